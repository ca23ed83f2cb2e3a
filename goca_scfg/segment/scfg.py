"""Official S-CFG segmentation (algorithm.md §1.3): low-resolution head-mean maps, SSGC refinement, 3×3 smoothing,
per-token mean normalisation, 77-token argmax regions (cond half) and the `<sos>`-vs-rest foreground (uncond half).

Pure tensor functions; `scfg_segment` wires them over the maps of one UNet call, and `SCFGSegmentor` picks the
layers of any UNet (`scfg_layers`) and runs it at every denoising step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.profiler import record_function

from ..capture import HEAD_MEAN, AttentionRecord
from ..config import SCFGConfig
from ..layout import AttentionLayer, ModelLayout
from ..ops import grid_shape, resize_bilinear, resize_nearest, scfg_blur_taps, smooth, split_cfg, to_grid
from .base import CapturePlan, SegmentationContext, Segmentor


def ssgc_refine(attn_self: Tensor, attn_cross: Tensor, variant: str = "official") -> Tensor:
    """S̃·A with S-CFG's self-attention refinement (algorithm.md §1.3 steps 1–2, §5.1).

    attn_self: (B, N, N) rows sum to 1; attn_cross: (B, N, T). Returns (B, N, T); rows still sum to 1.
    "official" is (S + 3·S²)/4 as the released code computes; "paper" is the mean of S, S², S³, S⁴.
    Deviation: S̃·A is formed as powers of S applied to A (no N×N product), equal up to rounding.
    """
    sa = torch.bmm(attn_self, attn_cross)
    ssa = torch.bmm(attn_self, sa)
    if variant == "official":
        return (sa + 3 * ssa) / 4
    if variant == "paper":
        s3a = torch.bmm(attn_self, ssa)
        return (sa + ssa + s3a + torch.bmm(attn_self, s3a)) / 4
    raise ValueError(f"unknown SSGC variant {variant!r}; expected 'official' or 'paper'")


def normalize_by_spatial_mean(maps: Tensor, eps: float) -> Tensor:
    """A_t / (mean_{h,w} A_t + eps) per channel (algorithm.md §1.3 steps 5–6). maps: (B, C, h, w)."""
    return maps / (maps.mean(dim=(-2, -1), keepdim=True) + eps)


def foreground_pair(maps: Tensor) -> Tensor:
    """(f₀, f₁) = (`<sos>` map, sum of the other tokens) (algorithm.md §1.3 step 6). (B, T, h, w) → (B, 2, h, w)."""
    return torch.cat([maps[:, :1], maps[:, 1:].sum(dim=1, keepdim=True)], dim=1)


def token_region_masks(scores: Tensor) -> Tensor:
    """M_t(p) = [score_t(p) is the max over all T tokens] (algorithm.md §1.3 step 9; ties give several ones, §5.4).

    scores: (B, T, h, w) → float {0, 1} masks of the same shape.
    """
    return (scores == scores.amax(dim=1, keepdim=True)).float()


def foreground_mask(pair: Tensor) -> Tensor:
    """fg = 1 − [f̄₀ is the max of (f̄₀, f̄₁)] = [f̄₁ > f̄₀] (algorithm.md §1.3 step 10). (B, 2, h, w) → (B, 1, h, w)."""
    return (pair[:, 1:2] > pair[:, 0:1]).float()


@dataclass(frozen=True)
class SCFGMapPair:
    """One transformer block's head-mean maps for the whole CFG batch: self (2B, N, N), cross (2B, N, T), grid."""

    attn_self: Tensor
    attn_cross: Tensor
    hw: tuple[int, int]


