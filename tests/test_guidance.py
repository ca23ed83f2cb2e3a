"""algorithm.md §6 properties 1–5 of the S-CFG rate and combination, on random tensors."""

import pytest
import torch

from goca_scfg.guidance import SCFGRate, clip_rate, combine_guidance, guidance_norm, rate_map, region_rate
from goca_scfg.ops import scfg_blur_taps, smooth


def _random_masks(b, t, h, w, gen):
    labels = torch.randint(0, t, (b, h, w), generator=gen)
    return torch.nn.functional.one_hot(labels, t).permute(0, 3, 1, 2).float()


def _reference_region_rate(norm, masks, fg, eps=1e-8):
    """Loop form of algorithm.md §1.4 steps 3–5."""
    b, t = masks.shape[:2]
    out = torch.zeros_like(norm)
    for i in range(b):
        n_fg = (norm[i, 0] * fg[i, 0]).sum() / (fg[i, 0].sum() + eps)
        for j in range(t):
            m = masks[i, j]
            if m.sum() == 0:
                continue
            n_t = (norm[i, 0] * m).sum() / (m.sum() + eps)
            out[i, 0] += n_fg / (n_t + eps) * m
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_region_rate_matches_loop_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    norm = torch.rand(2, 1, 8, 8, generator=gen)
    masks = _random_masks(2, 5, 8, 8, gen)
    fg = (torch.rand(2, 1, 8, 8, generator=gen) > 0.5).float()
    torch.testing.assert_close(region_rate(norm, masks, fg), _reference_region_rate(norm, masks, fg))


