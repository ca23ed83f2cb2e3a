"""GoCA segmentation inside S-CFG (algorithm.md §2): head-wise and layer-wise auto aggregation of the cross maps,
per-pixel rescaling over the caption tokens, self-attention propagation, region masks and the `<sos>` foreground.

Pure tensor functions in fp32; `goca_segment` wires them over one UNet call, `goca_layers` picks the layers of a
model layout and `GoCASegmentor` runs it at every denoising step. Every sample of the batch is segmented
from its own prompt (the released code handles batch 1 only). Exact shortcuts of algorithm.md §4.3 are used: head
weights without a per-head (H, N, C) stack, the pseudo self-attention once per call, even query rows + 2×2 key
pooling for latent-resolution self maps, and S·X as fused attention with the maps as values.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.profiler import record_function

from ..capture import AttentionRecord, Field, Reduce
from ..config import GoCAConfig
from ..families import GoCAPreset, PresetMatch, goca_presets
from ..families.flux import FLUX_DENSE, FLUX_DEPTH, FLUX_PRESET, FLUX_SELF
from ..families.pixart import PIXART_BAND, PIXART_DENSE, PIXART_DEPTH, PIXART_SIGMA_PRESET
from ..layout import AttentionLayer, ModelLayout
from ..ops import (
    attention_probs,
    gaussian_taps,
    grid_shape,
    minmax_per_token,
    resize_bilinear,
    resize_nearest,
    smooth,
    split_cfg,
    split_heads,
    to_grid,
)
from ..tokens import live_ends
from .base import CapturePlan, SegmentationContext, Segmentor
from .goca_joint import JointLayerMaps, joint_layer_pass, pad_tokens, reference_feature

logger = logging.getLogger(__name__)

_ROW_CHUNK_ELEMENTS = 2**20  # fp32 elements (4 MiB) per row chunk of an explicit self map
_EXPLICIT_S_ELEMENTS = 2**24  # the largest self map (64 MiB fp32) the propagation forms instead of fused passes
_SIM_CHUNK_ELEMENTS = 2**21  # fp32 elements (8 MiB) per head's row chunk in the layer similarity

# ----------------------------------------------------------------------------------------------- §2.3 heads


def head_weights_dot_product(out_heads: Tensor, w_out: Tensor, heads: int, eps: float) -> Tensor:
    """w_h(p) = ⟨u_h(p), s(p)⟩ / Σ_h' ⟨u_h'(p), s(p)⟩ with u_h = o_h·W_h, s = Σ_h u_h (algorithm.md §2.3, §4.3).

    out_heads: (B, N, C) per-head outputs before the out-projection; w_out: (C_out, C). Returns (B, H, N); weights
    sum to 1 per pixel and may be negative. Computed as ⟨o_h, (s·W_o)_h⟩, no (H, N, C) stack.
    Deviation: Σ_h c_h = ‖s‖² is floored at `eps` (the released code divides unguarded, §5.14).
    """
    o = out_heads.float()
    w = w_out.float()
    b, n, c = o.shape
    if c < b * n:  # the Gram matrix costs less than a second (B·N, C) × (C, C) product
        g = o @ (w.t() @ w)  # (B, N, C) = (o·W_oᵀ)·W_o: s pulled back through W_o
    else:
        g = (o @ w.t()) @ w  # s = o·W_oᵀ (B, N, C_out), the out-projection without bias, pulled back
    contrib = g.mul_(o).view(b, n, heads, c // heads).sum(-1)  # (B, N, H) = c_h(p)
    total = contrib.sum(-1, keepdim=True)
    return (contrib / total.clamp_min(eps)).transpose(1, 2)


def head_weights_average(batch: int, heads: int, n: int, device: torch.device | str = "cpu") -> Tensor:
    """w_h(p) = 1/H, the vanilla head aggregation (algorithm.md §2.3 'average'). Returns (B, H, N)."""
    return torch.full((batch, heads, n), 1.0 / heads, device=device)


def aggregate_heads(probs: Tensor, weights: Tensor) -> Tensor:
    """A(p, t) = Σ_h w_h(p)·P_h(p, t) (algorithm.md §2.3). probs: (B, H, N, T); weights: (B, H, N) → (B, N, T)."""
    return (probs.float() * weights.float().unsqueeze(-1)).sum(dim=1)  # faster than einsum's permuted bmm here


def goca_head_aggregate(probs: Tensor, out_heads: Tensor, w_out: Tensor, config: GoCAConfig) -> Tensor:
    """One block's head-aggregated cross map A_ℓ (B, N, T) by the configured head method (algorithm.md §2.3).

    probs: (B, H, N, T) per-head cross probabilities; out_heads: (B, N, C); w_out: (C_out, C).
    """
    batch, heads, n, _ = probs.shape
    if config.head == "dot":
        weights = head_weights_dot_product(out_heads, w_out, heads, config.eps)
    else:
        weights = head_weights_average(batch, heads, n, probs.device)
    return aggregate_heads(probs, weights)


# ----------------------------------------------------------------------------------------------- §2.4 layers


def pseudo_self_attention(dense: Tensor, query_stride: int = 1) -> Tensor:
    """P = softmax_row(F Fᵀ/√C) from the dense feature, all channels as one head (algorithm.md §2.4 step 1).

    dense: (B, Nd, C) → (B, Nd', Nd) with the query rows 0, k, 2k, … when `query_stride` = k (fast mode).
    """
    f = dense.float()
    return torch.softmax(f[:, ::query_stride] @ f.transpose(1, 2) / f.shape[-1] ** 0.5, dim=-1)


def resize_self_map(attn_self: Tensor, hw: tuple[int, int], dense_hw: tuple[int, int]) -> Tensor:
    """T̃: resize key dims bilinearly, then query dims by nearest, to the dense grid (algorithm.md §2.4 step 3).

    attn_self: (B, N, N) head-mean self map on grid `hw` → (B, Nd, Nd). The naive 4-D form; exact for any sizes.
    """
    b = attn_self.shape[0]
    (h, w), (dh, dw) = hw, dense_hw
    keys = resize_bilinear(attn_self.float().reshape(b * h * w, 1, h, w), dense_hw)  # (B·N, 1, dh, dw)
    queries = keys.reshape(b, h, w, dh * dw).permute(0, 3, 1, 2)  # (B, Nd_keys, h, w)
    queries = resize_nearest(queries, dense_hw)
    return queries.flatten(2).transpose(1, 2)


def layer_similarity(
    pseudo: Tensor,
    self_q: Tensor,
    self_k: Tensor,
    heads: int,
    scale: float,
    hw: tuple[int, int],
    dense_hw: tuple[int, int],
    query_stride: int = 1,
    self_map: Tensor | None = None,
    adjoint: Tensor | None = None,
) -> Tensor:
    """s_ℓ = Σ_{p,k} P(p,k)·T̃_ℓ(p,k) per sample (algorithm.md §2.4 steps 2–4), without N×N maps at latent size.

    pseudo: (B, Nd', Nd) from `pseudo_self_attention` with the same `query_stride`; self_q, self_k: (B, N, C) of
    the block's attn1 (self_q may already hold only the even rows). The dense grid itself (no resize) and a grid
    twice as fine (even query rows and 2×2 key pooling: exactly the bilinear/nearest resize, §4.3) run one head and
    cache-sized row chunk at a time (`_similarity_chunked`); other grids take the head-mean map (`self_map` when given,
    else formed from q and k) against the resize's adjoint applied to P (`resize_adjoint`, or `adjoint` when given:
    it depends only on P and the grids). Returns (B,).
    """
    if self_map is None and similarity_direct(hw, dense_hw):
        return _similarity_chunked(pseudo, self_q, self_k, heads, scale, hw, dense_hw, query_stride)
    full = self_map if self_map is not None else attention_probs(self_q, self_k, heads, scale, head_mean=True)
    if adjoint is None:
        adjoint = resize_adjoint(pseudo, hw, dense_hw, query_stride)
    return (full.float() * adjoint).sum(dim=(1, 2))


def _similarity_chunked(
    pseudo: Tensor,
    self_q: Tensor,
    self_k: Tensor,
    heads: int,
    scale: float,
    hw: tuple[int, int],
    dense_hw: tuple[int, int],
    query_stride: int,
) -> Tensor:
    """`layer_similarity` on the dense grid or one twice as fine, one sample, head and row chunk at a time.

    Per chunk and head: one matmul (scale folded into q), one softmax and (2× grids) the sum over each key's 2×2
    cell, the keys having been reordered once so that a cell's four keys are four contiguous blocks of the dense
    grid; the heads are summed into one buffer, then one dot product with P's rows. Chunks are bounded so that the
    temporaries stay cache-sized: the work is memory-bound, and one head's (rows × N) product runs faster than a
    batch of smaller ones. Equal to the 4-D resize form up to float rounding.
    """
    b = pseudo.shape[0]
    (h, w), (dh, dw) = hw, dense_hw
    pool = h // dh
    c = self_k.shape[-1]
    d = c // heads
    q = self_q.float()
    if pool == 2 and q.shape[1] == h * w:  # full queries: keep the even (y, x) rows
        q = even_query_rows(q, hw)
    qh = (split_heads(q[:, ::query_stride], heads) * scale).contiguous()  # (B, H, Nd', d)
    k = self_k.float()
    if pool == 2:  # (B, H, d, N) with the keys ordered (cell row parity, column parity, y, x)
        kt = k.view(b, dh, 2, dw, 2, heads, d).permute(0, 5, 6, 2, 4, 1, 3).reshape(b, heads, d, h * w)
    else:
        kt = k.view(b, h * w, heads, d).permute(0, 2, 3, 1).contiguous()
    nd = dh * dw
    rows = max(1, _SIM_CHUNK_ELEMENTS // (h * w))
    total = torch.zeros(b, device=q.device)
    for i in range(b):
        for start in range(0, qh.shape[2], rows):
            p_rows = pseudo[i, start : start + rows]
            acc = None
            for head in range(heads):
                probs = torch.softmax(qh[i, head, start : start + rows] @ kt[i, head], dim=-1)  # (r, N)
                if pool == 2:
                    probs = probs.view(-1, 4, nd).sum(dim=1)  # (r, Nd): the 2×2 cells
                acc = probs if acc is None else acc.add_(probs)
            total[i] += torch.dot(acc.view(-1), p_rows.reshape(-1))
    return total / (heads * pool * pool)


def resize_adjoint(pseudo: Tensor, hw: tuple[int, int], dense_hw: tuple[int, int], query_stride: int = 1) -> Tensor:
    """Rᵀ·P·U: the adjoint of the self-map resize of algorithm.md §2.4 step 3 applied to P, so that
    Σ P ⊙ resize(T) = Σ T ⊙ (Rᵀ P U) for any map T on grid `hw` (U: the bilinear key resize, separable; R: the
    nearest query resize, a row selection; with `query_stride` only P's rows 0, k, 2k, … of the dense grid).

    pseudo: (B, Nd', Nd) → (B, N, N) on the block's grid. Depends only on P and the grids: one per grid serves all
    its layers. Exact up to float rounding, any grid sizes.
    """
    b, nq, _ = pseudo.shape
    (h, w), (dh, dw) = hw, dense_hw
    device = pseudo.device
    u_h = bilinear_matrix(h, dh).to(device)  # (dh, h)
    u_w = bilinear_matrix(w, dw).to(device)  # (dw, w)
    keys = torch.matmul(torch.matmul(u_h.t(), pseudo.float().reshape(b * nq, dh, dw)), u_w)  # (B·Nd', h, w)
    near_y = resize_nearest(torch.arange(h, dtype=torch.float32).view(1, 1, h, 1), (dh, 1)).flatten().long()
    near_x = resize_nearest(torch.arange(w, dtype=torch.float32).view(1, 1, 1, w), (1, dw)).flatten().long()
    dense_rows = torch.arange(0, dh * dw, query_stride)[:nq]
    coarse = (near_y[dense_rows // dw] * w + near_x[dense_rows % dw]).to(device)  # each P row's coarse query
    out = torch.zeros(b, h * w, h * w, device=device)
    return out.index_add_(1, coarse, keys.reshape(b, nq, h * w))


def even_query_rows(q: Tensor, hw: tuple[int, int]) -> Tensor:
    """Rows of (B, N, C) at even (y, x) of the (h, w) grid: nearest 2× down-sampling of the queries (§4.3)."""
    b, _, c = q.shape
    return q.view(b, hw[0], hw[1], c)[:, ::2, ::2].reshape(b, -1, c)


def layer_weights_similarity(sims: Tensor, eps: float) -> Tensor:
    """w_ℓ = max(s_ℓ, 0) / Σ_ℓ' max(s_ℓ', 0) (algorithm.md §2.4 step 5). sims: (B, L) → (B, L).

    Deviation: the denominator is floored at `eps` (unguarded in the released code).
    """
    pos = sims.float().clamp_min(0)
    return pos / pos.sum(dim=1, keepdim=True).clamp_min(eps)


def aggregate_layers(maps: list[Tensor], weights: Tensor, latent_hw: tuple[int, int], eps: float) -> Tensor:
    """G = renorm_tokens(relu(Σ_ℓ w_ℓ·bilinear_to_latent(A_ℓ))) (algorithm.md §2.4 step 6).

    maps: per layer (B, T, h, w); weights: (B, L). Returns (B, T, H, W), ≥ 0, summing to 1 over tokens.
    Layers of one grid are weighted and summed before a single resize (the resize is linear: equal up to rounding).
    Deviation: the token sum is floored at `eps` (unguarded in the released code).
    """
    total = 0
    for hw in dict.fromkeys(tuple(a.shape[-2:]) for a in maps):
        idx = [i for i, a in enumerate(maps) if tuple(a.shape[-2:]) == hw]
        group = torch.stack([maps[i].float() for i in idx])  # (G, B, T, h, w)
        scale = weights[:, idx].float().t().reshape(len(idx), -1, 1, 1, 1)
        mixed = (group * scale).sum(dim=0)  # element-wise: identical for any batch size
        total = total + resize_bilinear(mixed, latent_hw)
    total = total.clamp_min(0)
    return total / total.sum(dim=1, keepdim=True).clamp_min(eps)


# ----------------------------------------------------------------------------------------------- §2.5 rescale


def rescale_sum_one(agg: Tensor, rescale_tokens: Tensor, eps: float) -> Tensor:
    """R(p, t) = G(p, t) / Σ_{j∈J} G(p, j) for all t (algorithm.md §2.5 step 1, paper Eq. 11).

    agg: (B, T, H, W); rescale_tokens: (B, T) bool J. Deviation: the factor is floored at `eps` (unguarded in the
    released code, and an empty caption makes it 0).
    """
    factor = (agg * rescale_tokens.to(agg.dtype).view(*rescale_tokens.shape, 1, 1)).sum(dim=1, keepdim=True)
    return agg / factor.clamp_min(eps)


def renorm_per_token(maps: Tensor, taps: Tensor, eps: float) -> Tensor:
    """Per-token blur (k=5, σ=1.1, reflect) then min–max to [0, 1] ("renorm+", algorithm.md §2.5 steps 2–3, Eq. 12)."""
    return minmax_per_token(smooth(maps, taps), eps)


# ----------------------------------------------------------------------------------------------- §2.6 propagate


def _width(n: int) -> int:
    """n rounded up to a multiple of 8 (a head size the fused attention kernels take)."""
    return -(-n // 8) * 8


def propagate_self_attention(
    maps: Tensor,
    queries: list[Tensor],
    keys: list[Tensor],
    heads: list[int],
    scales: list[float],
    order: int,
    row_weights: list[Tensor] | None = None,
    matrix: Tensor | None = None,
) -> Tensor:
    """C ← S^order·C with S = mean over blocks and heads of softmax(Q Kᵀ·scale) (algorithm.md §2.6, §4.3).

    maps: (B, T, H, W); queries/keys: per block (B, N, C) at the maps' grid (N = H·W). Where S is small (B·N² ≤
    2²⁴ fp32, e.g. SD v1.5 at 512 px) and the order is ≥ 2, S is formed once in cache-sized chunks
    (`mean_self_attention_matrix`) and applied `order` times: half the exponentials of `order` fused passes.
    Otherwise S is never formed: each product is one fused attention call with the maps as values, over the heads
    of all blocks that share a scale; q/k heads and the values are zero-padded to one common width (a multiple of
    8): q·k is unchanged, the scale is passed explicitly, and the fused kernels (which need equal q/k/v head sizes)
    apply, so no N×N map is materialised. `row_weights` (per block (B, H, N)): each head's rows scaled, as a
    joint-attention self map's rows sum to the image share 1 − m_h(p) (algorithm.md §8.5); they take the fused
    path. `matrix`: S itself, when the layer similarity already formed it (`explicit_propagation`). Returns
    (B, T, H, W).
    """
    b, t, hh, ww = maps.shape
    n = hh * ww
    if matrix is not None or explicit_propagation(b, n, order, row_weights is not None):
        s = matrix if matrix is not None else mean_self_attention_matrix(queries, keys, heads, scales)
        x = maps.float().flatten(2).transpose(1, 2)
        for _ in range(order):
            x = torch.bmm(s, x)
        return x.transpose(1, 2).reshape(b, t, hh, ww)
    width = _width(max([t] + [q.shape[-1] // h for q, h in zip(queries, heads)]))
    groups: dict[float, list[int]] = {}
    for i, scale in enumerate(scales):
        groups.setdefault(float(scale), []).append(i)
    prepared = []  # per scale: (B, H_g, N, width) q and k, the per-head factor, the per-head row weights
    for scale, idx in groups.items():

        def padded(x: Tensor, h: int) -> Tensor:
            d = x.shape[-1] // h
            return F.pad(x.float().view(b, n, h, d).transpose(1, 2), (0, width - d))

        qh = torch.cat([padded(queries[i], heads[i]) for i in idx], dim=1)
        kh = torch.cat([padded(keys[i], heads[i]) for i in idx], dim=1)
        factor = torch.cat([torch.full((heads[i],), 1.0 / (heads[i] * len(queries))) for i in idx]).to(qh.device)
        rows = torch.cat([row_weights[i].float() for i in idx], dim=1) if row_weights is not None else None
        prepared.append((scale, qh, kh, factor, rows))
    x = F.pad(maps.float().flatten(2).transpose(1, 2), (0, width - t))  # (B, N, width)
    for _ in range(order):
        acc = None
        for scale, qh, kh, factor, rows in prepared:
            out = F.scaled_dot_product_attention(qh, kh, x.unsqueeze(1).expand(b, qh.shape[1], n, width), scale=scale)
            if rows is not None:
                out = out * rows.unsqueeze(-1)
            part = torch.einsum("bhnc,h->bnc", out, factor)
            acc = part if acc is None else acc + part
        x = acc
    return x[..., :t].transpose(1, 2).reshape(b, t, hh, ww)


def explicit_propagation(batch: int, n: int, order: int, row_weights: bool) -> bool:
    """Whether `propagate_self_attention` forms S (B·N² ≤ 2²⁴ fp32, order ≥ 2, no row weights) instead of fused
    passes."""
    return not row_weights and order >= 2 and batch * n * n <= _EXPLICIT_S_ELEMENTS


def bilinear_matrix(size_in: int, size_out: int) -> Tensor:
    """U (size_out, size_in): 1-D linear resize (align_corners=False) as a matrix; 2-D bilinear is U_h ⊗ U_w."""
    eye = torch.eye(size_in).unsqueeze(1)  # (size_in, 1, size_in): one impulse per row
    return F.interpolate(eye, size=size_out, mode="linear", align_corners=False)[:, 0].t()


def mean_self_attention_matrix(
    queries: list[Tensor], keys: list[Tensor], heads: list[int], scales: list[float]
) -> Tensor:
    """S = mean over blocks and heads of softmax(Q Kᵀ·scale), formed in cache-sized row chunks (algorithm.md §2.6).

    queries/keys: per block (B, n, C). Returns (B, n, n) fp32. One head's chunk at a time, accumulated into the
    chunk of S while it is hot (scale folded into q; equal up to float rounding).
    """
    return mean_self_attention_and_similarity(queries, keys, heads, scales)[0]


@dataclass(frozen=True)
class SimilarityTap:
    """The layer similarity (§2.4 steps 2–4) of propagation blocks on the dense grid itself, read off the rows of S as
    it is formed (§2.6): those blocks' head maps are then computed once per step, not twice. pseudo: (B, Nd', Nd) P
    of the same samples and `query_stride`; blocks: indices of the blocks whose s_ℓ is wanted. (On a grid twice as
    fine the similarity reads a quarter of the rows; summing a block's heads apart then costs more than it saves.)"""

    pseudo: Tensor
    query_stride: int
    blocks: tuple[int, ...]


def similarity_direct(hw: tuple[int, int], dense_hw: tuple[int, int]) -> bool:
    """Whether a self map on grid `hw` meets P without a resize matrix: the dense grid, or twice as fine (§4.3)."""
    return hw in (dense_hw, (2 * dense_hw[0], 2 * dense_hw[1]))


def mean_self_attention_and_similarity(
    queries: list[Tensor],
    keys: list[Tensor],
    heads: list[int],
    scales: list[float],
    tap: SimilarityTap | None = None,
) -> tuple[Tensor, Tensor | None]:
    """`mean_self_attention_matrix`, and with `tap` the similarities s_ℓ (B, len(tap.blocks)) of the tapped blocks
    from the same softmax rows: each tapped block's chunk is summed over its heads apart, its rows that P reads are
    dotted with P, then it joins S. Equal to `layer_similarity` up to float rounding."""
    b, n, _ = queries[0].shape
    qs = [(split_heads(q.float(), h) * scale).contiguous() for q, h, scale in zip(queries, heads, scales)]
    kts = [split_heads(k.float(), h).transpose(-1, -2).contiguous() for k, h in zip(keys, heads)]
    s = torch.zeros(b, n, n, device=queries[0].device)
    rows = max(1, _ROW_CHUNK_ELEMENTS // n)
    tapped = {j: slot for slot, j in enumerate(tap.blocks)} if tap is not None else {}
    sims = torch.zeros(b, len(tapped), device=s.device) if tap is not None else None
    stride = tap.query_stride if tap is not None else 1
    for i in range(b):
        for start in range(0, n, rows):
            acc = s[i, start : start + rows]
            for j, (qh, kt, n_heads) in enumerate(zip(qs, kts, heads)):
                block = torch.zeros_like(acc) if j in tapped else acc
                for h in range(n_heads):
                    probs = torch.softmax(qh[i, h, start : start + rows] @ kt[i, h], dim=-1)
                    block.add_(probs, alpha=1.0 if j in tapped else 1.0 / n_heads)
                if j not in tapped:
                    continue
                first = -(-start // stride) * stride  # P's rows are the dense rows 0, stride, 2·stride, …
                read = block[first - start :: stride]
                p_rows = tap.pseudo[i, first // stride : first // stride + read.shape[0]]
                sims[i, tapped[j]] += torch.dot(read.flatten(), p_rows.flatten()) / n_heads
                acc.add_(block, alpha=1.0 / n_heads)
    return s.div_(len(queries)), sims


# a similarity-only self layer on a coarser grid keeps its head-mean map (§4.3), formed one head and cache-sized row
# chunk at a time (`capture.HEAD_MEAN` forms all heads' maps at once; equal up to float rounding)
HEAD_MEAN_CHUNKED = Reduce(lambda t: mean_self_attention_matrix([t.q], [t.k], [t.heads], [t.scale]))


def propagate_upsampled_self_attention(
    maps: Tensor,
    queries: list[Tensor],
    keys: list[Tensor],
    heads: list[int],
    scales: list[float],
    order: int,
    grid_hw: tuple[int, int],
) -> Tensor:
    """C ← S̃^order·C on the maps' finer grid, S̃ = the blocks' mean self map on `grid_hw` with keys resized
    bilinearly and queries by nearest to the maps' grid (algorithm.md §8.3; GoCA utils_sigma.py L372-384, L398-399).

    maps: (B, T, H, W); queries/keys: per block (B, h·w, C) on `grid_hw` = (h, w). Exact without forming S̃:
    S̃·X = nearest_up(S·(Uᵀ X)), Uᵀ the adjoint of the bilinear up-sampling U (separable: U_h ⊗ U_w). S lives on
    the coarse grid (B·(h·w)² fp32, 4 MiB per image at PixArt's 512 px), so it is formed once instead of `order`
    fused passes.
    """
    b, t, hh, ww = maps.shape
    h, w = grid_hw
    u_h = bilinear_matrix(h, hh).to(maps.device)  # (H, h)
    u_w = bilinear_matrix(w, ww).to(maps.device)  # (W, w)
    s = mean_self_attention_matrix(queries, keys, heads, scales)
    x = maps.float()
    for _ in range(order):
        coarse = torch.einsum("Hh,Ww,btHW->bhwt", u_h, u_w, x).reshape(b, h * w, t)  # Uᵀ X
        coarse = torch.bmm(s, coarse)
        x = resize_nearest(coarse.transpose(1, 2).reshape(b, t, h, w), (hh, ww))
    return x


def propagate(maps: Tensor, propagation: PropagationInputs) -> Tensor:
    """Propagation on the maps' grid: directly where the self-attention layers share it (SD v1.5), else through
    their up-sampled maps (PixArt-Sigma's latent-size segmentation from latent/2 blocks, algorithm.md §8.3)."""
    n = propagation.queries[0].shape[1]
    hw = tuple(maps.shape[-2:])
    args = (propagation.queries, propagation.keys, propagation.heads, propagation.scales, propagation.order)
    if n == hw[0] * hw[1]:
        return propagate_self_attention(maps, *args, row_weights=propagation.row_weights, matrix=propagation.matrix)
    if propagation.row_weights is not None:
        raise ValueError("joint-attention propagation runs on its blocks' own grid")
    return propagate_upsampled_self_attention(maps, *args, grid_shape(n, hw))


# ----------------------------------------------------------------------------------------------- §2.7 masks


def goca_region_masks(pos: Tensor, live_tokens: Tensor) -> Tensor:
    """M_t = [pos_t is the max over tokens] after zeroing pads t >= n+1; `<sos>` competes (algorithm.md §2.7).

    pos: (B, T, H, W) in [0, 1]; live_tokens: (B, T) bool (`<sos>` + caption). Ties give several ones (§5.4).
    """
    pos = pos * live_tokens.to(pos.dtype).view(*live_tokens.shape, 1, 1)
    return (pos == pos.amax(dim=1, keepdim=True)).float()


def global_token_into_uncond(agg: Tensor, global_index: Tensor, which: Tensor | None = None) -> Tensor:
    """G with the uncond half's channel 0 replaced by the cond half's global-token map G_c(·, g_b), per sample, so
    the foreground comes from the cond branch (algorithm.md §8.3; GoCA utils_sigma.py L329-330, PixArt-Sigma; and
    §8.2 for a blank uncond condition).

    agg: (2B, T, H, W) [uncond, cond]; global_index: (B,) long (CLIP: 0, `<sos>`; T5: the `</s>` position);
    which: (B,) bool, the samples to change (None: all). Returns a new tensor.
    """
    g_neg, g_pos = split_cfg(agg)
    glob = g_pos[torch.arange(g_pos.shape[0], device=agg.device), global_index.to(agg.device)]  # (B, H, W)
    if which is not None:
        glob = torch.where(which.to(agg.device).view(-1, 1, 1), glob, g_neg[:, 0])
    return torch.cat([torch.cat([glob.unsqueeze(1), g_neg[:, 1:]], dim=1), g_pos])


def foreground_from_sos(sos: Tensor, threshold: float = 0.5) -> Tensor:
    """fg(p) = [s(p) < threshold] for the processed uncond `<sos>` map s (algorithm.md §2.7). (B,1,H,W) → float."""
    return (sos < threshold).float()


# ----------------------------------------------------------------------------------------------- wiring


@dataclass(frozen=True)
class CrossLayerInputs:
    """One aggregated block for the whole CFG batch (2B first): its head-aggregated cross map (2B, N, T) from
    `goca_head_aggregate`, its grid, and for the layer similarity its attn1 queries/keys (2B, N, C) (queries may be
    the even rows only) or, for grids coarser than the dense one, its head-mean self map (2B, N, N)."""

    attn_cross: Tensor
    hw: tuple[int, int]
    self_map: Tensor | None = None
    self_q: Tensor | None = None
    self_k: Tensor | None = None
    self_heads: int = 1
    self_scale: float = 1.0


@dataclass(frozen=True)
class PropagationInputs:
    """Cond-half queries and keys (B, N, C) of the propagation blocks at the segmentation grid, and the order
    (algorithm.md §2.6; 0 turns propagation off)."""

    queries: list[Tensor]
    keys: list[Tensor]
    heads: list[int]
    scales: list[float]
    order: int = 2  # SD v1.5's (cfg15 L74-79)
    row_weights: list[Tensor] | None = None  # joint attention: per block the heads' image shares (B, H, N)
    matrix: Tensor | None = None  # S (B, N, N) when already formed (`mean_self_attention_and_similarity`)

    def sample(self, i: int) -> PropagationInputs:
        """The inputs of sample i alone (shapes independent of the batch)."""
        weights = [w[i : i + 1] for w in self.row_weights] if self.row_weights is not None else None
        matrix = self.matrix[i : i + 1] if self.matrix is not None else None
        return replace(
            self, queries=[q[i : i + 1] for q in self.queries], keys=[k[i : i + 1] for k in self.keys],
            row_weights=weights, matrix=matrix,
        )  # fmt: skip


def goca_layer_weights(
    layers: list[CrossLayerInputs],
    dense: Tensor,
    dense_hw: tuple[int, int],
    config: GoCAConfig,
    pseudo: Tensor | None = None,
    known: dict[int, Tensor] | None = None,
) -> Tensor:
    """Layer weights (2B, L) by the configured method (algorithm.md §2.4 steps 1–5; 'average' gives 1/L).

    P is formed once (or given as `pseudo`); the layers of a grid the similarity cannot chunk from q and k share one
    resize adjoint. `known[ℓ]`: s_ℓ of the last rows, already read off S (`SimilarityTap`); only the rows before
    them are computed here."""
    batch = layers[0].attn_cross.shape[0]
    if config.layer == "average":
        return torch.full((batch, len(layers)), 1.0 / len(layers), device=layers[0].attn_cross.device)
    stride = config.layer_query_stride
    if pseudo is None:
        pseudo = pseudo_self_attention(reference_feature(dense, config.reference_channels), stride)
    known = known or {}
    adjoints: dict[tuple[int, int], Tensor] = {}  # the resize adjoint: one per grid, shared by its layers
    sims = []
    for index, x in enumerate(layers):
        if x.self_map is not None or not similarity_direct(x.hw, dense_hw):
            if x.hw not in adjoints:
                adjoints[x.hw] = resize_adjoint(pseudo, x.hw, dense_hw, stride)
        given = known.get(index)
        todo = batch - (given.shape[0] if given is not None else 0)  # the first rows; `given` holds the rest
        if todo == 0:
            sims.append(given)
            continue
        fields = (x.self_q, x.self_k, x.self_map, adjoints.get(x.hw))
        q, k, self_map, adjoint = (t[:todo] if t is not None else None for t in fields)
        s_l = layer_similarity(
            pseudo[:todo], q, k, x.self_heads, x.self_scale, x.hw, dense_hw, stride, self_map=self_map, adjoint=adjoint
        )
        sims.append(s_l if given is None else torch.cat([s_l, given.to(s_l.dtype)]))
    return layer_weights_similarity(torch.stack(sims, dim=1), config.eps)


def goca_aggregate(
    layers: list[CrossLayerInputs], layer_weights: Tensor, latent_hw: tuple[int, int], config: GoCAConfig
) -> Tensor:
    """G for both CFG halves (2B, T, H, W): the weighted sum of the blocks' head-aggregated maps (§2.4 step 6)."""
    maps = [to_grid(x.attn_cross, x.hw) for x in layers]
    return aggregate_layers(maps, layer_weights, latent_hw, config.eps)


def goca_segment(
    agg: Tensor,
    propagation: PropagationInputs,
    rescale_tokens: Tensor,
    live_tokens: Tensor,
    config: GoCAConfig,
    ends: list[int] | None = None,
) -> tuple[Tensor, Tensor]:
    """Masks from G (algorithm.md §2.5–2.7, pseudocode §2.8): rescale + renorm the cond half, propagate both halves
    with the cond S, pads out, argmax regions and the uncond `<sos>` foreground.

    agg: (2B, T, H, W) from `goca_aggregate` (uncond channel 0 possibly replaced by `global_token_into_uncond`);
    rescale_tokens / live_tokens: (B, T) bool of the cond prompts; ends: `live_ends(live_tokens)` as a list, when
    known in advance (the segmentor computes it once per call).
    Returns masks (B, T, H, W) and fg (B, 1, H, W). Exact pruning (every step after the aggregation is per channel
    and per sample): each sample processes only its channels up to its last live token and channel 0 of its uncond
    half; the rest are the zeros the pad zeroing makes of them. Per sample, so a sample's shapes, and its result,
    do not depend on the rest of the batch.
    """
    taps = gaussian_taps(config.blur_kernel, config.blur_sigma)
    t = agg.shape[1]
    g_neg, g_pos = split_cfg(agg)
    ends = live_ends(live_tokens).tolist() if ends is None else ends  # given: no device sync per step
    masks, fgs = [], []
    for i in range(g_pos.shape[0]):
        n = ends[i]
        pos = g_pos[i : i + 1, :n]
        if config.rescale == "sum1":
            pos = rescale_sum_one(pos, rescale_tokens[i : i + 1, :n], config.eps)
        both = torch.cat([renorm_per_token(pos, taps, config.eps), g_neg[i : i + 1, :1]], dim=1)
        if propagation.order:
            both = propagate(both, propagation.sample(i))
        both = minmax_per_token(both, config.eps)
        pos = F.pad(both[:, :n], (0, 0, 0, 0, 0, t - n))  # the pruned channels: zero, as the pad zeroing makes them
        masks.append(goca_region_masks(pos, live_tokens[i : i + 1]))
        fgs.append(foreground_from_sos(renorm_per_token(both[:, n:], taps, config.eps), config.fg_threshold))
    return torch.cat(masks), torch.cat(fgs)


# ----------------------------------------------------------------------------------------------- layers, §8


# The authors' presets live with their model families (goca_scfg/families/sdxl.py, pixart.py); this is the registry's
# list, in registry order. The transformer rule below moves the PixArt-Sigma preset to other depths.
GOCA_PRESETS: tuple[tuple[PresetMatch, GoCAPreset], ...] = goca_presets()


def relative_block(index: int, depth: int) -> int:
    """Block `index` of PixArt-Sigma's 28 moved to the same relative depth among `depth` blocks (algorithm.md §8.4):
    round(index·(depth − 1)/27), halves up, in integers (exact: the identity at depth 28)."""
    span = PIXART_DEPTH - 1
    return (2 * index * (depth - 1) + span) // (2 * span)


def transformer_rule(layout: ModelLayout) -> GoCAPreset:
    """GoCA's layers for a transformer the authors did not configure (algorithm.md §8.4): the PixArt-Sigma preset at
    the same relative depths. Of the L blocks with cross-attention (call order), block d = `relative_block(13, L)` is
    the reference query; blocks `relative_block(10, L)` … `relative_block(17, L)` (at least one, always holding d)
    give the cross maps and the propagation; order 5, segmentation at latent size, foreground from the cond global
    token, as the preset. At L = 28 this is the preset itself."""
    blocks = list(dict.fromkeys(x.block for x in layout.of_kind("cross")))
    if not blocks:
        raise ValueError("segmentor needs a denoiser with text cross-attention; this one has none")
    first, dense, last = (relative_block(i, len(blocks)) for i in (PIXART_BAND[0], PIXART_DENSE, PIXART_BAND[1]))
    band = tuple(blocks[first : last + 1])
    return replace(
        PIXART_SIGMA_PRESET,
        cross=band,
        dense=blocks[dense],
        self_blocks=band,
        name=f"rule for a {len(blocks)}-block transformer (algorithm.md §8.4)",
    )


def joint_rule(layout: ModelLayout) -> GoCAPreset:
    """GoCA's layers for a joint-attention transformer the authors did not configure (algorithm.md §8.5): their Flux
    preset at the same relative depths. Of the L joint blocks (call order), all give cross maps; block
    round(27·(L − 1)/56) is the reference; blocks round(12·(L − 1)/56) and round(18·(L − 1)/56) (one where they
    coincide) give the propagation, order 2. At L = 57 these are the preset's blocks."""
    blocks = list(dict.fromkeys(x.block for x in layout.of_kind("cross")))
    span = FLUX_DEPTH - 1

    def at(index: int) -> str:
        return blocks[(2 * index * (len(blocks) - 1) + span) // (2 * span)]

    return replace(
        FLUX_PRESET,
        dense=at(FLUX_DENSE),
        self_blocks=tuple(dict.fromkeys(at(i) for i in FLUX_SELF)),
        name=f"rule for a {len(blocks)}-block joint-attention transformer (algorithm.md §8.5)",
    )


def default_dense_block(layout: ModelLayout) -> str:
    """GoCA's dense feature block by the SD v1.5 rule (algorithm.md §2.4, §8.2): the 2nd up-path cross block at
    latent/2 (SD v1.5: `up_blocks.2.attentions.1`), the last one where that grid has one; without latent/2
    cross-attention, the same at the finest up-path cross grid."""
    ups = [x for x in layout.of_kind("cross") if x.position == "up"]
    if not ups:
        raise ValueError("this denoiser has no up-path cross-attention; set GoCAConfig.dense_layer")
    factor = 2 if any(x.factor == 2 for x in ups) else min(x.factor for x in ups)
    at = [x for x in ups if x.factor == factor]
    return at[min(1, len(at) - 1)].block


def default_self_blocks(layout: ModelLayout) -> tuple[str, ...]:
    """GoCA's propagation blocks by the SD v1.5 rule (algorithm.md §2.6, §8.2): at the finest grid with
    self-attention, the first two up-path and the second down-path blocks (SD v1.5: up_blocks.3.attentions.{0,1},
    down_blocks.0.attentions.1), or what of them exists."""
    selfs = layout.of_kind("self")
    if not selfs:
        raise ValueError("this denoiser has no self-attention; set GoCAConfig.propagation_order=0")
    finest = [x for x in selfs if x.factor == min(x.factor for x in selfs)]
    ups = [x.block for x in finest if x.position == "up"][:2]
    downs = [x.block for x in finest if x.position == "down"][1:2]
    return tuple(ups + downs) or (finest[0].block,)


@dataclass(frozen=True)
class GoCALayers:
    """The layers one GoCA call reads: cross blocks, the dense (reference-query) cross layer, the propagation self
    layers, the order, the segmentation grid factor (latent / factor; by default the propagation layers' grid), the
    foreground's branch (`GoCAPreset.foreground`), the rule that chose them (a preset's name, the transformer rule
    or the SD v1.5 rules, algorithm.md §8) and which parts the config named instead ("cross", "dense",
    "propagation", "order"); `cross_total` counts the layout's cross layers."""

    cross: list[AttentionLayer]
    dense: AttentionLayer
    propagation: list[AttentionLayer]
    order: int
    factor: int
    foreground: Literal["uncond", "cond"] = "uncond"
    rule: str = "config"
    configured: frozenset[str] = frozenset()
    cross_total: int = 0
    head: str = "dot"
    reference: str = "query"
    joint: bool = False

    def describe(self) -> str:
        """One line saying which rule applied and what it chose (algorithm.md §8); parts the config named are marked
        "(config)"."""

        def mark(part: str) -> str:
            return " (config)" if part in self.configured else ""

        n, blocks = len(self.cross), _blocks_text([x.block for x in self.cross])
        cross = f"all {n}" if n == self.cross_total else f"{blocks} ({n} of {self.cross_total})"
        if self.order:
            prop = f"propagation {_blocks_text([x.block for x in self.propagation])}{mark('propagation')}"
            prop += f", order {self.order}{mark('order')}"
        else:
            prop = f"no propagation{mark('order')}"
        fg = "cond global token" if self.foreground == "cond" else "uncond token 0"
        dense = f"dense {self.dense.block}{' attention output' if self.reference == 'output' else ''}{mark('dense')}"
        heads = f"heads {self.head}; " if self.joint else ""
        return (
            f"{self.rule}: cross {cross}{mark('cross')}; {heads}{dense}; {prop}; "
            f"segmentation at latent/{self.factor}; foreground from the {fg}"
        )


def _blocks_text(blocks: list[str]) -> str:
    """Block names, runs of consecutive last indices under one prefix joined: `transformer_blocks.10-17`."""
    runs: list[list] = []  # [prefix, first, last], or [name, None, None] without a trailing index
    for block in blocks:
        prefix, _, last = block.rpartition(".")
        if last.isdigit() and runs and runs[-1][0] == prefix and runs[-1][2] == int(last) - 1:
            runs[-1][2] = int(last)
        elif last.isdigit():
            runs.append([prefix, int(last), int(last)])
        else:
            runs.append([block, None, None])
    return ", ".join(p if a is None else f"{p}.{a}" + (f"-{b}" if b != a else "") for p, a, b in runs)


def goca_layers(layout: ModelLayout, config: GoCAConfig) -> GoCALayers:
    """Resolve a config against a layout (algorithm.md §8): explicit config names first, then the authors' preset
    for a recognised architecture, then the transformer rule (§8.4) or the SD v1.5 rules (§8.2)."""
    if not layout.of_kind("cross"):
        raise ValueError("segmentor needs a denoiser with text cross-attention; this one has none")
    preset = next((p for match, p in GOCA_PRESETS if match(layout)), None)
    if preset is None and layout.arch == "transformer":
        preset = transformer_rule(layout)
    if preset is None and layout.arch == "joint":
        preset = joint_rule(layout)
    configured = {
        part
        for part, value in [
            ("cross", config.cross_layers),
            ("dense", config.dense_layer),
            ("propagation", config.self_layers),
            ("order", config.propagation_order),
        ]
        if value is not None
    }
    cross_names = config.cross_layers or (preset.cross if preset else None)
    cross = layout.resolve(cross_names, "cross") if cross_names else layout.of_kind("cross")
    dense_name = config.dense_layer or (preset.dense if preset else default_dense_block(layout))
    dense = layout.resolve((dense_name,), "cross")[0]
    order = config.propagation_order if config.propagation_order is not None else (preset.order if preset else 2)
    self_names = config.self_layers or (preset.self_blocks if preset else None)
    if self_names is None:
        self_names = default_self_blocks(layout)
    selfs = layout.resolve(self_names, "self")
    factors = sorted({x.factor for x in selfs})
    if len(factors) > 1:
        raise ValueError(f"GoCA's propagation blocks must share one grid; got factors {factors} for {self_names}")
    grid = preset.grid_factor if preset and preset.grid_factor else factors[0]
    if grid > factors[0]:
        raise ValueError(f"GoCA's segmentation grid (factor {grid}) must not be coarser than its propagation blocks'")
    return GoCALayers(
        cross,
        dense,
        selfs if order else [],
        order,
        grid,
        preset.foreground if preset else "uncond",
        rule=preset.name if preset else "SD v1.5 rules (algorithm.md §8.2)",
        configured=frozenset(configured),
        cross_total=len(layout.of_kind("cross")),
        # joint attention: the preset's head method (the authors' Flux config averages heads; per-head output
        # weights are not defined for single-stream blocks, whose output projection mixes in the MLP)
        head=preset.head if preset is not None and preset.head is not None else config.head,
        reference=preset.reference if preset is not None else "query",
        joint=layout.arch == "joint",
    )


class GoCASegmentor(Segmentor):
    """GoCA segmentation (CVPR 2026) at every step: auto head/layer aggregation, rescaling, propagation, masks at
    the segmentation grid (the propagation blocks' or the preset's) brought to latent size by nearest
    (algorithm.md §2, §8)."""

    name = "goca"
    needs_text = True

    def __init__(self, config: GoCAConfig | None = None) -> None:
        self.config = config or GoCAConfig()

    def check_layout(self, layout: ModelLayout) -> None:
        goca_layers(layout, self.config)

    def start(self, context: SegmentationContext) -> CapturePlan:
        if context.tokens is None:
            raise ValueError(
                "segmentor='goca' needs the prompt text to find its caption tokens; pass `prompt` (or, with "
                "`prompt_embeds`, `caption=`) or use segmentor='scfg' or None"
            )
        cfg = self.config
        self.latent_hw = context.latent_hw
        self.layers = goca_layers(context.layout, cfg)
        logger.debug("GoCA layers: %s", self.layers.describe())
        f = self.layers.factor
        self.seg_hw = (-(-self.latent_hw[0] // f), -(-self.latent_hw[1] // f))
        tokens = context.tokens
        self.fg_from_cond = context.foreground_from_cond()  # a blank uncond condition (§8.2)
        self.rescale_tokens = tokens.content() if cfg.tokens == "content" else tokens.caption
        self.live_tokens = tokens.live
        self.live_ends = live_ends(tokens.live.cpu()).tolist()  # once per call: no device sync per step
        self.global_index = tokens.global_index
        self.key_mask = context.key_mask
        # foreground from the cond branch: the uncond half's maps are never read (only its channel 0, which the
        # cond global-token map replaces), so only the cond half is aggregated
        self.cond_only = self.layers.foreground == "cond"
        self._layer_weights: Tensor | None = None
        layout = context.layout
        if layout.arch == "joint":
            return self._start_joint(context)
        self.self_of = {x.name: layout.sibling(x, "self").name for x in self.layers.cross}
        self.plan = CapturePlan(*self._requests(layout))
        return self.plan

    # ------------------------------------------------------------------------------------ joint attention (§8.5)

    def _start_joint(self, context: SegmentationContext) -> CapturePlan:
        """A joint layout's plan: the cross view (image queries, text keys, image keys) of every block that gives
        cross maps or propagation, and the dense block's attention output; cond rows only. From the dense block on
        (call order), each layer's pass runs inside the forward pass and only its cross map (and a propagation
        block's q and keys) stays; earlier blocks keep q and keys until the reference exists (algorithm.md §8.5)."""
        cfg, layout, layers = self.config, context.layout, self.layers
        self.cross_of = {x.name: layout.sibling(x, "cross").name for x in layers.propagation}
        cross_names = {x.name for x in layers.cross}
        prop_names = set(self.cross_of.values())
        req: dict[str, set[Field]] = {}
        for name in [x.name for x in layers.cross] + list(self.cross_of.values()):
            req.setdefault(name, set()).update({"q", "k"})
        req.setdefault(layers.dense.name, set()).add("o" if layers.reference == "output" else "q")
        # the columns that stay in the maps: the cond half of the context mask (padding and unused encoders out)
        self.keep = split_cfg(context.key_mask)[1] if context.key_mask is not None else None
        self._passes: dict[str, JointLayerMaps] = {}  # this call's in-forward passes
        self._pseudo: list[Tensor | None] = [None]
        similarity = cfg.layer == "similarity"
        order = {x.name: x.order for x in layout.layers}
        dense = layers.dense.name

        def reduce(name: str):
            def fn(slot) -> Tensor:
                if similarity and name == dense:
                    feature = slot.o if layers.reference == "output" else slot.q
                    self._pseudo[0] = pseudo_self_attention(reference_feature(feature, cfg.reference_channels))
                out = self._joint_pass(slot, self._pseudo[0] if name in cross_names else None)
                self._passes[name] = out
                return out.cross

            return fn

        reducers = {
            name: Reduce(reduce(name), frozenset({"q", "k"}) if name in prop_names else frozenset())
            for name in req
            if not similarity or order[name] >= order[dense]
        }
        self.plan = CapturePlan(req, reducers, rows="cond")
        return self.plan

    def _joint_pass(self, slot, pseudo: Tensor | None) -> JointLayerMaps:
        """One joint layer's pass (`joint_layer_pass`) over its recorded cond rows."""
        text_only = self.config.cross_norm == "text"
        return joint_layer_pass(slot.q, slot.k, slot.k_rest, slot.heads, slot.scale, pseudo, text_only)

    def _segment_joint(self, step: int, record: AttentionRecord) -> tuple[Tensor, Tensor]:
        """Masks and foreground from a joint layout's cond record (algorithm.md §8.5): each layer's pass (made in the
        forward pass where the reference already existed, here otherwise), then GoCA's §2.4–2.7 as on PixArt-Sigma."""
        cfg, layers = self.config, self.layers
        refresh = self._layer_weights is None or step % cfg.layer_refresh == 0
        cross_names = [x.name for x in layers.cross]
        if cfg.layer == "similarity" and self._pseudo[0] is None:  # a record made without this plan's reducers
            ref = record[layers.dense.name]
            feature = ref.o if layers.reference == "output" else ref.q
            self._pseudo[0] = pseudo_self_attention(reference_feature(feature, cfg.reference_channels))
        with record_function("goca_scfg::goca_joint_layers"):
            passes = {}
            for name in dict.fromkeys(cross_names + [self.cross_of[x.name] for x in layers.propagation]):
                if name in self._passes:
                    passes[name] = self._passes.pop(name)
                else:
                    pseudo = self._pseudo[0] if name in cross_names else None
                    passes[name] = self._joint_pass(record[name], pseudo)
        self._pseudo[0] = None
        maps = []
        for name in cross_names:
            cross = passes[name].cross
            if self.keep is not None:
                cross = cross * pad_tokens(self.keep.to(cross.device), cross.shape[-1]).unsqueeze(1).float()
            maps.append(to_grid(cross, grid_shape(cross.shape[1], self.latent_hw)))
        if refresh:
            if cfg.layer == "average":
                batch = maps[0].shape[0]
                self._layer_weights = torch.full((batch, len(maps)), 1.0 / len(maps), device=maps[0].device)
            else:
                sims = torch.stack([passes[name].similarity for name in cross_names], dim=1)
                self._layer_weights = layer_weights_similarity(sims, cfg.eps)
        with record_function("goca_scfg::goca_aggregate"):
            agg = aggregate_layers(maps, self._layer_weights, self.seg_hw, cfg.eps)
        t = agg.shape[1]
        agg = global_token_into_uncond(torch.cat([agg, agg]), self.global_index)
        names = [self.cross_of[x.name] for x in layers.propagation]
        propagation = PropagationInputs(
            queries=[record[n].q for n in names],
            keys=[record[n].k_rest for n in names],
            heads=[record[n].heads for n in names],
            scales=[record[n].scale for n in names],
            order=layers.order,
            row_weights=[passes[n].image_share for n in names],
        )
        device = agg.device
        with record_function("goca_scfg::goca_segment"):
            rescale, live = pad_tokens(self.rescale_tokens, t).to(device), pad_tokens(self.live_tokens, t).to(device)
            masks, fg = goca_segment(agg, propagation, rescale, live, cfg)
        return resize_nearest(masks, self.latent_hw), resize_nearest(fg, self.latent_hw)

    def _requests(self, layout: ModelLayout) -> tuple[dict[str, set[Field]], dict[str, Reduce]]:
        """Fields per layer and their in-forward reductions: A_ℓ of each cross layer (§2.3), and for self layers
        that only feed the similarity the least it reads (§4.3): a coarser grid's head-mean map, a grid twice the
        dense one's even query rows; propagation layers and the dense grid's own self layers keep q and k."""
        cfg, layers = self.config, self.layers
        similarity = cfg.layer == "similarity"
        req: dict[str, set[Field]] = {}
        for x in layers.cross:
            req.setdefault(x.name, set()).update({"q", "k", "o"})
            if similarity:
                req.setdefault(self.self_of[x.name], set()).update({"q", "k"})
        if similarity:
            req.setdefault(layers.dense.name, set()).add("q")
        for x in layers.propagation:
            req.setdefault(x.name, set()).update({"q", "k"})

        key_mask, half = self.key_mask, self._half

        def heads(t):  # §2.3 inside the forward pass: only A_ℓ (2B, N, T) — or its cond half — is kept
            if not self.cond_only:
                return goca_head_aggregate(t.probs(key_mask=key_mask), t.o, t.w_out, cfg)
            probs = attention_probs(half(t.q), half(t.k), t.heads, t.scale, key_mask=half(key_mask))
            return goca_head_aggregate(probs, half(t.o), t.w_out, cfg)

        dense_name = layers.dense.name if similarity else None
        reducers = {
            x.name: Reduce(heads, frozenset({"q"}) if x.name == dense_name else frozenset()) for x in layers.cross
        }
        self.self_mode: dict[str, str] = {}
        if similarity:
            prop = {x.name for x in layers.propagation}
            by_name = {x.name: x for x in layout.layers}
            for name in dict.fromkeys(self.self_of.values()):
                s = by_name[name]
                if name in prop:
                    continue
                if s.factor > layers.dense.factor:
                    self.self_mode[name] = "map"
                    reducers[name] = HEAD_MEAN_CHUNKED
                elif 2 * s.factor == layers.dense.factor:
                    grid = (-(-self.latent_hw[0] // s.factor), -(-self.latent_hw[1] // s.factor))
                    self.self_mode[name] = "even"
                    reducers[name] = Reduce(lambda t, g=grid: even_query_rows(t.q, g), frozenset({"k"}))
        return req, reducers

    def segment(self, step: int, record: AttentionRecord) -> tuple[Tensor, Tensor]:
        if self.plan.rows == "cond":
            return self._segment_joint(step, record)
        cfg = self.config
        inputs = [self._cross_inputs(record, x) for x in self.layers.cross]
        prop = [record[x.name] for x in self.layers.propagation]
        propagation = PropagationInputs(
            queries=[split_cfg(r.q)[1] for r in prop],
            keys=[split_cfg(r.k)[1] for r in prop],
            heads=[r.heads for r in prop],
            scales=[r.scale for r in prop],
            order=self.layers.order,
        )
        if self._layer_weights is None or step % cfg.layer_refresh == 0:
            dense = self._half(record[self.layers.dense.name].q) if cfg.layer == "similarity" else None
            dense_hw = grid_shape(dense.shape[1], self.latent_hw) if dense is not None else (0, 0)
            with record_function("goca_scfg::goca_layer_weights"):
                pseudo, known = None, None
                if dense is not None:
                    feature = reference_feature(dense, cfg.reference_channels)
                    pseudo = pseudo_self_attention(feature, cfg.layer_query_stride)
                    propagation, known = self._shared_similarity(propagation, pseudo, dense_hw)
                self._layer_weights = goca_layer_weights(inputs, dense, dense_hw, cfg, pseudo=pseudo, known=known)
        with record_function("goca_scfg::goca_aggregate"):
            agg = goca_aggregate(inputs, self._layer_weights, self.seg_hw, cfg)
        if self.cond_only:  # (B, …) → [uncond, cond] with the uncond channel 0 the cond global-token map
            agg = global_token_into_uncond(torch.cat([agg, agg]), self.global_index)
        elif self.fg_from_cond.any():
            agg = global_token_into_uncond(agg, self.global_index, self.fg_from_cond)
        device = agg.device
        with record_function("goca_scfg::goca_segment"):
            masks, fg = goca_segment(
                agg,
                propagation,
                self.rescale_tokens.to(device),
                self.live_tokens.to(device),
                cfg,
                ends=self.live_ends,
            )
        return resize_nearest(masks, self.latent_hw), resize_nearest(fg, self.latent_hw)

    def _shared_similarity(
        self, propagation: PropagationInputs, pseudo: Tensor, dense_hw: tuple[int, int]
    ) -> tuple[PropagationInputs, dict[int, Tensor] | None]:
        """Where the propagation will form S (`explicit_propagation`, on the segmentation grid) and some of its blocks
        are cross layers' self siblings on the dense grid (SDXL), S is formed now and their cond-half
        s_ℓ read off its rows (`SimilarityTap`): the propagation then uses this S, the similarity skips those rows."""
        if propagation.row_weights is not None:
            return propagation, None
        b, n, _ = propagation.queries[0].shape
        hw = grid_shape(n, self.latent_hw)
        if hw != self.seg_hw or hw != dense_hw:
            return propagation, None
        if not explicit_propagation(b, n, propagation.order, False):  # S of every sample at once: b·N² bounded
            return propagation, None
        names = [x.name for x in self.layers.propagation]
        cross = [self.self_of[x.name] for x in self.layers.cross]
        layers = {i: names.index(name) for i, name in enumerate(cross) if name in names}
        if not layers:
            return propagation, None
        blocks = tuple(dict.fromkeys(layers.values()))
        tap = SimilarityTap(pseudo[-b:], self.config.layer_query_stride, blocks)
        args = (propagation.queries, propagation.keys, propagation.heads, propagation.scales)
        matrix, sims = mean_self_attention_and_similarity(*args, tap=tap)
        known = {i: sims[:, blocks.index(j)] for i, j in layers.items()}
        return replace(propagation, matrix=matrix), known

    def _half(self, x: Tensor | None) -> Tensor | None:
        """The cond half of a CFG-batch tensor when only it is segmented (`cond_only`), else the tensor."""
        return split_cfg(x)[1] if self.cond_only and x is not None else x

    def _cross_inputs(self, record: AttentionRecord, layer: AttentionLayer) -> CrossLayerInputs:
        """One cross block's A_ℓ and what the layer similarity reads of its self-attention sibling."""
        attn_cross = self.reduced(record, layer.name)
        name = self.self_of[layer.name]
        rs = record[name] if self.config.layer == "similarity" else None
        mode = self.self_mode.get(name, "raw")
        reduced = self._half(self.reduced(record, name)) if mode != "raw" else None
        return CrossLayerInputs(
            attn_cross=attn_cross,
            hw=grid_shape(attn_cross.shape[1], self.latent_hw),
            self_map=reduced if mode == "map" else None,
            self_q=reduced if mode == "even" else (self._half(rs.q) if rs else None),
            self_k=self._half(rs.k) if rs else None,
            self_heads=rs.heads if rs else 1,
            self_scale=rs.scale if rs else 1.0,
        )
