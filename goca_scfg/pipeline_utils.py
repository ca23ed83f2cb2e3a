"""What every SCFG pipeline adds to its diffusers parent: planning one call's segmentation (`SCFGPipelineMixin`).

The pipelines' loops only wire it: `spatial_guidance(...)` before the loop, `capture_attention` around it, and the
returned `SpatialGuidance` instead of the CFG line. The denoiser is found by attribute (`unet` or `transformer`).
"""

from __future__ import annotations

import json
import logging
import math
from contextlib import nullcontext

import torch
from diffusers import DiffusionPipeline
from diffusers.loaders import TextualInversionLoaderMixin
from torch import Tensor

from .capture import AttentionRecord, capture_attention
from .checks import check_call_inputs, check_caption
from .config import GoCAConfig, SCFGConfig
from .guidance import RateRule, SpatialGuidance, rate_rule_from
from .layout import ModelLayout, unwrap
from .ops import split_cfg
from .segment import Segmentor, make_segmentor
from .segment.base import SegmentationContext
from .tokens import PromptTokens, clip_prompt_tokens

logger = logging.getLogger(__name__)

DEFAULT_SEGMENTOR = "goca"


def cond_half(x: Tensor) -> Tensor:
    """The cond half of a batched [uncond; cond] CFG tensor (algorithm.md §0)."""
    return split_cfg(x)[1]


