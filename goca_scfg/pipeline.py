"""`StableDiffusionSCFGPipeline`: Stable Diffusion whose CFG gives every image region its own guidance scale.

At every denoising step the UNet's own attention (recorded by `capture`) is segmented (`segment.scfg` or
`segment.goca`), turned into a rate map (`guidance`), and ε̂ = ε_u + w·r⊙Δ replaces ε_u + w·Δ. The loop is
diffusers' `StableDiffusionPipeline.__call__`, byte for byte except the lines marked `# [S-CFG]` (a test diffs it
against the installed diffusers); with `segmentor=None` it computes exactly what diffusers computes (tested bit
for bit).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import StableDiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput
from diffusers.pipelines.stable_diffusion.pipeline_output import StableDiffusionPipelineOutput
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
    XLA_AVAILABLE,
    rescale_noise_cfg,
    retrieve_timesteps,
)
from diffusers.utils import deprecate

from .capture import capture_attention
from .config import GoCAConfig, SCFGConfig
from .guidance import RateRule, SCFGStepMaps, SCFGStepRates
from .pipeline_utils import DEFAULT_SEGMENTOR, SCFGPipelineMixin
from .segment import Segmentor

if XLA_AVAILABLE:
    import torch_xla.core.xla_model as xm


@dataclass
class StableDiffusionSCFGPipelineOutput(StableDiffusionPipelineOutput):
    """diffusers' output plus `maps` (one `SCFGStepMaps` per denoising-loop iteration when `return_maps=True`) and
    `rates` (one `SCFGStepRates` per iteration whenever a segmentor ran; None for plain CFG)."""

    maps: list[SCFGStepMaps] | None = None
    rates: list[SCFGStepRates] | None = None


class StableDiffusionSCFGPipeline(SCFGPipelineMixin, StableDiffusionPipeline):
    r"""Stable Diffusion with spatially adaptive CFG (S-CFG), segmenting each step from the UNet's attention.

    Same components and `__call__` as [`StableDiffusionPipeline`]; new keyword arguments come last:

    Args:
        segmentor (`str` or `None`, defaults to `"goca"`):
            `"goca"`: GoCA masks (auto head/layer aggregation + per-pixel rescaling, CVPR 2026); `"scfg"`: the
            official S-CFG masks (CVPR 2024); `None`: plain CFG, identical to `StableDiffusionPipeline`.
            Nothing is segmented when `guidance_scale <= 1`.
        scfg_config (`SCFGConfig`, *optional*): the S-CFG segmentation settings (`segmentor="scfg"`).
        goca_config (`GoCAConfig`, *optional*): GoCA settings (`GoCAConfig.vanilla()` for the Table-2 baseline).
        return_maps (`bool`, defaults to `False`): add `maps`, one `SCFGStepMaps` per denoising step, to the output.
        caption (`str` or `list[str]`, *optional*): with `prompt_embeds` and no `prompt`, the text the embeddings encode
            (one per prompt row): its tokens name the regions, as the prompt's would.
        rate_rule (`RateRule`, *optional*): the per-pixel rate from the masks (default `SCFGRate()`: S-CFG's
            clamp 0.8–3.0, cap 15/w and smoothing).

    Example:
        >>> import torch
        >>> from goca_scfg import StableDiffusionSCFGPipeline
        >>> pipe = StableDiffusionSCFGPipeline.from_pretrained(
        ...     "stable-diffusion-v1-5/stable-diffusion-v1-5", dtype=torch.float16
        ... ).to("cuda")  # doctest: +SKIP
        >>> image = pipe("a cat on a red sofa", guidance_scale=7.5).images[0]  # doctest: +SKIP
    """

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] = None,
        sigmas: list[float] = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int | None = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image: PipelineImageInput | None = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
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
    ) -> StableDiffusionSCFGPipelineOutput | tuple:  # [S-CFG]
        r"""
        [`StableDiffusionPipeline.__call__`] with spatially adaptive guidance; the new keyword arguments come last.

        Args:
            segmentor (`str`, `Segmentor` or `None`, defaults to `"goca"`):
                `"goca"`: GoCA masks (auto head/layer aggregation + per-pixel rescaling, CVPR 2026); `"scfg"`: the
                official S-CFG masks (CVPR 2024); a `Segmentor` instance (your own method); `None`: plain CFG,
                identical to `StableDiffusionPipeline`. Nothing is segmented when `guidance_scale <= 1`.
            scfg_config (`SCFGConfig`, *optional*): the S-CFG segmentation settings (`segmentor="scfg"`).
            goca_config (`GoCAConfig`, *optional*): GoCA settings (`GoCAConfig.vanilla()` for the Table-2 baseline).
            return_maps (`bool`, defaults to `False`): add `maps`, one `SCFGStepMaps` per denoising step.
            caption (`str` or `list[str]`, *optional*): with `prompt_embeds` and no `prompt`, the text the embeddings
                encode (one per prompt row): its tokens name the regions, as the prompt's would.
            rate_rule (`RateRule`, *optional*): the per-pixel rate from the masks (default `SCFGRate()`: S-CFG's
                clamp 0.8–3.0, cap 15/w and smoothing).
        """

        callback = kwargs.pop("callback", None)
        callback_steps = kwargs.pop("callback_steps", None)
        if kwargs:  # [S-CFG] diffusers ignores unknown keywords; a misspelt S-CFG argument must not pass silently
            raise TypeError(f"unexpected keyword arguments: {sorted(kwargs)}")

        if callback is not None:
            deprecate(
                "callback",
                "1.0.0",
                "Passing `callback` as an input argument to `__call__` is deprecated, consider using `callback_on_step_end`",
            )
        if callback_steps is not None:
            deprecate(
                "callback_steps",
                "1.0.0",
                "Passing `callback_steps` as an input argument to `__call__` is deprecated, consider using `callback_on_step_end`",
            )

        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs

        height, width = self.default_size(height, width)  # [S-CFG] each missing side alone, as SDXL (SD resets both)
        # 0. Default height and width to unet
        if not height or not width:
            height = (
                self.unet.config.sample_size
                if self._is_unet_config_sample_size_int
                else self.unet.config.sample_size[0]
            )
            width = (
                self.unet.config.sample_size
                if self._is_unet_config_sample_size_int
                else self.unet.config.sample_size[1]
            )
            height, width = height * self.vae_scale_factor, width * self.vae_scale_factor
        # to deal with lora scaling and other possible forward hooks

        # 1. Check inputs. Raise error if not correct
        self.check_inputs(
            prompt,
            height,
            width,
            callback_steps,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
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

        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt,
            device,
            num_images_per_prompt,
            self.do_classifier_free_guidance,
            negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            lora_scale=lora_scale,
            clip_skip=self.clip_skip,
        )

        # For classifier free guidance, we need to do two forward passes.
        # Here we concatenate the unconditional and text embeddings into a single batch
        # to avoid doing two forward passes
        if self.do_classifier_free_guidance:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])

        if ip_adapter_image is not None or ip_adapter_image_embeds is not None:
            image_embeds = self.prepare_ip_adapter_image_embeds(
                ip_adapter_image,
                ip_adapter_image_embeds,
                device,
                batch_size * num_images_per_prompt,
                self.do_classifier_free_guidance,
            )

        # 4. Prepare timesteps
        timestep_device = device
        if XLA_AVAILABLE:
            timestep_device = "cpu"
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

        # 6.1 Add image embeds for IP-Adapter
        added_cond_kwargs = (
            {"image_embeds": image_embeds}
            if (ip_adapter_image is not None or ip_adapter_image_embeds is not None)
            else None
        )

        # 6.2 Optionally get Guidance Scale Embedding
        timestep_cond = None
        if self.unet.config.time_cond_proj_dim is not None:
            guidance_scale_tensor = torch.tensor(self.guidance_scale - 1).repeat(batch_size * num_images_per_prompt)
            timestep_cond = self.get_guidance_scale_embedding(
                guidance_scale_tensor, embedding_dim=self.unet.config.time_cond_proj_dim
            ).to(device=device, dtype=latents.dtype)

        # 7. Denoising loop
        num_warmup_steps = len(timesteps) - num_inference_steps * self.scheduler.order
        self._num_timesteps = len(timesteps)
        # [S-CFG] 6.3 Plan the segmentation (only when CFG is on) and record the needed attention layers
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
                if hasattr(self.scheduler, "scale_model_input"):
                    latent_model_input = self.scheduler.scale_model_input(latent_model_input, t)

                # predict the noise residual
                noise_pred = self.unet(
                    latent_model_input,
                    t,
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
                latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]

                if callback_on_step_end is not None:
                    callback_kwargs = {}
                    for k in callback_on_step_end_tensor_inputs:
                        callback_kwargs[k] = locals()[k]
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    self.check_step_end_outputs(i, callback_outputs, latents)  # [S-CFG] a dict; latents keep shape

                    latents = callback_outputs.pop("latents", latents)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = callback_outputs.pop("negative_prompt_embeds", negative_prompt_embeds)

                # call the callback, if provided
                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()
                    if callback is not None and i % callback_steps == 0:
                        step_idx = i // getattr(self.scheduler, "order", 1)
                        callback(step_idx, t, latents)

                if XLA_AVAILABLE:
                    xm.mark_step()

        if not output_type == "latent":
            image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False, generator=generator)[
                0
            ]
            image, has_nsfw_concept = self.run_safety_checker(image, device, prompt_embeds.dtype)
        else:
            image = latents
            has_nsfw_concept = None

        if has_nsfw_concept is None:
            do_denormalize = [True] * image.shape[0]
        else:
            do_denormalize = [not has_nsfw for has_nsfw in has_nsfw_concept]
        if XLA_AVAILABLE:
            xm.mark_step()
        image = self.image_processor.postprocess(image, output_type=output_type, do_denormalize=do_denormalize)

        # Offload all models
        self.maybe_free_model_hooks()

        maps = (guide.maps if guide is not None else []) if return_maps else None  # [S-CFG]
        if not return_dict:
            return (image, has_nsfw_concept, maps) if return_maps else (image, has_nsfw_concept)  # [S-CFG]

        rates = guide.step_rates() if guide is not None else None  # [S-CFG]
        return StableDiffusionSCFGPipelineOutput(  # [S-CFG]
            images=image, nsfw_content_detected=has_nsfw_concept, maps=maps, rates=rates
        )
