"""Loading an SCFG pipeline for a model name: the SCFG class that matches the model's `model_index.json`
(`StableDiffusionPipeline` → `StableDiffusionSCFGPipeline`, …), or one of the offline tiny random models; both
tables come from the model family registry (goca_scfg/families/).

Used by the CLI, the evaluation sweep and the benchmarks, so `--model` means the same everywhere.
"""

from __future__ import annotations

import json
import os

from .families import FAMILIES, Family, family_of, resolve, tiny_models
from .families.pixart import PIXART_SIGMA_MODEL_ID
from .families.sd import SD15_MODEL_ID
from .families.sdxl import SDXL_MODEL_ID

# diffusers pipeline class named in model_index.json → our subclass ("module:attribute", imported when used); from
# the family registry (goca_scfg/families/)
SCFG_PIPELINES: dict[str, str] = {name: f.pipeline for f in FAMILIES for name in f.class_names}
# offline tiny random models (no download): name → builder(seed, scheduler, torch_dtype) of a ready pipeline
TINY_MODELS: dict[str, str] = tiny_models()

__all__ = [
    "PIXART_SIGMA_MODEL_ID",
    "SCFG_PIPELINES",
    "SD15_MODEL_ID",
    "SDXL_MODEL_ID",
    "TINY_MODELS",
    "load_pipeline",
    "model_class_name",
    "model_family",
    "native_size",
    "scfg_pipeline_class",
    "swap_scheduler",
]


def model_class_name(model: str) -> str:
    """The `_class_name` in a model's `model_index.json`: a local folder's, or a hub id's (from the local cache
    when offline). Raises `FileNotFoundError` naming the model when neither has one."""
    if os.path.isdir(model):
        path = os.path.join(model, "model_index.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{model!r} is a folder without model_index.json (not a diffusers pipeline)")
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import HFValidationError

        try:
            path = hf_hub_download(model, "model_index.json")
        except (OSError, ValueError, HFValidationError) as err:
            raise FileNotFoundError(
                f"model {model!r} is neither a local diffusers folder nor a hub id that can be reached or is cached "
                f"({type(err).__name__})"
            ) from err
    with open(path, encoding="utf-8") as f:
        return json.load(f)["_class_name"]


def model_family(model: str) -> Family:
    """The model family of a tiny model name, model folder or hub id (by its `model_index.json`)."""
    for family in FAMILIES:
        if model in family.tiny_models:
            return family
    name = model_class_name(model)
    try:
        return family_of(name)
    except ValueError:
        raise ValueError(f"model {model!r} is a {name}; SCFG pipelines exist for {sorted(SCFG_PIPELINES)}") from None


def scfg_pipeline_class(model: str) -> type:
    """Our SCFG pipeline class for a model folder or hub id, by its `model_index.json`."""
    return model_family(model).pipeline_class()


def load_pipeline(model: str, torch_dtype=None, device: str | None = None, **kwargs):
    """`from_pretrained(model)` on the matching SCFG pipeline class (hub id or local path), or a tiny offline model
    (`TINY_MODELS`); safety checkers are not loaded (`safety_checker=None` where the pipeline has one)."""
    if model in TINY_MODELS:
        pipe = resolve(TINY_MODELS[model])(torch_dtype=torch_dtype)
    else:
        cls = scfg_pipeline_class(model)
        if "safety_checker" in cls._optional_components:
            kwargs.setdefault("safety_checker", None)
        pipe = cls.from_pretrained(model, dtype=torch_dtype, **kwargs)
    if device is not None:
        pipe = pipe.to(device)
    return pipe


def native_size(pipe) -> tuple[int, int]:
    """The pipeline's default (height, width) in pixels: the denoiser's sample size (or the pipeline's
    `default_sample_size`: Flux's transformer has none) times the VAE factor."""
    sample = getattr(pipe.denoiser.config, "sample_size", None) or pipe.default_sample_size
    h, w = (sample, sample) if isinstance(sample, int) else tuple(sample)
    return h * pipe.vae_scale_factor, w * pipe.vae_scale_factor


def swap_scheduler(pipe, name: str) -> None:
    """Replace `pipe.scheduler` by "pndm", "ddim" or "dpm++" (DPM-Solver++ 2M, the official S-CFG demo's,
    algorithm.md §1.6), keeping the model's own noise schedule (`from_config`); "default" keeps the model's."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler

    config = pipe.scheduler.config
    if name == "default":
        return
    if type(pipe.scheduler).__name__.startswith("FlowMatch"):
        raise ValueError(
            f"scheduler {name!r} is a diffusion (noise-prediction) scheduler; this model is trained for flow matching "
            "and keeps its own: use 'default'"
        )
    if name == "pndm":
        pipe.scheduler = PNDMScheduler.from_config(config, skip_prk_steps=True)
    elif name == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(config, clip_sample=False)
    elif name in ("dpm++", "dpmsolver++"):
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(config, solver_order=2, algorithm_type="dpmsolver++")
    else:
        raise ValueError(f"unknown scheduler {name!r}; expected 'default', 'pndm', 'ddim' or 'dpm++'")
