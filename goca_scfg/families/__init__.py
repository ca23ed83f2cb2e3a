"""The model families goca-scfg supports, one module each (sd.py, sdxl.py, pixart.py), and the registry that model
loading, the CLI, the sweep, the benchmarks, the package exports and GoCA's layer presets read.

Importing the registry imports no torch: a family names its code ("module:attribute") and imports it when asked.
Adding a family: docs/families.md.
"""

from __future__ import annotations

from .base import BenchShapes, Family, GoCAPreset, PresetMatch, SweepPreset, resolve
from .flux import FAMILY as FLUX
from .pixart import FAMILY as PIXART_SIGMA
from .sd import FAMILY as SD
from .sd3 import FAMILY as SD3
from .sdxl import FAMILY as SDXL

# In order of preference: the first family is every tool's default (`--arch`, the sweep's default model).
FAMILIES: tuple[Family, ...] = (SD, SDXL, PIXART_SIGMA, SD3, FLUX)


def _check(families: tuple[Family, ...]) -> None:
    """Names, `_class_name`s, offline model names and sweep preset names are each claimed by one family only."""
    for what, names in [
        ("family name", [f.name for f in families]),
        ("model_index class name", [c for f in families for c in f.class_names]),
        ("tiny model name", [m for f in families for m in f.tiny_models]),
        ("sweep preset name", [p.name for f in families for p in f.sweep_presets]),
        ("exported name", [n for f in families for n in f.public_names]),
    ]:
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"{what}s claimed by two families: {twice}")


_check(FAMILIES)


def family_names() -> tuple[str, ...]:
    """The registered families' names (the benchmarks' `--arch` choices), in registry order."""
    return tuple(f.name for f in FAMILIES)


def family_named(name: str) -> Family:
    """The family registered as `name` ("sd15", "sdxl", "pixart-sigma", …)."""
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ValueError(f"unknown model family {name!r}; registered: {list(family_names())}")


def family_of(pipeline_or_class_name) -> Family:
    """The family of a `model_index.json` `_class_name` ("StableDiffusionXLPipeline"), of one of our pipeline class
    names, or of a pipeline object or class (its nearest base class the registry knows)."""
    if isinstance(pipeline_or_class_name, str):
        names = [pipeline_or_class_name]
    else:
        cls = pipeline_or_class_name if isinstance(pipeline_or_class_name, type) else type(pipeline_or_class_name)
        names = [c.__name__ for c in cls.__mro__]
    for name in names:
        for family in FAMILIES:
            if name in family.class_names:
                return family
    known = sorted(c for f in FAMILIES for c in f.class_names)
    raise ValueError(f"{names[0]!r} belongs to no registered model family; SCFG pipelines exist for {known}")


def tiny_models() -> dict[str, str]:
    """Every offline tiny model: name → "module:function" building the ready pipeline."""
    return {name: target for f in FAMILIES for name, target in f.tiny_models.items()}


def goca_presets() -> tuple[tuple[PresetMatch, GoCAPreset], ...]:
    """Every family's (matcher, preset) pairs for the architectures the authors configured (algorithm.md §8)."""
    return tuple(pair for f in FAMILIES for pair in f.goca_presets)


__all__ = [
    "FAMILIES",
    "BenchShapes",
    "Family",
    "GoCAPreset",
    "SweepPreset",
    "family_named",
    "family_names",
    "family_of",
    "goca_presets",
    "resolve",
    "tiny_models",
]
