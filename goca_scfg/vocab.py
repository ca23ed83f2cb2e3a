"""The names users type, each defined once: guidance methods, schedulers and dtypes.

The CLI, the benchmark, the sweep and the report all read these tables. Importing this module does not import torch
(the CLI checks its arguments before loading anything heavy); `torch_dtype` imports it when called.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config import GoCAConfig, SCFGConfig, describe


@dataclass(frozen=True)
class Method:
    """A named guidance method: the `segmentor` and configs passed to `StableDiffusionSCFGPipeline.__call__`."""

    name: str
    segmentor: str | None
    scfg_config: SCFGConfig | None
    goca_config: GoCAConfig | None
    label: str  # row label in tables (paper Table 3 names where they exist)
    summary: str

    def pipeline_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the pipeline call for this method."""
        return {"segmentor": self.segmentor, "scfg_config": self.scfg_config, "goca_config": self.goca_config}

    def describe(self) -> dict[str, Any]:
        """Plain-dict view for manifests."""
        return {
            "segmentor": self.segmentor,
            "scfg_config": describe(self.scfg_config) if self.scfg_config else None,
            "goca_config": describe(self.goca_config) if self.goca_config else None,
            "summary": self.summary,
        }


# In table order: the baseline first, then S-CFG, then GoCA (vanilla masks before the released config).
METHODS: tuple[Method, ...] = (
    Method("cfg", None, None, None, "CFG", "plain classifier-free guidance (Table 3 'CFG')"),
    Method("scfg", "scfg", SCFGConfig(), None, "S-CFG", "official S-CFG masks and rate (algorithm.md §1)"),
    Method(
        "scfg-paper",
        "scfg",
        SCFGConfig.paper(),
        None,
        "S-CFG (paper SSGC)",
        "S-CFG with the paper's SSGC (mean of S..S⁴)",
    ),
    Method(
        "goca-vanilla",
        "goca",
        SCFGConfig(),
        GoCAConfig.vanilla(),
        "S-CFG (vanilla GoCA masks)",
        "GoCA pipeline, vanilla config (cfg15v)",
    ),
    Method(
        "goca",
        "goca",
        SCFGConfig(),
        GoCAConfig(),
        "GoCA+S-CFG",
        "GoCA masks in S-CFG, released config (Table 3 'Ours')",
    ),
    Method(
        "goca-paper",
        "goca",
        SCFGConfig(),
        GoCAConfig.paper(),
        "GoCA+S-CFG (Eq. 11 content tokens)",
        "GoCA, rescaling over content tokens (Eq. 11)",
    ),
    Method(
        "goca-fast",
        "goca",
        SCFGConfig(),
        GoCAConfig.fast(),
        "GoCA+S-CFG (fast mode)",
        "GoCA fast mode (approximate layer weights)",
    ),
)
METHOD_NAMES: tuple[str, ...] = tuple(m.name for m in METHODS)
METHOD_ALIASES: dict[str, str] = {"none": "cfg"}  # the CLI's historical name for plain CFG
BASELINE = "cfg"  # what paired comparisons are made against

# Scheduler names → what they mean; "default" keeps the model's own (PNDM for SD v1.5, algorithm.md §3.2).
SCHEDULERS: dict[str, str] = {
    "default": "the model's own scheduler",
    "pndm": "PNDM (skip_prk_steps), the SD v1.5 default",
    "ddim": "DDIM",
    "dpm++": "DPM-Solver++ 2M, the official S-CFG demo's (algorithm.md §1.6)",
}
SCHEDULER_NAMES: tuple[str, ...] = tuple(SCHEDULERS)

# Dtype names → torch attribute names; "auto" means fp16 on CUDA, fp32 elsewhere.
DTYPES: dict[str, str] = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
DTYPE_NAMES: tuple[str, ...] = tuple(DTYPES)
AUTO_DTYPE = "auto"


def get_method(name: str) -> Method:
    """Look a method up by name or alias ("none" = "cfg")."""
    name = METHOD_ALIASES.get(name, name)
    for method in METHODS:
        if method.name == name:
            return method
    raise ValueError(f"unknown method {name!r}; expected one of {list(METHOD_NAMES)}")


def method_label(name: str) -> str:
    """Table label of a method; unknown names are shown as they are."""
    return next((m.label for m in METHODS if m.name == name), name)


def method_rank(name: str) -> tuple[int, str]:
    """Sort key putting methods in table order, unknown names after them (alphabetically)."""
    return (METHOD_NAMES.index(name) if name in METHOD_NAMES else len(METHOD_NAMES), name)


def check_scheduler(name: str) -> str:
    """`name` if it is a scheduler name, else ValueError listing them."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; expected one of {list(SCHEDULER_NAMES)}")
    return name


def resolve_dtype_name(name: str, device_type: str) -> str:
    """ "auto" → "fp16" on CUDA, "fp32" elsewhere; any other dtype name is checked and returned."""
    if name == AUTO_DTYPE:
        return "fp16" if device_type == "cuda" else "fp32"
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {[AUTO_DTYPE, *DTYPE_NAMES]}")
    return name


def torch_dtype(name: str, device_type: str = "cpu"):
    """The torch dtype of a dtype name ("auto" resolved for `device_type`)."""
    import torch

    return getattr(torch, DTYPES[resolve_dtype_name(name, device_type)])
