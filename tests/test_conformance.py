"""Drop-in conformance: the scenarios of diffusers' own pipeline fast tests, run on every SCFG pipeline.

Each pipeline runs on diffusers' dummy component configurations (built here, random weights, a real CLIP tokenizer)
three ways: `segmentor=None` must give exactly what the stock diffusers pipeline gives on the same components
(`torch.equal`), and `segmentor="goca"` / `"scfg"` must run the scenario with the right output shapes and one
`SCFGStepMaps` / `SCFGStepRates` per denoising-loop iteration of the right shape.

Adding a pipeline is one `Case(...)` line in `CASES` (plus the function that builds its dummy components, and where
the pipeline differs from the Stable Diffusion ones, its hooks: how `encode_prompt` is called, the keyword of the CFG
scale and a negative prompt CFG needs (Flux's true CFG), packed latents, its schedulers, its IP-Adapter). What a
stock pipeline does not support (a segmentor, FreeU, `callback_on_step_end`, ...) its Case names in `not_applicable`
with the reason, from the vocabulary in `CAPABILITIES`; those scenarios are skipped for it and say why.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    LMSDiscreteScheduler,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    PNDMScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)
from diffusers.callbacks import SD3CFGCutoffCallback, SDCFGCutoffCallback, SDXLCFGCutoffCallback
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from goca_scfg import (
    FluxSCFGPipeline,
    GoCAConfig,
    PixArtSigmaSCFGPipeline,
    SCFGStepMaps,
    StableDiffusion3SCFGPipeline,
    StableDiffusionSCFGPipeline,
    StableDiffusionXLSCFGPipeline,
)
from goca_scfg.testing import (
    DIFFUSERS_TEST_UNET,
    clip_tokenizer,
    sharpen_attention,
    sharpened,
    t5_tokenizer,
    tiny_pixart_components,
)

pytestmark = pytest.mark.rounding  # compares runs: .ci/run's portability job runs it again

SEGMENTORS = [None, "goca", "scfg"]
PROMPT = "a watercolour fox reading a newspaper"
PROMPTS = [PROMPT, "two red apples on a wooden table", "a lighthouse at night"]

# ------------------------------------------------------------------------------ diffusers' dummy components


@lru_cache(maxsize=2)
def _tokenizer(pad_token: str = "<|endoftext|>"):
    return clip_tokenizer(pad_token)


def _clip_text_config(**over) -> CLIPTextConfig:
    """diffusers' dummy CLIP text encoder (hidden 32, 5 layers) with the real tokenizer's vocabulary and ids."""
    cfg = dict(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5, layer_norm_eps=1e-5,
        vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )  # fmt: skip
    return CLIPTextConfig(**{**cfg, **over})


def _dummy_vae(**over) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        **over,
    ).eval()


def sd_dummy_components() -> dict[str, Any]:
    """diffusers' StableDiffusionPipeline fast-test components: 2-level UNet (32, 64), cross-attention 32, DDIM; the
    UNet's attention sharpened (`sharpened`), so that scenarios comparing two code paths (attention processors,
    batch shapes, a reloaded copy) compare labels that rounding cannot flip."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**DIFFUSERS_TEST_UNET).eval()
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False
    )
    vae = _dummy_vae()
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(_clip_text_config()).eval()
    return sharpened(
        _components(unet, scheduler, vae, text_encoder, safety_checker=None, requires_safety_checker=False)
    )


def _components(unet, scheduler, vae, text_encoder, **more) -> dict[str, Any]:
    """The components every Stable Diffusion pipeline takes (no image encoder), plus `more`."""
    return dict(
        unet=unet,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_tokenizer(),
        feature_extractor=None,
        image_encoder=None,
        **more,
    )


def sdxl_dummy_components() -> dict[str, Any]:
    """diffusers' StableDiffusionXLPipeline fast-test components: 2-level UNet with transformer_layers_per_block
    (1, 2), text_time conditioning, two CLIP text encoders (the second with projection, padding with id 0); the UNet's
    attention sharpened as in `sd_dummy_components`."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        **{**DIFFUSERS_TEST_UNET, "block_out_channels": (2, 4), "cross_attention_dim": 64, "norm_num_groups": 1},
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 * 8 + 32
    ).eval()
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, steps_offset=1, beta_schedule="scaled_linear", timestep_spacing="leading"
    )
    vae = _dummy_vae(sample_size=128)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(_clip_text_config(hidden_act="gelu", projection_dim=32)).eval()
    torch.manual_seed(1)
    text_encoder_2 = CLIPTextModelWithProjection(
        _clip_text_config(hidden_act="gelu", projection_dim=32, pad_token_id=0)
    ).eval()
    return sharpened(_components(
        unet, scheduler, vae, text_encoder, text_encoder_2=text_encoder_2, tokenizer_2=_tokenizer("!"),
        add_watermarker=False,
    ))  # fmt: skip


def pixart_dummy_components() -> dict[str, Any]:
    """Tiny PixArt-Sigma components: 28 blocks (so GoCA's PixArt-Sigma preset applies, as on the real model), 8
    output channels (learned sigma), a 4-level VAE (scale 8), T5 of width 16 with a real T5-style tokenizer; sample
    size 32 (256 px: resolution binning has its bins). diffusers' PixArt dummy scheduler, DDIM (x0 unclipped).

    The attention is sharpened (`sharpened`) so the random attention is peaked as a trained model's is: with
    near-uniform random self-attention, GoCA's order-5 propagation flattens every token map and its per-token
    min-max turns 1e-7 rounding (another attention processor) into label flips at every pixel. (DPM-Solver++ from
    t=999 would also put the random model's latents in the hundreds.)
    """
    components = sharpened(tiny_pixart_components())
    config = components["transformer"].config
    assert config.num_layers == 28 and config.out_channels == 2 * config.in_channels
    return {**components, "scheduler": DDIMScheduler(clip_sample=False)}


def pixart_two_block_components() -> dict[str, Any]:
    """diffusers' own PixArt-Sigma fast-test components (2 transformer blocks, sample size 8, the one-level default
    VAE, DDIM), with a tiny T5 encoder of the caption width over the offline T5-style tokenizer."""
    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3, caption_channels=32,
        in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
    ).eval()  # fmt: skip
    torch.manual_seed(0)
    vae = AutoencoderKL().eval()
    tokenizer = t5_tokenizer()
    torch.manual_seed(0)
    text_config = T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, is_encoder_decoder=False
    )
    text_encoder = T5EncoderModel(text_config).eval()
    return dict(
        transformer=transformer, vae=vae, scheduler=DDIMScheduler(), text_encoder=text_encoder, tokenizer=tokenizer
    )


def _flow_vae(latent_channels: int) -> AutoencoderKL:
    """diffusers' SD3 and Flux fast-test VAE: one level (vae_scale_factor 1), no quant convs."""
    torch.manual_seed(0)
    return AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035,
    ).eval()  # fmt: skip


def _t5_encoder(tokenizer) -> T5EncoderModel:
    """A T5 encoder of width 32 (hf-internal-testing/tiny-random-t5's, two layers) over the offline tokenizer."""
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, is_encoder_decoder=False
    )
    return T5EncoderModel(config).eval()


def sd3_dummy_components() -> dict[str, Any]:
    """diffusers' StableDiffusion3Pipeline fast-test components: one joint block (4 heads of 8, patch 1, sample size
    32), two CLIP text encoders with projection (32, 5 layers) and a T5 encoder of width 32, the one-level VAE
    (vae_scale_factor 1, 4 latent channels), flow-matching Euler; the attention sharpened as in `sd_dummy_components`.

    With the real tokenizers (CLIP-L's; CLIP-G's, padding with "!" (id 0) as SDXL's second; the offline T5), and
    CLIP towers 16 wide instead of 32: SD3 pads the concatenated CLIP features to T5's width with `F.pad`, which cuts
    a wider concatenation (diffusers' 32 + 32 against T5's 32) to its first 32 features, silently dropping the
    second encoder's. The pooled projections (32 + 32) still fill `pooled_projection_dim` 64."""
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
    ).eval()  # fmt: skip
    clip = dict(hidden_size=16, hidden_act="gelu", projection_dim=32)
    torch.manual_seed(0)
    text_encoder = CLIPTextModelWithProjection(_clip_text_config(**clip)).eval()
    torch.manual_seed(0)
    text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config(**clip, pad_token_id=0)).eval()
    tokenizer_3 = t5_tokenizer()
    return sharpened(dict(
        scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        text_encoder_3=_t5_encoder(tokenizer_3), tokenizer=_tokenizer(), tokenizer_2=_tokenizer("!"),
        tokenizer_3=tokenizer_3, transformer=transformer, vae=_flow_vae(4), image_encoder=None, feature_extractor=None,
    ))  # fmt: skip


