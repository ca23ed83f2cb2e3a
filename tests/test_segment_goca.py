"""GoCA segmentation (algorithm.md §2): fast paths against naive references and §6 properties 11–21."""

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from goca_scfg.config import GoCAConfig
from goca_scfg.ops import attention_probs, minmax_per_token, resize_bilinear, resize_nearest
from goca_scfg.segment.goca import (
    CrossLayerInputs,
    PropagationInputs,
    aggregate_heads,
    aggregate_layers,
    even_query_rows,
    foreground_from_sos,
    goca_aggregate,
    goca_head_aggregate,
    goca_layer_weights,
    goca_region_masks,
    goca_segment,
    head_weights_dot_product,
    layer_similarity,
    layer_weights_similarity,
    propagate_self_attention,
    pseudo_self_attention,
    rescale_sum_one,
    resize_self_map,
)

pytestmark = pytest.mark.rounding  # compares runs: .ci/run's portability job runs it again


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _reference_head_weights(o, w_out, heads):
    """§2.3 as written: u_h = o_h·W_h with an explicit (H, N, C) stack, c_h = ⟨u_h, s⟩, w = c / Σc."""
    d = o.shape[-1] // heads
    u = torch.stack([o[..., h * d : (h + 1) * d] @ w_out[:, h * d : (h + 1) * d].t() for h in range(heads)], 1)
    s = u.sum(1)
    c = (u * s.unsqueeze(1)).sum(-1)
    return c / c.sum(1, keepdim=True), u, s


@pytest.mark.parametrize("seed", [0, 1])
def test_head_weights_match_reference_and_sum_to_one(seed):
    """§6.11–12: Σ_h u_h = o·W_oᵀ; weights sum to 1; equal to the explicit stack."""
    g = _gen(seed)
    o, w = torch.randn(2, 64, 32, generator=g), torch.randn(24, 32, generator=g)
    ref, u, s = _reference_head_weights(o, w, 4)
    torch.testing.assert_close(s, o @ w.t(), atol=1e-4, rtol=1e-4)
    got = head_weights_dot_product(o, w, 4, 1e-12)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.sum(1), torch.ones(2, 64), atol=1e-5, rtol=0)


def test_identical_heads_weigh_one_over_h():
    """§6.12: identical heads (same outputs, same W_o blocks) get 1/8 each."""
    g = _gen(2)
    o1, w1 = torch.randn(1, 16, 5, generator=g), torch.randn(40, 5, generator=g)
    o, w = o1.repeat(1, 1, 8), w1.repeat(1, 8)
    torch.testing.assert_close(head_weights_dot_product(o, w, 8, 1e-12), torch.full((1, 8, 16), 1 / 8))


def test_head_permutation_invariance():
    """§6.12: permuting heads with W_o's column blocks and the probs leaves the aggregated map unchanged."""
    g = _gen(3)
    heads, d = 4, 6
    o, w = torch.randn(2, 20, heads * d, generator=g), torch.randn(heads * d, heads * d, generator=g)
    probs = torch.softmax(torch.randn(2, heads, 20, 9, generator=g), -1)
    perm = torch.tensor([2, 0, 3, 1])
    cols = torch.cat([torch.arange(p * d, (p + 1) * d) for p in perm.tolist()])
    a = aggregate_heads(probs, head_weights_dot_product(o, w, heads, 1e-12))
    b = aggregate_heads(probs[:, perm], head_weights_dot_product(o[..., cols], w[:, cols], heads, 1e-12))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 20), atol=1e-5, rtol=0)  # §6.13, negative weights allowed


@pytest.mark.parametrize(("hw", "dense"), [((8, 8), (4, 4)), ((4, 4), (4, 4)), ((2, 2), (4, 4)), ((1, 1), (4, 4))])
def test_layer_similarity_equals_full_4d_resize(hw, dense):
    """§6.21 a/c: even rows + 2×2 pooling (and every other grid) equal the full-map 4-D resize similarity."""
    g = _gen(4)
    n, nd = hw[0] * hw[1], dense[0] * dense[1]
    q, k = torch.randn(2, n, 12, generator=g), torch.randn(2, n, 12, generator=g)
    feat = torch.randn(2, nd, 10, generator=g)
    pseudo = pseudo_self_attention(feat)
    ref_p = torch.softmax(feat @ feat.transpose(1, 2) / 10**0.5, -1)
    torch.testing.assert_close(pseudo, ref_p)
    full = attention_probs(q, k, 3, 0.5, head_mean=True)
    ref = (ref_p * resize_self_map(full, hw, dense)).sum((1, 2))
    torch.testing.assert_close(layer_similarity(pseudo, q, k, 3, 0.5, hw, dense), ref, atol=1e-5, rtol=1e-5)
    if hw == (8, 8):  # the record may hold only the even query rows
        even = even_query_rows(q, hw)
        assert torch.equal(
            layer_similarity(pseudo, even, k, 3, 0.5, hw, dense), layer_similarity(pseudo, q, k, 3, 0.5, hw, dense)
        )
    else:  # or, for other grids, the head-mean map (the dense grid itself is chunked from q/k: equal up to rounding)
        torch.testing.assert_close(
            layer_similarity(pseudo, None, None, 3, 0.5, hw, dense, self_map=full),
            layer_similarity(pseudo, q, k, 3, 0.5, hw, dense),
        )


