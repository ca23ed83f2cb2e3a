"""GoCA's faster paths (docs/algorithm.md §4.3) against their naive forms: the explicit and the fused (padded, grouped)
propagation, the resize adjoint of the layer similarity, the chunked similarity at every chunk size and query
stride, and the head weights' Gram form. Exact up to float rounding (algorithm.md §4.3)."""

from __future__ import annotations

import pytest
import torch

import goca_scfg.segment.goca as goca
from goca_scfg.config import GoCAConfig
from goca_scfg.ops import attention_probs
from goca_scfg.segment.goca import (
    CrossLayerInputs,
    goca_layer_weights,
    head_weights_dot_product,
    layer_similarity,
    mean_self_attention_matrix,
    propagate_self_attention,
    pseudo_self_attention,
    resize_adjoint,
    resize_self_map,
)

pytestmark = pytest.mark.rounding  # the segmentor test compares two code paths on a real (tiny) model call


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _reference_propagation(x, qs, ks, heads, scales, order, row_weights=None):
    """(mean_l mean_h diag(r_lh)·softmax_lh)^order · X, the maps formed explicitly."""
    b, t, h, w = x.shape
    s = 0
    for i, (q, k, n_heads, scale) in enumerate(zip(qs, ks, heads, scales)):
        probs = attention_probs(q, k, n_heads, scale)  # (B, H, N, N)
        if row_weights is not None:
            probs = probs * row_weights[i].unsqueeze(-1)
        s = s + probs.mean(dim=1)
    s = s / len(qs)
    v = x.flatten(2).transpose(1, 2)
    for _ in range(order):
        v = s @ v
    return v.transpose(1, 2).reshape(b, t, h, w)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize(("t", "channels"), [(5, (24, 24)), (21, (8, 8)), (9, (12, 24))])