def scfg_segment(
    maps: list[SCFGMapPair],
    mask_hw: tuple[int, int],
    latent_hw: tuple[int, int],
    config: SCFGConfig,
    fg_from_cond: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Official S-CFG masks from the watched blocks of one UNet call (algorithm.md §1.3, pseudocode §1.5).

    maps: blocks at the ratios of `config.ratios`, both CFG halves; mask_hw: grid of the first ratio (16×16 at
    512 px); fg_from_cond: (B,) bool, images whose foreground pair comes from the cond half (blank uncond).
    Returns masks (B, T, H, W) and fg (B, 1, H, W) at latent size (nearest up-sampling, §1.4 step 1).
    Deviation: batch of any size (the reference too), maps formed in fp32; fp16 in the released code.
    """
    if not maps:
        raise ValueError("S-CFG needs at least one block of maps")
    taps = scfg_blur_taps()
    tok_acc = pair_acc = 0
    for hw in dict.fromkeys(m.hw for m in maps):  # blocks of one grid are processed together (fewer kernels)
        group = [m for m in maps if m.hw == hw]
        batch = group[0].attn_self.shape[0]
        attn_self = torch.cat([m.attn_self.float() for m in group])  # (G·2B, N, N)
        attn_cross = torch.cat([m.attn_cross.float() for m in group])
        grid = resize_bilinear(to_grid(ssgc_refine(attn_self, attn_cross, config.ssgc), hw), mask_hw)
        if config.smooth_maps:
            grid = smooth(grid, taps)
        tok = normalize_by_spatial_mean(grid, config.norm_eps)
        pair = foreground_pair(grid)
        # Deviation: the released code divides the pair by its mean with no epsilon (§5.5); the floor only
        # matters for an all-zero map, which softmax probabilities never give.
        pair = pair / pair.mean(dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        tok_acc = tok_acc + tok.view(len(group), batch, *tok.shape[1:]).sum(0)
        pair_acc = pair_acc + pair.view(len(group), batch, *pair.shape[1:]).sum(0)
    tok_acc, pair_acc = tok_acc / len(maps), pair_acc / len(maps)
    _, tok_cond = split_cfg(tok_acc)
    pair_uncond, pair_cond = split_cfg(pair_acc)
    if fg_from_cond is not None:  # a blank uncond condition: the cond branch's pair (algorithm.md §8.2)
        pair_uncond = torch.where(fg_from_cond.to(pair_acc.device).view(-1, 1, 1, 1), pair_cond, pair_uncond)
    masks = resize_nearest(token_region_masks(tok_cond), latent_hw)
    fg = resize_nearest(foreground_mask(pair_uncond), latent_hw)
    return masks, fg


def scfg_layers(layout: ModelLayout, ratios: tuple[int, ...]) -> list[tuple[AttentionLayer, AttentionLayer]]:
    """(self, cross) pairs S-CFG reads (algorithm.md §8.1): for each configured ratio the cross-attention grid
    closest to it (log scale, ties to the coarser), there the first transformer block of every attention module.

    SD v1.x/2.x: exactly the official latent/4 and latent/8 blocks; SDXL: the latent/4 modules (no latent/8).
    """
    if layout.arch != "unet":
        raise ValueError(
            "segmentor='scfg' is defined for UNet denoisers only: the released S-CFG code reads UNet blocks at "
            "latent/4 and latent/8 and has no transformer variant, and the authors' PixArt-Sigma code (GoCA "
            "utils_sigma.py) defines only GoCA masks; use segmentor='goca' (GoCAConfig.vanilla() for their vanilla "
            "baseline)"
        )
    factors = layout.cross_factors()
    if not factors:
        raise ValueError("segmentor needs a denoiser with text cross-attention; this one has none")
    grids = dict.fromkeys(min(factors, key=lambda f: (abs(math.log2(f / r)), -f)) for r in ratios)
    first_blocks = [
        x for x in layout.of_kind("cross") if x.block == x.module or x.block.endswith(".transformer_blocks.0")
    ]
    return [(layout.sibling(x, "self"), x) for g in grids for x in first_blocks if x.factor == g]


class SCFGSegmentor(Segmentor):
    """The official S-CFG segmentation (CVPR 2024) at every step: SSGC-refined head-mean maps (algorithm.md §1.3)."""

    name = "scfg"

    def __init__(self, config: SCFGConfig | None = None) -> None:
        self.config = config or SCFGConfig()

    def check_layout(self, layout: ModelLayout) -> None:
        scfg_layers(layout, self.config.ratios)

    def start(self, context: SegmentationContext) -> CapturePlan:
        self.latent_hw = context.latent_hw
        self.fg_from_cond = context.foreground_from_cond()
        self.blocks = scfg_layers(context.layout, self.config.ratios)
        names = [x.name for pair in self.blocks for x in pair]
        self.plan = CapturePlan({n: {"q", "k"} for n in names}, {n: HEAD_MEAN for n in names})  # §1.2: head means
        return self.plan

    def segment(self, step: int, record: AttentionRecord) -> tuple[Tensor, Tensor]:
        with record_function("goca_scfg::scfg_segment"):
            pairs = []
            for s, c in self.blocks:
                attn_cross = self.reduced(record, c.name)
                hw = grid_shape(attn_cross.shape[1], self.latent_hw)
                pairs.append(SCFGMapPair(self.reduced(record, s.name), attn_cross, hw))
            return scfg_segment(pairs, pairs[0].hw, self.latent_hw, self.config, self.fg_from_cond)
