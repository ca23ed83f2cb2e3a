"""PixArt-Sigma: `PixArtSigmaPipeline` with a 28-block diffusion transformer and T5 text (algorithm.md §8.3).

GoCA's layers: the authors' PixArt-Sigma configuration, recognised by the transformer's 28 cross-attention blocks.
Transformers they did not configure take this preset moved to the same relative depth (segment/goca.py
`transformer_rule`, algorithm.md §8.4), which reads `PIXART_SIGMA_PRESET` and the positions below.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import BenchShapes, Family, GoCAPreset, SweepPreset

if TYPE_CHECKING:
    from ..layout import ModelLayout

PIXART_SIGMA_MODEL_ID = "PixArt-alpha/PixArt-Sigma-XL-2-512-MS"  # the authors' PixArt-Sigma (algorithm.md §8.3)

# PixArt-Sigma-XL/2's depth and the authors' positions in it (reference query, cross/self band; sources below); the
# transformer rule (algorithm.md §8.4) moves these positions to any depth.
PIXART_DEPTH, PIXART_DENSE, PIXART_BAND = 28, 13, (10, 17)


def pixart_blocks(first: int, last: int) -> tuple[str, ...]:
    """`transformer_blocks.first` … `transformer_blocks.last`."""
    return tuple(f"transformer_blocks.{i}" for i in range(first, last + 1))


def is_pixart(layout: ModelLayout) -> bool:
    """PixArt-α/Σ-XL/2's structure: a transformer of 28 blocks `transformer_blocks.0` … `.27` with cross-attention."""
    blocks = [x.block for x in layout.of_kind("cross")]
    return layout.arch == "transformer" and blocks == list(pixart_blocks(0, PIXART_DEPTH - 1))


# GoCA src-additional/generation-experiment/configs/config_model_sigma.py L43 (ref), L45-74 (cross 10-17),
# L77-89 (self 10-17), L91-96 (order 5), L9 (feat_size = latent at 512 px); utils_sigma.py L329-330 (fg)
PIXART_SIGMA_PRESET = GoCAPreset(
    cross=pixart_blocks(*PIXART_BAND),
    dense=f"transformer_blocks.{PIXART_DENSE}",
    self_blocks=pixart_blocks(*PIXART_BAND),
    order=5,
    grid_factor=1,
    foreground="cond",
    name="preset pixart-sigma",
)

FAMILY = Family(
    name="pixart-sigma",
    title="PixArt-Sigma",
    model_id=PIXART_SIGMA_MODEL_ID,
    extends=("PixArtSigmaPipeline",),
    pipeline="goca_scfg.pipeline_pixart:PixArtSigmaSCFGPipeline",
    denoiser="transformer",
    token_rule="goca_scfg.tokens:t5_prompt_tokens",  # option: max_sequence_length (the pipeline's, 300)
    tiny_models={"tiny-random-pixart": "goca_scfg.testing:tiny_pixart_pipeline"},
    tiny_components="goca_scfg.testing:tiny_pixart_components",
    # PixArt-Sigma-XL-2's transformer (the 512-MS config; other sizes by position-embedding interpolation) with
    # SDXL's VAE and a one-layer full-width T5
    random_components="goca_scfg.testing:pixart_sigma_random_components",
    bench=BenchShapes(
        cases="512b1,512b8,1024b1",
        flops_sizes="512,1024",
        methods=("cfg", "goca", "goca-fast"),  # S-CFG has no DiT segmentation
        # no resolution binning, so the case size is what is measured
        call_kwargs={"use_resolution_binning": False},
    ),
    sweep_presets=(
        # algorithm.md §8.3, as the authors generate with PixArt-Sigma (generate_for_fid_sigma.py L417-479): the
        # 512-MS model, fp16, 512², its own DPM-Solver++, 20 steps, seed 42 for every caption. S-CFG's released code
        # has no DiT segmentation, so the S-CFG baseline is GoCA's vanilla config, as in their PixArt runs.
        SweepPreset(
            "pixart-sigma", ("cfg", "goca-vanilla", "goca"), settings={"steps": 20, "height": 512, "width": 512}
        ),
    ),
    goca_presets=((is_pixart, PIXART_SIGMA_PRESET),),
)