def test_propagation_paths_equal_matrix_power(monkeypatch, fused, order, t, channels):
    """Blocks of different head counts and scales (two fused calls), values narrower and wider than q/k."""
    if fused:
        monkeypatch.setattr(goca, "_EXPLICIT_S_ELEMENTS", 0)
    g = _gen(1)
    b, hw = 2, (4, 5)
    heads, scales = [2, 3], [0.4, 0.25]
    c = channels
    qs = [torch.randn(b, 20, ci * h // 2, generator=g) for ci, h in zip(c, heads)]
    ks = [torch.randn(b, 20, ci * h // 2, generator=g) for ci, h in zip(c, heads)]
    x = torch.rand(b, t, *hw, generator=g)
    ref = _reference_propagation(x, qs, ks, heads, scales, order)
    got = propagate_self_attention(x, qs, ks, heads, scales, order)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)


def test_fused_propagation_row_weights():
    """Joint attention's scaled rows (algorithm.md §8.5) through the grouped fused calls."""
    g = _gen(2)
    b, hw, t = 1, (3, 4), 6
    heads, scales = [2, 2, 4], [0.5, 0.5, 0.3]
    qs = [torch.randn(b, 12, 8 * h, generator=g) for h in heads]
    ks = [torch.randn(b, 12, 8 * h, generator=g) for h in heads]
    rows = [torch.rand(b, h, 12, generator=g) for h in heads]
    x = torch.rand(b, t, *hw, generator=g)
    ref = _reference_propagation(x, qs, ks, heads, scales, 2, rows)
    got = propagate_self_attention(x, qs, ks, heads, scales, 2, row_weights=rows)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)


def test_mean_self_attention_matrix_chunks(monkeypatch):
    g = _gen(3)
    qs = [torch.randn(2, 30, 12, generator=g) for _ in range(2)]
    ks = [torch.randn(2, 30, 12, generator=g) for _ in range(2)]
    ref = sum(attention_probs(q, k, h, 0.3, head_mean=True) for q, k, h in zip(qs, ks, [2, 3])) / 2
    for chunk in (1, 7 * 30, 2**20):
        monkeypatch.setattr(goca, "_ROW_CHUNK_ELEMENTS", chunk)
        torch.testing.assert_close(mean_self_attention_matrix(qs, ks, [2, 3], [0.3, 0.3]), ref)


@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize(("hw", "dense"), [((2, 2), (4, 4)), ((1, 1), (4, 4)), ((3, 5), (4, 4)), ((8, 8), (4, 4)),
                                           ((2, 4), (4, 8)), ((6, 6), (4, 4))])  # fmt: skip
def test_resize_adjoint(hw, dense, stride):
    """Σ P ⊙ resize(T) = Σ T ⊙ (Rᵀ P U) for any grids and query strides."""
    g = _gen(4)
    n, nd = hw[0] * hw[1], dense[0] * dense[1]
    pseudo = pseudo_self_attention(torch.randn(2, nd, 6, generator=g), stride)
    t = torch.softmax(torch.randn(2, n, n, generator=g), -1)
    ref = (pseudo * resize_self_map(t, hw, dense)[:, ::stride]).sum((1, 2))
    got = (t * resize_adjoint(pseudo, hw, dense, stride)).sum((1, 2))
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("chunk", [1, 100, 2**21])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("hw", [(4, 6), (8, 12)])
def test_chunked_similarity_every_chunk_and_stride(monkeypatch, chunk, stride, hw):
    """The dense grid and the grid twice as fine (keys reordered by 2×2 cell), one row or many per chunk."""
    monkeypatch.setattr(goca, "_SIM_CHUNK_ELEMENTS", chunk)
    g = _gen(5)
    dense = (4, 6)
    n = hw[0] * hw[1]
    q, k = torch.randn(2, n, 12, generator=g), torch.randn(2, n, 12, generator=g)
    pseudo = pseudo_self_attention(torch.randn(2, 24, 10, generator=g), stride)
    full = attention_probs(q, k, 3, 0.5, head_mean=True)
    ref = (pseudo * resize_self_map(full, hw, dense)[:, ::stride]).sum((1, 2))
    got = layer_similarity(pseudo, q, k, 3, 0.5, hw, dense, stride)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)


def test_layer_weights_share_one_adjoint_per_grid():
    """goca_layer_weights (one resize adjoint per grid) equals layer_similarity layer by layer."""
    g = _gen(6)
    dense = torch.randn(2, 16, 8, generator=g)
    layers = []
    for hw in [(2, 2), (2, 2), (8, 8), (4, 4), (1, 1)]:
        n = hw[0] * hw[1]
        q, k = torch.randn(2, n, 8, generator=g), torch.randn(2, n, 8, generator=g)
        coarse = hw[0] < 4
        layers.append(
            CrossLayerInputs(
                attn_cross=torch.rand(2, n, 5, generator=g),
                hw=hw,
                self_map=attention_probs(q, k, 2, 0.5, head_mean=True) if coarse else None,
                self_q=None if coarse else q,
                self_k=None if coarse else k,
                self_heads=2,
                self_scale=0.5,
            )
        )
    cfg = GoCAConfig()
    pseudo = pseudo_self_attention(dense)
    sims = torch.stack(
        [layer_similarity(pseudo, x.self_q, x.self_k, 2, 0.5, x.hw, (4, 4), self_map=x.self_map) for x in layers],
        dim=1,
    )
    ref = sims.clamp_min(0) / sims.clamp_min(0).sum(1, keepdim=True)
    torch.testing.assert_close(goca_layer_weights(layers, dense, (4, 4), cfg), ref)


@pytest.mark.parametrize(("n", "c"), [(16, 8), (3, 16)])  # Gram form (C < B·N) and the two-product form
def test_head_weights_gram_form(n, c):
    g = _gen(7)
    o, w = torch.randn(2, n, c, generator=g), torch.randn(c + 4, c, generator=g)
    s = o @ w.t()
    u = torch.stack([o[..., h * 2 : h * 2 + 2] @ w[:, h * 2 : h * 2 + 2].t() for h in range(c // 2)], dim=1)
    contrib = (u * s.unsqueeze(1)).sum(-1)  # (B, H, N)
    ref = contrib / contrib.sum(1, keepdim=True)
    torch.testing.assert_close(head_weights_dot_product(o, w, c // 2, 1e-12), ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("chunk", [1, 50, 2**20])
def test_similarity_tap_equals_layer_similarity(monkeypatch, stride, chunk):
    """s_ℓ read off S's rows as S is formed (`SimilarityTap`, blocks on the dense grid) equals `layer_similarity` of
    the same block, and S itself is unchanged by the tap, for any row chunk and query stride."""
    monkeypatch.setattr(goca, "_ROW_CHUNK_ELEMENTS", chunk)
    g = _gen(8)
    dense = (3, 4)
    heads = [2, 3, 2]
    qs = [torch.randn(2, 12, 6 * h, generator=g) for h in heads]
    ks = [torch.randn(2, 12, 6 * h, generator=g) for h in heads]
    scales = [0.4, 0.3, 0.4]
    pseudo = pseudo_self_attention(torch.randn(2, 12, 5, generator=g), stride)
    tap = goca.SimilarityTap(pseudo, stride, blocks=(2, 0))
    s, sims = goca.mean_self_attention_and_similarity(qs, ks, heads, scales, tap=tap)
    torch.testing.assert_close(s, mean_self_attention_matrix(qs, ks, heads, scales))
    for slot, j in enumerate(tap.blocks):
        ref = layer_similarity(pseudo, qs[j], ks[j], heads[j], scales[j], dense, dense, stride)
        torch.testing.assert_close(sims[:, slot], ref, atol=1e-6, rtol=1e-5)


@torch.no_grad()
def test_sdxl_segmentor_shares_the_propagation_rows(monkeypatch):
    """On SDXL's preset (propagation blocks on the dense grid) the segmentor reads its propagation blocks' cond-half
    similarity off S (S formed once per step, with the tap) and its layer weights and masks equal those with the
    sharing off, on a sharpened tiny SDXL call."""
    from goca_scfg import StableDiffusionXLSCFGPipeline
    from goca_scfg.testing import sharpened, tiny_xl_components

    pipe = StableDiffusionXLSCFGPipeline(**sharpened(tiny_xl_components()))
    pipe.set_progress_bar_config(disable=True)
    taps, compared = [], []
    original_s, original_segment = goca.mean_self_attention_and_similarity, goca.GoCASegmentor.segment

    def counted(*args, **kwargs):
        taps.append(kwargs.get("tap"))
        return original_s(*args, **kwargs)

    def both(self, step, record):
        taps.clear()
        self._layer_weights = None
        masks, fg = original_segment(self, step, record)
        assert len(taps) == 1 and taps[0] is not None and len(taps[0].blocks) == len(self.layers.propagation)
        shared = self._layer_weights
        with monkeypatch.context() as m:
            m.setattr(goca.GoCASegmentor, "_shared_similarity", lambda self, p, *_: (p, None))
            self._layer_weights = None
            ref_masks, ref_fg = original_segment(self, step, record)
        compared.append(step)
        torch.testing.assert_close(shared, self._layer_weights, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(masks, ref_masks)
        torch.testing.assert_close(fg, ref_fg)
        return masks, fg

    monkeypatch.setattr(goca, "mean_self_attention_and_similarity", counted)
    monkeypatch.setattr(goca.GoCASegmentor, "segment", both)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    pipe(["a red dog on a green sofa", "two cats, sleeping."], generator=gens, num_inference_steps=2, height=128,
         width=128, guidance_scale=5.0, output_type="latent", segmentor="goca")  # fmt: skip
    assert compared == [0, 1]
