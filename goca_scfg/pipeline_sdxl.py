"""`StableDiffusionXLSCFGPipeline`: SDXL whose CFG gives every image region its own guidance scale.

The loop is diffusers' `StableDiffusionXLPipeline.__call__`, byte for byte except the lines marked `# [S-CFG]`
(a test diffs it against the installed diffusers); with `segmentor=None` it computes exactly what diffusers
computes (tested bit for bit). GoCA uses the authors' SDXL configuration (algorithm.md §8.2).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput
from diffusers.pipelines.stable_diffusion_xl.pipeline_output import StableDiffusionXLPipelineOutput
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
    XLA_AVAILABLE,
    rescale_noise_cfg,
    retrieve_timesteps,
)
from diffusers.utils import deprecate
from diffusers.utils.torch_utils import get_module_execution_device

from .capture import capture_attention
from .config import GoCAConfig, SCFGConfig
from .guidance import RateRule, SCFGStepMaps, SCFGStepRates
from .pipeline_utils import DEFAULT_SEGMENTOR, SCFGPipelineMixin
from .segment import Segmentor
from .tokens import clip_prompt_tokens

if XLA_AVAILABLE:
    import torch_xla.core.xla_model as xm


@dataclass
class StableDiffusionXLSCFGPipelineOutput(StableDiffusionXLPipelineOutput):
    """diffusers' output plus `maps` (one `SCFGStepMaps` per denoising-loop iteration when `return_maps=True`) and
    `rates` (one `SCFGStepRates` per iteration whenever a segmentor ran; None for plain CFG)."""

    maps: list[SCFGStepMaps] | None = None
    rates: list[SCFGStepRates] | None = None


class StableDiffusionXLSCFGPipeline(SCFGPipelineMixin, StableDiffusionXLPipeline):
    r"""Stable Diffusion XL with spatially adaptive CFG (S-CFG), segmenting each step from the UNet's attention.

    Same components and `__call__` as [`StableDiffusionXLPipeline`] plus `segmentor`, `scfg_config`, `goca_config`
    and `return_maps` at the end (see `StableDiffusionSCFGPipeline`).

    Example:
        >>> import torch
        >>> from goca_scfg import StableDiffusionXLSCFGPipeline
        >>> pipe = StableDiffusionXLSCFGPipeline.from_pretrained(
        ...     "stabilityai/stable-diffusion-xl-base-1.0", dtype=torch.float16
        ... ).to("cuda")  # doctest: +SKIP
        >>> image = pipe("a cat on a red sofa", guidance_scale=5.0).images[0]  # doctest: +SKIP
    """

    def segmentation_tokens(self, prompt, num_images_per_prompt):
        """Regions are named by `prompt`'s tokens from the first tokenizer (the second where there is none)."""
        if prompt is None:
            return None
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        tokenizer = self.tokenizer if self.tokenizer is not None else self.tokenizer_2
        prompts = self.maybe_convert_prompt(prompts, tokenizer)
        return clip_prompt_tokens(tokenizer, prompts, num_images_per_prompt)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] = None,
        prompt_2: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] = None,
        sigmas: list[float] = None,
        denoising_end: float | None = None,
        guidance_scale: float = 5.0,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        num_images_per_prompt: int | None = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image: PipelineImageInput | None = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable[[int, int], None] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        segmentor: str | Segmentor | None = DEFAULT_SEGMENTOR,  # [S-CFG]
        scfg_config: SCFGConfig | None = None,  # [S-CFG]
        goca_config: GoCAConfig | None = None,  # [S-CFG]
        return_maps: bool = False,  # [S-CFG]
        caption: str | list[str] | None = None,  # [S-CFG]
        rate_rule: RateRule | None = None,  # [S-CFG]
        **kwargs,
    ) -> StableDiffusionXLSCFGPipelineOutput | tuple:  # [S-CFG]
        r"""
        [`StableDiffusionXLPipeline.__call__`] with spatially adaptive guidance; the new keyword arguments come last.

        Args:
            segmentor (`str`, `Segmentor` or `None`, defaults to `"goca"`):
                `"goca"`: GoCA masks (the authors' SDXL configuration); `"scfg"`: S-CFG's segmentation on SDXL's
                latent/4 cross-attention (algorithm.md §8.1); a `Segmentor` instance; `None`: plain CFG, identical to
                `StableDiffusionXLPipeline`. Nothing is segmented when `guidance_scale <= 1`.
            scfg_config (`SCFGConfig`, *optional*): the S-CFG segmentation settings (`segmentor="scfg"`).
            goca_config (`GoCAConfig`, *optional*): GoCA settings (`GoCAConfig.vanilla()` for the Table-2 baseline).
            return_maps (`bool`, defaults to `False`): add `maps`, one `SCFGStepMaps` per denoising step.
            caption (`str` or `list[str]`, *optional*): with `prompt_embeds` and no `prompt`, the text the embeddings
                encode (one per prompt row): its tokens name the regions, as the prompt's would.
            rate_rule (`RateRule`, *optional*): the per-pixel rate from the masks (default `SCFGRate()`: S-CFG's
                clamp 0.8–3.0, cap 15/w and smoothing).

        Regions are named by the tokens of `prompt` (the first tokenizer's); `prompt_2` feeds the second encoder
        at the same token positions (algorithm.md §8.2).
        """

        callback = kwargs.pop("callback", None)
        callback_steps = kwargs.pop("callback_steps", None)
        if kwargs:  # [S-CFG] diffusers ignores unknown keywords; a misspelt S-CFG argument must not pass silently
            raise TypeError(f"unexpected keyword arguments: {sorted(kwargs)}")

        if callback is not None:
            deprecate(
                "callback",
                "1.0.0",
                "Passing `callback` as an input argument to `__call__` is deprecated, consider use `callback_on_step_end`",
            )
        if callback_steps is not None:
            deprecate(
                "callback_steps",
                "1.0.0",
                "Passing `callback_steps` as an input argument to `__call__` is deprecated, consider use `callback_on_step_end`",
            )

        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs

        # 0. Default height and width to unet
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor

        original_size = original_size or (height, width)
        target_size = target_size or (height, width)

        # 1. Check inputs. Raise error if not correct
        self.check_inputs(
            prompt,
            prompt_2,
            height,
            width,
            callback_steps,
            negative_prompt,
            negative_prompt_2,
            prompt_embeds,
            negative_prompt_embeds,
            pooled_prompt_embeds,
            negative_pooled_prompt_embeds,
            ip_adapter_image,
            ip_adapter_image_embeds,
            callback_on_step_end_tensor_inputs,
        )
        segmentor, regions = self.check_scfg_call(  # [S-CFG] before any work: inputs, segmentor, region text
            num_inference_steps, guidance_scale, height, width, timesteps, sigmas, segmentor, scfg_config, goca_config,
            prompt, caption, prompt_embeds, rate_rule, latents=latents, generator=generator,  # [S-CFG]
            num_images_per_prompt=num_images_per_prompt, negative_prompt=negative_prompt,  # [S-CFG]
            negative_prompt_embeds=negative_prompt_embeds, return_maps=return_maps, output_type=output_type,  # [S-CFG]
            callback_on_step_end=callback_on_step_end, guidance_rescale=guidance_rescale, eta=eta,  # [S-CFG]
            clip_skip=clip_skip,  # [S-CFG]
        )  # fmt: skip

        self._guidance_scale = guidance_scale
        self._guidance_rescale = guidance_rescale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._denoising_end = denoising_end
        self._interrupt = False

        # 2. Define call parameters
        if prompt is not None and isinstance(prompt, str):
            batch_size = 1
        elif prompt is not None and isinstance(prompt, list):
            batch_size = len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]

        device = self._execution_device

        # 3. Encode input prompt
        lora_scale = (
            self.cross_attention_kwargs.get("scale", None) if self.cross_attention_kwargs is not None else None
        )

        (
            prompt_embeds,
            negative_prompt_embeds,
            pooled_prompt_embeds,
            negative_pooled_prompt_embeds,
        ) = self.encode_prompt(
            prompt=prompt,
            prompt_2=prompt_2,
            device=device,
            num_images_per_prompt=num_images_per_prompt,
            do_classifier_free_guidance=self.do_classifier_free_guidance,
            negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            lora_scale=lora_scale,
            clip_skip=self.clip_skip,
        )

        # 4. Prepare timesteps
        is_neuron_device = device.type == "neuron"
        if XLA_AVAILABLE or is_neuron_device:
            timestep_device = "cpu"
        else:
            timestep_device = device
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, timestep_device, timesteps, sigmas
        )

        # 5. Prepare latent variables
        num_channels_latents = self.unet.config.in_channels
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

        # 6. Prepare extra step kwargs. TODO: Logic should ideally just be moved out of the pipeline
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

        # 7. Prepare added time ids & embeddings
        add_text_embeds = pooled_prompt_embeds
        if self.text_encoder_2 is None:
            text_encoder_projection_dim = int(pooled_prompt_embeds.shape[-1])
        else:
            text_encoder_projection_dim = self.text_encoder_2.config.projection_dim

        add_time_ids = self._get_add_time_ids(
            original_size,
            crops_coords_top_left,
            target_size,
            dtype=prompt_embeds.dtype,
            text_encoder_projection_dim=text_encoder_projection_dim,
        )
        if negative_original_size is not None and negative_target_size is not None:
            negative_add_time_ids = self._get_add_time_ids(
                negative_original_size,
                negative_crops_coords_top_left,
                negative_target_size,
                dtype=prompt_embeds.dtype,
                text_encoder_projection_dim=text_encoder_projection_dim,
            )
        else:
            negative_add_time_ids = add_time_ids

        if self.do_classifier_free_guidance:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds], dim=0)
            add_text_embeds = torch.cat([negative_pooled_prompt_embeds, add_text_embeds], dim=0)
            add_time_ids = torch.cat([negative_add_time_ids, add_time_ids], dim=0)

        prompt_embeds = prompt_embeds.to(device)
        add_text_embeds = add_text_embeds.to(device)
        add_time_ids = add_time_ids.to(device).repeat(batch_size * num_images_per_prompt, 1)

        if ip_adapter_image is not None or ip_adapter_image_embeds is not None:
            image_embeds = self.prepare_ip_adapter_image_embeds(
                ip_adapter_image,
                ip_adapter_image_embeds,
                device,
                batch_size * num_images_per_prompt,
                self.do_classifier_free_guidance,
            )

        # 8. Denoising loop
        num_warmup_steps = max(len(timesteps) - num_inference_steps * self.scheduler.order, 0)

        # 8.1 Apply denoising_end
        if (
            self.denoising_end is not None
            and isinstance(self.denoising_end, float)
            and self.denoising_end > 0
            and self.denoising_end < 1
        ):
            discrete_timestep_cutoff = int(
                round(
                    self.scheduler.config.num_train_timesteps
                    - (self.denoising_end * self.scheduler.config.num_train_timesteps)
                )
            )
            num_inference_steps = len(list(filter(lambda ts: ts >= discrete_timestep_cutoff, timesteps)))
            timesteps = timesteps[:num_inference_steps]

        # 9. Optionally get Guidance Scale Embedding
        timestep_cond = None
        if self.unet.config.time_cond_proj_dim is not None:
            guidance_scale_tensor = torch.tensor(self.guidance_scale - 1).repeat(batch_size * num_images_per_prompt)
            timestep_cond = self.get_guidance_scale_embedding(
                guidance_scale_tensor, embedding_dim=self.unet.config.time_cond_proj_dim
            ).to(device=device, dtype=latents.dtype)

        self._num_timesteps = len(timesteps)
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(0)
        # [S-CFG] 9.1 Plan the segmentation (only when CFG is on) and record the needed attention layers
        guide = self.start_spatial_guidance(
            segmentor,
            prompt=regions,
            rate_rule=rate_rule,
            height=height,
            width=width,
            num_images_per_prompt=num_images_per_prompt,
            scfg_config=scfg_config,
            return_maps=return_maps,
            batch_size=batch_size * num_images_per_prompt,
            negative_prompt_embeds=negative_prompt_embeds,
        )
        capture = capture_attention(self.unet, guide.requests, guide.reducers) if guide is not None else nullcontext()
        with capture as record, self.progress_bar(total=num_inference_steps) as progress_bar:  # [S-CFG] capture
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue

                self.follow_guidance_scale(guide, record)  # [S-CFG] a callback may switch CFG off (or break it)
                # expand the latents if we are doing classifier free guidance
                latent_model_input = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents
                latent_model_input = self.scheduler.scale_model_input(latent_model_input, t)

                # predict the noise residual
                added_cond_kwargs = {"text_embeds": add_text_embeds, "time_ids": add_time_ids}
                if ip_adapter_image is not None or ip_adapter_image_embeds is not None:
                    added_cond_kwargs["image_embeds"] = image_embeds
                # [Neuron] pre-cast timestep to float32 on device. Neuron XLA does not support
                # int64 ops; the compiled UNet graph requires a float32 timestep input on-device.
                t_unet = t.to(torch.float32).to(device) if is_neuron_device else t
                noise_pred = self.unet(
                    latent_model_input,
                    t_unet,
                    encoder_hidden_states=prompt_embeds,
                    timestep_cond=timestep_cond,
                    cross_attention_kwargs=self.cross_attention_kwargs,
                    added_cond_kwargs=added_cond_kwargs,
                    return_dict=False,
                )[0]

                # perform guidance
                if self.do_classifier_free_guidance:
                    noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                    if guide is not None:  # [S-CFG] per-region scale from this call's attention
                        noise_pred = guide(i, t, record, noise_pred_uncond, noise_pred_text, self.guidance_scale)
                    else:  # [S-CFG]
                        noise_pred = noise_pred_uncond + self.guidance_scale * (noise_pred_text - noise_pred_uncond)

                if self.do_classifier_free_guidance and self.guidance_rescale > 0.0:
                    # Based on 3.4. in https://huggingface.co/papers/2305.08891
                    noise_pred = rescale_noise_cfg(noise_pred, noise_pred_text, guidance_rescale=self.guidance_rescale)

                # compute the previous noisy sample x_t -> x_t-1
                latents_dtype = latents.dtype
                latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]
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
                    add_text_embeds = callback_outputs.pop("add_text_embeds", add_text_embeds)
                    add_time_ids = callback_outputs.pop("add_time_ids", add_time_ids)

                # call the callback, if provided
                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()
                    if callback is not None and i % callback_steps == 0:
                        step_idx = i // getattr(self.scheduler, "order", 1)
                        callback(step_idx, t, latents)

                if XLA_AVAILABLE:
                    xm.mark_step()

        if not output_type == "latent":
            # make sure the VAE is in float32 mode, as it overflows in float16
            needs_upcasting = self.vae.dtype == torch.float16 and self.vae.config.force_upcast

            if needs_upcasting:
                self.upcast_vae()
                latents = latents.to(next(iter(self.vae.post_quant_conv.parameters())).dtype)
            elif latents.dtype != self.vae.dtype:
                if torch.backends.mps.is_available():
                    # some platforms (eg. apple mps) misbehave due to a pytorch bug: https://github.com/pytorch/pytorch/pull/99272
                    self.vae = self.vae.to(latents.dtype)

            # unscale/denormalize the latents
            # denormalize with the mean and std if available and not None
            has_latents_mean = hasattr(self.vae.config, "latents_mean") and self.vae.config.latents_mean is not None
            has_latents_std = hasattr(self.vae.config, "latents_std") and self.vae.config.latents_std is not None
            if has_latents_mean and has_latents_std:
                latents_mean = (
                    torch.tensor(self.vae.config.latents_mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
                )
                latents_std = (
                    torch.tensor(self.vae.config.latents_std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
                )
                latents = latents * latents_std / self.vae.config.scaling_factor + latents_mean
            else:
                latents = latents / self.vae.config.scaling_factor

            latents = latents.to(get_module_execution_device(self.vae))
            image = self.vae.decode(latents, return_dict=False)[0]

            # cast back to fp16 if needed
            if needs_upcasting:
                self.vae.to(dtype=torch.float16)
        else:
            image = latents

        if not output_type == "latent":
            # apply watermark if available
            if self.watermark is not None:
                image = self.watermark.apply_watermark(image)

            image = self.image_processor.postprocess(image, output_type=output_type)

        # Offload all models
        self.maybe_free_model_hooks()

        maps = (guide.maps if guide is not None else []) if return_maps else None  # [S-CFG]
        if not return_dict:
            return (image, maps) if return_maps else (image,)  # [S-CFG]

        rates = guide.step_rates() if guide is not None else None  # [S-CFG]
        return StableDiffusionXLSCFGPipelineOutput(images=image, maps=maps, rates=rates)  # [S-CFG]
