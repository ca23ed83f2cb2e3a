"""`SCFGGuidance`: S-CFG's per-region guidance as a diffusers guider, for diffusers' modular pipelines.

A modular pipeline runs each CFG branch as its own denoiser call between the guider's `prepare_models` and
`cleanup_models`, then calls the guider on the branches' predictions. This guider records the attention of both
calls (raw q/k/o of the segmentor's layers), joins them into the [uncond; cond] record our pipelines make in one
batched call, and at `forward` segments it, forms the rate map and combines: ε̂ = ε_u + w·r⊙(ε_c − ε_u)
(algorithm.md §1.4). With `segmentor=None` it is diffusers' `ClassifierFreeGuidance` (bit for bit).
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

import torch
from diffusers.guiders.guider_utils import BaseGuidance, GuiderOutput
from torch import Tensor, nn

from .capture import AttentionRecord, LayerTensors, capture_attention
from .checks import check_caption
from .config import GoCAConfig, SCFGConfig
from .guidance import RateRule, SCFGRate, SCFGStepMaps, SCFGStepRates, SpatialGuidance, rate_rule_from
from .layout import ModelLayout, unwrap
from .segment import Segmentor, make_segmentor
from .segment.base import SegmentationContext
from .tokens import clip_prompt_tokens

if TYPE_CHECKING:
    from diffusers.modular_pipelines.modular_pipeline import BlockState


def _as_config(cls: type, value: Any) -> Any:
    """A config dataclass from itself, its dict (as `guider_config.json` stores it) or None."""
    if value is None or isinstance(value, cls):
        return value
    if isinstance(value, dict):
        return cls(**value)
    raise TypeError(f"expected a {cls.__name__}, its dict or None, got {value!r}")


def _json(config: Any) -> dict | None:
    """A config dataclass as a JSON-ready dict (tuples become lists)."""
    return None if config is None else _json_ready(dataclasses.asdict(config))


def _json_ready(value: Any) -> Any:
    """Nested dicts and sequences with every tuple a list, as JSON stores them."""
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_json_ready(v) for v in value]
    return value


def join_branches(uncond: dict[str, LayerTensors], cond: dict[str, LayerTensors]) -> AttentionRecord:
    """The record one batched [uncond; cond] call would have made, from the two branches' records (per layer, the
    recorded fields concatenated along the batch)."""
    record = AttentionRecord()
    for name, c in cond.items():
        u = uncond[name]
        fields = {f: torch.cat([getattr(u, f), getattr(c, f)]) for f in ("q", "k", "o") if getattr(c, f) is not None}
        record.layers[name] = LayerTensors(heads=c.heads, scale=c.scale, w_out=c.w_out, **fields)
    return record


class SCFGGuidance(BaseGuidance):
    """Spatially adaptive CFG (S-CFG, CVPR 2024) with GoCA or S-CFG segmentation, as a diffusers guider.

    Args:
        guidance_scale: w of ε̂ = ε_u + w·r⊙(ε_c − ε_u).
        segmentor: "goca" (default), "scfg", None (plain CFG, equal to `ClassifierFreeGuidance`) or a `Segmentor`
            instance (not saved by `save_pretrained`).
        scfg_config, goca_config: as the SCFG pipelines take them (or their dicts).
        rate_rule: the per-pixel rate from the masks (default `SCFGRate()`, S-CFG's; or its `describe()` dict).
        return_maps: keep one `SCFGStepMaps` per segmented step in `maps`.
        caption: the prompt text (or one per prompt) whose tokens name GoCA's regions: a modular pipeline hands the
            guider embeddings, not the prompt.
        start, stop, enabled: the fraction of steps that is guided, as diffusers' guiders.
        tokenizer: the tokenizer of `caption` (not saved); by default CLIP's BPE vocabulary, which SD 1.x/2.x and
            SDXL's first text encoder use (built offline from open_clip's copy).

    After a call, `maps` (with `return_maps`) and `rates` hold what the SCFG pipelines return for it.
    """

    _input_predictions = ["pred_cond", "pred_uncond"]

    def __init__(
        self,
        guidance_scale: float = 7.5,
        segmentor: str | Segmentor | None = "goca",
        scfg_config: SCFGConfig | dict | None = None,
        goca_config: GoCAConfig | dict | None = None,
        rate_rule: RateRule | dict | None = None,
        return_maps: bool = False,
        caption: str | list[str] | None = None,
        start: float = 0.0,
        stop: float = 1.0,
        enabled: bool = True,
        tokenizer: Any = None,
    ):
        super().__init__(start, stop, enabled)
        self.guidance_scale = guidance_scale
        self.scfg_config = _as_config(SCFGConfig, scfg_config)
        self.goca_config = _as_config(GoCAConfig, goca_config)
        self.segmentor = make_segmentor(segmentor, self.scfg_config, self.goca_config)  # checks the name now
        self.rate_rule = rate_rule_from(rate_rule)
        self.return_maps = return_maps
        if caption is not None:
            check_caption(caption)
        self.caption = caption
        self.tokenizer = tokenizer
        self.register_to_config(
            guidance_scale=guidance_scale,
            segmentor=segmentor if not isinstance(segmentor, Segmentor) else None,
            scfg_config=_json(self.scfg_config),
            goca_config=_json(self.goca_config),
            rate_rule=_json_ready(self.rate_rule.describe()),
            return_maps=return_maps,
            caption=list(caption) if isinstance(caption, tuple) else caption,
            start=start,
            stop=stop,
            enabled=enabled,
        )
        self.maps: list[SCFGStepMaps] = []
        self.rates: list[SCFGStepRates] = []
        self._reset_run()

    # ------------------------------------------------------------------------------------------- diffusers' API

    def set_state(self, step: int, num_inference_steps: int, timestep: torch.LongTensor) -> None:
        """Loop state, as `BaseGuidance`; step 0 starts a new call (maps, rates and the plan are reset)."""
        if step == 0:
            self._release()  # what a failed call left behind (a modular loop has no `finally`)
            self._reset_run()
            self.maps, self.rates = [], []
        super().set_state(step, num_inference_steps, timestep)

    def prepare_inputs(self, data: dict[str, tuple[Tensor, Tensor]]) -> list[BlockState]:
        """The cond branch, then (with CFG on at this step) the uncond one, as `ClassifierFreeGuidance`."""
        indices = [0] if self.num_conditions == 1 else [0, 1]
        return [self._prepare_batch(data, i, name) for i, name in zip(indices, self._input_predictions)]

    def prepare_inputs_from_block_state(
        self, data: BlockState, input_fields: dict[str, str | tuple[str, str]]
    ) -> list[BlockState]:
        indices = [0] if self.num_conditions == 1 else [0, 1]
        return [
            self._prepare_batch_from_block_state(input_fields, data, i, name)
            for i, name in zip(indices, self._input_predictions)
        ]

    def prepare_models(self, denoiser: nn.Module) -> None:
        """Before one branch's denoiser call: record the segmentor's layers during that call."""
        super().prepare_models(denoiser)
        self._release()
        if self._segmenting():
            branch = "cond" if self.is_conditional else "uncond"
            module = unwrap(denoiser)
            self._hooks = [
                module.register_forward_pre_hook(self._start_capture(branch), with_kwargs=True),
                module.register_forward_hook(self._end_capture, always_call=True),  # also when the call raises
            ]

    def cleanup_models(self, denoiser: nn.Module) -> None:
        """After the branch's call: every hook is gone (the denoiser's post-hook removed them)."""
        self._release()

    def forward(self, pred_cond: Tensor, pred_uncond: Tensor | None = None) -> GuiderOutput:
        """ε̂ from both branches: segmented (rate map r) where this step records both, else plain CFG."""
        if not self._is_cfg_enabled():
            return GuiderOutput(pred=pred_cond, pred_cond=pred_cond, pred_uncond=pred_uncond)
        cond_only = self._rows == "cond"
        recorded = {"cond"} if cond_only else {"cond", "uncond"}
        if self.segmentor is None or set(self._records) != recorded:
            pred = pred_uncond + self.guidance_scale * (pred_cond - pred_uncond)
            return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)
        if cond_only:  # joint attention: the plan reads the cond call only (algorithm.md §8.5)
            record = AttentionRecord(layers=self._records.pop("cond"))
        else:
            record = join_branches(self._records.pop("uncond"), self._records.pop("cond"))
        guide = self._guide or self._final_guide()
        pred = guide(self._step, self._timestep, record, pred_uncond, pred_cond, self.guidance_scale)
        self.maps, self.rates = guide.maps, guide.step_rates()
        return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs) -> None:
        """`guider_config.json`, as diffusers' guiders; a `Segmentor` instance has no config to save."""
        if self.segmentor is not None and self.config["segmentor"] is None:
            raise ValueError("SCFGGuidance with a Segmentor instance cannot be saved: only 'goca', 'scfg' or None")
        if type(self.rate_rule) is not SCFGRate:
            raise ValueError(
                f"SCFGGuidance with a {type(self.rate_rule).__name__} rate rule cannot be saved: SCFGRate only"
            )
        super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)

    @property
    def is_conditional(self) -> bool:
        return self._count_prepared == 1

    @property
    def num_conditions(self) -> int:
        return 2 if self._is_cfg_enabled() else 1

    # ------------------------------------------------------------------------------------------------ internals

    def _reset_run(self) -> None:
        self._guide: SpatialGuidance | None = None  # this call's plan, made at its first segmented step
        self._requests: dict | None = None  # the layers and fields recorded in this call
        self._context: dict[str, Any] = {}  # layout, latent size, batch, tokens, blank uncond rows
        self._records: dict[str, dict[str, LayerTensors]] = {}
        self._rows = "cfg"  # the plan's rows: "cond" when only the cond branch is recorded (joint attention)
        self._capture: tuple[str, Any, AttentionRecord] | None = None
        self._hooks: list = []

    def _release(self) -> None:
        """Remove this guider's pre-hook and capture hooks, if any are installed."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self._capture is not None:
            capture = self._capture[1]
            self._capture = None
            capture.__exit__(None, None, None)

    def _is_cfg_enabled(self) -> bool:
        """Inside the start/stop window and w not 1, as `ClassifierFreeGuidance`."""
        if not self._enabled:
            return False
        if self._num_inference_steps is not None:
            first, stop = int(self._start * self._num_inference_steps), int(self._stop * self._num_inference_steps)
            if not first <= self._step < stop:
                return False
        return not math.isclose(self.guidance_scale, 1.0)

    def _segmenting(self) -> bool:
        return self.segmentor is not None and self._is_cfg_enabled()

    def _start_capture(self, branch: str):
        """A forward pre-hook that plans the call on its first denoiser call, then records this branch."""

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
            text = kwargs.get("encoder_hidden_states")
            try:
                if branch == "uncond" and text is not None and "blank" not in self._context:
                    self._context["blank"] = text.flatten(1).abs().amax(dim=1) == 0
                if self._requests is None:
                    plan = self._plan(module, sample, text)
                    self._requests, self._rows = plan.requests, plan.plan.rows
                if branch == "uncond" and self._rows == "cond":
                    return
                capture = capture_attention(module, self._requests)
                self._capture = (branch, capture, capture.__enter__())
            except Exception:
                self._release()
                raise

        return hook

    def _end_capture(self, module: nn.Module, args: tuple, output: Any) -> None:
        """After a branch's denoiser call (or its failure): keep the branch's record, remove every hook."""
        if self._capture is not None:
            branch, _, record = self._capture
            self._records[branch] = {k: dataclasses.replace(v) for k, v in record.layers.items()}
        self._release()

    def _tokens(self, batch: int):
        """Token classes of `caption`, one row per image of a branch (B = captions × images per caption)."""
        if self.caption is None:
            if self.segmentor.needs_text:
                raise ValueError(
                    f"SCFGGuidance(segmentor={self.segmentor.name!r}) names its regions by caption tokens, and a "
                    "modular pipeline hands the guider embeddings only: pass caption= (the prompt text)"
                )
            return None
        captions = check_caption(self.caption)
        if batch % len(captions):
            raise ValueError(f"caption has {len(captions)} text(s) for a batch of {batch} images: one per prompt")
        if self.tokenizer is None:
            from .clip_bpe import clip_tokenizer

            self.tokenizer = clip_tokenizer()
        return clip_prompt_tokens(self.tokenizer, captions, batch // len(captions))

    def _plan(self, denoiser: nn.Module, sample: Tensor, text: Tensor | None = None) -> SpatialGuidance:
        """A provisional plan at the call's first denoiser call, for latents shaped like `sample` (one branch's
        batch): the layers to record. The uncond branch is not seen yet. On joint attention the maps keep the
        caption tokenizer's positions, which open the context (SD3's CLIP part; algorithm.md §8.5)."""
        layout = ModelLayout.of(denoiser)
        self.segmentor.check_layout(layout)
        batch = int(sample.shape[0])
        tokens = self._tokens(batch)
        key_mask = None
        if layout.arch == "joint" and text is not None and tokens is not None:
            key_mask = torch.zeros(2 * batch, text.shape[1], dtype=torch.bool)
            key_mask[:, : tokens.ids.shape[1]] = True
        self._context.update(
            layout=layout, latent_hw=(int(sample.shape[-2]), int(sample.shape[-1])), batch=batch, tokens=tokens,
            key_mask=key_mask,
        )  # fmt: skip
        return self._guide_for(blank=None, return_maps=False)

    def _final_guide(self) -> SpatialGuidance:
        """The call's plan, with what the uncond branch showed (blank rows: foreground from cond, §8.2)."""
        guide = self._guide_for(blank=self._context.get("blank"), return_maps=self.return_maps)
        if guide.requests != self._requests:
            raise RuntimeError("the segmentor asked for other layers once it saw the uncond branch")
        self._guide = guide
        return guide

    def _guide_for(self, blank: Tensor | None, return_maps: bool) -> SpatialGuidance:
        """A `SpatialGuidance` over this call's context (layout, latent size, batch, tokens) and blank uncond rows."""
        ctx = self._context
        context = SegmentationContext(
            ctx["layout"], ctx["latent_hw"], ctx["batch"], ctx["tokens"], ctx.get("key_mask"), uncond_blank=blank
        )
        return SpatialGuidance(make_segmentor(self.segmentor), context, self.rate_rule, return_maps)
