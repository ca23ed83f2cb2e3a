"""goca-scfg: GoCA and S-CFG spatially adaptive classifier-free guidance as a diffusers pipeline.

The public names are imported on first use (PEP 562), so that `import goca_scfg.cli` and `goca-scfg --help` do not
load torch or diffusers; `from goca_scfg import StableDiffusionSCFGPipeline` works as usual.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

_PUBLIC = {
    "AttentionRecord": ".capture",
    "capture_attention": ".capture",
    "GoCAConfig": ".config",
    "SCFGConfig": ".config",
    "SCFGStepMaps": ".guidance",
    "SCFGStepRates": ".guidance",
    "SpatialGuidance": ".guidance",
    "SCFGGuidance": ".guider",
    "AttentionLayer": ".layout",
    "ModelLayout": ".layout",
    "PixArtSigmaSCFGPipeline": ".pipeline_pixart",
    "PixArtSigmaSCFGPipelineOutput": ".pipeline_pixart",
    "StableDiffusionSCFGPipeline": ".pipeline",
    "StableDiffusionSCFGPipelineOutput": ".pipeline",
    "StableDiffusionXLSCFGPipeline": ".pipeline_sdxl",
    "StableDiffusionXLSCFGPipelineOutput": ".pipeline_sdxl",
    "CapturePlan": ".segment",
    "GoCASegmentor": ".segment",
    "SCFGSegmentor": ".segment",
    "SegmentationContext": ".segment",
    "Segmentor": ".segment",
}

if TYPE_CHECKING:
    from .capture import AttentionRecord, capture_attention
    from .config import GoCAConfig, SCFGConfig
    from .guidance import SCFGStepMaps, SCFGStepRates, SpatialGuidance
    from .guider import SCFGGuidance
    from .layout import AttentionLayer, ModelLayout
    from .pipeline import StableDiffusionSCFGPipeline, StableDiffusionSCFGPipelineOutput
    from .pipeline_pixart import PixArtSigmaSCFGPipeline, PixArtSigmaSCFGPipelineOutput
    from .pipeline_sdxl import StableDiffusionXLSCFGPipeline, StableDiffusionXLSCFGPipelineOutput
    from .segment import CapturePlan, GoCASegmentor, SCFGSegmentor, SegmentationContext, Segmentor

__all__ = [
    "AttentionLayer",
    "AttentionRecord",
    "CapturePlan",
    "GoCAConfig",
    "GoCASegmentor",
    "ModelLayout",
    "PixArtSigmaSCFGPipeline",
    "PixArtSigmaSCFGPipelineOutput",
    "SCFGConfig",
    "SCFGGuidance",
    "SCFGSegmentor",
    "SCFGStepMaps",
    "SCFGStepRates",
    "SegmentationContext",
    "Segmentor",
    "SpatialGuidance",
    "StableDiffusionSCFGPipeline",
    "StableDiffusionSCFGPipelineOutput",
    "StableDiffusionXLSCFGPipeline",
    "StableDiffusionXLSCFGPipelineOutput",
    "capture_attention",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(_PUBLIC[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