def test_resize_self_map_is_keys_bilinear_queries_nearest():
    """§2.4 step 3 written as F.interpolate on the (h, w, h, w) view, one dimension pair at a time."""
    g = _gen(5)
    t = torch.softmax(torch.randn(1, 64, 64, generator=g), -1)
    view = t.view(8, 8, 8, 8)
    keys = resize_bilinear(view.reshape(64, 1, 8, 8), (4, 4)).reshape(8, 8, 16)
    queries = resize_nearest(keys.permute(2, 0, 1)[None], (4, 4))[0].reshape(16, 16).t()
    torch.testing.assert_close(resize_self_map(t, (8, 8), (4, 4))[0], queries)
    even = t.view(8, 8, 64)[::2, ::2].reshape(16, 8, 8)
    pooled = torch.nn.functional.avg_pool2d(even[:, None], 2).reshape(16, 16)
    torch.testing.assert_close(queries, pooled)


def test_layer_weights_nonnegative_sum_one_and_vanilla():
    """§6.14: weights ≥ 0, sum 1; 'average' gives exactly 1/L."""
    sims = torch.tensor([[0.5, -1.0, 1.5, 0.0], [2.0, 2.0, 0.0, 0.0]])
    w = layer_weights_similarity(sims, 1e-12)
    assert (w >= 0).all()
    torch.testing.assert_close(w, torch.tensor([[0.25, 0.0, 0.75, 0.0], [0.5, 0.5, 0.0, 0.0]]))
    cfg = GoCAConfig.vanilla()
    layers = [_layer(_gen(i), (4, 4)).inputs(cfg) for i in range(3)]
    vanilla = goca_layer_weights(layers, None, (0, 0), cfg)
    assert torch.equal(vanilla, torch.full((4, 3), 1 / 3))


def test_aggregate_nonnegative_and_sums_to_one():
    """§6.13/15: bilinear resizing keeps the token sum; G ≥ 0 and sums to 1 over tokens."""
    g = _gen(6)
    maps = [torch.softmax(torch.randn(2, 9, s, s, generator=g), 1) for s in (2, 4, 8)]
    torch.testing.assert_close(resize_bilinear(maps[0], (8, 8)).sum(1), torch.ones(2, 8, 8))
    signed = [m - 0.05 for m in maps]
    agg = aggregate_layers(signed, torch.tensor([[0.2, 0.3, 0.5]] * 2), (8, 8), 1e-12)
    assert (agg >= 0).all()
    torch.testing.assert_close(agg.sum(1), torch.ones(2, 8, 8))


def test_rescale_sum_one_over_caption_tokens():
    """§6.16: Σ_{j∈J} R(p, j) = 1 at every pixel."""
    g = _gen(7)
    agg = torch.softmax(torch.randn(2, 10, 5, 5, generator=g), 1)
    caption = torch.zeros(2, 10, dtype=torch.bool)
    caption[0, 1:4] = True
    caption[1, 1:8] = True
    r = rescale_sum_one(agg, caption, 1e-12)
    for b in range(2):
        torch.testing.assert_close(r[b, caption[b]].sum(0), torch.ones(5, 5))


