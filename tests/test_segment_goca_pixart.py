"""GoCA's PixArt-Sigma steps (algorithm.md §8.3) against naive references written from the authors' formulas
(GoCA src-additional/generation-experiment/utils_sigma.py at 475892f)."""

from dataclasses import replace
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from goca_scfg.config import GoCAConfig
from goca_scfg.layout import ModelLayout
from goca_scfg.ops import attention_probs, gaussian_taps, smooth
from goca_scfg.segment.goca import (
    GOCA_PRESETS,
    PropagationInputs,
    global_token_into_uncond,
    goca_layers,
    goca_segment,
    propagate_upsampled_self_attention,
    relative_block,
    transformer_rule,
)
from goca_scfg.testing import tiny_pixart_components

pytestmark = pytest.mark.rounding  # compares runs: .ci/run's portability job runs it again

HEADS, DIM = 2, 8


def _qk(blocks, n, gen):
    return [torch.randn(1, n, HEADS * DIM, generator=gen) for _ in range(blocks)]


def _naive_upsampled_s(queries, keys, hw, big):
    """utils_sigma.py L359-384: head-mean self maps, keys resized bilinearly, queries by nearest, block mean."""
    out = []
    for q, k in zip(queries, keys):
        s = attention_probs(q, k, HEADS, DIM**-0.5, head_mean=True)[0].double()  # (n, n)
        s = s.reshape(*hw, *hw)
        s = F.interpolate(s, big, mode="bilinear").permute(2, 3, 0, 1)
        s = F.interpolate(s, big, mode="nearest").permute(2, 3, 0, 1)
        out.append(s)
    return torch.stack(out).mean(0).reshape(big[0] * big[1], big[0] * big[1])


def test_pixart_preset_is_recognised():
    layout = ModelLayout.of(tiny_pixart_components()["transformer"])
    layers = goca_layers(layout, GoCAConfig())
    blocks = [f"transformer_blocks.{i}" for i in range(10, 18)]
    assert [x.block for x in layers.cross] == blocks and all(x.kind == "cross" for x in layers.cross)
    assert [x.block for x in layers.propagation] == blocks and all(x.kind == "self" for x in layers.propagation)
    assert layers.dense.name == "transformer_blocks.13.attn2"
    assert (layers.order, layers.factor, layers.foreground) == (5, 1, "cond")
    assert goca_layers(layout, GoCAConfig(propagation_order=2)).order == 2


def test_global_token_into_uncond_equals_loop():
    gen = torch.Generator().manual_seed(0)
    agg = torch.rand(4, 6, 5, 7, generator=gen)  # B = 2
    glob = torch.tensor([4, 2])
    got = global_token_into_uncond(agg, glob)
    ref = agg.clone()
    for b in range(2):  # utils_sigma.py L329-330, per sample
        ref[b, 0] = agg[2 + b, int(glob[b])]
    assert torch.equal(got, ref)


def test_order5_propagation_over_8_upsampled_blocks_equals_explicit_matrix():
    gen = torch.Generator().manual_seed(1)
    hw, big, t = (4, 6), (8, 12), 5
    q, k = _qk(8, hw[0] * hw[1], gen), _qk(8, hw[0] * hw[1], gen)
    maps = torch.rand(1, t, *big, generator=gen)
    got = propagate_upsampled_self_attention(maps, q, k, [HEADS] * 8, [DIM**-0.5] * 8, 5, hw)
    s = _naive_upsampled_s(q, k, hw, big)
    x = maps[0].double().reshape(t, -1).t()
    for _ in range(5):  # utils_sigma.py L398-399
        x = s @ x
    torch.testing.assert_close(got[0].double(), x.t().reshape(t, *big), rtol=1e-5, atol=0)


def _naive_pixart_masks(g_pos, g_neg, s, rescale_ids, global_id, order):
    """utils_sigma.py L329-441 for B = 1 in float64 (aggregated maps (T, H, W) in, masks and fg out)."""
    taps = gaussian_taps(5, 1.1).double()

    def blur_minmax(x):  # torchvision gaussian_blur k=5 (reflect) then per-token min-max
        x = smooth(x[None], taps).double()[0]
        lo, hi = x.amin(dim=(1, 2), keepdim=True), x.amax(dim=(1, 2), keepdim=True)
        return (x - lo) / (hi - lo)

    g_neg = g_neg.clone()
    g_neg[0] = g_pos[global_id]
    pos = blur_minmax(g_pos / g_pos[rescale_ids].sum(0, keepdim=True))
    out = []
    for c in (pos, g_neg):
        t, h, w = c.shape
        x = c.reshape(t, -1).t()
        for _ in range(order):
            x = s @ x
        x = x.t().reshape(t, h, w)
        lo, hi = x.amin(dim=(1, 2), keepdim=True), x.amax(dim=(1, 2), keepdim=True)
        out.append((x - lo) / (hi - lo))
    pos, neg = out
    pos[rescale_ids[-1] + 1 :] = 0
    neg = blur_minmax(neg)
    masks = (pos == pos.amax(0, keepdim=True)).double()
    fore = torch.stack([neg[0], 1 - neg[0]])
    fg = 1 - (fore == fore.amax(0, keepdim=True)).double()[:1]
    return masks, fg


