"""Segmentors: one class per method over a model layout (`base.Segmentor`), and the name → object mapping."""

from __future__ import annotations

import copy

from ..config import GoCAConfig, SCFGConfig
from .base import CapturePlan, SegmentationContext, Segmentor
from .goca import GoCASegmentor
from .scfg import SCFGSegmentor

SEGMENTORS = ("goca", "scfg")


def make_segmentor(
    segmentor: str | Segmentor | None, scfg_config: SCFGConfig | None = None, goca_config: GoCAConfig | None = None
) -> Segmentor | None:
    """The pipelines' `segmentor` argument as an object: "goca" / "scfg" with their configs, a copy of a given
    `Segmentor` instance (so per-call state never leaks), or None (plain CFG)."""
    if segmentor is None:
        return None
    if isinstance(segmentor, Segmentor):
        return copy.copy(segmentor)
    if segmentor == "goca":
        return GoCASegmentor(goca_config)
    if segmentor == "scfg":
        return SCFGSegmentor(scfg_config)
    raise ValueError(
        f"unknown segmentor {segmentor!r}; expected one of {SEGMENTORS}, a goca_scfg Segmentor instance or None"
    )


__all__ = [
    "SEGMENTORS",
    "CapturePlan",
    "GoCASegmentor",
    "SCFGSegmentor",
    "SegmentationContext",
    "Segmentor",
    "make_segmentor",
]