@pytest.mark.parametrize("layers_n", [1, 3])
def test_propagation_equals_explicit_matrix_power(layers_n):
    """§6.21 b: fused S·X (maps as values) equals (mean_l mean_h softmax)² · X."""
    g = _gen(8)
    b, hw, heads, c, t = 2, (4, 4), 2, 8, 5
    qs = [torch.randn(b, 16, c, generator=g) for _ in range(layers_n)]
    ks = [torch.randn(b, 16, c, generator=g) for _ in range(layers_n)]
    x = torch.rand(b, t, *hw, generator=g)
    s = sum(attention_probs(q, k, heads, 0.4, head_mean=True) for q, k in zip(qs, ks)) / layers_n
    ref = (s @ s @ x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, t, *hw)
    got = propagate_self_attention(x, qs, ks, [heads] * layers_n, [0.4] * layers_n, 2)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_pads_never_win_and_sos_can_win():
    """§6.18: pads (t >= n+1) never win unless every live token is 0 at that pixel; `<sos>` competes."""
    pos = torch.zeros(1, 6, 2, 2)
    pos[0, 5] = 1.0  # a pad with the largest value everywhere
    pos[0, 0, 0, 0] = 0.9  # <sos> wins here
    pos[0, 2, 0, 1] = 0.5
    pos[0, 1, 1, 0] = 0.2
    live = torch.tensor([[True, True, True, False, False, False]])
    masks = goca_region_masks(pos, live)
    labels = masks.argmax(1)[0]
    assert labels[0, 0] == 0 and labels[0, 1] == 2 and labels[1, 0] == 1
    assert masks[0, 5].sum() == 0 or masks[0, :3, 1, 1].sum() == 3  # pixel (1,1): all live tokens 0 → tie
    assert masks[0, 3:, :1].sum() == 0


def test_foreground_threshold():
    """§6.19: fg = [s < 0.5] exactly (ties at 0.5 are background)."""
    s = torch.tensor([0.0, 0.49, 0.5, 0.51, 1.0]).view(1, 1, 1, 5)
    assert foreground_from_sos(s).flatten().tolist() == [1, 1, 0, 0, 0]


@dataclass
class _RawLayer:
    """What capture records for one block (per-head probs, per-head outputs, W_o, attn1 q/k)."""

    probs: torch.Tensor
    out_heads: torch.Tensor
    w_out: torch.Tensor
    hw: tuple
    self_q: torch.Tensor
    self_k: torch.Tensor
    heads: int
    scale: float

    def inputs(self, config, rows=slice(None)):
        attn_cross = goca_head_aggregate(self.probs[rows], self.out_heads[rows], self.w_out, config)
        return CrossLayerInputs(
            attn_cross, self.hw, self_q=self.self_q[rows], self_k=self.self_k[rows], self_heads=self.heads,
            self_scale=self.scale,
        )  # fmt: skip


def _layer(g, hw, heads=2, c=8, t=77, batch=4):
    n = hw[0] * hw[1]
    return _RawLayer(
        probs=torch.softmax(torch.randn(batch, heads, n, t, generator=g), -1),
        out_heads=torch.randn(batch, n, c, generator=g),
        w_out=torch.randn(c, c, generator=g),
        hw=hw,
        self_q=torch.randn(batch, n, c, generator=g),
        self_k=torch.randn(batch, n, c, generator=g),
        heads=heads,
        scale=c**-0.5,
    )


def _random_inputs(seed, batch=2):
    g = _gen(seed)
    layers = [_layer(g, hw, batch=2 * batch) for hw in [(8, 8), (8, 8), (4, 4), (2, 2), (1, 1), (4, 4)]]
    dense = torch.randn(2 * batch, 16, 8, generator=g)
    prop = PropagationInputs(
        queries=[torch.randn(batch, 64, 8, generator=g) for _ in range(3)],
        keys=[torch.randn(batch, 64, 8, generator=g) for _ in range(3)],
        heads=[2, 2, 2],
        scales=[8**-0.5] * 3,
    )
    caption = torch.zeros(batch, 77, dtype=torch.bool)
    caption[:, 1:6] = True
    live = caption.clone()
    live[:, 0] = True
    return layers, dense, prop, caption, live


def _masks(config, seed=0):
    raw, dense, prop, caption, live = _random_inputs(seed)
    layers = [x.inputs(config) for x in raw]
    weights = goca_layer_weights(layers, dense, (4, 4), config)
    agg = goca_aggregate(layers, weights, (8, 8), config)
    return goca_segment(agg, prop, caption, live, config)


def test_each_table2_switch_changes_the_masks_and_vanilla_is_all_off():
    base_masks, base_fg = _masks(GoCAConfig())
    for change in ({"head": "average"}, {"layer": "average"}, {"rescale": "none"}):
        m, f = _masks(GoCAConfig(**change))
        assert not (torch.equal(m, base_masks) and torch.equal(f, base_fg)), change
    vanilla = GoCAConfig.vanilla()
    assert (vanilla.head, vanilla.layer, vanilla.rescale) == ("average", "average", "none")
    m, f = _masks(vanilla)
    assert not (torch.equal(m, base_masks) and torch.equal(f, base_fg))