def flux_dummy_components() -> dict[str, Any]:
    """diffusers' FluxPipeline fast-test components: one double-stream and one single-stream block (2 heads of 16,
    rope axes 4 + 4 + 8, no guidance embedding), a CLIP text encoder (its pooled output, 32) and a T5 encoder of
    width 32, the one-level VAE with one latent channel (4 once packed 2x2; vae_scale_factor 1), flow-matching
    Euler; with the real tokenizers (CLIP; the offline T5 as `tokenizer_2`).

    The attention is sharpened as in `sd_dummy_components`, but less (`sharpen_attention` ×2 and ×3, not the
    default ×6 and ×10): Flux's per-head RMSNorms pin |q|² at the head width, and at the default factors the image
    queries' self logits exceed their text logits by hundreds, so the text keys' weights underflow to exactly 0
    (the image stream then ignores the T5 tokens, and the segmentation is decided by rounding)."""
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8),
    ).eval()  # fmt: skip
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(_clip_text_config(hidden_act="gelu", projection_dim=32)).eval()
    tokenizer_2 = t5_tokenizer()
    return dict(
        scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder=text_encoder,
        text_encoder_2=_t5_encoder(tokenizer_2), tokenizer=_tokenizer(), tokenizer_2=tokenizer_2,
        transformer=sharpen_attention(transformer, cross=2.0, self_=3.0), vae=_flow_vae(1), image_encoder=None,
        feature_extractor=None,
    )  # fmt: skip


FLUX_MAX_SEQUENCE_LENGTH = 48  # diffusers' Flux dummy inputs: T5 rows of 48 positions (the pipeline's default: 512)

# ------------------------------------------------------------------------------ per-family call plumbing


def encode_cfg_prompt(pipe, prompt, negative_prompt) -> tuple[torch.Tensor, ...]:
    """`encode_prompt` of a pipeline whose CFG batches both branches: every embedding, in its order."""
    params = inspect.signature(pipe.encode_prompt).parameters
    more = {p: None for p in ("prompt_2", "prompt_3") if p in params}  # SD3 requires them (None: `prompt`)
    return pipe.encode_prompt(
        prompt=prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True,
        negative_prompt=negative_prompt, **more,
    )  # fmt: skip


def encode_flux_prompt(pipe, prompt, negative_prompt) -> tuple[torch.Tensor, ...]:
    """Flux's `encode_prompt` encodes one branch: the prompt's and the negative prompt's embeddings and pooled
    vectors (the text ids are the call's own)."""
    embeds, pooled, _ = pipe.encode_prompt(prompt, device="cpu", max_sequence_length=FLUX_MAX_SEQUENCE_LENGTH)
    negative, negative_pooled, _ = pipe.encode_prompt(
        negative_prompt, device="cpu", max_sequence_length=FLUX_MAX_SEQUENCE_LENGTH
    )
    return embeds, pooled, negative, negative_pooled


def unet_ip_adapter(pipe) -> dict[str, Any]:
    """A random IP-Adapter on the UNet (`test_pipeline._attach_random_ip_adapter`); embeddings [negative; positive]."""
    from test_pipeline import _attach_random_ip_adapter

    _attach_random_ip_adapter(pipe.unet)
    return dict(ip_adapter_image_embeds=[torch.randn(2, 1, 16, generator=torch.Generator().manual_seed(1))])


def sd3_ip_adapter(pipe) -> dict[str, Any]:
    """A random SD3 IP-Adapter (the time-conditioned image projection, an IP joint processor per block) loaded
    through `pipe.load_ip_adapter` without an image encoder; one embedding tensor [negative; positive] of width 16."""
    from diffusers.models.attention_processor import SD3IPAdapterJointAttnProcessor2_0
    from diffusers.models.embeddings import IPAdapterTimeImageProjection

    config = pipe.transformer.config
    inner = config.num_attention_heads * config.attention_head_dim
    torch.manual_seed(0)
    image_proj = IPAdapterTimeImageProjection(
        embed_dim=16, output_dim=inner, hidden_dim=64, heads=1, num_queries=4, timestep_in_dim=32
    )
    ip = {}
    for i in range(len(pipe.transformer.attn_processors)):
        processor = SD3IPAdapterJointAttnProcessor2_0(inner, inner, config.attention_head_dim, timesteps_emb_dim=64)
        ip.update({f"{i}.{k}": v for k, v in processor.state_dict().items()})
    state = {"image_proj": image_proj.state_dict(), "ip_adapter": ip}
    pipe.load_ip_adapter(state, image_encoder_folder=None, low_cpu_mem_usage=False)
    pipe.set_ip_adapter_scale(1.0)
    return dict(ip_adapter_image_embeds=torch.randn(2, 1, 16, generator=torch.Generator().manual_seed(1)))


def flux_ip_adapter(pipe) -> dict[str, Any]:
    """A random Flux IP-Adapter, as diffusers' `create_flux_ip_adapter_state_dict` builds it (an IP processor per
    double-stream block, an image projection to 4 tokens), loaded through `pipe.load_ip_adapter` without an image
    encoder; image embeddings for the cond and the uncond call (true CFG runs them apart)."""
    from diffusers.models.embeddings import ImageProjection
    from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

    config = pipe.transformer.config
    torch.manual_seed(0)
    ip = {}
    double = [n for n in pipe.transformer.attn_processors if not n.startswith("single_")]
    for i in range(len(double)):
        sd = FluxIPAdapterAttnProcessor(
            config.num_attention_heads * config.attention_head_dim, config.joint_attention_dim, scale=1.0
        ).state_dict()
        ip.update({f"{i}.{k}_ip.{p}": sd[f"{k}_ip.0.{p}"] for k in ("to_k", "to_v") for p in ("weight", "bias")})
    proj = ImageProjection(
        cross_attention_dim=config.joint_attention_dim, image_embed_dim=config.pooled_projection_dim,
        num_image_text_embeds=4,
    ).state_dict()  # fmt: skip
    image_proj = {
        "proj.weight": proj["image_embeds.weight"], "proj.bias": proj["image_embeds.bias"],
        "norm.weight": proj["norm.weight"], "norm.bias": proj["norm.bias"],
    }  # fmt: skip
    state = {"image_proj": image_proj, "ip_adapter": ip}
    pipe.load_ip_adapter(state, weight_name="", image_encoder_pretrained_model_name_or_path=None)
    g = torch.Generator().manual_seed(1)
    width = config.pooled_projection_dim
    return dict(
        ip_adapter_image_embeds=[torch.randn(1, 1, width, generator=g)],
        negative_ip_adapter_image_embeds=[torch.randn(1, 1, width, generator=g)],
    )


# What a stock pipeline may lack. A Case lists those its stock pipeline lacks, with the reason, in `not_applicable`.
CAPABILITIES = {
    "segmentor:scfg": "segmentor='scfg'",
    "step_end_callback": "callback_on_step_end and _callback_tensor_inputs",
    "callback_guidance_scale": "a step-end callback changing the CFG scale (pipe._guidance_scale, read every step)",
    "cfg_cutoff_callback": "a diffusers CFG-cutoff PipelineCallback",
    "interrupt": "pipe._interrupt from a callback",
    "legacy_callback": "the legacy callback/callback_steps",
    "attention_slicing": "enable_attention_slicing on the denoiser",
    "default_attn_processor": "set_default_attn_processor on the denoiser",
    "freeu": "enable_freeu",
    "ip_adapter": "IP-Adapter image embeddings",
    "guidance_rescale": "guidance_rescale",
    "custom_timesteps": "custom timesteps",
    "resolution_binning": "use_resolution_binning",
    "max_sequence_length": "max_sequence_length",
    "clean_caption": "clean_caption",
}
_CLIP_ONLY = {
    "resolution_binning": "no use_resolution_binning (any multiple of the VAE scale is generated as asked)",
    "max_sequence_length": "CLIP prompts: always the tokenizer's 77 positions, no max_sequence_length",
    "clean_caption": "no clean_caption (prompts reach the CLIP tokenizer as given)",
}
_PIXART_LACKS = {
    "segmentor:scfg": "S-CFG defines no DiT segmentation; it raises (test_unsupported_segmentors_raise)",
    "step_end_callback": "PixArtSigmaPipeline has no callback_on_step_end (only the legacy callback/callback_steps)",
    "callback_guidance_scale": "PixArtSigmaPipeline has no callback_on_step_end, and its loop reads the call's "
    "guidance_scale, not pipe._guidance_scale",
    "cfg_cutoff_callback": "diffusers.callbacks has no PixArt CFG-cutoff callback (nor PixArt callback_on_step_end)",
    "interrupt": "PixArtSigmaPipeline's loop has no _interrupt check",
    "attention_slicing": "PixArtTransformer2DModel has no set_attention_slice (enable_attention_slicing: a no-op)",
    "freeu": "FreeU scales UNet up-blocks; PixArtSigmaPipeline has no enable_freeu",
    "ip_adapter": "PixArtSigmaPipeline has no IP-Adapter loader",
    "guidance_rescale": "PixArtSigmaPipeline has no guidance_rescale",
}


