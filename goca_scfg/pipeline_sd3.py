"""`StableDiffusion3SCFGPipeline`: Stable Diffusion 3 / 3.5 whose CFG gives every image region its own scale.

The MMDiT's joint attention (image queries over text + image keys) is recorded by hooks (`capture`, the model keeps
its fused kernel) and segmented by GoCA with the joint-attention rule (algorithm.md §8.5: the authors' Flux choices
at SD3's depth). The loop is diffusers' `StableDiffusion3Pipeline.__call__`, byte for byte except the lines marked
`# [S-CFG]`; with `segmentor=None` it computes exactly what diffusers computes (tested bit for bit).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import StableDiffusion3Pipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput
from diffusers.pipelines.stable_diffusion_3.pipeline_output import StableDiffusion3PipelineOutput
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
    XLA_AVAILABLE,
    calculate_shift,
    retrieve_timesteps,
)

from .config import GoCAConfig, SCFGConfig
from .guidance import RateRule, SCFGStepMaps, SCFGStepRates, SpatialGuidance
from .pipeline_utils import DEFAULT_SEGMENTOR, SCFGPipelineMixin
from .segment import Segmentor

if XLA_AVAILABLE:
    import torch_xla.core.xla_model as xm


@dataclass
class StableDiffusion3SCFGPipelineOutput(StableDiffusion3PipelineOutput):
    """diffusers' output plus `maps` (one `SCFGStepMaps` per denoising-loop iteration when `return_maps=True`) and
    `rates` (one `SCFGStepRates` per iteration whenever a segmentor ran; None for plain CFG)."""

    maps: list[SCFGStepMaps] | None = None
    rates: list[SCFGStepRates] | None = None


class StableDiffusion3SCFGPipeline(SCFGPipelineMixin, StableDiffusion3Pipeline):
    r"""Stable Diffusion 3 / 3.5 with spatially adaptive CFG (S-CFG), segmenting each step from the MMDiT's joint
    attention.

    Same components and `__call__` as [`StableDiffusion3Pipeline`] plus `segmentor`, `goca_config`, `return_maps`,
    `caption` and `rate_rule` at the end. Regions are named by the CLIP tokens of the joint context (positions
    0-76, the prompt as the first CLIP tokenizer sees it); the T5 positions are left out of the maps (§8.5).

    Example:
        >>> import torch
        >>> from goca_scfg import StableDiffusion3SCFGPipeline
        >>> pipe = StableDiffusion3SCFGPipeline.from_pretrained(
        ...     "stabilityai/stable-diffusion-3.5-medium", dtype=torch.bfloat16
        ... ).to("cuda")  # doctest: +SKIP
        >>> image = pipe("a cat on a red sofa", guidance_scale=4.5).images[0]  # doctest: +SKIP
    """

    denoiser_name = "transformer"
    casts_latents = True  # `prepare_latents` moves given latents to the call's dtype

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
        """The plan a call makes (`SCFGPipelineMixin.call_plan`): the joint context's CLIP columns for the call's
        `max_sequence_length` (default 256); no text needs encoding."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        length = self.tokenizer_max_length + call_kwargs.get("max_sequence_length", 256)
        keep = self.context_columns(torch.zeros(2 * len(prompts), length, 1, device=self.device))
        return self.spatial_guidance(
            segmentor, prompts, height, width, scfg_config=scfg_config, goca_config=goca_config, key_mask=keep
        )

    def context_columns(self, prompt_embeds: torch.Tensor) -> torch.Tensor:
        """(rows, T) bool: the joint context's CLIP positions (the first `tokenizer_max_length`, which name the
        regions); the T5 positions after them are left out of the maps (algorithm.md §8.5)."""
        keep = torch.zeros(prompt_embeds.shape[:2], dtype=torch.bool, device=prompt_embeds.device)
        keep[:, : self.tokenizer_max_length] = True
        return keep

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] = None,
        prompt_2: str | list[str] | None = None,
        prompt_3: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 28,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.0,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        negative_prompt_3: str | list[str] | None = None,
        num_images_per_prompt: int | None = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.FloatTensor | None = None,
        prompt_embeds: torch.FloatTensor | None = None,
        negative_prompt_embeds: torch.FloatTensor | None = None,
        pooled_prompt_embeds: torch.FloatTensor | None = None,
        negative_pooled_prompt_embeds: torch.FloatTensor | None = None,
        ip_adapter_image: PipelineImageInput | None = None,
        ip_adapter_image_embeds: torch.Tensor | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable[[int, int], None] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        max_sequence_length: int = 256,
        skip_guidance_layers: list[int] = None,
        skip_layer_guidance_scale: float = 2.8,
        skip_layer_guidance_stop: float = 0.2,
        skip_layer_guidance_start: float = 0.01,
        mu: float | None = None,
        segmentor: str | Segmentor | None = DEFAULT_SEGMENTOR,  # [S-CFG]
        scfg_config: SCFGConfig | None = None,  # [S-CFG]
        goca_config: GoCAConfig | None = None,  # [S-CFG]
        return_maps: bool = False,  # [S-CFG]
        caption: str | list[str] | None = None,  # [S-CFG]
        rate_rule: RateRule | None = None,  # [S-CFG]
        **kwargs,  # [S-CFG]
    ) -> StableDiffusion3SCFGPipelineOutput | tuple:  # [S-CFG]
        r"""The stock call (see [`StableDiffusion3Pipeline.__call__`]) with per-region guidance.

        Args (besides diffusers'):
            segmentor (`str` or `None`, defaults to `"goca"`): `"goca"`: GoCA masks from the joint attention
                (algorithm.md §8.5); `None`: plain CFG, identical to `StableDiffusion3Pipeline`. `"scfg"` is not
                defined for joint attention and raises. Nothing is segmented when `guidance_scale <= 1`.
            scfg_config (`SCFGConfig`, *optional*): unused (no S-CFG rule for joint attention).
            goca_config (`GoCAConfig`, *optional*): GoCA settings (`cross_norm`, `reference_channels`: §8.5).
            return_maps (`bool`, defaults to `False`): add `maps`, one `SCFGStepMaps` per step, to the output.
            caption (`str` or `list[str]`, *optional*): with `prompt_embeds` and no `prompt`, the text they encode.
            rate_rule (`RateRule`, *optional*): the per-pixel rate from the masks (default `SCFGRate()`).
        """
        if kwargs:  # [S-CFG] diffusers ignores unknown keywords; a misspelt S-CFG argument must not pass silently
            raise TypeError(f"unexpected keyword arguments: {sorted(kwargs)}")

        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor

        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs

        # 1. Check inputs. Raise error if not correct
        self.check_inputs(
            prompt,
            prompt_2,
            prompt_3,
            height,
            width,
            negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2,
            negative_prompt_3=negative_prompt_3,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            max_sequence_length=max_sequence_length,
        )
        segmentor, regions = self.check_scfg_call(  # [S-CFG] before any work: inputs, segmentor, region text
            num_inference_steps, guidance_scale, height, width, None, sigmas, segmentor, scfg_config, goca_config,
            prompt, caption, prompt_embeds, rate_rule, latents=latents, generator=generator,  # [S-CFG]
            num_images_per_prompt=num_images_per_prompt, negative_prompt=negative_prompt,  # [S-CFG]
            negative_prompt_embeds=negative_prompt_embeds, return_maps=return_maps, output_type=output_type,  # [S-CFG]
            callback_on_step_end=callback_on_step_end, clip_skip=clip_skip,  # [S-CFG]
        )  # fmt: skip

        self._guidance_scale = guidance_scale
        self._skip_layer_guidance_scale = skip_layer_guidance_scale
        self._clip_skip = clip_skip
        self._joint_attention_kwargs = joint_attention_kwargs
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
        (
            prompt_embeds,
            negative_prompt_embeds,
            pooled_prompt_embeds,
            negative_pooled_prompt_embeds,
        ) = self.encode_prompt(
            prompt=prompt,
            prompt_2=prompt_2,
            prompt_3=prompt_3,
            negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2,
            negative_prompt_3=negative_prompt_3,
            do_classifier_free_guidance=self.do_classifier_free_guidance,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            device=device,
            clip_skip=self.clip_skip,
            num_images_per_prompt=num_images_per_prompt,
            max_sequence_length=max_sequence_length,
            lora_scale=lora_scale,
        )

        if self.do_classifier_free_guidance:
            if skip_guidance_layers is not None:
                original_prompt_embeds = prompt_embeds
                original_pooled_prompt_embeds = pooled_prompt_embeds
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds], dim=0)
            pooled_prompt_embeds = torch.cat([negative_pooled_prompt_embeds, pooled_prompt_embeds], dim=0)

        # 4. Prepare latent variables
        num_channels_latents = self.transformer.config.in_channels
        latents = self.prepare_latents(
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
        scheduler_kwargs = {}
        if self.scheduler.config.get("use_dynamic_shifting", None) and mu is None:
            _, _, height, width = latents.shape
            image_seq_len = (height // self.transformer.config.patch_size) * (
                width // self.transformer.config.patch_size
            )
            mu = calculate_shift(
                image_seq_len,
                self.scheduler.config.get("base_image_seq_len", 256),
                self.scheduler.config.get("max_image_seq_len", 4096),
                self.scheduler.config.get("base_shift", 0.5),
                self.scheduler.config.get("max_shift", 1.16),
            )
            scheduler_kwargs["mu"] = mu
        elif mu is not None:
            scheduler_kwargs["mu"] = mu
        if XLA_AVAILABLE:
            timestep_device = "cpu"
        else:
            timestep_device = device
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler,
            num_inference_steps,
            timestep_device,
            sigmas=sigmas,
            **scheduler_kwargs,
        )
        num_warmup_steps = max(len(timesteps) - num_inference_steps * self.scheduler.order, 0)
        self._num_timesteps = len(timesteps)

        # 6. Prepare image embeddings
        if (ip_adapter_image is not None and self.is_ip_adapter_active) or ip_adapter_image_embeds is not None:
            ip_adapter_image_embeds = self.prepare_ip_adapter_image_embeds(
                ip_adapter_image,
                ip_adapter_image_embeds,
                device,
                batch_size * num_images_per_prompt,
                self.do_classifier_free_guidance,
            )

            if self.joint_attention_kwargs is None:
                self._joint_attention_kwargs = {"ip_adapter_image_embeds": ip_adapter_image_embeds}
            else:
                self._joint_attention_kwargs.update(ip_adapter_image_embeds=ip_adapter_image_embeds)

        # [S-CFG] 6.1 Plan the segmentation (only when CFG is on) and record the needed attention layers
        guide = self.start_spatial_guidance(
            segmentor,
            prompt=regions,
            rate_rule=rate_rule,
            height=height,
            width=width,
            num_images_per_prompt=num_images_per_prompt,
            return_maps=return_maps,
            batch_size=batch_size * num_images_per_prompt,
            key_mask=self.context_columns(prompt_embeds),
        )

        # 7. Denoising loop
        capture = self.attention_capture(guide)  # [S-CFG]
        with capture as record, self.progress_bar(total=num_inference_steps) as progress_bar:  # [S-CFG] capture
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                self.follow_guidance_scale(guide, record)  # [S-CFG] a callback may switch CFG off (or break it)

                # expand the latents if we are doing classifier free guidance
                latent_model_input = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents
                # broadcast to batch dimension in a way that's compatible with ONNX/Core ML
                timestep = t.expand(latent_model_input.shape[0])
                # on TPU, a view into `timesteps` makes `torch.compile` recompile every step
                if timestep.device.type == "tpu":
                    timestep = timestep.clone()

                noise_pred = self.transformer(
                    hidden_states=latent_model_input,
                    timestep=timestep,
                    encoder_hidden_states=prompt_embeds,
                    pooled_projections=pooled_prompt_embeds,
                    joint_attention_kwargs=self.joint_attention_kwargs,
                    return_dict=False,
                )[0]

                # perform guidance
                if self.do_classifier_free_guidance:
                    noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                    if guide is not None:  # [S-CFG] per-region scale from this call's attention
                        noise_pred = guide(i, t, record, noise_pred_uncond, noise_pred_text, self.guidance_scale)
                    else:  # [S-CFG]
                        noise_pred = noise_pred_uncond + self.guidance_scale * (noise_pred_text - noise_pred_uncond)
                    should_skip_layers = (
                        True
                        if i > num_inference_steps * skip_layer_guidance_start
                        and i < num_inference_steps * skip_layer_guidance_stop
                        else False
                    )
                    if skip_guidance_layers is not None and should_skip_layers:
                        timestep = t.expand(latents.shape[0])
                        if timestep.device.type == "tpu":
                            timestep = timestep.clone()
                        latent_model_input = latents
                        with self.unrecorded(record):  # [S-CFG] the skip-layer call is not segmented
                            noise_pred_skip_layers = self.transformer(
                                hidden_states=latent_model_input,
                                timestep=timestep,
                                encoder_hidden_states=original_prompt_embeds,
                                pooled_projections=original_pooled_prompt_embeds,
                                joint_attention_kwargs=self.joint_attention_kwargs,
                                return_dict=False,
                                skip_layers=skip_guidance_layers,
                            )[0]
                        noise_pred = (
                            noise_pred + (noise_pred_text - noise_pred_skip_layers) * self._skip_layer_guidance_scale
                        )

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
                    pooled_prompt_embeds = callback_outputs.pop("pooled_prompt_embeds", pooled_prompt_embeds)

                # call the callback, if provided
                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()

                if XLA_AVAILABLE:
                    xm.mark_step()

        if output_type == "latent":
            image = latents

        else:
            latents = (latents / self.vae.config.scaling_factor) + self.vae.config.shift_factor

            image = self.vae.decode(latents, return_dict=False)[0]
            image = self.image_processor.postprocess(image, output_type=output_type)

        # Offload all models
        self.maybe_free_model_hooks()

        maps = (guide.maps if guide is not None else []) if return_maps else None  # [S-CFG]
        if not return_dict:
            return (image, maps) if return_maps else (image,)  # [S-CFG]

        rates = guide.step_rates() if guide is not None else None  # [S-CFG]
        return StableDiffusion3SCFGPipelineOutput(images=image, maps=maps, rates=rates)  # [S-CFG]
