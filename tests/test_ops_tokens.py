"""Shared helpers (blur, min–max, grids) and token classes (algorithm.md §6 items 5, 17, 20)."""

import pytest
import torch
from torchvision.transforms.functional import gaussian_blur

from goca_scfg.ops import gaussian_taps, grid_shape, minmax_per_token, smooth
from goca_scfg.testing import clip_tokenizer
from goca_scfg.tokens import caption_token_mask, clip_prompt_tokens, content_token_mask, live_ends, live_token_mask


def test_five_tap_blur_matches_torchvision():
    """§6.5: the 5-tap kernel and reflect padding are torchvision's gaussian_blur(k=5, σ=1.1)."""
    taps = gaussian_taps(5, 1.1)
    expected = torch.tensor([0.070766, 0.244460, 0.369546, 0.244460, 0.070766])
    torch.testing.assert_close(taps, expected, atol=1e-6, rtol=0)
    x = torch.rand(2, 3, 9, 11, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(smooth(x, taps), gaussian_blur(x, [5, 5], [1.1, 1.1]), atol=1e-6, rtol=0)


def test_minmax_ranges_and_constant_maps():
    """§6.17: every non-constant map spans exactly [0, 1]; a constant map gives 0, not NaN."""
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(1))
    x[1, 2] = 3.0
    out = minmax_per_token(x, 1e-12)
    flat = out.flatten(2)
    assert torch.isfinite(out).all()
    for b in range(2):
        for t in range(4):
            if (b, t) == (1, 2):
                assert flat[b, t].abs().max() == 0
            else:
                assert flat[b, t].min() == 0 and flat[b, t].max() == 1


@pytest.mark.parametrize(
    ("n", "latent", "hw"), [(256, (16, 16), (16, 16)), (12, (8, 6), (4, 3)), (2, (16, 8), (2, 1))]
)
def test_grid_shape(n, latent, hw):
    assert grid_shape(n, latent) == hw


def test_grid_shape_rejects_unknown_count():
    with pytest.raises(ValueError, match="match no power-of-two"):
        grid_shape(7, (16, 16))


def test_token_classes_from_real_tokenizer():
    """§6.20: J = {1..n}; index 0 and n+1.. are special; > 75 caption tokens are truncated to J = {1..75}."""
    tok = clip_tokenizer()
    prompts = ["a red dog, running.", "word " * 100, ""]
    ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    caption = caption_token_mask(ids, tok.eos_token_id)
    n0 = len(tok("a red dog, running.", add_special_tokens=False).input_ids)
    assert n0 == 6
    assert caption[0].nonzero().flatten().tolist() == list(range(1, n0 + 1))
    assert caption[1].nonzero().flatten().tolist() == list(range(1, 76))
    assert not caption[2].any()
    live = live_token_mask(caption)
    assert live[:, 0].all() and live[0].sum() == n0 + 1
    stop = torch.tensor(tok(["a", ",", "."], add_special_tokens=False).input_ids).flatten()
    content = content_token_mask(caption, torch.isin(ids, stop))
    words = tok.convert_ids_to_tokens(ids[0][content[0]].tolist())
    assert words == ["red</w>", "dog</w>", "running</w>"]
    only_stop = tok(["a ,"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    cap = caption_token_mask(only_stop, tok.eos_token_id)
    assert torch.equal(content_token_mask(cap, torch.isin(only_stop, stop)), cap)
    classes = clip_prompt_tokens(tok, prompts[:1], num_images_per_prompt=2)  # the pipeline's builder agrees
    assert torch.equal(classes.caption, caption[:1].repeat(2, 1)) and torch.equal(classes.live, live[:1].repeat(2, 1))
    assert tok.convert_ids_to_tokens(classes.ids[0][classes.content()[0]].tolist()) == words
    assert live_ends(classes.live).tolist() == [n0 + 1] * 2 and classes.global_index.tolist() == [0, 0]
