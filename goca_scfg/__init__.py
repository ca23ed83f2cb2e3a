"""goca-scfg: GoCA and S-CFG spatially adaptive classifier-free guidance as a diffusers pipeline."""

from .capture import AttentionRecord, capture_attention, locate_attention_layers
from .config import GoCAConfig, SCFGConfig
from .pipeline import (
    SCFGStepMaps,
    SCFGStepRates,
    SpatialGuidance,
    StableDiffusionSCFGPipeline,
    StableDiffusionSCFGPipelineOutput,
)

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
