"""`FluxSCFGPipeline`: Flux whose true CFG gives every image region its own scale.

The joint attention of the cond call (image queries over T5 + image keys, QK-norm and RoPE applied as the model
applies them) is recorded by hooks (`capture`; the model keeps its fused kernel) and segmented by GoCA with the
authors' Flux configuration (algorithm.md §8.5). S-CFG's w is `true_cfg_scale`; guidance-distilled Flux keeps its
embedded `guidance_scale` beside it. The loop is diffusers' `FluxPipeline.__call__`, byte for byte except the lines
marked `# [S-CFG]`; with `segmentor=None`, or without true CFG, it computes exactly what diffusers computes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import FluxPipeline
from diffusers.image_processor import PipelineImageInput
from diffusers.loaders import TextualInversionLoaderMixin
from diffusers.pipelines.flux.pipeline_flux import XLA_AVAILABLE, calculate_shift, retrieve_timesteps
from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput
from diffusers.utils.torch_utils import get_module_execution_device
from torch import Tensor

from .capture import AttentionRecord
from .config import GoCAConfig, SCFGConfig
from .guidance import RateRule, SCFGStepMaps, SCFGStepRates, SpatialGuidance
from .layout import ModelLayout
from .pipeline_utils import DEFAULT_SEGMENTOR, SCFGPipelineMixin
from .segment import Segmentor
from .tokens import PromptTokens, t5_prompt_tokens

if XLA_AVAILABLE:
    import torch_xla.core.xla_model as xm

logger = logging.getLogger(__name__)


@dataclass
class FluxSCFGPipelineOutput(FluxPipelineOutput):
    """diffusers' output plus `maps` (one `SCFGStepMaps` per denoising-loop iteration when `return_maps=True`) and
    `rates` (one `SCFGStepRates` per iteration whenever a segmentor ran; None for plain true CFG)."""

    maps: list[SCFGStepMaps] | None = None
    rates: list[SCFGStepRates] | None = None


class FluxSCFGPipeline(SCFGPipelineMixin, FluxPipeline):
    r"""Flux with spatially adaptive true CFG (S-CFG), segmenting each step from the transformer's joint attention.

    Same components and `__call__` as [`FluxPipeline`] plus `segmentor`, `goca_config`, `return_maps`, `caption` and
    `rate_rule` at the end. Regions are named by the T5 tokens of `prompt_2` (else `prompt`), padded and truncated at
    `max_sequence_length` as the encoder sees them; padding is left out of the maps (algorithm.md §8.5).

    Example:
        >>> import torch
        >>> from goca_scfg import FluxSCFGPipeline
        >>> pipe = FluxSCFGPipeline.from_pretrained("black-forest-labs/FLUX.1-dev", dtype=torch.bfloat16).to(
        ...     "cuda"
        ... )  # doctest: +SKIP
        >>> image = pipe(
        ...     "a cat on a red sofa", negative_prompt="", true_cfg_scale=4.0, guidance_scale=3.5
        ... ).images[0]  # doctest: +SKIP
    """

    denoiser_name = "transformer"
    casts_latents = True  # `prepare_latents` moves given latents to the call's dtype
    _true_cfg_scale = 1.0
    _do_true_cfg = False

    @property
    def do_classifier_free_guidance(self) -> bool:
        """True CFG is on: `true_cfg_scale > 1` and a negative prompt (the embedded guidance is not CFG)."""
        return self._do_true_cfg

    def cfg_scale_text(self) -> str:
        return f"true_cfg_scale={self._true_cfg_scale}" + ("" if self._true_cfg_scale <= 1 else ", no negative prompt")

    def check_true_cfg_call(
        self, num_inference_steps, true_cfg_scale, height, width, sigmas, segmentor, scfg_config, goca_config,
        prompt, caption, prompt_embeds, rate_rule, **checks,
    ) -> tuple[Segmentor | None, str | list[str] | None]:  # fmt: skip
        """`check_scfg_call` with S-CFG's w = `true_cfg_scale`; notes whether the segmentor was passed explicitly
        (the default one segments silently only where true CFG is on)."""
        self._segmentor_explicit = segmentor is not DEFAULT_SEGMENTOR
        return self.check_scfg_call(
            num_inference_steps, true_cfg_scale, height, width, None, sigmas, segmentor, scfg_config, goca_config,
            prompt, caption, prompt_embeds, rate_rule, **checks,
        )  # fmt: skip

    def start_spatial_guidance(self, segmentor: Segmentor | None, **kwargs) -> SpatialGuidance | None:
        """The loop's plan, or None without true CFG (a warning only when the segmentor was passed explicitly)."""
        if segmentor is not None and not self._do_true_cfg and not self._segmentor_explicit:
            return None
        return super().start_spatial_guidance(segmentor, **kwargs)

    def latents_shape(self, batch: int, height: int | None, width: int | None) -> tuple[int, ...]:
        """Packed latents (B, (h/2)·(w/2), 4·C), h and w the latent size as `prepare_latents` rounds it."""
        height, width = self.default_size(height, width)
        h, w = self.check_segmentation_size(height, width, None)
        return (batch, (h // 2) * (w // 2), self.transformer.config.in_channels)

    def check_segmentation_size(self, height: int, width: int, layout: ModelLayout) -> tuple[int, int]:
        """The unpacked latent (h, w) as `prepare_latents` rounds it (2·⌊size / (2·vae_scale_factor)⌋, with the
        stock pipeline's warning); every packed token is a 2×2 latent patch, so any such size segments."""
        f = self.vae_scale_factor * 2
        return 2 * (int(height) // f), 2 * (int(width) // f)

    def segmentation_tokens(
        self, prompt: str | list[str] | None, num_images_per_prompt: int, max_sequence_length: int = 512
    ) -> PromptTokens | None:
        """T5 token classes of the text `_get_t5_prompt_embeds` encodes (textual-inversion tokens expanded,
        truncated at `max_sequence_length`; algorithm.md §8.5)."""
        if prompt is None:
            return None
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if isinstance(self, TextualInversionLoaderMixin):
            prompts = self.maybe_convert_prompt(prompts, self.tokenizer_2)
        return t5_prompt_tokens(self.tokenizer_2, prompts, num_images_per_prompt, max_sequence_length)

    def spatial_guidance(self, segmentor, prompt, height, width, num_images_per_prompt=1, **kwargs):
        """`SCFGPipelineMixin.spatial_guidance` with the T5 length of this call (`max_sequence_length`)."""
        length = kwargs.pop("max_sequence_length", None)
        if length is not None:
            kwargs["token_options"] = {"max_sequence_length": length}
        elif kwargs.get("key_mask") is not None:
            kwargs["token_options"] = {"max_sequence_length": int(kwargs["key_mask"].shape[1])}
        return super().spatial_guidance(segmentor, prompt, height, width, num_images_per_prompt, **kwargs)

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
        """The plan a call makes (`SCFGPipelineMixin.call_plan`): T5 tokens and non-padding columns of the call's
        `prompt_2` (else `prompt`) at its `max_sequence_length` (default 512); no text needs encoding."""
        texts = call_kwargs.get("prompt_2") or prompt
        prompts = [texts] if isinstance(texts, str) else list(texts)
        length = call_kwargs.get("max_sequence_length", 512)
        return self.spatial_guidance(
            segmentor, prompts, height, width, scfg_config=scfg_config, goca_config=goca_config,
            key_mask=self.context_columns(prompts, 1, length), max_sequence_length=length,
        )  # fmt: skip

    def context_columns(
        self, prompt: str | list[str] | None, num_images_per_prompt: int, max_sequence_length: int
    ) -> Tensor | None:
        """(2B, T) bool [uncond; cond]: the T5 positions that are not padding (the cond rows name the regions; the
        uncond call is not recorded). None without a prompt."""
        if prompt is None:
            return None
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if isinstance(self, TextualInversionLoaderMixin):
            prompts = self.maybe_convert_prompt(prompts, self.tokenizer_2)
        mask = self.tokenizer_2(
            prompts, padding="max_length", max_length=max_sequence_length, truncation=True, return_tensors="pt"
        ).attention_mask.bool()
        mask = mask.repeat_interleave(num_images_per_prompt, dim=0)
        return torch.cat([mask, mask])

    def packed_guidance(
        self, guide: SpatialGuidance, step: int, timestep, record: AttentionRecord, neg: Tensor, pos: Tensor,
        height: int, width: int,
    ) -> Tensor:  # fmt: skip
        """ε̂ = ε_u + w·r⊙(ε_c − ε_u) on the unpacked (B, 16, h, w) latents, packed back: the rate is per latent pixel
        as on every other model (packing and unpacking are exact reshapes)."""
        u = self._unpack_latents(neg, height, width, self.vae_scale_factor)
        c = self._unpack_latents(pos, height, width, self.vae_scale_factor)
        out = guide(step, timestep, record, u, c, self._true_cfg_scale)
        b, ch, h, w = out.shape
        return self._pack_latents(out, b, ch, h, w)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] = None,
        prompt_2: str | list[str] | None = None,
        negative_prompt: str | list[str] = None,
        negative_prompt_2: str | list[str] | None = None,
        true_cfg_scale: float = 1.0,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 28,
        sigmas: list[float] | None = None,
        guidance_scale: float = 3.5,
        num_images_per_prompt: int | None = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.FloatTensor | None = None,
        prompt_embeds: torch.FloatTensor | None = None,
        pooled_prompt_embeds: torch.FloatTensor | None = None,
        ip_adapter_image: PipelineImageInput | None = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        negative_ip_adapter_image: PipelineImageInput | None = None,
        negative_ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        negative_prompt_embeds: torch.FloatTensor | None = None,
        negative_pooled_prompt_embeds: torch.FloatTensor | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[[int, int], None] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        max_sequence_length: int = 512,
        segmentor: str | Segmentor | None = DEFAULT_SEGMENTOR,  # [S-CFG]
        scfg_config: SCFGConfig | None = None,  # [S-CFG]
        goca_config: GoCAConfig | None = None,  # [S-CFG]
        return_maps: bool = False,  # [S-CFG]
        caption: str | list[str] | None = None,  # [S-CFG]
        rate_rule: RateRule | None = None,  # [S-CFG]
        **kwargs,  # [S-CFG]
    ) -> FluxSCFGPipelineOutput | tuple:  # [S-CFG]
        r"""The stock call (see [`FluxPipeline.__call__`]) with per-region true CFG.

        Args (besides diffusers'):
            segmentor (`str` or `None`, defaults to `"goca"`): `"goca"`: GoCA masks from the joint attention (the
                authors' Flux configuration, algorithm.md §8.5); `None`: plain true CFG, identical to `FluxPipeline`.
                `"scfg"` is not defined for joint attention and raises. S-CFG's w is `true_cfg_scale`: with
                `true_cfg_scale <= 1` or no negative prompt there is no CFG and nothing is segmented (a warning when
                a segmentor was passed explicitly); `guidance_scale` stays the embedded guidance of guidance-distilled
                Flux.
            scfg_config (`SCFGConfig`, *optional*): unused (no S-CFG rule for joint attention).
            goca_config (`GoCAConfig`, *optional*): GoCA settings (`cross_norm`, `reference_channels`: §8.5).
            return_maps (`bool`, defaults to `False`): add `maps`, one `SCFGStepMaps` per step, to the output.
            caption (`str` or `list[str]`, *optional*): with `prompt_embeds` and no `prompt`, the text they encode
                (its T5 tokens name the regions).
            rate_rule (`RateRule`, *optional*): the per-pixel rate from the masks (default `SCFGRate()`).
        """
        if kwargs:  # [S-CFG] diffusers ignores unknown keywords; a misspelt S-CFG argument must not pass silently
            raise TypeError(f"unexpected keyword arguments: {sorted(kwargs)}")

        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor

        # 1. Check inputs. Raise error if not correct
        self.check_inputs(
            prompt,
            prompt_2,
            height,
            width,
            negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            max_sequence_length=max_sequence_length,
        )
        segmentor, regions = self.check_true_cfg_call(  # [S-CFG] before any work: inputs, segmentor, region text
            num_inference_steps, true_cfg_scale, height, width, sigmas, segmentor, scfg_config, goca_config,
            prompt if prompt_2 is None else prompt_2, caption, prompt_embeds, rate_rule, latents=latents,  # [S-CFG]
            generator=generator, num_images_per_prompt=num_images_per_prompt, negative_prompt=negative_prompt,  # [S-CFG]
            negative_prompt_embeds=negative_prompt_embeds, return_maps=return_maps, output_type=output_type,  # [S-CFG]
            callback_on_step_end=callback_on_step_end,  # [S-CFG]
        )  # fmt: skip

        self._guidance_scale = guidance_scale
        self._joint_attention_kwargs = joint_attention_kwargs
        self._current_timestep = None
        self._interrupt = False

        # 2. Define call parameters
        if prompt is not None and isinstance(prompt, str):
            batch_size = 1
        elif prompt is not None and isinstance(prompt, list):
            batch_size = len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]

        device = self._execution_device

        lora_scale = (
            self.joint_attention_kwargs.get("scale", None) if self.joint_attention_kwargs is not None else None
        )
        has_neg_prompt = negative_prompt is not None or (
            negative_prompt_embeds is not None and negative_pooled_prompt_embeds is not None
        )
        do_true_cfg = true_cfg_scale > 1 and has_neg_prompt
        self._true_cfg_scale, self._do_true_cfg = true_cfg_scale, do_true_cfg  # [S-CFG] S-CFG's w and on/off
        if do_true_cfg and prompt_embeds is not None and negative_prompt_embeds is not None:
            if prompt_embeds.shape != negative_prompt_embeds.shape:
                raise ValueError(
                    "`prompt_embeds` and `negative_prompt_embeds` must have the same shape when passed directly, but"
                    f" got: `prompt_embeds` {prompt_embeds.shape} != `negative_prompt_embeds`"
                    f" {negative_prompt_embeds.shape}."
                )
        (
            prompt_embeds,
            pooled_prompt_embeds,
            text_ids,
        ) = self.encode_prompt(
            prompt=prompt,
            prompt_2=prompt_2,
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            device=device,
            num_images_per_prompt=num_images_per_prompt,
            max_sequence_length=max_sequence_length,
            lora_scale=lora_scale,
        )
        if do_true_cfg:
            (
                negative_prompt_embeds,
                negative_pooled_prompt_embeds,
                negative_text_ids,
            ) = self.encode_prompt(
                prompt=negative_prompt,
                prompt_2=negative_prompt_2,
                prompt_embeds=negative_prompt_embeds,
                pooled_prompt_embeds=negative_pooled_prompt_embeds,
                device=device,
                num_images_per_prompt=num_images_per_prompt,
                max_sequence_length=max_sequence_length,
                lora_scale=lora_scale,
            )

        # 4. Prepare latent variables
        num_channels_latents = self.transformer.config.in_channels // 4
        latents, latent_image_ids = self.prepare_latents(
            batch_size * num_images_per_prompt,
            num_channels_latents,
            height,
            width,
            prompt_embeds.dtype,
            device,
            generator,
            latents,
        )

        # 5. Prepare timesteps
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps) if sigmas is None else sigmas
        if hasattr(self.scheduler.config, "use_flow_sigmas") and self.scheduler.config.use_flow_sigmas:
            sigmas = None
        image_seq_len = latents.shape[1]
        mu = calculate_shift(
            image_seq_len,
            self.scheduler.config.get("base_image_seq_len", 256),
            self.scheduler.config.get("max_image_seq_len", 4096),
            self.scheduler.config.get("base_shift", 0.5),
            self.scheduler.config.get("max_shift", 1.15),
        )

        timestep_device = device
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler,
            num_inference_steps,
            timestep_device,
            sigmas=sigmas,
            mu=mu,
        )
        num_warmup_steps = max(len(timesteps) - num_inference_steps * self.scheduler.order, 0)
        self._num_timesteps = len(timesteps)

        # handle guidance
        if self.transformer.config.guidance_embeds:
            guidance = torch.full([1], guidance_scale, device=device, dtype=torch.float32)
            guidance = guidance.expand(latents.shape[0])
        else:
            guidance = None

        if (ip_adapter_image is not None or ip_adapter_image_embeds is not None) and (
            negative_ip_adapter_image is None and negative_ip_adapter_image_embeds is None
        ):
            negative_ip_adapter_image = np.zeros((width, height, 3), dtype=np.uint8)
            negative_ip_adapter_image = [negative_ip_adapter_image] * self.transformer.encoder_hid_proj.num_ip_adapters

        elif (ip_adapter_image is None and ip_adapter_image_embeds is None) and (
            negative_ip_adapter_image is not None or negative_ip_adapter_image_embeds is not None
        ):
            ip_adapter_image = np.zeros((width, height, 3), dtype=np.uint8)
            ip_adapter_image = [ip_adapter_image] * self.transformer.encoder_hid_proj.num_ip_adapters

        if self.joint_attention_kwargs is None:
            self._joint_attention_kwargs = {}

        image_embeds = None
        negative_image_embeds = None
        if ip_adapter_image is not None or ip_adapter_image_embeds is not None:
            image_embeds = self.prepare_ip_adapter_image_embeds(
                ip_adapter_image,
                ip_adapter_image_embeds,
                device,
                batch_size * num_images_per_prompt,
            )
        if negative_ip_adapter_image is not None or negative_ip_adapter_image_embeds is not None:
            negative_image_embeds = self.prepare_ip_adapter_image_embeds(
                negative_ip_adapter_image,
                negative_ip_adapter_image_embeds,
                device,
                batch_size * num_images_per_prompt,
            )

        # [S-CFG] 5.1 Plan the segmentation (only with true CFG) and record the cond call's attention layers
        guide = self.start_spatial_guidance(
            segmentor,
            prompt=regions,
            rate_rule=rate_rule,
            height=height,
            width=width,
            num_images_per_prompt=num_images_per_prompt,
            return_maps=return_maps,
            batch_size=batch_size * num_images_per_prompt,
            key_mask=self.context_columns(regions, num_images_per_prompt, max_sequence_length),
        )
        capture = self.attention_capture(guide, batched_cfg=False)

        # 6. Denoising loop
        # We set the index here to remove DtoH sync, helpful especially during compilation.
        # Check out more details here: https://github.com/huggingface/diffusers/pull/11696
        self.scheduler.set_begin_index(0)
        with capture as record, self.progress_bar(total=num_inference_steps) as progress_bar:  # [S-CFG] capture
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue

                self._current_timestep = t
                if image_embeds is not None:
                    self._joint_attention_kwargs["ip_adapter_image_embeds"] = image_embeds
                # broadcast to batch dimension in a way that's compatible with ONNX/Core ML
                timestep = t.expand(latents.shape[0]).to(latents.dtype)

                with self.transformer.cache_context("cond"):
                    noise_pred = self.transformer(
                        hidden_states=latents,
                        timestep=timestep / 1000,
                        guidance=guidance,
                        pooled_projections=pooled_prompt_embeds,
                        encoder_hidden_states=prompt_embeds,
                        txt_ids=text_ids,
                        img_ids=latent_image_ids,
                        joint_attention_kwargs=self.joint_attention_kwargs,
                        return_dict=False,
                    )[0]

                if do_true_cfg:
                    if negative_image_embeds is not None:
                        self._joint_attention_kwargs["ip_adapter_image_embeds"] = negative_image_embeds

                    with self.transformer.cache_context("uncond"), self.unrecorded(record):  # [S-CFG] cond only
                        neg_noise_pred = self.transformer(
                            hidden_states=latents,
                            timestep=timestep / 1000,
                            guidance=guidance,
                            pooled_projections=negative_pooled_prompt_embeds,
                            encoder_hidden_states=negative_prompt_embeds,
                            txt_ids=negative_text_ids,
                            img_ids=latent_image_ids,
                            joint_attention_kwargs=self.joint_attention_kwargs,
                            return_dict=False,
                        )[0]
                    if guide is not None:  # [S-CFG] per-region scale from the cond call's attention
                        noise_pred = self.packed_guidance(
                            guide, i, t, record, neg_noise_pred, noise_pred, height, width
                        )
                    else:  # [S-CFG]
                        noise_pred = neg_noise_pred + true_cfg_scale * (noise_pred - neg_noise_pred)

                # compute the previous noisy sample x_t -> x_t-1
                latents_dtype = latents.dtype
                latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]

                if latents.dtype != latents_dtype:
                    if torch.backends.mps.is_available():
                        # some platforms (eg. apple mps) misbehave due to a pytorch bug: https://github.com/pytorch/pytorch/pull/99272
                        latents = latents.to(latents_dtype)

                if callback_on_step_end is not None:
                    callback_kwargs = {}
                    for k in callback_on_step_end_tensor_inputs:
                        callback_kwargs[k] = locals()[k]
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    self.check_step_end_outputs(i, callback_outputs, latents)  # [S-CFG] a dict; latents keep shape

                    latents = callback_outputs.pop("latents", latents)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)

                # call the callback, if provided
                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()

                if XLA_AVAILABLE:
                    xm.mark_step()

        self._current_timestep = None

        if output_type == "latent":
            image = latents
        else:
            latents = self._unpack_latents(latents, height, width, self.vae_scale_factor)
            latents = (latents / self.vae.config.scaling_factor) + self.vae.config.shift_factor
            latents = latents.to(get_module_execution_device(self.vae))
            image = self.vae.decode(latents, return_dict=False)[0]
            image = self.image_processor.postprocess(image, output_type=output_type)

        # Offload all models
        self.maybe_free_model_hooks()

        maps = (guide.maps if guide is not None else []) if return_maps else None  # [S-CFG]
        if not return_dict:
            return (image, maps) if return_maps else (image,)  # [S-CFG]

        rates = guide.step_rates() if guide is not None else None  # [S-CFG]
        return FluxSCFGPipelineOutput(images=image, maps=maps, rates=rates)  # [S-CFG]
