"""The segmentor interface: what a segmentation method tells the capture, and what it gives the guidance.

A `Segmentor` is one method (S-CFG, GoCA, or a third party's). Per pipeline call it is given a
`SegmentationContext` (the denoiser's layout, the latent size, the prompt's token classes) and answers with a
`CapturePlan`: which attention layers to record, which fields, and how to reduce them inside the forward pass. At
every denoising step it turns that call's `AttentionRecord` into region masks and a foreground at latent size.
The pipeline copies the instance it is given before `start`, so per-call state never leaks between calls.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from ..capture import AttentionRecord, Field, Reduce
from ..layout import ModelLayout
from ..tokens import PromptTokens


@dataclass(frozen=True)
class SegmentationContext:
    """What one pipeline call tells its segmentor: the denoiser's layout, the latent (h, w), the batch size B
    (images per call, one CFG half), the cond prompts' token classes (None when only embeddings were given), the
    (2B, T) text positions the cross-attention attends, [uncond, cond] (a T5 pipeline's encoder attention mask; None:
    every position, as in the CLIP pipelines) and, per image, whether the uncond text condition is blank (all-zero
    embeddings, SDXL's default for an empty negative prompt): its cross-attention is then exactly uniform and says
    nothing about the foreground, which is taken from the cond branch instead (algorithm.md §8.2)."""

    layout: ModelLayout
    latent_hw: tuple[int, int]
    batch: int
    tokens: PromptTokens | None
    key_mask: Tensor | None = None
    uncond_blank: Tensor | None = None

    def foreground_from_cond(self) -> Tensor:
        """(B,) bool: images whose foreground comes from the cond branch's global-token map."""
        if self.uncond_blank is None:
            return torch.zeros(self.batch, dtype=torch.bool)
        return self.uncond_blank.cpu().bool()


@dataclass(frozen=True)
class CapturePlan:
    """The layers to record (`requests[name]` ⊆ {"q", "k", "o"}), their in-forward reductions, and the rows the
    record holds: "cfg", the whole [uncond; cond] batch; "cond", the cond branch only (a batched CFG call keeps its
    cond half, a pipeline calling the branches separately records the cond call)."""

    requests: dict[str, set[Field]]
    reducers: dict[str, Reduce] = field(default_factory=dict)
    rows: Literal["cfg", "cond"] = "cfg"


class Segmentor(abc.ABC):
    """One segmentation method over a model layout: `start` once per call, then `segment` at every step."""

    name: str = "segmentor"
    plan: CapturePlan
    needs_text: bool = False  # True: the regions are caption tokens, so the call needs `prompt` or `caption`

    @abc.abstractmethod
    def start(self, context: SegmentationContext) -> CapturePlan:
        """Resolve this call's layers from the layout, reset per-call state; return (and keep as `plan`) the plan."""

    def check_layout(self, layout: ModelLayout) -> None:  # noqa: B027 (optional hook: any layout by default)
        """Raise a clear ValueError now if this segmentor cannot run on the layout (called before any work)."""

    @abc.abstractmethod
    def segment(self, step: int, record: AttentionRecord) -> tuple[Tensor, Tensor]:
        """Region masks (B, T, H, W) in {0, 1} and foreground (B, 1, H, W) at latent size from one call's record."""

    def reduced(self, record: AttentionRecord, name: str) -> Tensor:
        """This plan's reduction of a layer: made now when the record kept the raw fields (a capture without
        reducers, or one shared by several plans), else the one made inside the forward pass."""
        slot = record[name]
        if all(getattr(slot, f) is not None for f in self.plan.requests[name]):
            return self.plan.reducers[name].fn(slot)
        if slot.reduced is None:
            raise RuntimeError(f"layer {name!r} was recorded without the fields this plan needs")
        return slot.reduced
