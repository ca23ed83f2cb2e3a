"""`StableDiffusionSCFGPipeline`: Stable Diffusion whose CFG gives every image region its own guidance scale.

At every denoising step the UNet's own attention (recorded by `capture`) is segmented (`segment.scfg` or
`segment.goca`), turned into a rate map (`guidance`), and ε̂ = ε_u + w·r⊙Δ replaces ε_u + w·Δ. The loop is
diffusers' `StableDiffusionPipeline.__call__` with the lines marked `# [S-CFG]` changed; with `segmentor=None`
it computes exactly what diffusers computes (tested bit for bit). Deviation: torch_xla's `mark_step` calls are
left out of the copied loop.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any

import torch
from diffusers import StableDiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput
from diffusers.pipelines.stable_diffusion.pipeline_output import StableDiffusionPipelineOutput
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg, retrieve_timesteps
from diffusers.utils import deprecate
from torch import Tensor
from torch.profiler import record_function

from .capture import (
    AttentionLayer,
    AttentionRecord,
    Reduce,
    capture_attention,
    default_dense_block,
    default_self_blocks,
    locate_attention_layers,
    resolve_blocks,
    sibling,
)
from .config import GoCAConfig, SCFGConfig, check_segmentor
from .guidance import combine_guidance, rate_map
from .ops import grid_shape, split_cfg
from .segment.goca import (
    CrossLayerInputs,
    PropagationInputs,
    even_query_rows,
    goca_aggregate,
    goca_head_aggregate,
    goca_layer_weights,
    goca_segment,
)
from .segment.scfg import SCFGMapPair, scfg_segment
from .tokens import STOP_WORDS, caption_token_mask, content_token_mask, live_token_mask

DEFAULT_SEGMENTOR = "goca"
_HEAD_MEAN = Reduce(lambda t: t.probs(head_mean=True))  # keep a layer's head-mean map only


@dataclass
class SCFGStepMaps:
    """What the segmentor decided at one denoising step, for every image of the batch (CPU tensors).

    labels: (B, h, w) long, the winning token index per latent pixel (first index on ties); foreground: (B, h, w)
    bool; rate: (B, h, w) float, the guidance rate r applied at that pixel; tokens: per image, the prompt's 77 token
    strings (None when only `prompt_embeds` were given), so `tokens[b][labels[b, y, x]]` names a region.
    """

    step: int
    timestep: int
    labels: Tensor
    foreground: Tensor
    rate: Tensor
    tokens: list[list[str]] | None


@dataclass
class SCFGStepRates:
    """The guidance strength one denoising step applied, per image (cheap: kept on every segmenting call).

    guidance_scale: the nominal w used at this step; mean: (B,) mean rate r over all latent pixels; fg_mean: (B,)
    mean r over the foreground (NaN where the foreground is empty). The effective scale of a step is w·mean.
    """

    step: int
    timestep: int
    guidance_scale: float
    mean: Tensor
    fg_mean: Tensor


@dataclass
class StableDiffusionSCFGPipelineOutput(StableDiffusionPipelineOutput):
    """diffusers' output plus `maps` (one `SCFGStepMaps` per denoising-loop iteration when `return_maps=True`) and
    `rates` (one `SCFGStepRates` per iteration whenever a segmentor ran; None for plain CFG)."""

    maps: list[SCFGStepMaps] | None = None
    rates: list[SCFGStepRates] | None = None


def step_rates(step: int, timestep: Any, guidance_scale: float, rate: Tensor, fg: Tensor) -> SCFGStepRates:
    """Mean applied rate over all pixels and over the foreground, per image (kept on the device until read)."""
    fg = fg.float()
    fg_mean = (rate * fg).sum(dim=(1, 2, 3)) / fg.sum(dim=(1, 2, 3))  # 0/0 = NaN for an empty foreground
    return SCFGStepRates(step, int(timestep), float(guidance_scale), rate.mean(dim=(1, 2, 3)), fg_mean)


class SpatialGuidance:
    """One call's segmentation plan and per-step work: which layers to record (`requests`, for
    `capture_attention`), `masks(step, record)` → (masks, fg), and `__call__` → ε̂ = ε_u + w·r⊙Δ.

    Built by `StableDiffusionSCFGPipeline.spatial_guidance`; record with
    `capture_attention(unet, plan.requests, plan.reducers)`. Usable on its own to segment any step of a run
    (e.g. to compare two configs on the same maps). Stages run under `torch.profiler.record_function` labels
    `goca_scfg::*`, so a profiler attributes their cost.
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        segmentor: str,
        scfg_config: SCFGConfig,
        goca_config: GoCAConfig,
        guidance_scale: float,
        latent_hw: tuple[int, int],
        input_ids: Tensor | None,
        tokens: list[list[str]] | None,
        eos_id: int | None,
        stop_ids: Tensor,
        return_maps: bool,
    ) -> None:
        self.segmentor = segmentor
        self.scfg_config = scfg_config
        self.goca_config = goca_config
        self.guidance_scale = guidance_scale
        self.latent_hw = latent_hw
        self.tokens = tokens
        self.return_maps = return_maps
        self.maps: list[SCFGStepMaps] = []
        self.rates: list[SCFGStepRates] = []
        self._layer_weights: Tensor | None = None
        layers = locate_attention_layers(unet)
        if not any(x.kind == "cross" for x in layers):
            raise ValueError("segmentor needs a UNet with text cross-attention; this UNet has none")
        if segmentor == "scfg":
            self._plan_scfg(layers)
        else:
            if input_ids is None:
                raise ValueError(
                    "segmentor='goca' needs the prompt text to find its caption tokens; pass `prompt` "
                    "(not only `prompt_embeds`) or use segmentor='scfg' or None"
                )
            self._plan_goca(layers)
            caption = caption_token_mask(input_ids, eos_id)
            if goca_config.tokens == "content":
                self.rescale_tokens = content_token_mask(input_ids, caption, stop_ids)
            else:
                self.rescale_tokens = caption
            self.live_tokens = live_token_mask(caption)

    # ------------------------------------------------------------------ plans: which layers record what
    def _plan_scfg(self, layers: list[AttentionLayer]) -> None:
        self.scfg_blocks: list[tuple[AttentionLayer, AttentionLayer]] = []
        factors = sorted({x.factor for x in layers if x.kind == "cross"})
        for ratio in self.scfg_config.ratios:
            cross = [x for x in layers if x.kind == "cross" and x.factor == ratio]
            if not cross:
                raise ValueError(f"SCFGConfig.ratios has {ratio}, but this UNet has cross-attention at {factors}")
            self.scfg_blocks += [(sibling(layers, x, "self"), x) for x in cross]
        self.requests, self.reducers = {}, {}
        for s, c in self.scfg_blocks:  # only head-mean maps are kept (§1.2)
            for layer in (s, c):
                self.requests[layer.name] = {"q", "k"}
                self.reducers[layer.name] = _HEAD_MEAN

    def _plan_goca(self, layers: list[AttentionLayer]) -> None:
        cfg = self.goca_config
        if cfg.cross_layers is None:
            self.goca_cross = [x for x in layers if x.kind == "cross"]
        else:
            self.goca_cross = resolve_blocks(layers, cfg.cross_layers, "cross")
        similarity = cfg.layer == "similarity"
        dense_block = cfg.dense_layer or default_dense_block(layers)
        self.goca_dense = resolve_blocks(layers, (dense_block,), "cross")[0]
        self_blocks = cfg.self_layers if cfg.self_layers is not None else default_self_blocks(layers)
        self.goca_prop = resolve_blocks(layers, self_blocks, "self") if cfg.propagation_order else []
        if any(x.factor != 1 for x in self.goca_prop):
            raise ValueError(
                f"GoCAConfig.self_layers must be at latent resolution, got {[x.block for x in self.goca_prop]}"
            )
        self_of = {x.name: sibling(layers, x, "self") for x in self.goca_cross}
        self.goca_self_of = {name: s.name for name, s in self_of.items()}
        req: dict[str, set[str]] = {}
        for x in self.goca_cross:
            req.setdefault(x.name, set()).update({"q", "k", "o"})
            if similarity:
                req.setdefault(self_of[x.name].name, set()).update({"q", "k"})
        if similarity:
            req.setdefault(self.goca_dense.name, set()).add("q")
        for x in self.goca_prop:
            req.setdefault(x.name, set()).update({"q", "k"})
        self.requests = req

        def heads(t):  # §2.3 inside the forward pass: only A_ℓ (2B, N, T) is kept of each cross layer
            return goca_head_aggregate(t.probs(), t.o, t.w_out, cfg)

        dense_name = self.goca_dense.name if similarity else None
        self.reducers = {
            x.name: Reduce(heads, frozenset({"q"}) if x.name == dense_name else frozenset()) for x in self.goca_cross
        }
        # Self layers that only feed the similarity keep only what it reads (§4.3): a coarser grid its head-mean
        # map, a grid twice the dense one its even query rows (and all keys). Propagation layers keep q and k.
        self.self_mode: dict[str, str] = {}
        if similarity:
            prop_names = {x.name for x in self.goca_prop}
            for s in self_of.values():
                if s.name in prop_names:
                    continue
                if s.factor > self.goca_dense.factor:
                    self.self_mode[s.name] = "map"
                    self.reducers[s.name] = _HEAD_MEAN
                elif 2 * s.factor == self.goca_dense.factor:
                    grid = (self.latent_hw[0] // s.factor, self.latent_hw[1] // s.factor)
                    self.self_mode[s.name] = "even"
                    self.reducers[s.name] = Reduce(lambda t, g=grid: even_query_rows(t.q, g), frozenset({"k"}))

    # ------------------------------------------------------------------ per step
    def __call__(self, step: int, timestep: Any, record: AttentionRecord, eps_uncond: Tensor, eps_cond: Tensor):
        """ε̂ for this step from the maps of the UNet call that produced (ε_u, ε_c)."""
        masks, fg = self.masks(step, record)
        with record_function("goca_scfg::rate"):
            rate = rate_map(eps_cond - eps_uncond, masks, fg, self.guidance_scale, self.scfg_config)
        record.clear()
        self.rates.append(step_rates(step, timestep, self.guidance_scale, rate, fg))
        if self.return_maps:
            self.maps.append(
                SCFGStepMaps(
                    step=step,
                    timestep=int(timestep),
                    labels=masks.argmax(dim=1).cpu(),
                    foreground=fg[:, 0].bool().cpu(),
                    rate=rate[:, 0].cpu(),
                    tokens=self.tokens,
                )
            )
        with record_function("goca_scfg::combine"):
            return combine_guidance(eps_uncond, eps_cond, self.guidance_scale, rate)

    def masks(self, step: int, record: AttentionRecord) -> tuple[Tensor, Tensor]:
        """Region masks (B, T, H, W) and foreground (B, 1, H, W) at latent size from one UNet call's record."""
        if self.segmentor == "scfg":
            with record_function("goca_scfg::scfg_segment"):
                return self._scfg_masks(record)
        return self._goca_masks(step, record)

    def _hw(self, t: Tensor) -> tuple[int, int]:
        return grid_shape(t.shape[1], self.latent_hw)

    def _reduced(self, record: AttentionRecord, name: str) -> Tensor:
        """This plan's reduction of a layer: made now from the raw tensors when the record kept them all (a
        capture without reducers, or shared by several plans), else the one made inside the forward pass."""
        slot = record[name]
        if all(getattr(slot, f) is not None for f in self.requests[name]):
            return self.reducers[name].fn(slot)
        if slot.reduced is None:
            raise RuntimeError(f"layer {name!r} was recorded without the fields this plan needs")
        return slot.reduced

    def _scfg_masks(self, record: AttentionRecord) -> tuple[Tensor, Tensor]:
        pairs = []
        for s, c in self.scfg_blocks:
            attn_cross = self._reduced(record, c.name)
            pairs.append(SCFGMapPair(self._reduced(record, s.name), attn_cross, self._hw(attn_cross)))
        return scfg_segment(pairs, pairs[0].hw, self.latent_hw, self.scfg_config)

    def _goca_masks(self, step: int, record: AttentionRecord) -> tuple[Tensor, Tensor]:
        cfg = self.goca_config
        inputs = []
        for x in self.goca_cross:
            attn_cross = self._reduced(record, x.name)
            name = self.goca_self_of[x.name]
            rs = record[name] if cfg.layer == "similarity" else None
            mode = self.self_mode.get(name, "raw")
            reduced = self._reduced(record, name) if mode != "raw" else None
            inputs.append(
                CrossLayerInputs(
                    attn_cross=attn_cross,
                    hw=self._hw(attn_cross),
                    self_map=reduced if mode == "map" else None,
                    self_q=reduced if mode == "even" else (rs.q if rs else None),
                    self_k=rs.k if rs else None,
                    self_heads=rs.heads if rs else 1,
                    self_scale=rs.scale if rs else 1.0,
                )
            )
        if self._layer_weights is None or step % cfg.layer_refresh == 0:
            dense = record[self.goca_dense.name].q if cfg.layer == "similarity" else None
            dense_hw = self._hw(dense) if dense is not None else (0, 0)
            with record_function("goca_scfg::goca_layer_weights"):
                self._layer_weights = goca_layer_weights(inputs, dense, dense_hw, cfg)
        with record_function("goca_scfg::goca_aggregate"):
            agg = goca_aggregate(inputs, self._layer_weights, self.latent_hw, cfg)
        prop = [record[x.name] for x in self.goca_prop]
        propagation = PropagationInputs(
            queries=[split_cfg(r.q)[1] for r in prop],
            keys=[split_cfg(r.k)[1] for r in prop],
            heads=[r.heads for r in prop],
            scales=[r.scale for r in prop],
        )
        device = agg.device
        with record_function("goca_scfg::goca_segment"):
            return goca_segment(
                agg, propagation, self.rescale_tokens.to(device), self.live_tokens.to(device), self.goca_config
            )


class StableDiffusionSCFGPipeline(StableDiffusionPipeline):
    r"""Stable Diffusion with spatially adaptive CFG (S-CFG), segmenting each step from the UNet's attention.

    Same components and `__call__` as [`StableDiffusionPipeline`]; new keyword arguments come last:

    Args:
        segmentor (`str` or `None`, defaults to `"goca"`):
            `"goca"`: GoCA masks (auto head/layer aggregation + per-pixel rescaling, CVPR 2026); `"scfg"`: the
            official S-CFG masks (CVPR 2024); `None`: plain CFG, identical to `StableDiffusionPipeline`.
            Nothing is segmented when `guidance_scale <= 1`.
        scfg_config (`SCFGConfig`, *optional*): rate clamp, cap, smoothing and the S-CFG segmentation settings.
        goca_config (`GoCAConfig`, *optional*): GoCA settings (`GoCAConfig.vanilla()` for the Table-2 baseline).
        return_maps (`bool`, defaults to `False`): add `maps`, one `SCFGStepMaps` per denoising step, to the output.

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
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' signature)
        segmentor: str | None = DEFAULT_SEGMENTOR,  # [S-CFG]
        scfg_config: SCFGConfig | None = None,  # [S-CFG]
        goca_config: GoCAConfig | None = None,  # [S-CFG]
        return_maps: bool = False,  # [S-CFG]
        **kwargs,
    ) -> StableDiffusionSCFGPipelineOutput | tuple:
        callback = kwargs.pop("callback", None)
        callback_steps = kwargs.pop("callback_steps", None)
        if kwargs:  # [S-CFG] diffusers ignores unknown keywords; a misspelt S-CFG argument must not pass silently
            raise TypeError(f"unexpected keyword arguments: {sorted(kwargs)}")

        if callback is not None:
            deprecate("callback", "1.0.0", "Passing `callback` is deprecated, use `callback_on_step_end`")
        if callback_steps is not None:
            deprecate("callback_steps", "1.0.0", "Passing `callback_steps` is deprecated, use `callback_on_step_end`")

        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs

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
        segmentor = check_segmentor(segmentor)  # [S-CFG]
        scfg_config = scfg_config or SCFGConfig()  # [S-CFG]
        goca_config = goca_config or GoCAConfig()  # [S-CFG]

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
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, device, timesteps, sigmas
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

        # 6. Prepare extra step kwargs.
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

        # [S-CFG] 6.3 Plan the segmentation (only when CFG is on) and record the needed attention layers
        guide = None
        if segmentor is not None and self.do_classifier_free_guidance:
            guide = self.spatial_guidance(
                segmentor,
                prompt,
                height,
                width,
                num_images_per_prompt=num_images_per_prompt,
                guidance_scale=self.guidance_scale,
                scfg_config=scfg_config,
                goca_config=goca_config,
                return_maps=return_maps,
            )
        capture = capture_attention(self.unet, guide.requests, guide.reducers) if guide is not None else nullcontext()

        # 7. Denoising loop
        num_warmup_steps = len(timesteps) - num_inference_steps * self.scheduler.order
        self._num_timesteps = len(timesteps)
        with capture as record, self.progress_bar(total=num_inference_steps) as progress_bar:  # [S-CFG] capture
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue

                latent_model_input = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents
                if hasattr(self.scheduler, "scale_model_input"):
                    latent_model_input = self.scheduler.scale_model_input(latent_model_input, t)

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
                        noise_pred = guide(i, t, record, noise_pred_uncond, noise_pred_text)
                    else:
                        noise_pred = noise_pred_uncond + self.guidance_scale * (noise_pred_text - noise_pred_uncond)

                if self.do_classifier_free_guidance and self.guidance_rescale > 0.0:
                    noise_pred = rescale_noise_cfg(noise_pred, noise_pred_text, guidance_rescale=self.guidance_rescale)

                latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]

                if callback_on_step_end is not None:
                    callback_kwargs = {}
                    for k in callback_on_step_end_tensor_inputs:
                        callback_kwargs[k] = locals()[k]
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)

                    latents = callback_outputs.pop("latents", latents)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = callback_outputs.pop("negative_prompt_embeds", negative_prompt_embeds)

                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()
                    if callback is not None and i % callback_steps == 0:
                        step_idx = i // getattr(self.scheduler, "order", 1)
                        callback(step_idx, t, latents)

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
        image = self.image_processor.postprocess(image, output_type=output_type, do_denormalize=do_denormalize)

        self.maybe_free_model_hooks()

        maps = (guide.maps if guide is not None else []) if return_maps else None  # [S-CFG]
        if not return_dict:
            return (image, has_nsfw_concept, maps) if return_maps else (image, has_nsfw_concept)  # [S-CFG]

        rates = (
            [replace(r, mean=r.mean.cpu(), fg_mean=r.fg_mean.cpu()) for r in guide.rates] if guide else None
        )  # [S-CFG]
        return StableDiffusionSCFGPipelineOutput(  # [S-CFG]
            images=image, nsfw_content_detected=has_nsfw_concept, maps=maps, rates=rates
        )

    def spatial_guidance(
        self,
        segmentor: str,
        prompt: str | list[str] | None,
        height: int,
        width: int,
        num_images_per_prompt: int = 1,
        guidance_scale: float = 7.5,
        scfg_config: SCFGConfig | None = None,
        goca_config: GoCAConfig | None = None,
        return_maps: bool = False,
    ) -> SpatialGuidance:
        """Validate a call for segmentation and build its plan: token classes and the layers to record."""
        segmentor = check_segmentor(segmentor)
        if segmentor is None:
            raise ValueError("spatial_guidance needs segmentor 'scfg' or 'goca'")
        scfg_config = scfg_config or SCFGConfig()
        goca_config = goca_config or GoCAConfig()
        latent_hw = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        down = 2 ** (len(self.unet.down_blocks) - 1)
        if latent_hw[0] % down or latent_hw[1] % down:
            px = down * self.vae_scale_factor
            raise ValueError(
                f"segmentor={segmentor!r} needs height and width that are multiples of {px} px for this UNet "
                f"(its attention grids must divide the latent evenly), got "
                f"{latent_hw[0] * self.vae_scale_factor}x{latent_hw[1] * self.vae_scale_factor}"
            )
        input_ids = tokens = None
        eos_id = None
        if prompt is not None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            ids = self.tokenizer(
                prompts,
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.repeat_interleave(num_images_per_prompt, dim=0)
            input_ids = ids
            tokens = [self.tokenizer.convert_ids_to_tokens(row.tolist()) for row in ids]
            eos_id = self.tokenizer.eos_token_id
        stop_ids = torch.empty(0, dtype=torch.long)
        if segmentor == "goca" and goca_config.tokens == "content":
            words = self.tokenizer(list(STOP_WORDS), add_special_tokens=False).input_ids
            stop_ids = torch.tensor(sorted({i for ids in words for i in ids}), dtype=torch.long)
        return SpatialGuidance(
            self.unet,
            segmentor,
            scfg_config,
            goca_config,
            guidance_scale,
            latent_hw,
            input_ids,
            tokens,
            eos_id,
            stop_ids,
            return_maps=return_maps,
        )
