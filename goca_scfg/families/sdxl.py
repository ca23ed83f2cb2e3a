"""Stable Diffusion XL: `StableDiffusionXLPipeline` with its 1/2/10-block UNet and two CLIP text encoders.

GoCA's layers: the authors' SDXL configuration (algorithm.md §8.2), recognised by the UNet's attention structure
(`ModelLayout.signature`: per attention module its position, grid factor and transformer-block count).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import BenchShapes, Family, GoCAPreset, SweepPreset

if TYPE_CHECKING:
    from ..layout import ModelLayout

SDXL_MODEL_ID = "stabilityai/stable-diffusion-xl-base-1.0"

# (position, grid factor, transformer blocks) per attention module, in call order
SDXL_SIGNATURE = (
    (("down", 2, 2),) * 2 + (("down", 4, 10),) * 2 + (("mid", 4, 10),) + (("up", 4, 10),) * 3 + (("up", 2, 2),) * 3
)


def is_sdxl(layout: ModelLayout) -> bool:
    """SDXL base's UNet structure (`SDXL_SIGNATURE`), whatever its widths."""
    return layout.arch == "unet" and layout.signature() == SDXL_SIGNATURE


# GoCA src-main/configs/config-model/config_model_xl.py L43 (ref), L45-123 (cross), L126-138 (self), L140-145
SDXL_PRESET = GoCAPreset(
    cross=None,
    dense="up_blocks.1.attentions.0.transformer_blocks.0",
    self_blocks=(
        "up_blocks.1.attentions.0.transformer_blocks.0",
        "up_blocks.1.attentions.0.transformer_blocks.1",
        "up_blocks.1.attentions.1.transformer_blocks.0",
        "up_blocks.1.attentions.1.transformer_blocks.1",
        "up_blocks.1.attentions.2.transformer_blocks.0",
        "down_blocks.1.attentions.0.transformer_blocks.0",
        "down_blocks.1.attentions.0.transformer_blocks.1",
    ),
    order=2,
    name="preset sdxl",
)

FAMILY = Family(
    name="sdxl",
    title="Stable Diffusion XL",
    model_id=SDXL_MODEL_ID,
    extends=("StableDiffusionXLPipeline",),
    pipeline="goca_scfg.pipeline_sdxl:StableDiffusionXLSCFGPipeline",
    denoiser="unet",
    # the first tokenizer's tokens name the regions (the second's where there is no first; algorithm.md §8.2)
    token_rule="goca_scfg.tokens:clip_prompt_tokens",
    tiny_models={"tiny-random-xl": "goca_scfg.testing:tiny_xl_pipeline"},
    tiny_components="goca_scfg.testing:tiny_xl_components",
    random_components="goca_scfg.testing:sdxl_random_components",
    bench=BenchShapes(cases="1024b1", flops_sizes="1024"),
    sweep_presets=(
        # SDXL base 1.0 at its native 1024², fp16, the model's own scheduler (Euler, as its model card runs it) and
        # the same 50 steps, scales and seed as "paper", so the two models' tables compare row for row.
        SweepPreset("sdxl", ("cfg", "scfg", "goca")),
    ),
    goca_presets=((is_sdxl, SDXL_PRESET),),
)