def _pixart_inputs(seed, t=7, hw=(4, 4), big=(8, 8)):
    """Peaked self-attention (q = k, large): S^5 keeps structure, so min–max has no near-ties to flip."""
    gen = torch.Generator().manual_seed(seed)
    q = [3 * x for x in _qk(8, hw[0] * hw[1], gen)]
    k = q
    agg = torch.rand(2, t, *big, generator=gen)
    agg = agg / agg.sum(1, keepdim=True)  # G: token-normalised, both halves
    prop = PropagationInputs(q, k, [HEADS] * 8, [DIM**-0.5] * 8, order=5)
    return agg, prop, _naive_upsampled_s(q, k, hw, big)


def test_pixart_segment_equals_authors_formulas():
    """Bare `▁` at 0 (live, not rescaled), caption 1-3, `</s>` at 4, pads 5-6."""
    agg, prop, s = _pixart_inputs(2)
    caption = torch.tensor([[False, True, True, True, False, False, False]])
    live = torch.tensor([[True, True, True, True, False, False, False]])
    swapped = global_token_into_uncond(agg, torch.tensor([4]))
    masks, fg = goca_segment(swapped, prop, caption, live, GoCAConfig())
    ref_masks, ref_fg = _naive_pixart_masks(agg[1].double(), agg[0].double(), s, [1, 2, 3], 4, 5)
    assert torch.equal(masks[0].double(), ref_masks)
    assert torch.equal(fg[0].double(), ref_fg)
    assert 0 < fg.mean() < 1 and masks[0, 4:].sum() == 0


def test_batch_of_two_equals_single_samples():
    """Global index, pad zeroing and propagation are per sample: a batch of 2 equals the two B = 1 results."""
    (a0, p0, _), (a1, p1, _) = _pixart_inputs(6), _pixart_inputs(7)
    caption = torch.tensor([[False, True, True, True] + [False] * 3, [True, True] + [False] * 5])
    live = torch.tensor([[True] * 4 + [False] * 3, [True, True] + [False] * 5])  # bare ▁ at 0 in the first
    glob = torch.tensor([4, 3])
    agg = torch.cat([a0[:1], a1[:1], a0[1:], a1[1:]])
    prop = PropagationInputs(
        [torch.cat([x, y]) for x, y in zip(p0.queries, p1.queries)],
        [torch.cat([x, y]) for x, y in zip(p0.keys, p1.keys)],
        p0.heads, p0.scales, order=5,
    )  # fmt: skip
    masks, fg = goca_segment(global_token_into_uncond(agg, glob), prop, caption, live, GoCAConfig())
    for b, (a, p) in enumerate([(a0, p0), (a1, p1)]):
        m1, f1 = goca_segment(
            global_token_into_uncond(a, glob[b : b + 1]), p, caption[b : b + 1], live[b : b + 1], GoCAConfig()
        )
        assert torch.equal(masks[b : b + 1], m1) and torch.equal(fg[b : b + 1], f1)


