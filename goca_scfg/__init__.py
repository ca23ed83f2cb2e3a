"""goca-scfg: GoCA and S-CFG spatially adaptive classifier-free guidance as a diffusers pipeline."""

from .capture import AttentionRecord, capture_attention
from .config import GoCAConfig, SCFGConfig
from .guidance import SCFGStepMaps, SCFGStepRates, SpatialGuidance
from .layout import AttentionLayer, ModelLayout
from .pipeline import StableDiffusionSCFGPipeline, StableDiffusionSCFGPipelineOutput
from .pipeline_pixart import PixArtSigmaSCFGPipeline, PixArtSigmaSCFGPipelineOutput
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
    "SCFGSegmentor",
    "SCFGStepMaps",
    "SCFGStepRates",
    "SegmentationContext",
    "Segmentor",
    "SpatialGuidance",
    "StableDiffusionSCFGPipeline",
    "StableDiffusionSCFGPipelineOutput",
    "capture_attention",
]
__version__ = "0.1.0"
