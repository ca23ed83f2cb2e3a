"""Small tensor helpers shared by the segmentors and the guidance: blur kernels, padded smoothing, per-token
min–max, attention probabilities, resizes and the CFG batch split. Pure torch; everything here runs in fp32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def scfg_blur_taps(sigma: float = 0.5, size: int = 3) -> Tensor:
    """1-D taps of S-CFG's smoothing kernel exp(-((x-μ)/(2σ))²), normalised (algorithm.md §1.3 step 4, §5.3).

    Deviation: none; the (x-μ)/(2σ) quirk (σ_eff = √2·σ) is kept. For σ=0.5: [0.211942, 0.576117, 0.211942].
    """
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    taps = torch.exp(-((x / (2 * sigma)) ** 2))
    return (taps / taps.sum()).float()


def gaussian_taps(kernel_size: int, sigma: float) -> Tensor:
    """1-D Gaussian taps exp(-x²/(2σ²)), normalised, as torchvision's `gaussian_blur` (algorithm.md §2.5 step 2)."""
    x = torch.arange(kernel_size, dtype=torch.float64) - (kernel_size - 1) / 2
    taps = torch.exp(-0.5 * (x / sigma) ** 2)
    return (taps / taps.sum()).float()


def smooth(x: Tensor, taps: Tensor) -> Tensor:
    """Separable blur of every channel with `taps`⊗`taps`, reflect padding (algorithm.md §1.3 step 4, §2.5 step 2).

    x: (B, C, h, w); returns fp32 of the same shape.
    Deviation: where a map is too small for reflect padding (side <= radius), replicate padding is used.
    """
    x = x.float()
    k = taps.numel()
    pad = k // 2
    if pad == 0:
        return x
    b, c, h, w = x.shape
    mode = "reflect" if min(h, w) > pad else "replicate"
    y = F.pad(x.reshape(b * c, 1, h, w), (pad, pad, pad, pad), mode=mode)
    t = taps.to(device=x.device, dtype=torch.float32)
    y = F.conv2d(y, t.view(1, 1, 1, k))
    y = F.conv2d(y, t.view(1, 1, k, 1))
    return y.reshape(b, c, h, w)


def minmax_per_token(x: Tensor, eps: float) -> Tensor:
    """Per-channel min–max over the spatial grid to [0, 1] (algorithm.md §2.5 step 3, paper Eq. 12).

    x: (B, T, h, w). Deviation: the range is floored at `eps` (the released code divides by it unguarded), so a
    constant map becomes 0 instead of NaN.
    """
    flat = x.float().flatten(2)
    lo = flat.amin(dim=-1, keepdim=True)
    hi = flat.amax(dim=-1, keepdim=True)
    return ((flat - lo) / (hi - lo).clamp_min(eps)).view_as(x)


def attention_probs(
    q: Tensor, k: Tensor, heads: int, scale: float, head_mean: bool = False, key_mask: Tensor | None = None
) -> Tensor:
    """softmax(Q Kᵀ · scale) per head, in fp32 (the explicit map that SDPA never materialises).

    q: (B, N, C), k: (B, M, C) as produced by `to_q` / `to_k`; key_mask: (B, M), the keys the layer attends (an
    encoder attention mask; diffusers adds -10000 to the others, whose probabilities underflow to 0 — here -inf).
    Returns (B, H, N, M), or (B, N, M) with `head_mean`.
    """
    q, k = split_heads(q.float(), heads), split_heads(k.float(), heads)
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask.bool().to(logits.device)[:, None, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return probs.mean(dim=1) if head_mean else probs


_JOINT_CHUNK = 2**24  # fp32 logits (64 MiB) per temporary of the chunked joint softmax


def joint_logsumexp(q: Tensor, k: Tensor, heads: int, scale: float) -> Tensor:
    """log Σ_j exp(q·k_j·scale) per head and query, in fp32, over query-row chunks (no (N, M) map is kept).

    q: (B, N, C), k: (B, M, C) → (B, H, N)."""
    qh, kh = split_heads(q.float(), heads), split_heads(k.float(), heads)
    b, h, n, _ = qh.shape
    rows = max(1, _JOINT_CHUNK // max(1, b * h * kh.shape[2]))
    return torch.cat(
        [torch.logsumexp(qh[:, :, i : i + rows] @ kh.transpose(-1, -2) * scale, dim=-1) for i in range(0, n, rows)],
        dim=2,
    )


def joint_attention_probs(
    q: Tensor, k: Tensor, k_rest: Tensor, heads: int, scale: float, head_mean: bool = False
) -> Tensor:
    """The `k` columns of softmax(Q [K; K_rest]ᵀ·scale), the slice of a joint-attention softmax over two key sets
    (algorithm.md §8.5: the authors' `attention_probs[:, :, text_len:, :text_len]`), in fp32.

    q: (B, N, C); k: (B, M, C); k_rest: (B, M', C). Returns (B, H, N, M), or (B, N, M) with `head_mean`; rows sum to
    the share of attention on `k` (≤ 1)."""
    logits = split_heads(q.float(), heads) @ split_heads(k.float(), heads).transpose(-1, -2) * scale
    total = torch.logaddexp(torch.logsumexp(logits, dim=-1), joint_logsumexp(q, k_rest, heads, scale))
    probs = torch.exp(logits - total.unsqueeze(-1))
    return probs.mean(dim=1) if head_mean else probs


def split_heads(x: Tensor, heads: int) -> Tensor:
    """(B, N, C) → (B, H, N, C/H), the head layout of diffusers' attention processors."""
    b, n, c = x.shape
    if c % heads:
        raise ValueError(f"channel count {c} is not divisible by {heads} heads")
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def split_cfg(x: Tensor) -> tuple[Tensor, Tensor]:
    """Split a CFG batch into (uncond, cond) halves: the batch order is [uncond, cond] (algorithm.md §0)."""
    if x.shape[0] % 2:
        raise ValueError(f"a CFG batch has an even leading size, got {tuple(x.shape)}")
    uncond, cond = x.chunk(2)
    return uncond, cond


def grid_shape(n: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of an attention layer with `n` query tokens under a latent of size `latent_hw` (any aspect ratio)."""
    lh, lw = latent_hw
    factor = 1
    while factor <= max(lh, lw):
        h, w = math.ceil(lh / factor), math.ceil(lw / factor)
        if h * w == n:
            return h, w
        factor *= 2
    raise ValueError(f"{n} attention tokens match no power-of-two downsampling of the {lh}x{lw} latent")


def to_grid(x: Tensor, hw: tuple[int, int]) -> Tensor:
    """(B, N, T) token-last maps → (B, T, h, w) grids."""
    b, n, t = x.shape
    return x.transpose(1, 2).reshape(b, t, hw[0], hw[1])


def resize_bilinear(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize, align_corners=False, no antialias (as `F.interpolate` in both released codes)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def resize_nearest(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest resize (legacy 'nearest', as in both released codes)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="nearest")
