"""goca-scfg: GoCA and S-CFG spatially adaptive classifier-free guidance as a diffusers pipeline.

The public names are imported on first use (PEP 562), so that `import goca_scfg.cli` and `goca-scfg --help` do not
load torch or diffusers; `from goca_scfg import StableDiffusionSCFGPipeline` works as usual. Each model family's
pipeline names come from the family registry (goca_scfg/families/), so a new family needs no edit here.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .families import FAMILIES

_PUBLIC = {
    "AttentionRecord": ".capture",
    "capture_attention": ".capture",
    "GoCAConfig": ".config",
    "SCFGConfig": ".config",
    "SCFGStepMaps": ".guidance",
    "SCFGStepRates": ".guidance",
    "SpatialGuidance": ".guidance",
    "RateRule": ".guidance",
    "SCFGRate": ".guidance",
    "SCFGGuidance": ".guider",
    "AttentionLayer": ".layout",
    "ModelLayout": ".layout",
    "CapturePlan": ".segment",
    "GoCASegmentor": ".segment",
    "SCFGSegmentor": ".segment",
    "SegmentationContext": ".segment",
    "Segmentor": ".segment",
    # each model family's pipeline and output classes (goca_scfg/families/)
    **{name: f.pipeline_module for f in FAMILIES for name in f.public_names},
}

# For type checkers and IDEs only (`__all__` is computed): the runtime names are `_PUBLIC`'s, read on first use.
if TYPE_CHECKING:
    from .capture import AttentionRecord, capture_attention  # noqa: F401
    from .config import GoCAConfig, SCFGConfig  # noqa: F401
    from .guidance import RateRule, SCFGRate, SCFGStepMaps, SCFGStepRates, SpatialGuidance  # noqa: F401
    from .guider import SCFGGuidance  # noqa: F401
    from .layout import AttentionLayer, ModelLayout  # noqa: F401
    from .pipeline import StableDiffusionSCFGPipeline, StableDiffusionSCFGPipelineOutput  # noqa: F401
    from .pipeline_flux import FluxSCFGPipeline, FluxSCFGPipelineOutput  # noqa: F401
    from .pipeline_pixart import PixArtSigmaSCFGPipeline, PixArtSigmaSCFGPipelineOutput  # noqa: F401
    from .pipeline_sd3 import StableDiffusion3SCFGPipeline, StableDiffusion3SCFGPipelineOutput  # noqa: F401
    from .pipeline_sdxl import StableDiffusionXLSCFGPipeline, StableDiffusionXLSCFGPipelineOutput  # noqa: F401
    from .segment import CapturePlan, GoCASegmentor, SCFGSegmentor, SegmentationContext, Segmentor  # noqa: F401

__all__ = sorted(_PUBLIC)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(_PUBLIC[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