def test_goca_segment_matches_reference_pipeline():
    """The §2.8 pseudocode with explicit S, per sample, against the batched fast path."""
    layers, dense, prop, caption, live = _random_inputs(1)
    cfg = GoCAConfig()
    masks, fg = _masks(cfg, seed=1)
    raw_of = {id(x): x for x in layers}
    from goca_scfg.ops import gaussian_taps, smooth

    taps = gaussian_taps(5, 1.1)
    b = 2
    for i in range(b):
        rows = [i, b + i]  # uncond, cond of sample i
        one = [
            _RawLayer(x.probs[rows], x.out_heads[rows], x.w_out, x.hw, x.self_q[rows], x.self_k[rows], 2, x.scale)
            for x in raw_of.values()
        ]
        sims = []
        p = torch.softmax(dense[rows] @ dense[rows].transpose(1, 2) / 8**0.5, -1)
        for x in one:
            full = attention_probs(x.self_q, x.self_k, 2, x.scale, head_mean=True)
            sims.append((p * resize_self_map(full, x.hw, (4, 4))).sum((1, 2)))
        sims = torch.stack(sims, 1).clamp_min(0)
        lw = sims / sims.sum(1, keepdim=True)
        maps = []
        for x in one:
            w, _, _ = _reference_head_weights(x.out_heads, x.w_out, 2)
            maps.append(torch.einsum("bhnt,bhn->bnt", x.probs, w).transpose(1, 2).reshape(2, 77, *x.hw))
        g = sum(resize_bilinear(m, (8, 8)) * lw[:, j].view(-1, 1, 1, 1) for j, m in enumerate(maps)).clamp_min(0)
        g = g / g.sum(1, keepdim=True)
        gpos = g[1:] / g[1:, caption[i]].sum(0, keepdim=True).sum(1, keepdim=True)
        rpos = minmax_per_token(smooth(gpos, taps), 0)
        s = (
            sum(
                attention_probs(q[i : i + 1], k[i : i + 1], 2, 8**-0.5, head_mean=True)
                for q, k in zip(prop.queries, prop.keys)
            )
            / 3
        )

        def prop2(x, s=s):
            return (s @ s @ x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(x.shape)

        rpos = minmax_per_token(prop2(rpos), 0) * live[i].float().view(1, -1, 1, 1)
        rneg = minmax_per_token(smooth(minmax_per_token(prop2(g[:1]), 0), taps), 0)
        ref_m = (rpos == rpos.amax(1, keepdim=True)).float()
        ref_f = (rneg[:, :1] < 0.5).float()
        # near-uniform random maps make min–max amplify rounding (SDPA vs explicit S): allow a near-tie pixel or two
        assert (masks[i : i + 1] == ref_m).float().mean() >= 0.95
        assert (fg[i : i + 1] == ref_f).float().mean() >= 0.95


def test_fast_mode_switches_are_close_to_exact():
    exact = _masks(GoCAConfig(), seed=2)
    fast = _masks(GoCAConfig.fast(refresh=1, query_stride=2), seed=2)
    assert (exact[0].argmax(1) == fast[0].argmax(1)).float().mean() > 0.5


def test_batch_independence_exact():
    """§6.22: every sample is segmented from its own inputs: batch results equal per-sample runs."""
    raw, dense, prop, caption, live = _random_inputs(3)
    caption[1, 6:9] = True  # the two prompts differ in length
    live = caption.clone()
    live[:, 0] = True
    cfg = GoCAConfig()
    layers = [x.inputs(cfg) for x in raw]
    w = goca_layer_weights(layers, dense, (4, 4), cfg)
    masks, fg = goca_segment(goca_aggregate(layers, w, (8, 8), cfg), prop, caption, live, cfg)
    for i in range(2):
        rows = [i, 2 + i]
        one = [x.inputs(cfg, rows) for x in raw]
        p1 = PropagationInputs(
            [q[i : i + 1] for q in prop.queries], [k[i : i + 1] for k in prop.keys], [2] * 3, prop.scales
        )
        w1 = goca_layer_weights(one, dense[rows], (4, 4), cfg)
        torch.testing.assert_close(w1, w[rows], atol=1e-6, rtol=1e-6)
        m1, f1 = goca_segment(goca_aggregate(one, w1, (8, 8), cfg), p1, caption[i : i + 1], live[i : i + 1], cfg)
        assert (m1 == masks[i : i + 1]).float().mean() >= 0.99 and (f1 == fg[i : i + 1]).float().mean() >= 0.99
        # given the same aggregated maps, a sample's masks do not depend on the batch at all (per-sample shapes)
        agg = goca_aggregate(layers, w, (8, 8), cfg)
        m2, f2 = goca_segment(agg[rows], p1, caption[i : i + 1], live[i : i + 1], cfg)
        assert torch.equal(m2, masks[i : i + 1]) and torch.equal(f2, fg[i : i + 1])


def _reference_head_mean(q, k, heads, scale):
    """Head-mean softmax map accumulated one head at a time (keeps SD-sized references in memory)."""
    d = q.shape[-1] // heads
    acc = 0
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        acc = acc + torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) * scale, -1)
    return acc / heads


