"""Which prompt positions are `<sos>`, caption tokens or end/padding (ALGORITHM §2.5, §6 item 20).

Works on token ids only (no tokenizer), so it serves any CLIP-style tokenizer: the caption is everything between
the first position and the first end-of-text id, which holds whether padding uses the EOS id (SD 1.x) or not.
"""

from __future__ import annotations

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
    """Caption positions J = {1, …, n} per prompt (ALGORITHM §2.5): after `<sos>`, before the first EOS.

    input_ids: (B, T) padded ids with `<sos>` at 0. Returns (B, T) bool. A caption truncated by the tokenizer
    (no EOS inside the window would be unusual, CLIP keeps one) still yields J = {1, …, T-2}.
    """
    b, t = input_ids.shape
    pos = torch.arange(t, device=input_ids.device).expand(b, t)
    is_eos = input_ids == eos_id
    first_eos = torch.where(is_eos.any(dim=1), is_eos.float().argmax(dim=1), torch.full((b,), t - 1))
    return (pos >= 1) & (pos < first_eos.unsqueeze(1).to(pos.device))


def content_token_mask(input_ids: Tensor, caption: Tensor, stop_ids: Tensor) -> Tensor:
    """Content positions for the paper's Eq. 11: caption tokens minus stop words and punctuation.

    caption: (B, T) bool from `caption_token_mask`; stop_ids: 1-D ids to exclude.
    Deviation: a prompt whose caption is only stop words falls back to all its caption tokens.
    """
    content = caption & ~torch.isin(input_ids, stop_ids.to(input_ids.device))
    empty = ~content.any(dim=1, keepdim=True)
    return torch.where(empty, caption, content)


def live_token_mask(caption: Tensor) -> Tensor:
    """Positions that compete in the GoCA argmax: `<sos>` plus the caption (pads t >= n+1 are out, §2.7)."""
    live = caption.clone()
    live[:, 0] = True
    return live