@pytest.mark.parametrize("w", [2.0, 7.5, 10.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_constant_norm_gives_plain_cfg(seed, w):
    """§6.1: ‖Δ‖ spatially constant and fg non-empty ⇒ rate ≡ 1 ⇒ ε_u + wΔ, for any masks (15/w >= 1)."""
    gen = torch.Generator().manual_seed(seed)
    eps_u = torch.randn(2, 4, 8, 8, generator=gen)
    direction = torch.randn(2, 4, 8, 8, generator=gen)
    delta = direction / guidance_norm(direction) * 0.7
    masks = _random_masks(2, 6, 8, 8, gen)
    fg = (torch.rand(2, 1, 8, 8, generator=gen) > 0.3).float()
    rate = rate_map(delta, masks, fg, w, SCFGRate())
    torch.testing.assert_close(rate, torch.ones_like(rate), atol=1e-5, rtol=0)
    out = combine_guidance(eps_u, eps_u + delta, w, rate)
    torch.testing.assert_close(out, eps_u + w * delta, atol=1e-5, rtol=1e-5)


def test_single_region_full_foreground_gives_cfg():
    """§6.2: one region covering the image and fg = everything ⇒ rate ≡ 1."""
    gen = torch.Generator().manual_seed(3)
    delta = torch.randn(1, 4, 8, 8, generator=gen)
    masks = torch.zeros(1, 4, 8, 8)
    masks[:, 2] = 1
    fg = torch.ones(1, 1, 8, 8)
    rate = rate_map(delta, masks, fg, 5.0, SCFGRate())
    torch.testing.assert_close(rate, torch.ones_like(rate), atol=1e-6, rtol=0)


def test_rate_one_is_bitwise_cfg():
    gen = torch.Generator().manual_seed(4)
    eps_u, eps_c = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    for dtype in (torch.float32, torch.float16):
        u, c = eps_u.to(dtype), eps_c.to(dtype)
        out = combine_guidance(u, c, 7.3, torch.ones(2, 1, 8, 8))
        assert torch.equal(out, u + 7.3 * (c - u))


@pytest.mark.parametrize("c", [0.01, 3.0, 250.0])
def test_rate_invariant_to_delta_scale(c):
    """§6.3: ratios of norms do not change when Δ is scaled."""
    gen = torch.Generator().manual_seed(5)
    delta = torch.randn(2, 4, 8, 8, generator=gen)
    masks = _random_masks(2, 4, 8, 8, gen)
    fg = (torch.rand(2, 1, 8, 8, generator=gen) > 0.5).float()
    r1 = rate_map(delta, masks, fg, 3.0, SCFGRate())
    r2 = rate_map(delta * c, masks, fg, 3.0, SCFGRate())
    torch.testing.assert_close(r1, r2, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("w", [1.5, 5.0, 7.5, 10.0, 20.0])
def test_rate_bounds(w):
    """§6.4: rate ∈ [min(0.8, 15/w), min(3, 15/w)] after clip and smoothing."""
    gen = torch.Generator().manual_seed(6)
    delta = torch.randn(3, 4, 12, 12, generator=gen) * torch.rand(3, 1, 12, 12, generator=gen) * 10
    masks = _random_masks(3, 7, 12, 12, gen)
    fg = (torch.rand(3, 1, 12, 12, generator=gen) > 0.7).float()
    rate = rate_map(delta, masks, fg, w, SCFGRate())
    lo, hi = min(0.8, 15 / w), min(3.0, 15 / w)
    assert rate.min() >= lo - 1e-6 and rate.max() <= hi + 1e-6
    raw = clip_rate(region_rate(guidance_norm(delta), masks, fg), w, SCFGRate())
    assert raw.min() >= lo - 1e-6 and raw.max() <= hi + 1e-6


def test_clip_order_clamp_then_cap():
    """§5.10: clamp to [0.8, 3] first, then the 15/w cap, which may go below 0.8."""
    rate = torch.tensor([0.1, 1.0, 5.0]).view(1, 1, 1, 3)
    assert clip_rate(rate, 30.0, SCFGRate()).flatten().tolist() == [0.5, 0.5, 0.5]
    assert clip_rate(rate, 7.5, SCFGRate()).flatten().tolist() == pytest.approx([0.8, 1.0, 2.0])


def test_kernel_taps_and_constant_smoothing():
    """§6.5: 3×3 taps [0.211942, 0.576117, 0.211942], sum 1; smoothing a constant returns it."""
    taps = scfg_blur_taps()
    torch.testing.assert_close(taps, torch.tensor([0.211942, 0.576117, 0.211942]), atol=1e-6, rtol=0)
    assert taps.sum().item() == pytest.approx(1.0)
    const = torch.full((1, 1, 6, 6), 1.7)
    torch.testing.assert_close(smooth(const, taps), const)
    point = torch.zeros(1, 1, 5, 5)
    point[..., 2, 2] = 1
    out = smooth(point, taps)[0, 0]
    assert out[2, 2].item() == pytest.approx(0.331911, abs=1e-6)
    assert out[1, 2].item() == pytest.approx(0.122103, abs=1e-6)
    assert out[1, 1].item() == pytest.approx(0.044919, abs=1e-6)


def test_a_rate_rule_is_a_class_and_unit_rate_is_plain_cfg():
    """A variant is a `RateRule` subclass: r ≡ 1 through the segmenting pipeline gives plain CFG bit for bit (same
    instance, same shapes), and S-CFG's default rule changes the image."""
    from dataclasses import dataclass

    from goca_scfg.guidance import RateRule
    from goca_scfg.testing import tiny_pipeline

    @dataclass(frozen=True)
    class UnitRate(RateRule):
        def __call__(self, delta, masks, fg, guidance_scale):
            return torch.ones_like(fg, dtype=torch.float32)

    pipe = tiny_pipeline()
    kw = dict(num_inference_steps=2, height=64, width=64, output_type="latent", guidance_scale=7.5)
    plain = pipe("a red dog", generator=torch.Generator().manual_seed(0), segmentor=None, **kw).images
    unit = pipe("a red dog", generator=torch.Generator().manual_seed(0), rate_rule=UnitRate(), **kw).images
    scfg = pipe("a red dog", generator=torch.Generator().manual_seed(0), rate_rule=SCFGRate(), **kw).images
    assert torch.equal(unit, plain) and not torch.equal(scfg, plain)
    assert UnitRate().describe() == {"rule": "UnitRate"} and SCFGRate().describe()["cap_numerator"] == 15.0
    with pytest.raises(TypeError, match="rate_rule must be a RateRule"):
        pipe("a red dog", rate_rule={"rate_min": 1.0}, **kw)