@pytest.mark.slow
def test_sd15_shaped_fast_paths():
    """§6.21 at SD v1.5 shapes (8 heads; 4096/1024/256/64 tokens; dense 32×32×640): similarity and propagation."""
    g = _gen(9)
    dense = torch.randn(1, 1024, 640, generator=g)
    pseudo = pseudo_self_attention(dense)
    for hw, c in [((64, 64), 320), ((32, 32), 640), ((16, 16), 1280), ((8, 8), 1280)]:
        n = hw[0] * hw[1]
        q, k = torch.randn(1, n, c, generator=g), torch.randn(1, n, c, generator=g)
        scale = (c // 8) ** -0.5
        full = _reference_head_mean(q, k, 8, scale)
        ref = (pseudo * resize_self_map(full, hw, (32, 32))).sum((1, 2))
        got = layer_similarity(pseudo, q, k, 8, scale, hw, (32, 32))
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-4)
    qs = [torch.randn(1, 4096, 320, generator=g) * 0.3 for _ in range(3)]
    ks = [torch.randn(1, 4096, 320, generator=g) * 0.3 for _ in range(3)]
    x = torch.rand(1, 78, 64, 64, generator=g)
    s = sum(_reference_head_mean(q, k, 8, 40**-0.5) for q, k in zip(qs, ks)) / 3
    ref = (s @ (s @ x.flatten(2).transpose(1, 2))).transpose(1, 2).reshape(x.shape)
    got = propagate_self_attention(x, qs, ks, [8] * 3, [40**-0.5] * 3, 2)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_sdxl_shaped_fast_paths():
    """At SDXL shapes (1024 px: dense query 64²×640; 10 heads of 64 channels at 64², 20 at 32²; 70 cross layers;
    propagation blocks at 64² — 3 of SDXL's 7, to keep the naive reference affordable): the chunked similarity, the
    grouped layer sum and the fused propagation equal their naive forms."""
    g = _gen(10)
    dense = torch.randn(1, 4096, 640, generator=g) * 0.1
    pseudo = pseudo_self_attention(dense)
    for hw, heads in [((64, 64), 10), ((32, 32), 20)]:
        n = hw[0] * hw[1]
        q, k = torch.randn(1, n, heads * 64, generator=g), torch.randn(1, n, heads * 64, generator=g)
        full = _reference_head_mean(q, k, heads, 64**-0.5)
        ref = (pseudo * resize_self_map(full, hw, (64, 64))).sum((1, 2))
        got = layer_similarity(pseudo, q, k, heads, 64**-0.5, hw, (64, 64))
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-4)
    maps = [torch.rand(1, 77, *hw, generator=g) for hw in [(64, 64)] * 10 + [(32, 32)] * 60]
    weights = torch.rand(1, 70, generator=g)
    total = sum(weights[0, i] * F.interpolate(m, size=(64, 64), mode="bilinear") for i, m in enumerate(maps))
    ref = total.clamp_min(0) / total.clamp_min(0).sum(1, keepdim=True)
    torch.testing.assert_close(aggregate_layers(maps, weights, (64, 64), 1e-12), ref, atol=1e-6, rtol=1e-5)
    qs = [torch.randn(1, 4096, 640, generator=g) * 0.2 for _ in range(3)]
    ks = [torch.randn(1, 4096, 640, generator=g) * 0.2 for _ in range(3)]
    x = torch.rand(1, 9, 64, 64, generator=g)
    s = sum(_reference_head_mean(q, k, 10, 64**-0.5) for q, k in zip(qs, ks)) / 3
    ref = (s @ (s @ x.flatten(2).transpose(1, 2))).transpose(1, 2).reshape(x.shape)
    got = propagate_self_attention(x, qs, ks, [10] * 3, [64**-0.5] * 3, 2)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
