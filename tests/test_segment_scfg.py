"""Official S-CFG segmentation (algorithm.md §1.3) against naive twins, and §6 properties 8–10."""

import pytest
import torch

from goca_scfg.config import SCFGConfig
from goca_scfg.ops import resize_bilinear, scfg_blur_taps, smooth, to_grid
from goca_scfg.segment.scfg import (
    SCFGMapPair,
    foreground_mask,
    foreground_pair,
    scfg_segment,
    ssgc_refine,
    token_region_masks,
)

pytestmark = pytest.mark.rounding  # compares runs: .ci/run's portability job runs it again


def _stochastic(*shape, gen):
    return torch.softmax(torch.randn(*shape, generator=gen) * 3, dim=-1)


@pytest.mark.parametrize("seed", [0, 1])
def test_ssgc_official_equals_explicit_matrix_and_is_stochastic(seed):
    """§1.3 step 1 (§5.1): (S + 3S²)/4 · A, rows of S̃ and of S̃·A sum to 1 (§6.8)."""
    gen = torch.Generator().manual_seed(seed)
    s, a = _stochastic(2, 16, 16, gen=gen), _stochastic(2, 16, 7, gen=gen)
    s_tilde = (s + 3 * s @ s) / 4
    torch.testing.assert_close(s_tilde.sum(-1), torch.ones(2, 16))
    torch.testing.assert_close(ssgc_refine(s, a, "official"), s_tilde @ a)
    torch.testing.assert_close(ssgc_refine(s, a).sum(-1), torch.ones(2, 16))
    s2 = s @ s
    paper = (s + s2 + s2 @ s + s2 @ s2) / 4
    torch.testing.assert_close(ssgc_refine(s, a, "paper"), paper @ a)


def test_pair_sums_to_one_after_upsampling_and_smoothing():
    """§6.8: f₀ + f₁ = 1 per pixel after bilinear up + smoothing."""
    gen = torch.Generator().manual_seed(2)
    a = _stochastic(2, 16, 77, gen=gen)
    grid = smooth(resize_bilinear(to_grid(a, (4, 4)), (8, 8)), scfg_blur_taps())
    pair = foreground_pair(grid)
    torch.testing.assert_close(pair.sum(1), torch.ones(2, 8, 8))


def test_fg_closed_form_single_map():
    """§6.9: for one map, fg(p) = 1 ⇔ f₀(p) < mean(f₀)."""
    gen = torch.Generator().manual_seed(3)
    grid = smooth(to_grid(_stochastic(1, 64, 10, gen=gen), (8, 8)), scfg_blur_taps())
    pair = foreground_pair(grid)
    normed = pair / pair.mean(dim=(-2, -1), keepdim=True)
    f0 = grid[:, :1]
    assert torch.equal(foreground_mask(normed).bool(), f0 < f0.mean())


def test_region_masks_one_hot_and_all_tokens_eligible():
    """§6.10: one-hot without ties, and every one of the T channels (incl. 0 and pads) can win."""
    t = 77
    scores = torch.zeros(1, t, 1, t)
    for i in range(t):
        scores[0, i, 0, i] = 1.0
    masks = token_region_masks(scores)
    assert torch.equal(masks.sum(1), torch.ones(1, 1, t))
    assert torch.equal(masks[0].argmax(0)[0], torch.arange(t))
    ties = token_region_masks(torch.ones(1, 3, 2, 2))
    assert torch.equal(ties, torch.ones(1, 3, 2, 2))


def _reference_scfg(maps, mask_hw, latent_hw):
    """Line-by-line §1.5 pseudocode with the explicit (S + 3S²)/4 matrix and per-sample loops."""
    taps = scfg_blur_taps()
    b2 = maps[0].attn_self.shape[0]
    tok, fgp = [0] * b2, [0] * b2
    for m in maps:
        for i in range(b2):
            s, a = m.attn_self[i], m.attn_cross[i]
            a = ((s + 3 * s @ s) / 4) @ a
            g = to_grid(a[None], m.hw)
            g = torch.nn.functional.interpolate(g, size=mask_hw, mode="bilinear", align_corners=False)
            g = smooth(g, taps)
            tok[i] = tok[i] + g / (g.mean(dim=(-2, -1), keepdim=True) + 1e-8)
            pair = torch.cat([g[:, :1], g[:, 1:].sum(1, keepdim=True)], 1)
            fgp[i] = fgp[i] + pair / pair.mean(dim=(-2, -1), keepdim=True)
    b = b2 // 2
    masks, fgs = [], []
    for i in range(b):
        cond, unc = tok[b + i] / len(maps), fgp[i] / len(maps)
        masks.append((cond == cond.max(1, keepdim=True).values).float())
        fgs.append(1 - (unc[:, :1] == unc.max(1, keepdim=True).values).float())
    up = lambda x: torch.nn.functional.interpolate(torch.cat(x), size=latent_hw, mode="nearest")  # noqa: E731
    return up(masks), up(fgs)


@pytest.mark.parametrize("seed", [0, 1])
def test_scfg_segment_matches_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    maps = [SCFGMapPair(_stochastic(4, 16, 16, gen=gen), _stochastic(4, 16, 77, gen=gen), (4, 4)) for _ in range(5)]
    maps.append(SCFGMapPair(_stochastic(4, 4, 4, gen=gen), _stochastic(4, 4, 77, gen=gen), (2, 2)))
    masks, fg = scfg_segment(maps, (4, 4), (16, 16), SCFGConfig())
    ref_masks, ref_fg = _reference_scfg(maps, (4, 4), (16, 16))
    assert masks.shape == (2, 77, 16, 16) and fg.shape == (2, 1, 16, 16)
    assert (masks == ref_masks).float().mean() > 0.99  # argmax near-ties may flip (different summation order)
    assert (fg == ref_fg).float().mean() > 0.99
