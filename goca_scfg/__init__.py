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
    "locate_attention_layers": ".capture",
    "GoCAConfig": ".config",
    "SCFGConfig": ".config",
    "SCFGStepMaps": ".pipeline",
    "SCFGStepRates": ".pipeline",
    "SpatialGuidance": ".pipeline",
    "StableDiffusionSCFGPipeline": ".pipeline",
    "StableDiffusionSCFGPipelineOutput": ".pipeline",
}

if TYPE_CHECKING:
    from .capture import AttentionRecord, capture_attention, locate_attention_layers
    from .config import GoCAConfig, SCFGConfig
    from .pipeline import (
        SCFGStepMaps,
        SCFGStepRates,
        SpatialGuidance,
        StableDiffusionSCFGPipeline,
        StableDiffusionSCFGPipelineOutput,
    )


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(_PUBLIC[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})


__all__ = [
    "AttentionRecord",
    "GoCAConfig",
    "SCFGConfig",
    "SCFGStepMaps",
    "SCFGStepRates",
    "SpatialGuidance",
    "StableDiffusionSCFGPipeline",
    "StableDiffusionSCFGPipelineOutput",
    "capture_attention",
    "locate_attention_layers",
]
__version__ = "0.1.0"
