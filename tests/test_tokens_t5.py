"""T5 token classes (algorithm.md §8.3; GoCA utils_sigma.py L293-330, L410) on the real T5-style tokenizer."""

import pytest
import torch

from goca_scfg.testing import t5_tokenizer, tiny_pixart_pipeline
from goca_scfg.tokens import t5_prompt_tokens, t5_token_classes


@pytest.fixture(scope="module")
def tok():
    return t5_tokenizer()


def _reference(strings):
    """utils_sigma.py t5_tokenization + L321-327 + L410, literally, for one row."""
    refined = []
    for s in strings:
        refined.append("<insert>" if s == "▁" else "<eos>" if s == "</s>" else "<pad>" if s == "<pad>" else s)
    special, glob = ["<insert>", "<eos>", "<pad>"], ["<eos>"]
    rescale = [i for i, s in enumerate(refined) if s not in special]
    global_id = [i for i, s in enumerate(refined) if s in glob][-1]
    first_pad = rescale[-1] + 1
    return rescale, global_id, first_pad


def _check(tokens, row):
    rescale, global_id, first_pad = _reference(tokens.strings[row])
    assert torch.nonzero(tokens.caption[row]).flatten().tolist() == rescale
    assert int(tokens.global_index[row]) == global_id
    assert torch.nonzero(tokens.live[row]).flatten().tolist() == list(range(first_pad))


def test_short_caption(tok):
    t = t5_prompt_tokens(tok, ["a red dog on a green sofa"], max_sequence_length=16)
    assert t.strings[0][:9] == ["▁a", "▁red", "▁dog", "▁on", "▁a", "▁green", "▁sofa", "</s>", "<pad>"]
    _check(t, 0)
    assert t.caption[0].tolist() == [True] * 7 + [False] * 9  # rescaled: the seven pieces
    assert int(t.global_index[0]) == 7  # `</s>` is the global token ...
    assert t.live[0].tolist() == [True] * 7 + [False] * 9  # ... but zeroed in the region masks, as every pad
    assert t.stop[0].tolist()[:7] == [True, False, False, True, True, False, False]  # a, on, a


def test_caption_longer_than_max_sequence_length(tok):
    t = t5_prompt_tokens(tok, ["a dog " * 40], max_sequence_length=24)
    assert len(t.strings[0]) == 24 and t.strings[0][-1] == "</s>" and "<pad>" not in t.strings[0]
    _check(t, 0)
    assert int(t.global_index[0]) == 23 and t.live[0].sum() == 23


def test_bare_word_boundary_piece(tok):
    """A bare `▁` is outside the rescaling set but inside the caption stays live (it can win a region)."""
    t = t5_prompt_tokens(tok, ["x 3 cats", "a cat 3"], max_sequence_length=12)
    assert t.strings[0][:6] == ["▁", "x", "▁", "3", "▁cat", "s"]
    for row in range(2):
        _check(t, row)
    assert not t.caption[0, 0] and t.live[0, 0]  # leading bare piece: live, not rescaled
    assert t.strings[1][:4] == ["▁a", "▁cat", "▁", "3"] and not t.caption[1, 2] and t.live[1, 2]


def test_repeat_per_image_and_empty_caption(tok):
    t = t5_prompt_tokens(tok, ["a cat", ""], num_images_per_prompt=2, max_sequence_length=8)
    assert t.ids.shape == (4, 8) and torch.equal(t.ids[0], t.ids[1]) and torch.equal(t.ids[2], t.ids[3])
    assert t.strings[2][0] == "</s>" and not t.caption[2].any()
    assert t.live[2].tolist() == [True] + [False] * 7  # deviation: the authors' code raises IndexError here


def test_classes_need_the_end_token():
    with pytest.raises(ValueError, match="'</s>'"):
        t5_token_classes([["▁a", "▁cat"]], "</s>", "<pad>")


def test_pipeline_names_regions_by_the_encoded_text():
    """The tokens are those of the text the encoder sees: preprocessed (lower-cased here) and truncated at
    `max_sequence_length`."""
    pipe = tiny_pixart_pipeline()
    t = pipe.segmentation_tokens(["  A Red DOG  "], 2, clean_caption=False, max_sequence_length=10)
    ids = pipe.tokenizer("a red dog", padding="max_length", max_length=10, return_tensors="pt").input_ids
    assert torch.equal(t.ids, ids.repeat(2, 1))
    assert t.strings[0][:4] == ["▁a", "▁red", "▁dog", "</s>"]


def _train_unigram_vocab(size: int = 1000, captions: int = 3000) -> list[tuple[str, float]]:
    """The recipe of goca_scfg/data/t5_unigram_vocab.json: a `tokenizers` Unigram trained on the first `captions`
    COCO-30k captions, lower-cased as PixArt's pipeline does, T5's special pieces first."""
    import csv
    import json
    from pathlib import Path

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    path = Path(__file__).resolve().parents[1] / "eval" / "data" / "coco30k_captions.csv"
    with open(path, encoding="utf-8", newline="") as f:
        lines = [row[1].lower().strip() for row in list(csv.reader(f))[1 : captions + 1]]
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    tok.train_from_iterator(lines, trainers.UnigramTrainer(vocab_size=size, special_tokens=["<pad>", "</s>", "<unk>"],
                                                           unk_token="<unk>"))  # fmt: skip
    return [(p, float(s)) for p, s in json.loads(tok.to_str())["model"]["vocab"]]


def test_shipped_vocabulary_is_the_trained_one():
    """The shipped vocabulary has the pieces a fresh training gives (their order among near-ties and the last digits
    of their scores vary between trainings, which is why a fixed copy is shipped), `▁` among them."""
    from goca_scfg.testing import _t5_unigram_vocab

    shipped, trained = _t5_unigram_vocab(), _train_unigram_vocab()
    assert [p for p, _ in shipped[:3]] == ["<pad>", "</s>", "<unk>"] and len(shipped) == 1000
    assert {p for p, _ in shipped} == {p for p, _ in trained} and "▁" in {p for p, _ in shipped}
    scores = dict(trained)
    assert max(abs(s - scores[p]) for p, s in shipped) < 1e-3
