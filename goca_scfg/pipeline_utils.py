"""What every SCFG pipeline adds to its diffusers parent: planning one call's segmentation (`SCFGPipelineMixin`).

The pipelines' loops only wire it: `spatial_guidance(...)` before the loop, `capture_attention` around it, and the
returned `SpatialGuidance` instead of the CFG line. The denoiser is found by attribute (`unet` or `transformer`).
"""

from __future__ import annotations

import json
import logging
import math
from contextlib import contextmanager, nullcontext

import torch
from diffusers import DiffusionPipeline
from diffusers.loaders import TextualInversionLoaderMixin
from torch import Tensor

from .capture import AttentionRecord, capture_attention
from .checks import (
    MAX_GUIDANCE_SCALE,
    check_bool,
    check_call_inputs,
    check_callable,
    check_caption,
    check_float,
    check_generator,
    check_int,
    check_latents,
    check_output_type,
    check_prompt,
    check_segmentor_arg,
    check_step_end_outputs,
    check_type,
)
from .config import GoCAConfig, SCFGConfig
from .guidance import RateRule, SpatialGuidance, rate_rule_from
from .layout import ModelLayout, unwrap
from .ops import split_cfg
from .segment import SEGMENTORS, Segmentor, make_segmentor
from .segment.base import SegmentationContext
from .tokens import PromptTokens, clip_prompt_tokens
from .vocab import METHOD_ALIASES, METHOD_NAMES

logger = logging.getLogger(__name__)


class _DefaultName(str):
    """A default argument value equal to its name, told apart from the same name passed explicitly (`is`)."""


DEFAULT_SEGMENTOR = _DefaultName("goca")  # `segmentor is DEFAULT_SEGMENTOR`: the caller did not choose one


def check_configs(scfg_config: object, goca_config: object) -> None:
    """`scfg_config` and `goca_config` must be their config objects (or None): not a dict, a name or each other."""
    presets = {"scfg_config": "SCFGConfig.paper()", "goca_config": "GoCAConfig.fast()"}
    for name, value, expected in (("scfg_config", scfg_config, SCFGConfig), ("goca_config", goca_config, GoCAConfig)):
        hint = ""
        if isinstance(value, dict):
            hint = f" (build it: {expected.__name__}(**{value!r}))"
        elif isinstance(value, str):
            hint = f" (a preset is a classmethod, e.g. {presets[name]})"
        elif isinstance(value, SCFGConfig | GoCAConfig):
            hint = f" (pass it as {'goca_config' if name == 'scfg_config' else 'scfg_config'}=)"
        check_type(name, value, expected, hint)


def cond_half(x: Tensor) -> Tensor:
    """The cond half of a batched [uncond; cond] CFG tensor (algorithm.md §0)."""
    return split_cfg(x)[1]