class SCFGPipelineMixin:
    """Segmentation planning shared by the SCFG pipelines (`denoiser_name` names the denoiser component)."""

    denoiser_name = "unet"

    @property
    def denoiser(self):
        return getattr(self, self.denoiser_name)

    @classmethod
    def diffusers_class(cls) -> type:
        """The stock diffusers pipeline this class extends (e.g. `StableDiffusionPipeline`)."""
        return next(
            c for c in cls.__mro__ if c.__module__.startswith("diffusers.") and issubclass(c, DiffusionPipeline)
        )

    def to_json_string(self) -> str:
        """`model_index.json` names the stock diffusers class, so a saved folder is a plain diffusers pipeline that
        `DiffusionPipeline.from_pretrained` opens anywhere; `goca_scfg.loading` maps it back to the SCFG class."""
        config = json.loads(super().to_json_string())
        config["_class_name"] = self.diffusers_class().__name__
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    def segmentation_tokens(self, prompt: str | list[str] | None, num_images_per_prompt: int) -> PromptTokens | None:
        """Token classes of the cond prompts as the text encoder sees them (textual-inversion tokens expanded),
        one row per image; None without a prompt. SDXL: the first tokenizer's tokens name the regions."""
        if prompt is None:
            return None
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if isinstance(self, TextualInversionLoaderMixin):
            prompts = self.maybe_convert_prompt(prompts, self.tokenizer)
        return clip_prompt_tokens(self.tokenizer, prompts, num_images_per_prompt)

    def prepare_segmentor(
        self, segmentor: str | Segmentor | None, scfg_config: SCFGConfig | None, goca_config: GoCAConfig | None
    ) -> Segmentor | None:
        """The call's segmentor object, its layer choice checked against this denoiser before any work."""
        seg = make_segmentor(segmentor, scfg_config, goca_config)
        if seg is not None:
            seg.check_layout(ModelLayout.of(self.denoiser))
        return seg

    def check_scfg_call(
        self,
        num_inference_steps: int | None,
        guidance_scale: float,
        height: int | None,
        width: int | None,
        timesteps: list[int] | None,
        sigmas: list[float] | None,
        segmentor: str | Segmentor | None,
        scfg_config: SCFGConfig | None,
        goca_config: GoCAConfig | None,
        prompt: str | list[str] | None,
        caption: str | list[str] | None,
        prompt_embeds: Tensor | None,
        rate_rule: RateRule | None = None,
    ) -> tuple[Segmentor | None, str | list[str] | None]:
        """What a call adds to diffusers' `check_inputs`, before any work: the inputs diffusers lets pass (steps may
        be None with explicit `timesteps`/`sigmas`), the segmentor object checked against the denoiser, and the text
        that names its regions (`region_text`); a `rate_rule` of the wrong type is refused."""
        check_call_inputs(
            num_inference_steps, guidance_scale, height, width, timesteps is not None or sigmas is not None
        )
        seg = self.prepare_segmentor(segmentor, scfg_config, goca_config)
        rate_rule_from(rate_rule)
        return seg, self.region_text(seg, prompt, caption, prompt_embeds)

    def check_step_end_callback(self, tensor_inputs: list[str] | None) -> None:
        """The tensors a step-end callback asks for must be ones the loop hands out (`_callback_tensor_inputs`)."""
        allowed = getattr(self, "_callback_tensor_inputs", [])
        if tensor_inputs is not None and not set(tensor_inputs) <= set(allowed):
            raise ValueError(
                f"callback_on_step_end_tensor_inputs {sorted(set(tensor_inputs) - set(allowed))} are not handed to "
                f"callbacks; allowed: {allowed}"
            )

    def region_text(
        self,
        segmentor: Segmentor | None,
        prompt: str | list[str] | None,
        caption: str | list[str] | None,
        prompt_embeds: Tensor | None,
    ) -> str | list[str] | None:
        """The text whose tokens name the regions: `prompt`, or `caption` when only `prompt_embeds` are given
        (prompt weighting, precomputed embeddings). Checked before any work."""
        if caption is None:
            if prompt is None and segmentor is not None and segmentor.needs_text:
                others = [repr(name) for name in ("scfg",) if self._segments_with(name)] + ["None"]
                raise ValueError(
                    f"segmentor={segmentor.name!r} names its regions by caption tokens: with prompt_embeds and no "
                    f"prompt, pass caption= (the text the embeddings encode), or use segmentor={' or '.join(others)}"
                )
            return prompt
        if prompt is not None:
            raise ValueError(
                "caption= is for calls with prompt_embeds and no prompt; here the prompt names the regions"
            )
        texts = check_caption(caption)
        if prompt_embeds is not None and len(texts) != prompt_embeds.shape[0]:
            raise ValueError(
                f"caption has {len(texts)} text(s) but prompt_embeds has {prompt_embeds.shape[0]} row(s): one each"
            )
        if getattr(self, "tokenizer", None) is None and getattr(self, "tokenizer_2", None) is None:
            raise ValueError("caption= needs the pipeline's tokenizer, and this pipeline was loaded without one")
        return caption

    def _segments_with(self, name: str) -> bool:
        """Whether the built-in segmentor `name` can run on this pipeline's denoiser."""
        try:
            make_segmentor(name).check_layout(ModelLayout.of(self.denoiser))
        except ValueError:
            return False
        return True

    def check_segmentation_size(self, height: int, width: int, layout: ModelLayout) -> tuple[int, int]:
        """The latent (h, w), checked to divide evenly into every attention grid of the denoiser."""
        latent_hw = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        deepest = max(x.factor for x in layout.layers) if layout.layers else 1
        if latent_hw[0] % deepest or latent_hw[1] % deepest:
            px = deepest * self.vae_scale_factor
            raise ValueError(
                f"segmentation needs height and width that are multiples of {px} px for this "
                f"{type(unwrap(self.denoiser)).__name__} (its attention grids must divide the latent evenly), got "
                f"{height}x{width}"
            )
        return latent_hw

    def spatial_guidance(
        self,
        segmentor: str | Segmentor,
        prompt: str | list[str] | None,
        height: int,
        width: int,
        num_images_per_prompt: int = 1,
        scfg_config: SCFGConfig | None = None,
        goca_config: GoCAConfig | None = None,
        return_maps: bool = False,
        batch_size: int | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        key_mask: Tensor | None = None,
        token_options: dict | None = None,
        rate_rule: RateRule | None = None,
    ) -> SpatialGuidance:
        """Plan one call's segmentation: the segmentor object, its layers on this denoiser and the token classes.

        batch_size: images per call (one CFG half); defaults to the prompt count times `num_images_per_prompt`.
        negative_prompt_embeds: the uncond condition, one row per image: all-zero rows (SDXL's empty negative
        prompt) take the foreground from the cond branch (algorithm.md §8.2).
        key_mask: (2B, T) text positions the cross-attention attends ([uncond, cond]; the encoder attention mask of a
        T5 pipeline), None when all are attended. token_options: extra keywords of `segmentation_tokens`.
        rate_rule: the per-pixel rate from the masks (default `SCFGRate()`, S-CFG's, algorithm.md §1.4).
        """
        seg = make_segmentor(segmentor, scfg_config, goca_config)
        if seg is None:
            raise ValueError("spatial_guidance needs a segmentor ('goca', 'scfg' or a Segmentor instance)")
        layout = ModelLayout.of(self.denoiser)
        latent_hw = self.check_segmentation_size(height, width, layout)
        tokens = self.segmentation_tokens(prompt, num_images_per_prompt, **(token_options or {}))
        if batch_size is None:
            if tokens is None:
                raise ValueError("spatial_guidance needs `prompt` or `batch_size`")
            batch_size = tokens.ids.shape[0]
        blank = None
        if negative_prompt_embeds is not None:
            blank = negative_prompt_embeds.flatten(1).abs().amax(dim=1) == 0
        context = SegmentationContext(layout, latent_hw, batch_size, tokens, key_mask, blank)
        return SpatialGuidance(seg, context, rate_rule_from(rate_rule), return_maps=return_maps)

    def follow_guidance_scale(self, guide: SpatialGuidance | None, record: AttentionRecord | None) -> None:
        """Before each denoiser call: a guidance scale a step-end callback set to NaN or inf is refused; one at most 1
        (diffusers' dynamic-CFG pattern, `SDCFGCutoffCallback`) turns CFG off, so nothing is recorded or segmented
        from then on."""
        if guide is None:
            return
        if not math.isfinite(self._guidance_scale):
            raise ValueError(
                f"guidance_scale became {self._guidance_scale} during the call (set by a step-end callback); "
                "it must be a finite number (<= 1 turns classifier-free guidance off)"
            )
        record.enabled = self.do_classifier_free_guidance

    def attention_capture(self, guide: SpatialGuidance | None, batched_cfg: bool = True):
        """The loop's capture context: nothing without a plan; else the plan's layers recorded on the denoiser, the
        cond half only where the plan asks for cond rows and one call runs both branches (`batched_cfg`)."""
        if guide is None:
            return nullcontext()
        rows = cond_half if guide.plan.rows == "cond" and batched_cfg else None
        return capture_attention(self.denoiser, guide.requests, guide.reducers, rows=rows)

    def call_plan(
        self,
        segmentor: str | Segmentor,
        prompt: str | list[str],
        height: int,
        width: int,
        scfg_config: SCFGConfig | None = None,
        goca_config: GoCAConfig | None = None,
        **call_kwargs,
    ) -> SpatialGuidance:
        """The plan a call `pipe(prompt, height=..., width=..., segmentor=...)` makes, built outside the call (to
        segment any recorded step yourself): the uncond condition encoded as the call encodes it (SDXL's empty
        negative prompt is all zeros, which changes what the segmentors read)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        with torch.no_grad():
            negative = self.encode_prompt(
                prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=True,
                negative_prompt=call_kwargs.get("negative_prompt"),
            )[1]  # fmt: skip
        return self.spatial_guidance(
            segmentor, prompts, height, width, scfg_config=scfg_config, goca_config=goca_config,
            negative_prompt_embeds=negative,
        )  # fmt: skip

    def start_spatial_guidance(self, segmentor: Segmentor | None, **kwargs) -> SpatialGuidance | None:
        """The loop's plan, or None (with a warning when a segmentor was asked for but CFG is off: w <= 1 or a
        guidance-embedding denoiser such as LCM's, where there is no Δ to rescale)."""
        if segmentor is None:
            return None
        if not self.do_classifier_free_guidance:
            logger.warning(
                "segmentor %r segments nothing: classifier-free guidance is off (%s)", segmentor.name,
                self.cfg_scale_text(),
            )  # fmt: skip
            return None
        return self.spatial_guidance(segmentor, **kwargs)

    def cfg_scale_text(self) -> str:
        """Why CFG is off, for the warning: the scale (and a guidance-embedding denoiser such as LCM's)."""
        embedded = getattr(self.denoiser.config, "time_cond_proj_dim", None)
        return f"guidance_scale={self.guidance_scale}" + (", guidance-embedding denoiser" if embedded else "")