def _mmdit_lacks(pipeline: str, transformer: str) -> dict[str, str]:
    """What the stock SD3 and Flux pipelines (MMDiTs, flow matching) both lack."""
    return {
        "segmentor:scfg": "S-CFG defines no joint-attention segmentation; it raises "
        "(test_unsupported_segmentors_raise)",
        "legacy_callback": f"{pipeline} has no callback/callback_steps (only callback_on_step_end)",
        "attention_slicing": f"{transformer} has no set_attention_slice (enable_attention_slicing: a no-op)",
        "default_attn_processor": f"{transformer} has no set_default_attn_processor",
        "freeu": f"FreeU scales UNet up-blocks; {pipeline} has no enable_freeu",
        "guidance_rescale": f"{pipeline} has no guidance_rescale",
        "custom_timesteps": f"{pipeline} takes custom sigmas only, no timesteps (test_custom_sigmas)",
        "resolution_binning": f"{pipeline} has no use_resolution_binning",
        "clean_caption": f"{pipeline} has no clean_caption (prompts reach the tokenizers as given)",
    }


_SD3_LACKS = _mmdit_lacks("StableDiffusion3Pipeline", "SD3Transformer2DModel")
_FLUX_LACKS = {
    **_mmdit_lacks("FluxPipeline", "FluxTransformer2DModel"),
    "callback_guidance_scale": "FluxPipeline's CFG scale is the call's true_cfg_scale, a local no callback reaches "
    "(pipe._guidance_scale is the embedded guidance, read once before the loop)",
    "cfg_cutoff_callback": "diffusers.callbacks has no Flux CFG-cutoff callback",
}

# Schedulers a case is run with (`Case.schedulers`, test_schedulers): (class, config changes)
SCHEDULERS = {
    "ddim": (DDIMScheduler, {}),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),
    "lms": (LMSDiscreteScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler-a": (EulerAncestralDiscreteScheduler, {}),
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
}
_FLOW = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}
# Flow matching (SD3, Flux). Not the stochastic ones (FlowMatchEuler's stochastic_sampling, FlowMatchLCM): these
# pipelines pass no generator to `scheduler.step`, so they draw from the global RNG and no two runs are equal.
# Dynamic shifting: the shift from `mu` (the image's token count), which FluxPipeline always passes (DPM-Solver++
# and DEIS assert dynamic shifting when given one).
FLOW_SCHEDULERS = {
    "flow-euler": (FlowMatchEulerDiscreteScheduler, {}),
    "flow-euler-dynamic": (FlowMatchEulerDiscreteScheduler, {"use_dynamic_shifting": True}),
    "flow-heun": (FlowMatchHeunDiscreteScheduler, {}),
    "unipc-flow": (UniPCMultistepScheduler, _FLOW),
    "dpm++-flow": (
        DPMSolverMultistepScheduler,
        {**_FLOW, "use_dynamic_shifting": True, "algorithm_type": "dpmsolver++"},
    ),
    "deis-flow": (DEISMultistepScheduler, {**_FLOW, "use_dynamic_shifting": True}),
}
ALL_SCHEDULERS = {**SCHEDULERS, **FLOW_SCHEDULERS}
# FluxPipeline passes its own sigmas to `set_timesteps`; FlowMatchHeun's takes none (the stock pipeline raises).
_FLUX_SCHEDULERS = tuple(s for s in FLOW_SCHEDULERS if s != "flow-heun")


@dataclass(frozen=True)
class Case:
    """One SCFG pipeline under test: its class, the stock diffusers class it extends, and its dummy inputs."""

    name: str
    pipeline: type
    stock: type
    components: Callable[[], dict[str, Any]]
    guidance_scale: float
    # the diffusers callback that switches CFG off after a step (a `PipelineCallback`), if diffusers has one
    cfg_cutoff: type | None
    # names of what `encode` returns, in order, as `__call__` keywords
    embeds: tuple[str, ...] = ("prompt_embeds", "negative_prompt_embeds")
    # (pipe, prompt, negative_prompt) -> the prompt's and the negative prompt's embeddings, as `embeds` names them
    encode: Callable[..., tuple[torch.Tensor, ...]] = encode_cfg_prompt
    # the `__call__` keyword that sets the CFG scale (Flux: true_cfg_scale; its guidance_scale is the embedded one)
    cfg_keyword: str = "guidance_scale"
    # where CFG needs a negative prompt (Flux's true CFG), the one every call with a prompt gets (one per prompt)
    negative_prompt: str | None = None
    size: int = 32  # px: latents 16x16 with the 2-level dummy VAE
    extra: dict[str, Any] = field(default_factory=dict)  # call keywords every scenario passes to this pipeline
    # the maps' token rows: the pipeline attribute of the tokenizer that names them, what it puts first, what ends a
    # truncated prompt, and the `__call__` keyword that sets the row length (None: the tokenizer's model_max_length)
    tokenizer: str = "tokenizer"
    bos: tuple[str, ...] = ("<|startoftext|>",)
    eos: str = "<|endoftext|>"
    sequence_length: str | None = None
    packed_latents: bool = False  # Flux: latents are 2x2 patches packed into tokens, (B, h/2 * w/2, 4 * channels)
    # why the native size (height=width=None) is not segmented, if it is not
    native_unsegmented: str | None = None
    schedulers: tuple[str, ...] = tuple(SCHEDULERS)  # names in ALL_SCHEDULERS
    custom_sigmas: tuple[str, tuple[float, ...]] = ("euler", (14.6, 2.0))  # (scheduler, sigmas) of test_custom_sigmas
    # attaches a random IP-Adapter to the pipeline's denoiser; returns the call keywords that feed it
    ip_adapter: Callable[[Any], dict[str, Any]] | None = None
    not_applicable: dict[str, str] = field(default_factory=dict)  # capability (`CAPABILITIES`) -> why

    def __post_init__(self):
        assert self.not_applicable.keys() <= CAPABILITIES.keys(), self.not_applicable.keys() - CAPABILITIES.keys()
        assert set(self.schedulers) <= ALL_SCHEDULERS.keys() and self.custom_sigmas[0] in self.schedulers
        assert (self.ip_adapter is None) == ("ip_adapter" in self.not_applicable)

    @property
    def segmentors(self) -> tuple[str, ...]:
        """The segmentors this pipeline defines."""
        return tuple(s for s in SEGMENTORS if s is not None and f"segmentor:{s}" not in self.not_applicable)


_POOLED_EMBEDS = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
CASES = [
    Case("sd", StableDiffusionSCFGPipeline, StableDiffusionPipeline, sd_dummy_components, 6.0, SDCFGCutoffCallback,
         ip_adapter=unet_ip_adapter, not_applicable=_CLIP_ONLY),
    Case("sdxl", StableDiffusionXLSCFGPipeline, StableDiffusionXLPipeline, sdxl_dummy_components, 5.0,
         SDXLCFGCutoffCallback, embeds=_POOLED_EMBEDS, ip_adapter=unet_ip_adapter, not_applicable=_CLIP_ONLY),
    Case("pixart", PixArtSigmaSCFGPipeline, PixArtSigmaPipeline, pixart_dummy_components, 5.0, None,
         embeds=("prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds", "negative_prompt_attention_mask"),
         size=64,  # latents 8x8 with the 4-level VAE
         extra=dict(use_resolution_binning=False, clean_caption=False),  # as diffusers' own PixArt tests; both tested
         bos=(), eos="</s>", sequence_length="max_sequence_length", not_applicable=_PIXART_LACKS),
    # The maps name the CLIP tokens of `prompt` (77 rows); max_sequence_length sets the T5 part of the context only.
    Case("sd3", StableDiffusion3SCFGPipeline, StableDiffusion3Pipeline, sd3_dummy_components, 5.0,
         SD3CFGCutoffCallback, embeds=_POOLED_EMBEDS,
         size=16,  # latents 16x16 with the one-level VAE: 256 image tokens (patch 1)
         schedulers=tuple(FLOW_SCHEDULERS), custom_sigmas=("flow-euler", (1.0, 0.5)), ip_adapter=sd3_ip_adapter,
         not_applicable=_SD3_LACKS),
    # True CFG: true_cfg_scale and a negative prompt (a list, one per prompt: stock Flux fails on one string for a
    # list of prompts). The maps name the T5 tokens (`tokenizer_2`), rows of max_sequence_length.
    Case("flux", FluxSCFGPipeline, FluxPipeline, flux_dummy_components, 4.0, None,
         embeds=("prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds", "negative_pooled_prompt_embeds"),
         encode=encode_flux_prompt, cfg_keyword="true_cfg_scale", negative_prompt="",
         size=8,  # latents 8x8 with the one-level VAE: 16 packed image tokens (diffusers' own Flux inputs)
         extra=dict(max_sequence_length=FLUX_MAX_SEQUENCE_LENGTH), tokenizer="tokenizer_2", bos=(), eos="</s>",
         sequence_length="max_sequence_length", packed_latents=True,
         native_unsegmented="FluxPipeline's native size is 128 latents whatever the model (1024 px at scale 8): "
         "4096 image tokens, tens of seconds to segment on a CPU; the other scenarios segment Flux at their sizes",
         schedulers=_FLUX_SCHEDULERS, custom_sigmas=("flow-euler", (1.0, 0.5)), ip_adapter=flux_ip_adapter,
         not_applicable=_FLUX_LACKS),
]  # fmt: skip


