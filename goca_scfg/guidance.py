"""Per-region guidance of S-CFG (algorithm.md §1.4): region norms of Δ, the rate map, clamp/cap/smooth, and
ε̂ = ε_u + w·r⊙Δ, and `SpatialGuidance`, the per-step wiring of a segmentor to them that every SCFG pipeline uses.
Pure torch, fp32 maths.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor
from torch.profiler import record_function

from .capture import AttentionRecord
from .checks import check_bool, check_float, check_masks
from .ops import scfg_blur_taps, smooth
from .segment.base import SegmentationContext, Segmentor


def guidance_norm(delta: Tensor) -> Tensor:
    """n(p) = ‖Δ(p)‖₂ over the latent channels (algorithm.md §1.4 step 2). delta: (B, C, H, W) → (B, 1, H, W) fp32."""
    return torch.linalg.vector_norm(delta.float(), dim=1, keepdim=True)


def region_rate(norm: Tensor, masks: Tensor, fg: Tensor, eps: float = 1e-8) -> Tensor:
    """r(p) = Σ_t ρ_t M_t(p), ρ_t = N_fg·[|M_t| > 0] / (N_t + ε) (algorithm.md §1.4 steps 3–5).

    norm: (B, 1, H, W); masks: (B, T, H, W) in {0,1}; fg: (B, 1, H, W). Returns the raw rate (B, 1, H, W).
    """
    masks, fg = masks.float(), fg.float()
    area = masks.sum(dim=(-2, -1))  # (B, T)
    region_norm = (norm * masks).sum(dim=(-2, -1)) / (area + eps)
    fg_norm = (norm * fg).sum(dim=(-2, -1)) / (fg.sum(dim=(-2, -1)) + eps)  # (B, 1)
    rho = fg_norm * (area > 0).float() / (region_norm + eps)
    return torch.einsum("bt,bthw->bhw", rho, masks).unsqueeze(1)


def clip_rate(rate: Tensor, guidance_scale: float, rule: SCFGRate) -> Tensor:
    """clamp(r, 0.8, 3.0) then min(r, 15/w) (algorithm.md §1.4 step 6; the cap may go below 0.8, §5.10)."""
    rate = rate.clamp(rule.rate_min, rule.rate_max)
    return rate.clamp_max(rule.cap_numerator / guidance_scale)


def smooth_rate(rate: Tensor) -> Tensor:
    """3×3 σ=0.5-quirk blur of the rate map, reflect padding (algorithm.md §1.4 step 7)."""
    return smooth(rate, scfg_blur_taps())


def rate_map(delta: Tensor, masks: Tensor, fg: Tensor, guidance_scale: float, rule: SCFGRate) -> Tensor:
    """The full S-CFG rate (B, 1, H, W) fp32 from Δ and the masks (algorithm.md §1.4 steps 2–7)."""
    rate = clip_rate(region_rate(guidance_norm(delta), masks, fg, rule.region_eps), guidance_scale, rule)
    return smooth_rate(rate) if rule.smooth else rate


class RateRule(abc.ABC):
    """How strongly each pixel is guided: the rate r of ε̂ = ε_u + w·r⊙Δ (algorithm.md §1.4).

    A rule is called at every segmented step with Δ = ε_c − ε_u (B, C, H, W), the region masks (B, T, H, W) in
    {0, 1} and the foreground (B, 1, H, W) at latent size, and the step's w; it returns r (B, 1, H, W) fp32. r ≡ 1 is
    plain CFG. A variant of the rule is a new subclass (frozen dataclass: its fields are its settings).
    """

    @abc.abstractmethod
    def __call__(self, delta: Tensor, masks: Tensor, fg: Tensor, guidance_scale: float) -> Tensor:
        """r (B, 1, H, W) fp32."""

    def describe(self) -> dict:
        """Plain-dict view (class and settings), for manifests and saved guider configs."""
        return {"rule": type(self).__name__, **{f.name: getattr(self, f.name) for f in fields(self)}}


@dataclass(frozen=True)
class SCFGRate(RateRule):
    """S-CFG's rate (CVPR 2024; algorithm.md §1.4): foreground-normalised inverse region norms of Δ, clamped to
    [0.8, 3.0], capped at 15/w and smoothed; the constants of the released code (SCFG commit 4e5c9a7)."""

    rate_min: float = 0.8  # SCFG sd/sd.py L149: clamp(0.8, 3.0)
    rate_max: float = 3.0  # SCFG sd/sd.py L149
    cap_numerator: float = 15.0  # SCFG sd/sd.py L150: rate <= 15 / w
    smooth: bool = True  # SCFG sd/sd.py L153-158: 3x3 sigma=0.5-quirk blur of the rate map
    region_eps: float = 1e-8  # SCFG sd/sd.py L133, L137, L146: epsilons of the region means and ratio

    def __post_init__(self) -> None:
        for name in ("rate_min", "rate_max", "cap_numerator", "region_eps"):
            check_float(f"SCFGRate.{name}", getattr(self, name), above=0)
        if self.rate_min > self.rate_max:
            raise ValueError(f"SCFGRate.rate_min={self.rate_min} must be <= SCFGRate.rate_max={self.rate_max}")
        check_bool("SCFGRate.smooth", self.smooth)

    def __call__(self, delta: Tensor, masks: Tensor, fg: Tensor, guidance_scale: float) -> Tensor:
        return rate_map(delta, masks, fg, guidance_scale, self)


def rate_rule_from(value: RateRule | dict | None) -> RateRule:
    """A rate rule from itself, its `describe()` dict (a saved guider config) or None (S-CFG's)."""
    if value is None:
        return SCFGRate()
    if isinstance(value, RateRule):
        return value
    if isinstance(value, dict) and value.get("rule") == "SCFGRate":
        return SCFGRate(**{k: v for k, v in value.items() if k != "rule"})
    raise TypeError(f"rate_rule must be a RateRule (e.g. SCFGRate()), its describe() dict or None, got {value!r}")


def combine_guidance(eps_uncond: Tensor, eps_cond: Tensor, guidance_scale: float, rate: Tensor) -> Tensor:
    """ε̂ = ε_u + w·(r⊙Δ), r cast to ε's dtype (algorithm.md §1.4 step 8).

    Deviation: w·(r⊙Δ) instead of (w·r)⊙Δ, equal up to rounding, so that r ≡ 1 gives diffusers' CFG bit for bit.
    """
    delta = eps_cond - eps_uncond
    return eps_uncond + guidance_scale * (rate.to(delta.dtype) * delta)


# ----------------------------------------------------------------------------------------------- per step


@dataclass
class SCFGStepMaps:
    """What the segmentor decided at one denoising step, for every image of the batch (CPU tensors).

    labels: (B, h, w) long, the winning token index per latent pixel (first index on ties); foreground: (B, h, w)
    bool; rate: (B, h, w) float, the guidance rate r applied at that pixel; tokens: per image, the prompt's token
    strings (None when only `prompt_embeds` were given), so `tokens[b][labels[b, y, x]]` names a region.
    """

    step: int
    timestep: int
    labels: Tensor
    foreground: Tensor
    rate: Tensor
    tokens: list[list[str]] | None


@dataclass
class SCFGStepRates:
    """The guidance strength one denoising step applied, per image (cheap: kept on every segmenting call).

    guidance_scale: the nominal w used at this step; mean: (B,) mean rate r over all latent pixels; fg_mean: (B,)
    mean r over the foreground (NaN where the foreground is empty). The effective scale of a step is w·mean.
    """

    step: int
    timestep: int
    guidance_scale: float
    mean: Tensor
    fg_mean: Tensor


def step_rates(step: int, timestep: Any, guidance_scale: float, rate: Tensor, fg: Tensor) -> SCFGStepRates:
    """Mean applied rate over all pixels and over the foreground, per image (kept on the device until read)."""
    fg = fg.float()
    fg_mean = (rate * fg).sum(dim=(1, 2, 3)) / fg.sum(dim=(1, 2, 3))  # 0/0 = NaN for an empty foreground
    return SCFGStepRates(step, int(timestep), float(guidance_scale), rate.mean(dim=(1, 2, 3)), fg_mean)


class SpatialGuidance:
    """One call's segmentation and per-step guidance: `requests`/`reducers` for `capture_attention`,
    `masks(step, record)` → (masks, fg), and `__call__` → ε̂ = ε_u + w·r⊙Δ, keeping maps and rates.

    Built by the SCFG pipelines' `spatial_guidance`; usable on its own to segment any step of a run (e.g. to
    compare two configs on the same maps). Stages run under `torch.profiler.record_function` labels `goca_scfg::*`.
    """

    def __init__(
        self,
        segmentor: Segmentor,
        context: SegmentationContext,
        rate_rule: RateRule | None = None,
        return_maps: bool = False,
    ) -> None:
        self.segmentor = segmentor
        self.batch, self.latent_hw = context.batch, context.latent_hw  # what every step's masks must match
        self.plan = segmentor.start(context)
        self.rate_rule = rate_rule or SCFGRate()
        self.tokens = context.tokens.strings if context.tokens is not None else None
        self.return_maps = return_maps
        self.maps: list[SCFGStepMaps] = []
        self.rates: list[SCFGStepRates] = []

    @property
    def requests(self) -> dict:
        return self.plan.requests

    @property
    def reducers(self) -> dict:
        return self.plan.reducers

    def masks(self, step: int, record: AttentionRecord) -> tuple[Tensor, Tensor]:
        """Region masks (B, T, H, W) and foreground (B, 1, H, W) at latent size from one denoiser call's record
        (checked: a segmentor of your own that returns other shapes is named, not broadcast into the rate)."""
        result = self.segmentor.segment(step, record)
        return check_masks(type(self.segmentor).__name__, step, result, self.batch, self.latent_hw)

    def __call__(
        self,
        step: int,
        timestep: Any,
        record: AttentionRecord,
        eps_uncond: Tensor,
        eps_cond: Tensor,
        guidance_scale: float,
    ) -> Tensor:
        """ε̂ for this step from the maps of the denoiser call that produced (ε_u, ε_c), at scale w = `guidance_scale`
        (read from the pipeline every step, so step-end callbacks may change it)."""
        masks, fg = self.masks(step, record)
        with record_function("goca_scfg::rate"):
            rate = self.rate_rule(eps_cond - eps_uncond, masks, fg, guidance_scale)
        record.clear()
        self.rates.append(step_rates(step, timestep, guidance_scale, rate, fg))
        if self.return_maps:
            self.maps.append(
                SCFGStepMaps(
                    step=step,
                    timestep=int(timestep),
                    labels=masks.argmax(dim=1).cpu(),
                    foreground=fg[:, 0].bool().cpu(),
                    rate=rate[:, 0].cpu(),
                    tokens=self.tokens,
                )
            )
        with record_function("goca_scfg::combine"):
            return combine_guidance(eps_uncond, eps_cond, guidance_scale, rate)

    def step_rates(self) -> list[SCFGStepRates]:
        """The rates of every step so far, moved to the CPU."""
        return [replace(r, mean=r.mean.cpu(), fg_mean=r.fg_mean.cpu()) for r in self.rates]
