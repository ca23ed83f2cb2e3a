"""Stable Diffusion 1.x/2.x: `StableDiffusionPipeline` with a UNet2DConditionModel and one CLIP text encoder.

GoCA's layers: no preset here. The SD v1.5 rules of segment/goca.py (algorithm.md §8.2) are the rule for every UNet
the authors did not configure, and on SD v1.x/2.x they give the authors' SD v1.5 lists exactly (`cfg15`, §0.1);
S-CFG's official blocks likewise (§8.1). tests/test_layout_models.py pins both.
"""

from __future__ import annotations

from .base import BenchShapes, Family, SweepPreset

SD15_MODEL_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
_METHODS = ("cfg", "scfg", "goca")

FAMILY = Family(
    name="sd15",
    title="Stable Diffusion 1.x/2.x",
    model_id=SD15_MODEL_ID,
    extends=("StableDiffusionPipeline",),
    pipeline="goca_scfg.pipeline:StableDiffusionSCFGPipeline",
    denoiser="unet",
    token_rule="goca_scfg.tokens:clip_prompt_tokens",
    tiny_models={"tiny-random": "goca_scfg.testing:tiny_pipeline"},
    tiny_components="goca_scfg.testing:tiny_components",
    random_components="goca_scfg.testing:sd15_random_components",
    bench=BenchShapes(cases="512b1,512b8,1024b1", flops_sizes="512,768,1024"),
    sweep_presets=(
        # algorithm.md §3.2: SD v1.5, fp16, 512² (native size), 50 steps, the model's PNDM, seed 42 for every caption.
        SweepPreset("paper", _METHODS),
        # As "paper" but every caption gets its own noise, drawn on the CPU so that any device reproduces it.
        SweepPreset("per-image", _METHODS, settings={"seed_mode": "per-image", "generator_device": "cpu"}),
    ),
)
