"""`PixArtSigmaSCFGPipeline`: PixArt-Sigma whose CFG gives every image region its own guidance scale.

The transformer's own attention (recorded by `capture`) is segmented by GoCA with the authors' PixArt-Sigma
choices (algorithm.md §8.3: blocks 10–17, T5 token classes, foreground from the cond branch) and the S-CFG rate
rescales Δ of all eight output channels (noise and learned variance) before diffusers keeps the first four. The loop
is diffusers' `PixArtSigmaPipeline.__call__` with the lines marked `# [S-CFG]` changed; with `segmentor=None` it
computes exactly what diffusers computes (tested bit for bit).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from diffusers import PixArtSigmaPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import (
    ASPECT_RATIO_256_BIN,
    ASPECT_RATIO_512_BIN,
    ASPECT_RATIO_1024_BIN,
)
from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import (
    ASPECT_RATIO_2048_BIN,
    XLA_AVAILABLE,
    retrieve_timesteps,
)

from .capture import capture_attention
from .config import GoCAConfig, SCFGConfig
from .guidance import RateRule, SCFGStepMaps, SCFGStepRates, SpatialGuidance
from .pipeline_utils import DEFAULT_SEGMENTOR, SCFGPipelineMixin
from .segment import Segmentor
from .tokens import PromptTokens, t5_prompt_tokens

if XLA_AVAILABLE:
    import torch_xla.core.xla_model as xm


@dataclass
class PixArtSigmaSCFGPipelineOutput(ImagePipelineOutput):
    """diffusers' output plus `maps` (one `SCFGStepMaps` per denoising-loop iteration when `return_maps=True`) and
    `rates` (one `SCFGStepRates` per iteration whenever a segmentor ran; None for plain CFG)."""

    maps: list[SCFGStepMaps] | None = None
    rates: list[SCFGStepRates] | None = None


class PixArtSigmaSCFGPipeline(SCFGPipelineMixin, PixArtSigmaPipeline):
    r"""PixArt-Sigma with spatially adaptive CFG (S-CFG), segmenting each step from the transformer's attention.

    Same components and `__call__` as [`PixArtSigmaPipeline`]; new keyword arguments come last:

    Args:
        segmentor (`str` or `None`, defaults to `"goca"`):
            `"goca"`: GoCA masks as the authors run them on PixArt-Sigma (algorithm.md §8.3); `None`: plain CFG,
            identical to `PixArtSigmaPipeline`. `"scfg"` is not defined for a transformer (the released S-CFG code
            reads UNet blocks) and raises. Nothing is segmented when `guidance_scale <= 1`.
        scfg_config (`SCFGConfig`, *optional*): the S-CFG segmentation settings (unused: no DiT S-CFG).
        goca_config (`GoCAConfig`, *optional*): GoCA settings (`GoCAConfig.vanilla()`: the authors' vanilla config).
        return_maps (`bool`, defaults to `False`): add `maps`, one `SCFGStepMaps` per denoising step, to the output.
        caption (`str` or `list[str]`, *optional*): with `prompt_embeds` and no `prompt`, the text the embeddings encode
            (one per prompt row): its T5 tokens name the regions, as the prompt's would.
        rate_rule (`RateRule`, *optional*): the per-pixel rate from the masks (default `SCFGRate()`: S-CFG's
            clamp 0.8–3.0, cap 15/w and smoothing).

    Regions are named by the T5 tokens of the text the encoder sees (after `clean_caption`, truncated at
    `max_sequence_length`). Example:
        >>> import torch
        >>> from goca_scfg import PixArtSigmaSCFGPipeline
        >>> pipe = PixArtSigmaSCFGPipeline.from_pretrained(
        ...     "PixArt-alpha/PixArt-Sigma-XL-2-512-MS", dtype=torch.float16
        ... ).to("cuda")  # doctest: +SKIP
        >>> image = pipe("a cat on a red sofa", guidance_scale=4.5).images[0]  # doctest: +SKIP
    """

    denoiser_name = "transformer"
    # Our addition: PixArtSigmaPipeline has no step-end callback (it swallows `callback_on_step_end` unused).
    _callback_tensor_inputs = ["latents", "prompt_embeds", "prompt_attention_mask"]

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1.0

    @property
    def num_timesteps(self) -> int:
        """The denoising loop's length (set by `__call__`), as on the Stable Diffusion pipelines, for callbacks."""
        return self._num_timesteps

    def segmentation_tokens(
        self,
        prompt: str | list[str] | None,
        num_images_per_prompt: int,
        clean_caption: bool = False,
        max_sequence_length: int = 300,
    ) -> PromptTokens | None:
        """T5 token classes of the text the encoder sees: `_text_preprocessing` (lower-casing, or `clean_caption`)
        then truncation at `max_sequence_length`, as `encode_prompt` does (algorithm.md §8.3)."""
        if prompt is None:
            return None
        texts = self._text_preprocessing(prompt, clean_caption=clean_caption)
        return t5_prompt_tokens(self.tokenizer, texts, num_images_per_prompt, max_sequence_length)

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
        """The plan a call makes (`SCFGPipelineMixin.call_plan`): the T5 key mask [uncond; cond] and the token rows
        as the call's `negative_prompt`, `clean_caption` (default True) and `max_sequence_length` give them."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        options = {"clean_caption": call_kwargs.get("clean_caption", True),
                   "max_sequence_length": call_kwargs.get("max_sequence_length", 300)}  # fmt: skip
        with torch.no_grad():
            _, mask, _, negative_mask = self.encode_prompt(
                prompts, True, call_kwargs.get("negative_prompt", ""), device=self.device, **options
            )
        return self.spatial_guidance(
            segmentor, prompts, height, width, scfg_config=scfg_config, goca_config=goca_config,
            key_mask=torch.cat([negative_mask, mask]), token_options=options,
        )  # fmt: skip

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] = None,
        negative_prompt: str = "",
        num_inference_steps: int = 20,
        timesteps: list[int] = None,
        sigmas: list[float] = None,
        guidance_scale: float = 4.5,
        num_images_per_prompt: int | None = 1,
        height: int | None = None,
        width: int | None = None,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        callback: Callable[[int, int, torch.Tensor], None] | None = None,
        callback_steps: int = 1,
        clean_caption: bool = True,
        use_resolution_binning: bool = True,
        max_sequence_length: int = 300,
        segmentor: str | Segmentor | None = DEFAULT_SEGMENTOR,  # [S-CFG]
        scfg_config: SCFGConfig | None = None,  # [S-CFG]
        goca_config: GoCAConfig | None = None,  # [S-CFG]
        return_maps: bool = False,  # [S-CFG]
        caption: str | list[str] | None = None,  # [S-CFG]
        rate_rule: RateRule | None = None,  # [S-CFG]
        callback_on_step_end: Callable[[int, int], None]
        | PipelineCallback
        | MultiPipelineCallbacks
        | None = None,  # [S-CFG]
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # [S-CFG]
        **kwargs,
    ) -> PixArtSigmaSCFGPipelineOutput | tuple:  # [S-CFG]
        if kwargs:  # [S-CFG] diffusers ignores unknown keywords; a misspelt S-CFG argument must not pass silently
            raise TypeError(f"unexpected keyword arguments: {sorted(kwargs)}")

        # 1. Check inputs. Raise error if not correct
        height = height or self.transformer.config.sample_size * self.vae_scale_factor
        width = width or self.transformer.config.sample_size * self.vae_scale_factor
        if use_resolution_binning:
            if self.transformer.config.sample_size == 256:
                aspect_ratio_bin = ASPECT_RATIO_2048_BIN
            elif self.transformer.config.sample_size == 128:
                aspect_ratio_bin = ASPECT_RATIO_1024_BIN
            elif self.transformer.config.sample_size == 64:
                aspect_ratio_bin = ASPECT_RATIO_512_BIN
            elif self.transformer.config.sample_size == 32:
                aspect_ratio_bin = ASPECT_RATIO_256_BIN
            else:
                raise ValueError("Invalid sample size")
            orig_height, orig_width = height, width
            height, width = self.image_processor.classify_height_width_bin(height, width, ratios=aspect_ratio_bin)

        self.check_inputs(
            prompt,
            height,
            width,
            negative_prompt,
            callback_steps,
            prompt_embeds,
            negative_prompt_embeds,
            prompt_attention_mask,
            negative_prompt_attention_mask,
        )
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):  # [S-CFG] as StableDiffusion
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        self.check_step_end_callback(callback_on_step_end_tensor_inputs)
        segmentor, regions = self.check_scfg_call(  # [S-CFG] before any work: inputs, segmentor, region text
            num_inference_steps, guidance_scale, height, width, timesteps, sigmas, segmentor, scfg_config, goca_config,
            prompt, caption, prompt_embeds, rate_rule, latents=latents, generator=generator,  # [S-CFG]
            num_images_per_prompt=num_images_per_prompt, negative_prompt=negative_prompt,  # [S-CFG]
            negative_prompt_embeds=negative_prompt_embeds, return_maps=return_maps, output_type=output_type,  # [S-CFG]
            callback_on_step_end=callback_on_step_end, eta=eta,  # [S-CFG]
        )  # fmt: skip
        self._guidance_scale = guidance_scale  # [S-CFG]

        # 2. Default height and width to transformer
        if prompt is not None and isinstance(prompt, str):
            batch_size = 1
        elif prompt is not None and isinstance(prompt, list):
            batch_size = len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]

        device = self._execution_device

        # here `guidance_scale` is defined analog to the guidance weight `w` of equation (2)
        # of the Imagen paper: https://huggingface.co/papers/2205.11487 . `guidance_scale = 1`
        # corresponds to doing no classifier free guidance.
        do_classifier_free_guidance = guidance_scale > 1.0

        # 3. Encode input prompt
        (
            prompt_embeds,
            prompt_attention_mask,
            negative_prompt_embeds,
            negative_prompt_attention_mask,
        ) = self.encode_prompt(
            prompt,
            do_classifier_free_guidance,
            negative_prompt=negative_prompt,
            num_images_per_prompt=num_images_per_prompt,
            device=device,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            prompt_attention_mask=prompt_attention_mask,
            negative_prompt_attention_mask=negative_prompt_attention_mask,
            clean_caption=clean_caption,
            max_sequence_length=max_sequence_length,
        )
        if do_classifier_free_guidance:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds], dim=0)
            prompt_attention_mask = torch.cat([negative_prompt_attention_mask, prompt_attention_mask], dim=0)

        # 4. Prepare timesteps
        if XLA_AVAILABLE:
            timestep_device = "cpu"
        else:
            timestep_device = device
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, timestep_device, timesteps, sigmas
        )

        # 5. Prepare latents.
        latent_channels = self.transformer.config.in_channels
        latents = self.prepare_latents(
            batch_size * num_images_per_prompt,
            latent_channels,
            height,
            width,
            prompt_embeds.dtype,
            device,
            generator,
            latents,
        )

        # 6. Prepare extra step kwargs. TODO: Logic should ideally just be moved out of the pipeline
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

        # 6.1 Prepare micro-conditions.
        added_cond_kwargs = {"resolution": None, "aspect_ratio": None}

        # [S-CFG] 6.2 Plan the segmentation (only when CFG is on) and record the needed attention layers
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
            key_mask=prompt_attention_mask,
            token_options={"clean_caption": clean_caption, "max_sequence_length": max_sequence_length},
        )
        capture = (
            capture_attention(self.transformer, guide.requests, guide.reducers) if guide is not None else nullcontext()
        )  # [S-CFG]

        # 7. Denoising loop
        num_warmup_steps = max(len(timesteps) - num_inference_steps * self.scheduler.order, 0)
        self._num_timesteps = len(timesteps)  # [S-CFG] for step-end callbacks (`num_timesteps`)

        with capture as record, self.progress_bar(total=num_inference_steps) as progress_bar:  # [S-CFG] capture
            for i, t in enumerate(timesteps):
                self.follow_guidance_scale(guide, record)  # [S-CFG] a callback may switch CFG off (or break it)
                latent_model_input = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents
                latent_model_input = self.scheduler.scale_model_input(latent_model_input, t)

                current_timestep = t
                if not torch.is_tensor(current_timestep):
                    # TODO: this requires sync between CPU and GPU. So try to pass timesteps as tensors if you can
                    # This would be a good case for the `match` statement (Python 3.10+)
                    is_mps = latent_model_input.device.type == "mps"
                    is_npu = latent_model_input.device.type == "npu"
                    if isinstance(current_timestep, float):
                        dtype = torch.float32 if (is_mps or is_npu) else torch.float64
                    else:
                        dtype = torch.int32 if (is_mps or is_npu) else torch.int64
                    current_timestep = torch.tensor([current_timestep], dtype=dtype, device=latent_model_input.device)
                elif len(current_timestep.shape) == 0:
                    current_timestep = current_timestep[None].to(latent_model_input.device)
                # broadcast to batch dimension in a way that's compatible with ONNX/Core ML
                current_timestep = current_timestep.expand(latent_model_input.shape[0])

                # predict noise model_output
                noise_pred = self.transformer(
                    latent_model_input,
                    encoder_hidden_states=prompt_embeds,
                    encoder_attention_mask=prompt_attention_mask,
                    timestep=current_timestep,
                    added_cond_kwargs=added_cond_kwargs,
                    return_dict=False,
                )[0]

                # perform guidance
                if self.do_classifier_free_guidance:  # [S-CFG] the scale a step-end callback may have changed
                    noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                    if guide is not None:  # [S-CFG] per-region scale from this call's attention, all 8 channels
                        noise_pred = guide(i, t, record, noise_pred_uncond, noise_pred_text, self._guidance_scale)
                    else:
                        noise_pred = noise_pred_uncond + self._guidance_scale * (noise_pred_text - noise_pred_uncond)

                # learned sigma
                if self.transformer.config.out_channels // 2 == latent_channels:
                    noise_pred = noise_pred.chunk(2, dim=1)[0]
                else:
                    noise_pred = noise_pred

                # compute previous image: x_t -> x_t-1
                latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]
                if callback_on_step_end is not None:  # [S-CFG] StableDiffusionPipeline's step-end callback
                    callback_kwargs = {}
                    for k in callback_on_step_end_tensor_inputs:
                        callback_kwargs[k] = locals()[k]
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    self.check_step_end_outputs(i, callback_outputs, latents)  # [S-CFG] a dict; latents keep shape
                    latents = callback_outputs.pop("latents", latents)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    prompt_attention_mask = callback_outputs.pop("prompt_attention_mask", prompt_attention_mask)

                # call the callback, if provided
                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()
                    if callback is not None and i % callback_steps == 0:
                        step_idx = i // getattr(self.scheduler, "order", 1)
                        callback(step_idx, t, latents)

                if XLA_AVAILABLE:
                    xm.mark_step()

        if not output_type == "latent":
            image = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor, return_dict=False)[0]
            if use_resolution_binning:
                image = self.image_processor.resize_and_crop_tensor(image, orig_width, orig_height)
        else:
            image = latents

        if not output_type == "latent":
            image = self.image_processor.postprocess(image, output_type=output_type)

        # Offload all models
        self.maybe_free_model_hooks()

        maps = (guide.maps if guide is not None else []) if return_maps else None  # [S-CFG]
        if not return_dict:
            return (image, maps) if return_maps else (image,)  # [S-CFG]

        rates = guide.step_rates() if guide is not None else None  # [S-CFG]
        return PixArtSigmaSCFGPipelineOutput(images=image, maps=maps, rates=rates)  # [S-CFG]
