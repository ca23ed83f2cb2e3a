"""Stable Diffusion 3 / 3.5: `StableDiffusion3Pipeline` with a joint-attention transformer (MMDiT), CLIP-L/G and T5.

GoCA's layers: the authors never configured SD3; it takes their Flux configuration moved to the same relative depth
(segment/goca.py `joint_rule`, algorithm.md §8.5). Regions are named by the CLIP tokens of the joint context
(positions 0-76, `<sos>` global); the T5 positions are left out of the maps
(`StableDiffusion3SCFGPipeline.context_columns`).
"""

from __future__ import annotations

from .base import BenchShapes, Family, SweepPreset

SD3_MODEL_ID = "stabilityai/stable-diffusion-3.5-medium"

FAMILY = Family(
    name="sd3",
    title="Stable Diffusion 3",
    model_id=SD3_MODEL_ID,
    extends=("StableDiffusion3Pipeline",),
    pipeline="goca_scfg.pipeline_sd3:StableDiffusion3SCFGPipeline",
    denoiser="transformer",
    token_rule="goca_scfg.tokens:clip_prompt_tokens",
    tiny_models={"tiny-random-sd3": "goca_scfg.testing:tiny_sd3_pipeline"},
    tiny_components="goca_scfg.testing:tiny_sd3_components",
    random_components="goca_scfg.testing:sd35_medium_random_components",
    bench=BenchShapes(cases="1024b1", flops_sizes="1024", steps=28, dtype="bf16", methods=("cfg", "goca")),
    sweep_presets=(
        # SD3.5 medium at 1024², bf16, its own flow-matching Euler, 40 steps (its model card), scales below.
        SweepPreset(
            "sd3", ("cfg", "goca"), scales=(3.0, 4.5, 7.0), settings={"steps": 40, "height": 1024, "width": 1024}
        ),
    ),
)