# ------------------------------------------------------------------------------ harness


def _images(out) -> Any:
    return out.images if hasattr(out, "images") else out[0]


def _count(images) -> int:
    return len(images) if isinstance(images, list) else images.shape[0]


def _as_tensor(images) -> torch.Tensor:
    if isinstance(images, list):
        return torch.from_numpy(np.stack([np.asarray(im) for im in images]))
    return torch.from_numpy(images) if isinstance(images, np.ndarray) else images


def assert_same_images(a, b) -> None:
    assert type(a) is type(b)
    assert torch.equal(_as_tensor(a), _as_tensor(b))


class Harness:
    """One case's pipelines over shared dummy components, and calls that check what every scenario must show."""

    def __init__(self, case: Case):
        self.case = case
        self.components = case.components()
        self.pipe = self.ours()
        self.stock = self.plain()

    def require(self, capability: str) -> None:
        """Skip the scenario, saying why, where the stock pipeline does not support `capability`."""
        assert capability in CAPABILITIES, capability
        if capability in self.case.not_applicable:
            pytest.skip(f"{CAPABILITIES[capability]} not applicable to {self.case.name}: "
                        f"{self.case.not_applicable[capability]}")  # fmt: skip

    @property
    def tokenizer(self):
        """The tokenizer whose tokens name the maps' regions (Flux: T5's, `tokenizer_2`)."""
        return getattr(self.pipe, self.case.tokenizer)

    def token_row_length(self, kw: dict[str, Any]) -> int:
        """Entries per token row of the maps: the call's sequence length (its default if not given) or the
        tokenizer's `model_max_length`."""
        name = self.case.sequence_length
        if name is None:
            return self.tokenizer.model_max_length
        return kw.get(name, inspect.signature(self.case.pipeline.__call__).parameters[name].default)

    def native_size(self) -> int:
        """The image size (px) the pipelines generate when no height/width is given."""
        sample = getattr(self.pipe, "default_sample_size", None) or self.pipe.denoiser.config.sample_size
        return sample * self.pipe.vae_scale_factor

    def initial_latents(self, height: int, width: int, seed: int) -> torch.Tensor:
        """One image's initial noise as `prepare_latents` draws it from a generator seeded `seed` (Flux draws the
        (1, C, h, w) latents, then packs them)."""
        generator = torch.Generator().manual_seed(seed)
        if not self.case.packed_latents:
            return torch.randn(self.latent_shape(1, height, width), generator=generator)
        f, channels = self.pipe.vae_scale_factor, self.pipe.vae.config.latent_channels
        h, w = 2 * (height // (2 * f)), 2 * (width // (2 * f))
        return self.pipe._pack_latents(torch.randn(1, channels, h, w, generator=generator), 1, channels, h, w)

    def latent_shape(self, n: int, height: int, width: int) -> tuple[int, ...]:
        """The shape of `n` images' latents (`output_type="latent"`, `latents=`): (n, C, h, w), or Flux's packed
        tokens (n, h/2 * w/2, 4C); h, w = height, width over the VAE scale."""
        f, channels = self.pipe.vae_scale_factor, self.pipe.vae.config.latent_channels
        if self.case.packed_latents:
            return (n, (height // (2 * f)) * (width // (2 * f)), 4 * channels)
        return (n, channels, height // f, width // f)

    def denoiser(self, pipe) -> torch.nn.Module:
        """The UNet or transformer of either pipeline (ours or stock)."""
        return getattr(pipe, self.case.pipeline.denoiser_name)

    def _build(self, cls, components=None, **replace):
        pipe = cls(**{**(components or self.components), **replace})
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def ours(self, components=None, **replace):
        """The SCFG pipeline over `components` (default: the shared ones), with some components replaced."""
        return self._build(self.case.pipeline, components, **replace)

    def plain(self, components=None, **replace):
        """The stock diffusers pipeline over the same components."""
        return self._build(self.case.stock, components, **replace)

    def fresh(self) -> tuple[Any, Any]:
        """(ours, stock) over a private copy of the components, for scenarios that change the models in place."""
        components = {k: v if "tokenizer" in k else copy.deepcopy(v) for k, v in self.components.items()}
        return self.ours(components), self.plain(components)

    def inputs(self, prompt=PROMPT, seeds=(0,), **over) -> dict[str, Any]:
        """diffusers-style dummy inputs with freshly seeded generators (one per image): the CFG scale under the case's
        keyword, and where CFG needs a negative prompt, the case's for every prompt (unless `over` names one)."""
        kw = dict(
            prompt=prompt,
            num_inference_steps=2,
            height=self.case.size,
            width=self.case.size,
            output_type="pt",
            **{self.case.cfg_keyword: self.case.guidance_scale},
            **self.case.extra,
        )
        kw.update(over)
        negative, prompt = self.case.negative_prompt, kw["prompt"]
        if negative is not None and prompt is not None and "negative_prompt" not in over:
            kw["negative_prompt"] = negative if isinstance(prompt, str) else [negative] * len(prompt)
        if seeds is not None:
            kw["generator"] = [torch.Generator().manual_seed(s) for s in seeds]
        return kw

    def run(self, segmentor, pipe=None, stock=None, steps=None, latent_hw=None, **inputs):
        """Call `pipe` (default: ours) with `segmentor`. None: the output must equal the stock pipeline's on the same
        inputs. A segmentor: the maps and rates must be right (`steps` loop iterations; default all of them; maps
        of size `latent_hw`, default height and width over the VAE scale)."""
        pipe = pipe or self.pipe
        kw = self.inputs(**inputs)
        out = pipe(**kw, segmentor=segmentor, return_maps=segmentor is not None)
        if segmentor is None:
            ref = (stock or self.stock)(**self.inputs(**inputs))
            assert type(ref) is not tuple or len(out) == len(ref)
            assert_same_images(_images(out), _images(ref))
            if isinstance(out, tuple):
                assert all(x == y for x, y in zip(out[1:], ref[1:]))
            else:
                assert out.maps is None and out.rates is None
        else:
            size = {k: kw[k] or self.native_size() for k in ("height", "width")}  # no size: the native one
            hw = latent_hw or tuple(size[k] // pipe.vae_scale_factor for k in ("height", "width"))
            maps = out[-1] if isinstance(out, tuple) else out.maps
            check_maps(pipe, maps, _count(_images(out)), hw, self.token_row_length(kw), steps,
                       has_tokens=kw.get("prompt") is not None or kw.get("caption") is not None)  # fmt: skip
            if not isinstance(out, tuple):
                assert [r.step for r in out.rates] == [m.step for m in maps]
                assert all(r.mean.shape == (_count(_images(out)),) for r in out.rates)
        return out


def assert_same_guidance(a, b, segmentor) -> None:
    """Two runs that differ only by rounding in the denoiser (~1e-6: batch size, slicing, fused projections, another
    attention processor, a reloaded copy of the weights; on some CPUs MKL also rounds by buffer alignment).

    Plain CFG keeps that size (1e-4, diffusers' bound). The dummy models' attention is sharpened, so rounding does
    not flip their maps: every step keeps >= 99 % of its labels and foreground, and the latents stay within 1e-3,
    while segmenting or not differs by 0.15-0.6 on these latents.
    """
    torch.testing.assert_close(a.images, b.images, atol=1e-4 if segmentor is None else 1e-3, rtol=0)
    if segmentor is not None:
        assert len(a.maps) == len(b.maps)
        for x, y in zip(a.maps, b.maps):
            assert (x.labels == y.labels).float().mean() >= 0.99
            assert (x.foreground == y.foreground).float().mean() >= 0.99


def check_maps(pipe, maps: list[SCFGStepMaps], n_images, latent_hw, max_tokens, steps=None, has_tokens=True) -> None:
    """One map per loop iteration (step index and timestep in order), each (B, h, w) with labels naming tokens
    (token rows of `max_tokens` entries)."""
    timesteps = pipe.scheduler.timesteps
    assert len(maps) == (len(timesteps) if steps is None else steps)
    for i, m in enumerate(maps):
        assert m.step == i and m.timestep == int(timesteps[i])
        assert m.labels.shape == m.foreground.shape == m.rate.shape == (n_images, *latent_hw)
        assert m.labels.dtype == torch.long and m.foreground.dtype == torch.bool and m.rate.dtype == torch.float32
        assert m.labels.min() >= 0 and m.labels.max() < max_tokens and torch.isfinite(m.rate).all()
        if has_tokens:
            assert len(m.tokens) == n_images and all(len(t) == max_tokens for t in m.tokens)
        else:
            assert m.tokens is None


@pytest.fixture(scope="module", params=CASES, ids=[c.name for c in CASES])
def h(request) -> Harness:
    return Harness(request.param)


@pytest.fixture(autouse=True)
def _segmentor_applicable(request):
    """A scenario parametrized with a segmentor the case's pipeline does not define is skipped, saying why."""
    params = request.node.callspec.params if hasattr(request.node, "callspec") else {}
    case, segmentor = params.get("h"), params.get("segmentor")
    if case is not None and segmentor is not None and segmentor not in case.segmentors:
        pytest.skip(f"segmentor={segmentor!r} not applicable to {case.name}: "
                    f"{case.not_applicable[f'segmentor:{segmentor}']}")  # fmt: skip


segmentors = pytest.mark.parametrize("segmentor", SEGMENTORS, ids=["off", "goca", "scfg"])

# ------------------------------------------------------------------------------ scenarios


@segmentors
def test_output_types(h, segmentor):
    """pt, np, pil and latent outputs: one generation, four views (pt == np exactly, pil == round(255·np))."""
    outs = {t: h.run(segmentor, output_type=t) for t in ("pt", "np", "pil", "latent")}
    pt, np_, pil, latent = (outs[t].images for t in ("pt", "np", "pil", "latent"))
    s = h.case.size
    assert pt.shape == (1, 3, s, s) and np_.shape == (1, s, s, 3) and isinstance(pil[0], Image.Image)
    assert latent.shape == h.latent_shape(1, s, s)
    assert torch.equal(pt.permute(0, 2, 3, 1), torch.from_numpy(np_))
    assert np.abs(np.asarray(pil[0], dtype=np.float32) - (np_[0] * 255).round()).max() <= 1
    if segmentor is not None:  # the maps do not depend on how the result is decoded; the segmentation acted
        ref = outs["latent"].maps
        for t in ("pt", "np", "pil"):
            assert all(
                torch.equal(a.rate, b.rate) and torch.equal(a.labels, b.labels) for a, b in zip(outs[t].maps, ref)
            )
        plain = h.pipe(**h.inputs(output_type="latent"), segmentor=None).images
        assert (latent - plain).abs().max() > 1e-2


def test_call_signature_and_components(h):
    """Same `__call__` parameters as the stock pipeline, in the same order with the same defaults, the new keywords
    after them; the same components, optional components and callback tensor inputs."""
    ours = list(inspect.signature(h.case.pipeline.__call__).parameters.values())
    stock = [p for p in inspect.signature(h.case.stock.__call__).parameters.values() if p.kind != p.VAR_KEYWORD]
    assert [(p.name, p.default) for p in ours[: len(stock)]] == [(p.name, p.default) for p in stock]
    new = [p.name for p in ours[len(stock) :] if p.kind != p.VAR_KEYWORD]
    added = ["callback_on_step_end", "callback_on_step_end_tensor_inputs"]  # ours adds them where stock lacks them
    lacks_callback = "step_end_callback" in h.case.not_applicable
    assert new == ["segmentor", "scfg_config", "goca_config", "return_maps", "caption", "rate_rule"] + (
        added if lacks_callback else []
    )
    assert h.pipe.components.keys() == h.stock.components.keys()
    assert h.case.pipeline._optional_components == h.case.stock._optional_components
    tensor_inputs = "_callback_tensor_inputs"  # PixArt: stock has none, ours its loop's tensors
    if lacks_callback:
        assert (
            getattr(h.case.stock, tensor_inputs, None) is None and "latents" in h.case.pipeline._callback_tensor_inputs
        )
    else:
        assert getattr(h.case.pipeline, tensor_inputs) == getattr(h.case.stock, tensor_inputs)


@segmentors
def test_batch_consistent_and_batch_equals_single(h, segmentor):
    """Prompts of unequal length (one truncated) in one batch; image 0 of the batch equals the single call's."""
    long = 100 * "very long "
    batch = h.run(segmentor, prompt=[PROMPT, PROMPT[: len(PROMPT) // 2], long], seeds=(0, 1, 2), output_type="latent")
    single = h.run(segmentor, prompt=PROMPT, seeds=(0,), output_type="latent")
    assert batch.images.shape[0] == 3
    first = SimpleNamespace(images=batch.images[:1], maps=segmentor and [_first_image(m) for m in batch.maps])
    assert_same_guidance(first, single, segmentor)  # the denoiser differs by ~1e-6 between batch sizes
    if segmentor is not None:
        tokens = batch.maps[0].tokens
        assert tokens[0] == single.maps[0].tokens[0] and tokens[2][-1] == h.case.eos  # truncated


def _first_image(m: SCFGStepMaps) -> SCFGStepMaps:
    return SCFGStepMaps(m.step, m.timestep, m.labels[:1], m.foreground[:1], m.rate[:1], m.tokens[:1])


@segmentors
def test_num_images_per_prompt(h, segmentor):
    for n_prompts, per_prompt in ((1, 2), (2, 2)):  # (n, 1) is the batch test above
        out = h.run(
            segmentor,
            prompt=PROMPTS[:n_prompts],
            seeds=range(n_prompts * per_prompt),
            num_images_per_prompt=per_prompt,
            output_type="latent",
        )
        assert out.images.shape[0] == n_prompts * per_prompt
        if segmentor is not None:  # one token row per image, each prompt's images together
            want = [[*h.case.bos, *h.tokenizer.tokenize(p)] for p in PROMPTS[:n_prompts]]
            want = [row for row in want for _ in range(per_prompt)]
            assert [t[: len(w)] for t, w in zip(out.maps[0].tokens, want)] == want


@segmentors
def test_native_size(h, segmentor):
    """No size: the denoiser's native one."""
    if segmentor is not None and h.case.native_unsegmented:
        pytest.skip(f"segmenting at the native size not run for {h.case.name}: {h.case.native_unsegmented}")
    native = h.native_size()
    out = h.run(segmentor, height=None, width=None, output_type="latent")
    assert out.images.shape == h.latent_shape(1, native, native) and native > h.case.size


@segmentors
def test_height_width_and_given_latents(h, segmentor):
    """A non-square size; `latents` given instead of drawn from the generator."""
    size = dict(height=h.case.size, width=h.case.size * 3 // 2)
    drawn = h.run(segmentor, **size, output_type="latent")
    assert drawn.images.shape == h.latent_shape(1, size["height"], size["width"])
    latents = h.initial_latents(size["height"], size["width"], seed=0)
    given = h.run(segmentor, **size, latents=latents, seeds=None, output_type="latent")
    assert torch.equal(given.images, drawn.images)


@segmentors
def test_dict_and_tuple_outputs_equal(h, segmentor):
    as_dict = h.run(segmentor, output_type="latent")
    as_tuple = h.run(segmentor, output_type="latent", return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], as_dict.images)
    if segmentor is not None:
        assert len(as_tuple[-1]) == len(as_dict.maps)
        assert all(torch.equal(a.rate, b.rate) for a, b in zip(as_tuple[-1], as_dict.maps))


@pytest.fixture(scope="module")
def saved(h, tmp_path_factory):
    """The pipeline (optional components None) saved and loaded back, plainly and as variant "fp16"."""
    root = tmp_path_factory.mktemp(h.case.name)
    h.pipe.save_pretrained(root / "plain")
    h.pipe.save_pretrained(root / "variant", variant="fp16")  # file names only: still fp32 weights
    for sub in (root / "variant").iterdir():
        if sub.is_dir() and isinstance(h.components.get(sub.name), torch.nn.Module):
            assert any(".fp16." in f.name for f in sub.iterdir()), sub.name
    with pytest.raises(ValueError, match="variant=fp16"):
        h.case.pipeline.from_pretrained(root / "plain", variant="fp16")
    loaded = {
        "plain": h.case.pipeline.from_pretrained(root / "plain"),
        "variant": h.case.pipeline.from_pretrained(root / "variant", variant="fp16"),
    }
    for pipe in loaded.values():
        pipe.set_progress_bar_config(disable=True)
    return loaded


@pytest.mark.parametrize(
    ("saved_as", "segmentor"),
    [("plain", None), ("plain", "goca"), ("plain", "scfg"), ("variant", None)],  # variants: file names, no maps
    ids=["plain-off", "plain-goca", "plain-scfg", "variant-off"],
)
def test_save_load_local_optional_components_variants(h, saved, saved_as, segmentor):
    loaded = saved[saved_as]
    assert type(loaded) is h.case.pipeline
    for name in h.case.pipeline._optional_components:  # what was None stays None
        if h.components.get(name) is None:
            assert getattr(loaded, name) is None, name
    for name, module in h.pipe.components.items():
        if isinstance(module, torch.nn.Module):
            theirs = dict(getattr(loaded, name).named_parameters())
            assert theirs.keys() <= dict(module.named_parameters()).keys()
            assert all(torch.equal(p, theirs[k]) for k, p in module.named_parameters() if k in theirs), name
    # Off: exactly the stock pipeline over the loaded components (same instances). Against the pipeline that was
    # saved, only up to rounding: the reloaded weights are equal but are other buffers, and MKL may round by
    # buffer alignment.
    got = h.run(segmentor, pipe=loaded, stock=h.plain(loaded.components), output_type="latent")
    want = h.run(segmentor, output_type="latent")
    assert_same_guidance(got, want, segmentor)


@segmentors
def test_from_pipe_both_ways(h, segmentor):
    processors = {k: type(v) for k, v in h.denoiser(h.stock).attn_processors.items()}
    ours = h.case.pipeline.from_pipe(h.stock)
    ours.set_progress_bar_config(disable=True)
    assert type(ours) is h.case.pipeline
    assert all(ours.components[k] is v for k, v in h.stock.components.items())
    back = h.case.stock.from_pipe(ours)
    back.set_progress_bar_config(disable=True)
    assert type(back) is h.case.stock
    assert {k: v for k, v in back.config.items() if not k.startswith("_")} == {
        k: v for k, v in h.stock.config.items() if not k.startswith("_")
    }
    got = h.run(segmentor, pipe=ours, stock=back, output_type="latent")
    if segmentor is not None:
        assert torch.equal(got.images, h.run(segmentor, output_type="latent").images)
    assert {k: type(v) for k, v in h.denoiser(h.stock).attn_processors.items()} == processors


@segmentors
def test_callback_tensor_inputs(h, segmentor):
    """A subset and all of `_callback_tensor_inputs` reach the callback; what it returns replaces the tensors."""
    h.require("step_end_callback")
    seen = []

    def subset(pipe, i, t, kwargs):
        seen.append(set(kwargs))
        return kwargs

    h.run(segmentor, callback_on_step_end=subset, callback_on_step_end_tensor_inputs=["latents"], output_type="latent")
    allowed = list(h.pipe._callback_tensor_inputs)
    h.run(segmentor, callback_on_step_end=subset, callback_on_step_end_tensor_inputs=allowed, output_type="latent")
    n = len(h.pipe.scheduler.timesteps)
    stock_calls = n if segmentor is None else 0  # the stock pipeline ran the same callback in the `off` runs
    assert seen == [{"latents"}] * (n + stock_calls) + [set(allowed)] * (n + stock_calls)

    def zero_last(pipe, i, t, kwargs):
        if i == pipe.num_timesteps - 1:
            kwargs["latents"] = torch.zeros_like(kwargs["latents"])
        return kwargs

    out = h.run(segmentor, callback_on_step_end=zero_last, callback_on_step_end_tensor_inputs=allowed,
                output_type="latent")  # fmt: skip
    assert out.images.abs().sum() == 0


@segmentors
def test_callback_changes_guidance_scale(h, segmentor):
    """A callback raising `_guidance_scale` by 1 each step: the pipeline reads the new scale at every step."""
    h.require("step_end_callback")
    h.require("callback_guidance_scale")

    def louder(pipe, i, t, kwargs):
        pipe._guidance_scale += 1.0
        return kwargs

    out = h.run(segmentor, guidance_scale=2.0, callback_on_step_end=louder, output_type="latent")
    assert h.pipe.guidance_scale == 2.0 + h.pipe.num_timesteps
    if segmentor is not None:
        assert [r.guidance_scale for r in out.rates] == [2.0 + i for i in range(h.pipe.num_timesteps)]


@segmentors
def test_pipeline_callback_cfg_cutoff(h, segmentor):
    """diffusers' CFG-cutoff `PipelineCallback` drops the uncond half after step 1: segmentation stops there."""
    h.require("cfg_cutoff_callback")
    cutoff = h.case.cfg_cutoff(cutoff_step_ratio=None, cutoff_step_index=1)
    h.run(segmentor, num_inference_steps=3, callback_on_step_end=cutoff, output_type="latent", steps=2)


@segmentors
def test_interrupt(h, segmentor):
    """`pipe._interrupt = True` from a callback skips the remaining steps: the output is that step's latents."""
    h.require("interrupt")
    states = []

    def record(pipe, i, t, kwargs):
        states.append(kwargs["latents"].clone())
        return kwargs

    h.pipe(**h.inputs(num_inference_steps=3, output_type="latent"), segmentor=segmentor, callback_on_step_end=record)

    def interrupt(pipe, i, t, kwargs):
        if i == 1:
            pipe._interrupt = True
        return kwargs

    out = h.run(segmentor, num_inference_steps=3, callback_on_step_end=interrupt, output_type="latent", steps=2)
    assert torch.equal(out.images, states[1])


@segmentors
def test_attention_slicing(h, segmentor):
    """Sliced attention (slice sizes 1 and 2): the same guidance."""
    h.require("attention_slicing")
    ours, stock = h.fresh()
    base = h.run(segmentor, pipe=ours, stock=stock, output_type="latent")
    for size in (1, 2):
        ours.enable_attention_slicing(slice_size=size)  # the stock pipeline shares the UNet
        sliced = h.run(segmentor, pipe=ours, stock=stock, output_type="latent")
        assert_same_guidance(sliced, base, segmentor)


@segmentors
def test_default_attention_processor(h, segmentor):
    """The plain attention processor (`AttnProcessor`, as diffusers' own tests set): the same guidance."""
    h.require("default_attn_processor")
    ours, stock = h.fresh()
    base = h.run(segmentor, pipe=ours, stock=stock, output_type="latent")
    h.denoiser(ours).set_default_attn_processor()  # the stock pipeline shares the denoiser
    assert_same_guidance(h.run(segmentor, pipe=ours, stock=stock, output_type="latent"), base, segmentor)


@segmentors
def test_vae_slicing(h, segmentor):
    kw = dict(prompt=PROMPTS, seeds=(0, 1, 2))
    base = h.run(segmentor, **kw)
    h.pipe.vae.enable_slicing()
    try:
        sliced = h.run(segmentor, **kw)
    finally:
        h.pipe.vae.disable_slicing()
    torch.testing.assert_close(sliced.images, base.images, atol=3e-3, rtol=0)
    if segmentor is not None:
        assert all(torch.equal(a.rate, b.rate) for a, b in zip(sliced.maps, base.maps))


@segmentors
def test_freeu(h, segmentor):
    h.require("freeu")
    base = h.run(segmentor, output_type="latent")
    h.pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    try:
        freeu = h.run(segmentor, output_type="latent")
    finally:
        h.pipe.disable_freeu()
    assert all(getattr(b, k) is None for b in h.pipe.unet.up_blocks for k in ("s1", "s2", "b1", "b2"))
    again = h.run(segmentor, output_type="latent")
    assert not torch.allclose(freeu.images, base.images, atol=1e-3) and torch.equal(again.images, base.images)


@segmentors
def test_fused_qkv_projections(h, segmentor):
    ours, stock = h.fresh()
    base = h.run(segmentor, pipe=ours, stock=stock, output_type="latent")
    # the pipeline's switch where it has one (UNet and VAE), else the denoiser's, as diffusers' own PixArt test does
    fusing = ours if hasattr(ours, "fuse_qkv_projections") else h.denoiser(ours)
    fusing.fuse_qkv_projections()
    denoiser = h.denoiser(ours)  # fused processors (UNet, PixArt, SD3), or fused modules (Flux's processor reads it)
    assert any("Fused" in type(p).__name__ for p in denoiser.attn_processors.values()) or any(
        getattr(m, "fused_projections", False) for m in denoiser.modules()
    )
    fused = h.run(segmentor, pipe=ours, stock=stock, output_type="latent")
    fusing.unfuse_qkv_projections()
    unfused = h.run(segmentor, pipe=ours, stock=stock, output_type="latent")
    assert_same_guidance(fused, base, segmentor)  # one fused matmul rounds differently
    assert torch.equal(unfused.images, base.images)


def _with_scheduler(h, name):
    cls, over = ALL_SCHEDULERS[name]
    scheduler = cls.from_config(h.components["scheduler"].config, **over)
    return h.ours(scheduler=scheduler), h.plain(scheduler=copy.deepcopy(scheduler))


@pytest.mark.parametrize("scheduler", list(ALL_SCHEDULERS))
@segmentors
def test_schedulers(h, segmentor, scheduler):
    """Each scheduler of the model's kind (ε-prediction or flow matching) that the stock pipeline runs with."""
    if scheduler not in h.case.schedulers:
        pytest.skip(f"scheduler {scheduler!r} not applicable to {h.case.name}: its schedulers are {h.case.schedulers}")
    ours, stock = _with_scheduler(h, scheduler)
    out = h.run(segmentor, pipe=ours, stock=stock, output_type="latent")
    assert out.images.shape == h.latent_shape(1, h.case.size, h.case.size)
    assert torch.isfinite(out.images).all()


@segmentors
def test_custom_timesteps(h, segmentor):
    h.require("custom_timesteps")
    ours, stock = _with_scheduler(h, "euler")
    out = h.run(segmentor, pipe=ours, stock=stock, timesteps=[999, 499], output_type="latent")
    assert ours.scheduler.timesteps.tolist() == [999, 499]
    if segmentor is not None:
        assert [m.timestep for m in out.maps] == [999, 499]
    ours, stock = _with_scheduler(h, "ddim")  # no custom timesteps: the same error as the stock pipeline's
    with pytest.raises(ValueError, match="does not support custom timestep"):
        stock(**h.inputs(timesteps=[999, 499]))
    with pytest.raises(ValueError, match="does not support custom timestep"):
        ours(**h.inputs(timesteps=[999, 499]), segmentor=segmentor)


@segmentors
def test_custom_sigmas(h, segmentor):
    name, sigmas = h.case.custom_sigmas
    ours, stock = _with_scheduler(h, name)
    h.run(segmentor, pipe=ours, stock=stock, sigmas=list(sigmas), output_type="latent")  # maps: at its timesteps
    assert ours.scheduler.sigmas.tolist()[: len(sigmas)] == pytest.approx(sigmas)


@segmentors
def test_prompt_embeds(h, segmentor):
    """`prompt_embeds`/`negative_prompt_embeds` give the images of the prompt text; goca takes the text as `caption`
    (one per prompt row) and then equals the prompt's call, maps and all; without it, one error naming `caption=`
    and only the segmentors this pipeline has."""
    negative = ["blurry", "dark"]
    with torch.no_grad():  # as in `__call__` (T5 rounds differently with autograd on)
        embeds = h.case.encode(h.pipe, PROMPTS[:2], negative)
    embeds = dict(zip(h.case.embeds, embeds), negative_prompt=None)  # PixArt's default is "", not None
    if segmentor == "goca":
        with pytest.raises(ValueError, match="pass caption=") as err:
            h.pipe(**h.inputs(prompt=None, seeds=(0, 1), **embeds), segmentor=segmentor)
        assert ("'scfg'" in str(err.value)) == ("scfg" in h.case.segmentors)  # only what this pipeline can run
        with pytest.raises(ValueError, match="caption has 1 text"):
            h.pipe(**h.inputs(prompt=None, seeds=(0, 1), caption=PROMPTS[0], **embeds), segmentor=segmentor)
        embeds["caption"] = PROMPTS[:2]
    from_text = h.run(segmentor, prompt=PROMPTS[:2], negative_prompt=negative, seeds=(0, 1), output_type="latent")
    from_embeds = h.run(segmentor, prompt=None, seeds=(0, 1), output_type="latent", **embeds)
    assert torch.equal(from_embeds.images, from_text.images)  # one instance, the same shapes: exact
    for a, b in zip(from_embeds.maps or [], from_text.maps or []):
        assert torch.equal(a.labels, b.labels) and torch.equal(a.rate, b.rate)
        assert a.tokens == (b.tokens if "caption" in embeds else None)  # scfg without a caption: no token names


@segmentors
def test_ip_adapter(h, segmentor):
    """A random IP-Adapter loaded through diffusers' loader acts (scale 1) and is inert at scale 0."""
    h.require("ip_adapter")
    ours, stock = h.fresh()
    base = h.run(segmentor, pipe=ours, stock=stock, output_type="latent")
    kw = dict(output_type="latent", **h.case.ip_adapter(ours))  # the stock pipeline shares the denoiser
    with_ip = h.run(segmentor, pipe=ours, stock=stock, **kw)
    ours.set_ip_adapter_scale(0.0)
    inert = h.run(segmentor, pipe=ours, stock=stock, **kw)
    assert (with_ip.images - base.images).abs().max() > 1e-4
    torch.testing.assert_close(inert.images, base.images, atol=1e-4, rtol=0)


@segmentors
def test_guidance_rescale(h, segmentor):
    h.require("guidance_rescale")
    rescaled = h.run(segmentor, guidance_rescale=0.7, output_type="latent")
    plain = h.pipe(**h.inputs(output_type="latent"), segmentor=segmentor).images
    assert not torch.equal(rescaled.images, plain)


@pytest.mark.parametrize("segmentor", ["goca", "scfg"])
def test_no_cfg_segments_nothing(h, segmentor):
    """No CFG (scale <= 1; where CFG needs a negative prompt, none either): nothing to segment; the stock pipeline's
    output and no maps."""
    offs = [{h.case.cfg_keyword: 1.0}] + ([{"negative_prompt": None}] if h.case.negative_prompt is not None else [])
    for off in offs:
        out = h.pipe(**h.inputs(**off), segmentor=segmentor, return_maps=True)
        assert_same_images(out.images, h.stock(**h.inputs(**off)).images)
        assert out.maps == [] and out.rates is None, off


# ------------------------------------------------------------------------------ scenarios of some pipelines only


class _Calls:
    """Counts forward calls of modules (what ran before an error)."""

    def __init__(self, modules: dict[str, torch.nn.Module]):
        self.counts = dict.fromkeys(modules, 0)
        self.handles = [m.register_forward_pre_hook(self._hook(k)) for k, m in modules.items()]

    def _hook(self, name):
        def hook(module, args):
            self.counts[name] += 1

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _stock_supports(h, capability: str) -> bool:
    """Whether the stock diffusers pipeline has `capability`, read off its class, `__call__` and denoiser."""
    stock = h.case.stock
    params, source = inspect.signature(stock.__call__).parameters, inspect.getsource(stock.__call__)
    return {
        "step_end_callback": "callback_on_step_end" in params and hasattr(stock, "_callback_tensor_inputs"),
        "callback_guidance_scale": "callback_on_step_end" in params and "+ self.guidance_scale * (" in source,
        "cfg_cutoff_callback": h.case.cfg_cutoff is not None,
        "interrupt": "self.interrupt" in source,
        "legacy_callback": "callback_steps" in params or 'kwargs.pop("callback_steps"' in source,  # SD: deprecated
        "attention_slicing": hasattr(h.denoiser(h.stock), "set_attention_slice"),
        "default_attn_processor": hasattr(h.denoiser(h.stock), "set_default_attn_processor"),
        "freeu": hasattr(stock, "enable_freeu"),
        "ip_adapter": hasattr(stock, "load_ip_adapter") and "ip_adapter_image_embeds" in params,
        "guidance_rescale": "guidance_rescale" in params,
        "custom_timesteps": "timesteps" in params,
        "resolution_binning": "use_resolution_binning" in params,
        "max_sequence_length": "max_sequence_length" in params,
        "clean_caption": "clean_caption" in params,
    }[capability]


def test_not_applicable_is_what_the_stock_pipeline_lacks(h):
    """Each capability a case marks not applicable is one its stock pipeline lacks, and every other one it has (the
    segmentors: test_unsupported_segmentors_raise)."""
    for capability in CAPABILITIES:
        if not capability.startswith("segmentor:"):
            assert _stock_supports(h, capability) == (capability not in h.case.not_applicable), capability


def test_unsupported_segmentors_raise(h):
    """A segmentor the pipeline does not define: a clear ValueError naming it; no denoiser call, no decoding."""
    unsupported = [s for s in SEGMENTORS if s is not None and s not in h.case.segmentors]
    if not unsupported:
        pytest.skip(f"{h.case.name} defines every segmentor")
    calls = _Calls({"denoiser": h.denoiser(h.pipe), "vae": h.pipe.vae})
    try:
        for segmentor in unsupported:
            with pytest.raises(ValueError, match=f"segmentor={segmentor!r} is defined for UNet denoisers only"):
                h.pipe(**h.inputs(), segmentor=segmentor)
    finally:
        calls.remove()
    assert calls.counts == {"denoiser": 0, "vae": 0}


def test_unsupported_segmentors_raise_before_any_work(h):
    """... and before the text encoder runs or the generator draws anything."""
    unsupported = [s for s in SEGMENTORS if s is not None and s not in h.case.segmentors]
    if not unsupported:
        pytest.skip(f"{h.case.name} defines every segmentor")
    calls = _Calls({"text_encoder": h.pipe.text_encoder})
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    try:
        with pytest.raises(ValueError, match="is defined for UNet denoisers only"):
            h.pipe(**h.inputs(seeds=None, generator=generator), segmentor=unsupported[0])
    finally:
        calls.remove()
    assert calls.counts == {"text_encoder": 0}, "the text encoder ran"
    assert torch.equal(generator.get_state(), state), "the generator drew"


@segmentors
def test_resolution_binning(h, segmentor):
    """`use_resolution_binning=True`: the latents at the nearest bin of the transformer's aspect-ratio table, the
    decoded image resized and cropped back to the size asked for; the maps at the binned latent size."""
    h.require("resolution_binning")
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import ASPECT_RATIO_256_BIN

    assert h.pipe.transformer.config.sample_size == 32  # 256 px: the 256 table
    size = dict(height=h.case.size, width=h.case.size * 3 // 2)
    binned = [int(x) for x in h.pipe.image_processor.classify_height_width_bin(**size, ratios=ASPECT_RATIO_256_BIN)]
    assert binned != [size["height"], size["width"]]
    hw = tuple(x // h.pipe.vae_scale_factor for x in binned)
    latents = h.run(segmentor, **size, use_resolution_binning=True, output_type="latent", latent_hw=hw)
    assert latents.images.shape[-2:] == hw
    image = h.run(segmentor, **size, use_resolution_binning=True, output_type="pt", latent_hw=hw)
    assert image.images.shape[-2:] == (size["height"], size["width"])
    unbinned = h.run(segmentor, **size, use_resolution_binning=False, output_type="pt")
    assert unbinned.images.shape == image.images.shape and not torch.allclose(unbinned.images, image.images)
    if segmentor is not None:
        assert all(torch.equal(a.rate, b.rate) for a, b in zip(latents.maps, image.maps))


@segmentors
def test_max_sequence_length(h, segmentor):
    """`max_sequence_length` truncates the prompt for the T5 encoder (its `</s>` last). Where T5's tokens name the
    regions it sets the token rows' length (the harness's default as well: PixArt's 300, Flux's 48; the long
    prompt has 300 pieces); SD3's maps keep the 77 CLIP tokens."""
    h.require("max_sequence_length")
    long = 100 * "very long "
    short = h.run(segmentor, prompt=[PROMPT, long], seeds=(0, 1), max_sequence_length=16, output_type="latent")
    default = h.run(segmentor, prompt=[PROMPT, long], seeds=(0, 1), output_type="latent")
    assert not torch.equal(short.images[1], default.images[1])
    if segmentor is not None and h.case.sequence_length is None:
        assert short.maps[0].tokens == default.maps[0].tokens
        assert [len(t) for t in default.maps[0].tokens] == [h.token_row_length({})] * 2
    elif segmentor is not None:
        words, length = h.tokenizer.tokenize(long), h.token_row_length(h.inputs())
        assert short.maps[0].tokens[1] == [*words[:15], h.case.eos]
        assert len(words) >= length and default.maps[0].tokens[1] == [*words[: length - 1], h.case.eos]


@segmentors
def test_clean_caption(h, segmentor):
    """`clean_caption=True` (PixArt's default): the encoder sees the cleaned, lower-cased text, and the maps name
    its tokens (without bs4 installed diffusers warns and only lower-cases, for the embeddings and the maps
    alike)."""
    h.require("clean_caption")
    from diffusers.utils import is_bs4_available, is_ftfy_available

    prompt = "A FOX   reading #news at http://example.com"
    out = h.run(segmentor, prompt=prompt, clean_caption=True, output_type="latent")
    raw = h.run(segmentor, prompt=prompt, clean_caption=False, output_type="latent")
    seen = h.pipe._text_preprocessing(prompt, clean_caption=True)[0]
    assert seen != prompt
    if segmentor is not None:  # by id: pieces out of the vocabulary are `<unk>`
        tokens = h.pipe.tokenizer.convert_ids_to_tokens(h.pipe.tokenizer(seen).input_ids)
        assert tokens[-1] == h.case.eos and out.maps[0].tokens[0][: len(tokens)] == tokens
        cleaning = is_bs4_available() and is_ftfy_available()  # else both only lower-case
        assert (raw.maps[0].tokens[0] != out.maps[0].tokens[0]) == cleaning


@segmentors
def test_legacy_callback(h, segmentor):
    """The older `callback(step, t, latents)` every `callback_steps` steps (PixArt's only callback; deprecated in
    the Stable Diffusion pipelines): the same calls as the stock pipeline's, the last one with the output."""
    h.require("legacy_callback")
    calls = []

    def record(step, t, latents):
        calls.append((step, int(t), latents.clone()))

    out = h.run(segmentor, num_inference_steps=3, callback=record, callback_steps=2, output_type="latent")
    timesteps = [int(t) for t in h.pipe.scheduler.timesteps]
    ours = calls[:2]
    assert [(step, t) for step, t, _ in ours] == [(0, timesteps[0]), (2, timesteps[2])]
    assert torch.equal(ours[-1][2], out.images)
    if segmentor is None:  # then the stock pipeline ran the same callback
        assert len(calls) == 4 and all(a[:2] == b[:2] and torch.equal(a[2], b[2]) for a, b in zip(ours, calls[2:]))
    with pytest.raises(ValueError, match="callback_steps"):
        h.pipe(**h.inputs(), callback=record, callback_steps=0, segmentor=segmentor)


def test_goca_vanilla_config(h):
    """GoCA with the authors' vanilla configuration (average heads and layers, no rescaling) segments too."""
    vanilla = h.run("goca", goca_config=GoCAConfig.vanilla(), output_type="latent")
    plain = h.pipe(**h.inputs(output_type="latent"), segmentor=None).images
    default = h.run("goca", output_type="latent")
    assert (vanilla.images - plain).abs().max() > 1e-2
    assert any(not torch.equal(a.labels, b.labels) for a, b in zip(vanilla.maps, default.maps))


@segmentors
def test_save_load_without_optional_components(h, segmentor, tmp_path):
    """Optional components set to None (PixArt: tokenizer and text encoder) stay None through save/load; the
    loaded pipeline generates from prompt embeddings, several images each, as before saving; goca needs the text."""
    optional = [n for n in h.case.pipeline._optional_components if h.components.get(n) is not None]
    if not optional:
        pytest.skip(f"{h.case.name}: its optional components are None in the dummy already (test_save_load_...)")
    with torch.no_grad():
        embeds = dict(zip(h.case.embeds, h.pipe.encode_prompt(PROMPT, device="cpu")), negative_prompt=None)
    kw = dict(prompt=None, seeds=(0, 1), num_images_per_prompt=2, output_type="latent", **embeds)
    ours, stock = h.ours(**dict.fromkeys(optional)), h.plain(**dict.fromkeys(optional))
    ours.save_pretrained(tmp_path)
    loaded = h.case.pipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert all(getattr(loaded, name) is None for name in optional)
    if segmentor == "goca":  # no prompt and no tokenizer: nothing can name the regions
        with pytest.raises(ValueError, match="pass caption="):
            loaded(**h.inputs(**kw), segmentor=segmentor)
        with pytest.raises(ValueError, match="needs the pipeline's tokenizer"):
            loaded(**h.inputs(**kw, caption=PROMPT), segmentor=segmentor)
        return
    got = h.run(segmentor, pipe=loaded, stock=h.plain(loaded.components), **kw)  # off: exact, same instances
    assert_same_guidance(got, h.run(segmentor, pipe=ours, stock=stock, **kw), segmentor)  # reloaded: other buffers
    assert got.images.shape[0] == 2


def test_goca_pixart_without_preset():
    """diffusers' own 2-block PixArt dummy: not PixArt-Sigma's 28 blocks, so no GoCA preset; the transformer rule
    (algorithm.md §8.4) picks its layers, so the default GoCA and `GoCAConfig.vanilla()` run without configuration
    (dense block 0, both blocks' cross and self maps, order 5) and an explicit `dense_layer` still wins."""
    from goca_scfg.layout import ModelLayout
    from goca_scfg.segment.goca import goca_layers

    components = pixart_two_block_components()
    pipe, stock = PixArtSigmaSCFGPipeline(**components), PixArtSigmaPipeline(**components)
    for p in (pipe, stock):
        p.set_progress_bar_config(disable=True)
    kw = dict(prompt=PROMPT, num_inference_steps=2, guidance_scale=5.0, use_resolution_binning=False,
              clean_caption=False, output_type="latent")  # fmt: skip
    plain = pipe(**kw, generator=torch.Generator().manual_seed(0), segmentor=None).images
    assert torch.equal(plain, stock(**kw, generator=torch.Generator().manual_seed(0)).images)
    layout = ModelLayout.of(pipe.transformer)
    assert goca_layers(layout, GoCAConfig()).rule == "rule for a 2-block transformer (algorithm.md §8.4)"
    outs = {}
    for name, config in [
        ("default", None),
        ("vanilla", GoCAConfig.vanilla()),
        ("dense 1", GoCAConfig(dense_layer="transformer_blocks.1")),
    ]:
        out = pipe(
            **kw, generator=torch.Generator().manual_seed(0), segmentor="goca", goca_config=config, return_maps=True
        )
        check_maps(pipe, out.maps, 1, plain.shape[-2:], 300)
        assert (out.images - plain).abs().max() > 1e-3, name
        outs[name] = out.images
    assert goca_layers(layout, GoCAConfig(dense_layer="transformer_blocks.1")).dense.block == "transformer_blocks.1"
    assert not torch.equal(outs["dense 1"], outs["default"])  # the reference query changes the layer weights
