"""Per-region guidance of S-CFG (ALGORITHM §1.4): region norms of Δ, the rate map, clamp/cap/smooth, and
ε̂ = ε_u + w·r⊙Δ. Shared by every segmentor; pure torch, fp32 maths.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .config import SCFGConfig
from .ops import scfg_blur_taps, smooth


def guidance_norm(delta: Tensor) -> Tensor:
    """n(p) = ‖Δ(p)‖₂ over the latent channels (ALGORITHM §1.4 step 2). delta: (B, C, H, W) → (B, 1, H, W) fp32."""
    return torch.linalg.vector_norm(delta.float(), dim=1, keepdim=True)


def region_rate(norm: Tensor, masks: Tensor, fg: Tensor, eps: float = 1e-8) -> Tensor:
    """r(p) = Σ_t ρ_t M_t(p), ρ_t = N_fg·[|M_t| > 0] / (N_t + ε) (ALGORITHM §1.4 steps 3–5).

    norm: (B, 1, H, W); masks: (B, T, H, W) in {0,1}; fg: (B, 1, H, W). Returns the raw rate (B, 1, H, W).
    """
    masks, fg = masks.float(), fg.float()
    area = masks.sum(dim=(-2, -1))  # (B, T)
    region_norm = (norm * masks).sum(dim=(-2, -1)) / (area + eps)
    fg_norm = (norm * fg).sum(dim=(-2, -1)) / (fg.sum(dim=(-2, -1)) + eps)  # (B, 1)
    rho = fg_norm * (area > 0).float() / (region_norm + eps)
    return torch.einsum("bt,bthw->bhw", rho, masks).unsqueeze(1)


def clip_rate(rate: Tensor, guidance_scale: float, config: SCFGConfig) -> Tensor:
    """clamp(r, 0.8, 3.0) then min(r, 15/w) (ALGORITHM §1.4 step 6; the cap may go below 0.8, §5.10)."""
    rate = rate.clamp(config.rate_min, config.rate_max)
    return rate.clamp_max(config.cap_numerator / guidance_scale)


def smooth_rate(rate: Tensor) -> Tensor:
    """3×3 σ=0.5-quirk blur of the rate map, reflect padding (ALGORITHM §1.4 step 7)."""
    return smooth(rate, scfg_blur_taps())


def rate_map(delta: Tensor, masks: Tensor, fg: Tensor, guidance_scale: float, config: SCFGConfig) -> Tensor:
    """The full S-CFG rate (B, 1, H, W) fp32 from Δ and the masks (ALGORITHM §1.4 steps 2–7)."""
    rate = clip_rate(region_rate(guidance_norm(delta), masks, fg, config.region_eps), guidance_scale, config)
    return smooth_rate(rate) if config.smooth_rate else rate


def combine_guidance(eps_uncond: Tensor, eps_cond: Tensor, guidance_scale: float, rate: Tensor) -> Tensor:
    """ε̂ = ε_u + w·(r⊙Δ), r cast to ε's dtype (ALGORITHM §1.4 step 8).

    Deviation: w·(r⊙Δ) instead of (w·r)⊙Δ, equal up to rounding, so that r ≡ 1 gives diffusers' CFG bit for bit.
    """
    delta = eps_cond - eps_uncond
    return eps_uncond + guidance_scale * (rate.to(delta.dtype) * delta)