def test_foreground_comes_from_the_cond_branch():
    agg, prop, _ = _pixart_inputs(3)
    caption = torch.tensor([[True, True, True, False, False, False, False]])
    live = caption.clone()
    other = agg.clone()
    other[0] = torch.rand(other[0].shape, generator=torch.Generator().manual_seed(9))  # a different uncond half
    glob = torch.tensor([3])
    runs = [goca_segment(global_token_into_uncond(a, glob), prop, caption, live, GoCAConfig()) for a in (agg, other)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_flat_token_map_gives_no_nan():
    """A token map that is flat (0/0 = NaN in the authors' fp16 store) gives finite masks and foreground here."""
    agg, prop, _ = _pixart_inputs(4)
    agg[:, 2] = 0.2  # flat caption-token map in both halves
    agg[1, 3] = agg[1, 3, 0, 0]  # flat global token: the foreground source
    caption = torch.tensor([[True, True, True, False, False, False, False]])
    masks, fg = goca_segment(global_token_into_uncond(agg, torch.tensor([3])), prop, caption, caption, GoCAConfig())
    assert torch.isfinite(masks).all() and torch.isfinite(fg).all()
    assert (masks.sum(1) >= 1).all()  # every pixel belongs to a region


def test_key_mask_equals_diffusers_bias():
    """Cross maps leave out the keys the encoder attention mask drops, as the forward pass does (-10000 bias)."""
    gen = torch.Generator().manual_seed(5)
    q, k = torch.randn(2, 6, 16, generator=gen), torch.randn(2, 9, 16, generator=gen)
    mask = torch.tensor([[1] * 3 + [0] * 6, [1] * 7 + [0] * 2])
    got = attention_probs(q, k, 2, 0.25, key_mask=mask)
    qh, kh = q.view(2, 6, 2, 8).transpose(1, 2), k.view(2, 9, 2, 8).transpose(1, 2)
    bias = ((1 - mask.float()) * -10000.0)[:, None, None, :]
    torch.testing.assert_close(got, torch.softmax(qh @ kh.transpose(-1, -2) * 0.25 + bias, dim=-1), rtol=0, atol=1e-7)
    assert (got[0, ..., 3:] == 0).all() and (got[1, ..., 7:] == 0).all()


def _pixart_layout(blocks: int) -> ModelLayout:
    from diffusers import PixArtTransformer2DModel

    with torch.device("meta"):
        model = PixArtTransformer2DModel(
            num_attention_heads=2, attention_head_dim=8, num_layers=blocks, cross_attention_dim=16,
            caption_channels=16, sample_size=8,
        )  # fmt: skip
    return ModelLayout.of(model)


def _blocks(layers):
    return [x.block for x in layers]


def test_relative_block_moves_the_authors_positions():
    """algorithm.md §8.4: round(i·(L − 1)/27), halves up; the ends stay the ends and L = 28 is the identity."""
    assert [relative_block(i, 28) for i in range(28)] == list(range(28))
    for depth in range(1, 60):
        got = [relative_block(i, depth) for i in range(28)]
        assert got[0] == 0 and got[27] == depth - 1 and got == sorted(got)
        assert got == [int(Fraction(i * (depth - 1), 27) + Fraction(1, 2)) for i in range(28)]  # exact reference
    assert [relative_block(i, 2) for i in (10, 13, 17)] == [0, 0, 1]  # 0.37, 0.48, 0.63 of one step
    assert relative_block(27, 55) == 54 and relative_block(1, 55) == 2  # 2.0 exactly; 1·54/27 = 2


def test_transformer_rule_at_pixart_depth_is_the_preset():
    """The rule is the preset moved (algorithm.md §8.4): at PixArt-Sigma's 28 blocks it gives the preset exactly."""
    layout = _pixart_layout(28)
    preset = next(p for match, p in GOCA_PRESETS if match(layout))
    assert replace(transformer_rule(layout), name=preset.name) == preset


@pytest.mark.parametrize(
    ("blocks", "dense", "band"), [(1, 0, (0, 0)), (2, 0, (0, 1)), (3, 1, (1, 1)), (4, 1, (1, 2)), (12, 5, (4, 7))]
)
def test_other_transformers_fall_back_to_the_rule(blocks, dense, band):
    layout = _pixart_layout(blocks)
    expected = [f"transformer_blocks.{i}" for i in range(band[0], band[1] + 1)]
    for config in (GoCAConfig(), GoCAConfig.vanilla()):
        layers = goca_layers(layout, config)
        assert _blocks(layers.cross) == expected and all(x.kind == "cross" for x in layers.cross)
        assert _blocks(layers.propagation) == expected and all(x.kind == "self" for x in layers.propagation)
        assert layers.dense.name == f"transformer_blocks.{dense}.attn2"
        assert (layers.order, layers.factor, layers.foreground) == (5, 1, "cond")
        assert layers.describe().startswith(f"rule for a {blocks}-block transformer (algorithm.md §8.4): cross ")
    last = f"transformer_blocks.{blocks - 1}"
    layers = goca_layers(layout, GoCAConfig(dense_layer=last, self_layers=(last,), propagation_order=2))
    assert layers.dense.block == last and _blocks(layers.propagation) == [last] and layers.order == 2  # config wins
    assert _blocks(layers.cross) == expected and layers.configured == {"dense", "propagation", "order"}


def test_describe_names_the_rule_and_the_config_parts():
    assert goca_layers(_pixart_layout(2), GoCAConfig()).describe() == (
        "rule for a 2-block transformer (algorithm.md §8.4): cross all 2; dense transformer_blocks.0; propagation "
        "transformer_blocks.0-1, order 5; segmentation at latent/1; foreground from the cond global token"
    )
    layout = _pixart_layout(28)
    assert goca_layers(layout, GoCAConfig()).describe() == (
        "preset pixart-sigma: cross transformer_blocks.10-17 (8 of 28); dense transformer_blocks.13; propagation "
        "transformer_blocks.10-17, order 5; segmentation at latent/1; foreground from the cond global token"
    )
    config = GoCAConfig(cross_layers=("transformer_blocks.3", "transformer_blocks.5"), propagation_order=0)
    assert goca_layers(layout, config).describe() == (
        "preset pixart-sigma: cross transformer_blocks.3, transformer_blocks.5 (2 of 28) (config); dense "
        "transformer_blocks.13; no propagation (config); segmentation at latent/1; foreground from the cond global "
        "token"
    )


@torch.no_grad()
def test_segmentor_equals_the_chain_over_both_halves():
    """`GoCASegmentor` aggregates only the cond half for PixArt (the uncond maps are never read); it equals the pure
    functions run on both CFG halves of a real tiny PixArt-Sigma call, with the encoder attention mask.

    Up to rounding: the chain's matmuls run at batch 4, the segmentor's at batch 2 (BLAS blocking, and on some CPUs
    buffer alignment, differ), so the model is sharpened (labels that rounding cannot flip), soft masks within 1e-4
    and the foreground on >= 99.9 % of pixels (2 of 2048 may flip)."""
    from goca_scfg.capture import capture_attention
    from goca_scfg.ops import grid_shape, split_cfg
    from goca_scfg.segment.goca import (
        CrossLayerInputs,
        goca_aggregate,
        goca_head_aggregate,
        goca_layer_weights,
    )
    from goca_scfg.testing import sharpened, tiny_pixart_pipeline

    pipe = tiny_pixart_pipeline()
    sharpened(pipe.components)
    prompts = ["a red dog on a green sofa", "two cats, sleeping."]
    emb, mask, neg, neg_mask = pipe.encode_prompt(prompts, device="cpu", max_sequence_length=40)
    emb, mask = torch.cat([neg, emb]), torch.cat([neg_mask, mask])
    guide = pipe.spatial_guidance("goca", prompts, 256, 256, key_mask=mask, token_options={"max_sequence_length": 40})
    seg, cfg = guide.segmentor, GoCAConfig()
    x = torch.randn(4, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    with capture_attention(pipe.transformer, guide.requests) as rec:  # raw fields: no in-forward reductions
        pipe.transformer(
            x, encoder_hidden_states=emb, encoder_attention_mask=mask, timestep=torch.tensor([500] * 4),
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        )  # fmt: skip
        masks, fg = seg.segment(0, rec)
        inputs = []
        for layer in seg.layers.cross:
            c, s = rec[layer.name], rec[layer.name.replace("attn2", "attn1")]
            a = goca_head_aggregate(c.probs(key_mask=mask), c.o, c.w_out, cfg)
            inputs.append(
                CrossLayerInputs(a, (16, 16), self_q=s.q, self_k=s.k, self_heads=s.heads, self_scale=s.scale)
            )
        dense = rec["transformer_blocks.13.attn2"].q
        agg = goca_aggregate(inputs, goca_layer_weights(inputs, dense, grid_shape(256, (32, 32)), cfg), (32, 32), cfg)
        agg = global_token_into_uncond(agg, seg.global_index)
        prop = [rec[x.name] for x in seg.layers.propagation]
        propagation = PropagationInputs(
            [split_cfg(r.q)[1] for r in prop], [split_cfg(r.k)[1] for r in prop], [r.heads for r in prop],
            [r.scale for r in prop], order=5,
        )  # fmt: skip
        ref_masks, ref_fg = goca_segment(agg, propagation, seg.rescale_tokens, seg.live_tokens, cfg)
    assert masks.shape == (2, 40, 32, 32)
    torch.testing.assert_close(masks, ref_masks, atol=1e-4, rtol=0)
    assert (masks.argmax(1) == ref_masks.argmax(1)).float().mean() >= 0.999
    assert (fg == ref_fg).float().mean() >= 0.999