class SCFGPipelineMixin:
    """Segmentation planning shared by the SCFG pipelines (`denoiser_name` names the denoiser component)."""

    denoiser_name = "unet"
    # True where `prepare_latents` casts given `latents` to the compute dtype (SD3, Flux); SD, SDXL and PixArt do not,
    # so there a `latents=` of another dtype is refused up front instead of failing inside the denoiser
    casts_latents = False

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
        *,
        latents: Tensor | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_images_per_prompt: int = 1,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_embeds: Tensor | None = None,
        return_maps: bool = False,
        output_type: str | None = None,
        callback_on_step_end: object = None,
        guidance_rescale: float = 0.0,
        eta: float = 0.0,
        clip_skip: int | None = None,
    ) -> tuple[Segmentor | None, str | list[str] | None]:
        """What a call adds to diffusers' `check_inputs`, before any work: the inputs diffusers lets pass (steps may
        be None with explicit `timesteps`/`sigmas`; at most the scheduler's training timesteps), the segmentor object
        checked against the denoiser, and the text that names its regions (`region_text`); a `rate_rule` of the wrong
        type is refused. The keyword-only arguments are the call's own (each checked only where the call has it;
        `output_type=None` is not checked): the errors are listed in docs/bad_input.md."""
        scheduler_config = getattr(getattr(self, "scheduler", None), "config", None)
        check_call_inputs(
            num_inference_steps, guidance_scale, height, width, timesteps is not None or sigmas is not None,
            max_steps=getattr(scheduler_config, "num_train_timesteps", None),
        )  # fmt: skip
        check_prompt("prompt", prompt)
        check_prompt("negative_prompt", negative_prompt)
        check_int("num_images_per_prompt", num_images_per_prompt, minimum=1)
        check_bool("return_maps", return_maps)
        check_float("guidance_rescale", guidance_rescale, at_least=0, at_most=1)
        check_float("eta", eta, at_least=0, at_most=1)
        if output_type is not None:
            check_output_type(output_type)
        check_callable("callback_on_step_end", callback_on_step_end)
        if clip_skip is not None:
            check_int("clip_skip", clip_skip, minimum=0, maximum=self._max_clip_skip())
        self.check_text_embeds("prompt_embeds", prompt_embeds)
        self.check_text_embeds("negative_prompt_embeds", negative_prompt_embeds)
        check_segmentor_arg(segmentor, SEGMENTORS, Segmentor, (*METHOD_NAMES, *METHOD_ALIASES))
        check_configs(scfg_config, goca_config)
        seg = self.prepare_segmentor(segmentor, scfg_config, goca_config)
        rate_rule_from(rate_rule)
        if return_maps and seg is None:
            logger.warning("return_maps=True with segmentor=None: nothing is segmented, so `maps` will be []")
        if prompt is not None or prompt_embeds is not None:
            rows = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0]
            images = rows * num_images_per_prompt
            check_generator(generator, images)
            dtype = None if self.casts_latents else self.denoiser.dtype
            check_latents(latents, self.latents_shape(images, height, width), dtype)
        return seg, self.region_text(seg, prompt, caption, prompt_embeds)

    def latents_shape(self, batch: int, height: int | None, width: int | None) -> tuple[int, ...]:
        """The shape of the initial latents `prepare_latents` makes for `batch` images (a `latents=` argument must
        have it): (B, C, height/f, width/f), f the VAE factor. A pipeline with packed latents overrides it."""
        if height is None or width is None:
            height, width = self.default_size(height, width)
        f = self.vae_scale_factor
        return (batch, self.denoiser.config.in_channels, int(height) // f, int(width) // f)

    def default_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """(height, width) with each missing side the denoiser's native size (as SDXL and PixArt default them; SD's
        copied loop would reset both when one is missing). A given side must be an int >= 1."""
        sample = getattr(self.denoiser.config, "sample_size", None) or self.default_sample_size  # Flux: no sample size
        native_h, native_w = (sample, sample) if isinstance(sample, int) else tuple(sample)
        f = self.vae_scale_factor
        try:  # ValueError, as `check_call_inputs` raises for the same arguments
            height = native_h * f if height is None else check_int("height", height, minimum=1)
            width = native_w * f if width is None else check_int("width", width, minimum=1)
        except TypeError as err:
            raise ValueError(str(err)) from None
        return height, width

    def text_embeds_dim(self) -> int | None:
        """The last dimension `prompt_embeds` must have: a transformer's `caption_channels` (PixArt's T5), a UNet's
        `cross_attention_dim` (SD, SDXL); None where it is not known (not checked)."""
        config = self.denoiser.config
        if isinstance(getattr(config, "caption_channels", None), int):
            return config.caption_channels
        if isinstance(getattr(config, "joint_attention_dim", None), int):  # SD3, Flux: the joint context's width
            return config.joint_attention_dim
        if self.denoiser_name == "unet" and getattr(config, "encoder_hid_dim", None) is None:
            dim = getattr(config, "cross_attention_dim", None)
            return dim if isinstance(dim, int) else None
        return None

    def check_text_embeds(self, name: str, embeds: object) -> None:
        """Precomputed text embeddings must be a (B, T, D) tensor with this denoiser's D (e.g. SD v1.5 embeddings
        given to SDXL fail inside the first denoiser call otherwise)."""
        if embeds is None:
            return
        if not isinstance(embeds, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor (B, T, D), got {type(embeds).__name__}")
        dim = self.text_embeds_dim()
        if embeds.ndim != 3 or (dim is not None and embeds.shape[-1] != dim):
            raise ValueError(
                f"{name} must have shape (batch, tokens, {dim if dim is not None else 'D'}) for this "
                f"{type(unwrap(self.denoiser)).__name__}, got {tuple(embeds.shape)}"
            )

    def _max_clip_skip(self) -> int | None:
        """The largest `clip_skip` that keeps one layer of every text encoder (None: no CLIP encoder to count)."""
        layers = [
            enc.config.num_hidden_layers
            for enc in (getattr(self, "text_encoder", None), getattr(self, "text_encoder_2", None))
            if enc is not None and isinstance(getattr(enc.config, "num_hidden_layers", None), int)
        ]
        return min(layers) - 1 if layers else None

    def check_step_end_outputs(self, step: int, outputs: object, latents: Tensor) -> None:
        """Right after a step-end callback, in the loop: it returned a dict, and latents of the current shape and
        dtype (a wrong shape would fail, or broadcast, in the next denoiser call)."""
        check_step_end_outputs(step, outputs, latents)

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
        check_configs(scfg_config, goca_config)
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
        if not math.isfinite(self._guidance_scale) or abs(self._guidance_scale) > MAX_GUIDANCE_SCALE:
            raise ValueError(
                f"guidance_scale became {self._guidance_scale} during the call (set by a step-end callback); "
                f"it must be a finite number between -{MAX_GUIDANCE_SCALE:g} and {MAX_GUIDANCE_SCALE:g} (<= 1 turns "
                "classifier-free guidance off)"
            )
        record.enabled = self.do_classifier_free_guidance

    def attention_capture(self, guide: SpatialGuidance | None, batched_cfg: bool = True):
        """The loop's capture context: nothing without a plan; else the plan's layers recorded on the denoiser, the
        cond half only where the plan asks for cond rows and one call runs both branches (`batched_cfg`)."""
        if guide is None:
            return nullcontext()
        rows = cond_half if guide.plan.rows == "cond" and batched_cfg else None
        return capture_attention(self.denoiser, guide.requests, guide.reducers, rows=rows)

    @contextmanager
    def unrecorded(self, record: AttentionRecord | None):
        """Denoiser calls in this block are not recorded (Flux's uncond call: the joint segmentation reads the cond
        call only, algorithm.md §8.5; SD3's skip-layer guidance call)."""
        if record is None:
            yield
            return
        record.enabled = False
        try:
            yield
        finally:
            record.enabled = True

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
