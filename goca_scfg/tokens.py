"""Which prompt positions are `<sos>`, caption tokens or end/padding (algorithm.md §2.5, §6 item 20).

Works on token ids only (no tokenizer), so it serves any CLIP-style tokenizer: the caption is everything between
the first position and the first end-of-text id, which holds whether padding uses the EOS id (SD 1.x) or not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# Stop words and punctuation left out of the paper's Eq. 11 rescaling (`tokens="content"`). The released
# segmentation code drops {a, an, the, and, ',', '.', '-'} from GPT entities (GoCA src-main/captioner.py L324, L337);
# we use that list plus common function words.
STOP_WORDS: tuple[str, ...] = (
    "a", "an", "the", "and", "or", "of", "in", "on", "at", "to", "with", "by", "for", "from", "is", "are", "it",
    "its", "this", "that", "there", "some", "while", "near", "next", "into", "onto", "as", "be", "has", "have",
    ",", ".", "-", "!", "?", ";", ":", "'", '"', "(", ")",
)  # fmt: skip


def caption_token_mask(input_ids: Tensor, eos_id: int) -> Tensor:
    """Caption positions J = {1, …, n} per prompt (algorithm.md §2.5): after `<sos>`, before the first EOS.

    input_ids: (B, T) padded ids with `<sos>` at 0. Returns (B, T) bool. A caption truncated by the tokenizer
    (no EOS inside the window would be unusual, CLIP keeps one) still yields J = {1, …, T-2}.
    """
    b, t = input_ids.shape
    pos = torch.arange(t, device=input_ids.device).expand(b, t)
    is_eos = input_ids == eos_id
    first_eos = torch.where(is_eos.any(dim=1), is_eos.float().argmax(dim=1), torch.full((b,), t - 1))
    return (pos >= 1) & (pos < first_eos.unsqueeze(1).to(pos.device))


def content_token_mask(caption: Tensor, stop: Tensor) -> Tensor:
    """Content positions for the paper's Eq. 11: caption tokens minus stop words and punctuation.

    caption: (B, T) bool from `caption_token_mask`; stop: (B, T) bool, the stop-word positions.
    Deviation: a prompt whose caption is only stop words falls back to all its caption tokens.
    """
    content = caption & ~stop
    empty = ~content.any(dim=1, keepdim=True)
    return torch.where(empty, caption, content)


def live_ends(live: Tensor) -> Tensor:
    """(B,) one past each row's last live position: later channels are zero in every mask (exact pruning, §2.7)."""
    pos = torch.arange(live.shape[1], device=live.device)
    return (pos * live).amax(dim=1) + 1


def live_token_mask(caption: Tensor) -> Tensor:
    """Positions that compete in the GoCA argmax: `<sos>` plus the caption (pads t >= n+1 are out, §2.7)."""
    live = caption.clone()
    live[:, 0] = True
    return live


@dataclass(frozen=True)
class PromptTokens:
    """Token classes of the cond prompts of one call, one row per generated image (algorithm.md §2.5, §2.7).

    ids: (B, T) padded ids as the text encoder saw them; strings: the T token strings per row (to name regions);
    caption: (B, T) bool, the caption positions J; stop: (B, T) bool, stop words and punctuation inside J (for
    the paper's content-token variant); live: (B, T) bool, positions that may win a region (the global token and
    the caption; pads and end tokens are out); global_index: (B,) long, the position of the global token whose
    uncond map gives the foreground (`<sos>` = 0 for CLIP).
    """

    ids: Tensor
    strings: list[list[str]]
    caption: Tensor
    stop: Tensor
    live: Tensor
    global_index: Tensor

    def content(self) -> Tensor:
        """The caption minus stop words (paper Eq. 11), all of the caption where that would leave nothing."""
        return content_token_mask(self.caption, self.stop)


def clip_prompt_tokens(tokenizer, prompts: list[str], num_images_per_prompt: int = 1) -> PromptTokens:
    """`PromptTokens` of CLIP-tokenized prompts (padded to the tokenizer's length, truncated as the encoder does)."""
    ids = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.repeat_interleave(num_images_per_prompt, dim=0)
    caption = caption_token_mask(ids, tokenizer.eos_token_id)
    words = tokenizer(list(STOP_WORDS), add_special_tokens=False).input_ids
    stop_ids = torch.tensor(sorted({i for w in words for i in w}), dtype=torch.long)
    return PromptTokens(
        ids=ids,
        strings=[tokenizer.convert_ids_to_tokens(row.tolist()) for row in ids],
        caption=caption,
        stop=caption & torch.isin(ids, stop_ids),
        live=live_token_mask(caption),
        global_index=torch.zeros(ids.shape[0], dtype=torch.long),
    )


# T5 pieces that are not caption tokens (GoCA utils_sigma.py L293-308): the bare word-boundary piece, end, padding.
T5_BARE_PIECE = "▁"


def t5_token_classes(strings: list[list[str]], eos: str, pad: str) -> tuple[Tensor, Tensor, Tensor]:
    """(caption, live, global_index) of T5 token strings (algorithm.md §8.3; GoCA utils_sigma.py L293-330, L410).

    caption J: every position that is not `</s>`, `<pad>` or the bare `▁` piece (the rescaling set, L321-325);
    global: the (last) `</s>` (L326-327); live: positions 0 … last caption position, which includes bare `▁` pieces
    inside the caption but not `</s>` (every later channel is zeroed, L410-411). Deviation: a prompt without caption
    tokens (the authors' code raises IndexError at L410) keeps only its global token live.
    """
    special = torch.tensor([[s in (eos, pad, T5_BARE_PIECE) for s in row] for row in strings])
    caption = ~special
    is_eos = torch.tensor([[s == eos for s in row] for row in strings])
    pos = torch.arange(caption.shape[1]).expand_as(caption)
    if not is_eos.any(dim=1).all():
        raise ValueError("every T5-tokenized prompt needs its '</s>' (tokenize with add_special_tokens=True)")
    global_index = torch.where(is_eos, pos, -1).amax(dim=1)
    last = torch.where(caption, pos, -1).amax(dim=1, keepdim=True)
    live = pos <= last  # nothing for a prompt without caption tokens (last = -1) ...
    empty = last[:, 0] < 0
    live[empty, global_index[empty]] = True  # ... but its global token
    return caption, live, global_index


def t5_prompt_tokens(
    tokenizer, texts: list[str], num_images_per_prompt: int = 1, max_sequence_length: int = 300
) -> PromptTokens:
    """`PromptTokens` of T5-tokenized texts as PixArt's `encode_prompt` tokenizes them (already preprocessed;
    padded to and truncated at `max_sequence_length`, `</s>` appended). Stop words: caption pieces whose text
    (without `▁`) is in `STOP_WORDS`."""
    ids = tokenizer(
        texts, padding="max_length", max_length=max_sequence_length, truncation=True, add_special_tokens=True,
        return_tensors="pt",
    ).input_ids.repeat_interleave(num_images_per_prompt, dim=0)  # fmt: skip
    strings = [tokenizer.convert_ids_to_tokens(row.tolist()) for row in ids]
    caption, live, global_index = t5_token_classes(strings, tokenizer.eos_token, tokenizer.pad_token)
    stop = torch.tensor([[s.replace(T5_BARE_PIECE, "") in STOP_WORDS for s in row] for row in strings]) & caption
    return PromptTokens(ids, strings, caption, stop, live, global_index)
