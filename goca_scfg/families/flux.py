"""Flux: `FluxPipeline` with a joint-attention transformer (19 double-stream + 38 single-stream blocks for
FLUX.1-dev/schnell), CLIP (pooled vector only) and T5 text. S-CFG's w is `true_cfg_scale` (real CFG with a negative
prompt); the embedded guidance of guidance-distilled Flux stays beside it.

GoCA's layers: the authors' Flux configuration (algorithm.md §8.5), recognised by the 57 joint blocks. Joint
transformers they did not configure (SD3, smaller Flux-like models) take this preset moved to the same relative
depth (segment/goca.py `joint_rule`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import BenchShapes, Family, GoCAPreset, SweepPreset

if TYPE_CHECKING:
    from ..layout import ModelLayout

FLUX_MODEL_ID = "black-forest-labs/FLUX.1-dev"

# FLUX.1's block counts and the authors' positions among its 57 joint blocks (numbered double-stream first, as
# `vit-block0` … `vit-block56` in their config): the reference block and the two propagation blocks.
FLUX_DOUBLE, FLUX_SINGLE = 19, 38
FLUX_DEPTH, FLUX_DENSE, FLUX_SELF = FLUX_DOUBLE + FLUX_SINGLE, 27, (12, 18)


def joint_blocks(layout: ModelLayout) -> list[str]:
    """The joint blocks of a layout in call order (the authors' block numbering)."""
    return list(dict.fromkeys(x.block for x in layout.of_kind("cross")))


def is_flux(layout: ModelLayout) -> bool:
    """FLUX.1's structure: 19 double-stream then 38 single-stream joint blocks."""
    blocks = joint_blocks(layout)
    double = [b for b in blocks if b.startswith("transformer_blocks.")]
    return layout.arch == "joint" and len(double) == FLUX_DOUBLE and len(blocks) == FLUX_DEPTH


def flux_block(index: int) -> str:
    """The diffusers name of the authors' `vit-block{index}` (0-18 double-stream, 19-56 single-stream)."""
    if index < FLUX_DOUBLE:
        return f"transformer_blocks.{index}"
    return f"single_transformer_blocks.{index - FLUX_DOUBLE}"


# GoCA src-main/configs/config-model/config_model_flux.py L18 (head 'average'), L27 (layer 'dot-product
# similarity'), L38 (rescaling 'sum-1 rescaling + per-token renorm+'), L43 (ref 'vit-block27-attn-out'), L45-105
# (cross maps of all 57 blocks), L171-180 (self maps of blocks 12 and 18), L182-187 (affinity, order 2).
# Generation forces: every step segments (their segmentation runs once, at t = 150, L10), the foreground is the cond
# global token (`</s>`; there is no uncond branch in their call), padding columns are dropped (algorithm.md §8.5).
FLUX_PRESET = GoCAPreset(
    cross=None,
    dense=flux_block(FLUX_DENSE),
    self_blocks=tuple(flux_block(i) for i in FLUX_SELF),
    order=2,
    foreground="cond",
    name="preset flux",
    head="average",
    reference="output",
)

FAMILY = Family(
    name="flux",
    title="Flux",
    model_id=FLUX_MODEL_ID,
    extends=("FluxPipeline",),
    pipeline="goca_scfg.pipeline_flux:FluxSCFGPipeline",
    denoiser="transformer",
    token_rule="goca_scfg.tokens:t5_prompt_tokens",  # option: max_sequence_length (the pipeline's, 512)
    tiny_models={"tiny-random-flux": "goca_scfg.testing:tiny_flux_pipeline"},
    tiny_components="goca_scfg.testing:tiny_flux_components",
    random_components="goca_scfg.testing:flux_dev_random_components",
    bench=BenchShapes(
        cases="1024b1",
        flops_sizes="1024",
        steps=28,
        dtype="bf16",
        methods=("cfg", "goca"),  # no S-CFG rule for joint attention
        call_kwargs={"true_cfg_scale": 4.0, "negative_prompt": ""},
    ),
    sweep_presets=(
        # FLUX.1-dev at 1024², bf16, its own flow-matching Euler, 28 steps, embedded guidance 3.5 (the model card's)
        # and true CFG over the scales below with an empty negative prompt.
        SweepPreset(
            "flux",
            ("cfg", "goca"),
            scales=(2.0, 3.0, 4.0, 5.0),
            settings={"steps": 28, "height": 1024, "width": 1024},
        ),  # fmt: skip
    ),
    goca_presets=((is_flux, FLUX_PRESET),),
    region_tokenizer="tokenizer_2",
    token_options={"max_sequence_length": 512},  # FluxPipeline's default
    scale_keyword="true_cfg_scale",
    negative_prompt_required=True,
)
