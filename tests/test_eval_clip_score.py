"""CLIP score (eval/clip_score.py): ×100 cosine on constructed features, and the batched open_clip path against a
direct one-image-at-a-time computation with an unpretrained ViT-B-32 (no weights offline)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from eval.clip_score import CLIPSpec, _quick_gelu, clip_scores, clip_scores_from_features, load_clip


@pytest.fixture(scope="module")
def clip():
    return load_clip(CLIPSpec(pretrained=None))


def test_scores_are_100_times_the_cosine():
    image = torch.tensor([[1.0, 0.0], [1.0, 1.0], [3.0, 4.0], [1.0, 0.0]])
    text = torch.tensor([[2.0, 0.0], [1.0, 0.0], [3.0, 4.0], [-1.0, 0.0]])
    expected = [100.0, 100 / math.sqrt(2), 100.0, -100.0]  # no clipping at 0, no 2.5 factor
    np.testing.assert_allclose(clip_scores_from_features(image, text).numpy(), expected, rtol=1e-6)


def _reference_clip_score(clip, path, caption: str) -> float:
    """One image, one caption: 100 · cos(encode_image, encode_text), straight from open_clip."""
    with torch.no_grad():
        image = clip.model.encode_image(clip.preprocess(Image.open(path).convert("RGB"))[None])[0]
        text = clip.model.encode_text(clip.tokenizer([caption]))[0]
    return 100.0 * float(torch.dot(image, text) / (image.norm() * text.norm()))


def test_batched_scores_match_the_direct_computation(clip, tmp_path):
    rng = np.random.default_rng(0)
    paths, captions = [], ["a red car", "two dogs on a beach", "a bowl of fruit"]
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(paths[-1])
    scores = clip_scores(clip, paths, captions, batch_size=2)
    expected = [_reference_clip_score(clip, p, c) for p, c in zip(paths, captions)]
    np.testing.assert_allclose(scores, expected, atol=1e-3)  # batch 2 vs 1 changes fp32 summation order (~1e-6)
    assert scores.shape == (3,)


def test_random_weights_are_reproducible_and_leave_the_global_rng_alone(clip):
    state = torch.random.get_rng_state()
    again = load_clip(CLIPSpec(pretrained=None))
    assert torch.equal(torch.random.get_rng_state(), state)
    for a, b in zip(clip.model.parameters(), again.model.parameters()):
        assert torch.equal(a, b)


def test_openai_weights_get_quick_gelu():
    assert _quick_gelu(CLIPSpec("ViT-B-32", "openai")) is True
    assert _quick_gelu(CLIPSpec("ViT-B-32", None)) is False
    assert CLIPSpec().name == "ViT-B-32/openai"


def test_errors(clip, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        load_clip(CLIPSpec(weights=str(tmp_path / "nowhere.pt")))
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        clip_scores(clip, ["a.png", "b.png"], ["x"])
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"cannot read image .*bad\.png"):
        clip_scores(clip, [tmp_path / "bad.png"], ["x"])
