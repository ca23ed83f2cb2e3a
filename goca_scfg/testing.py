"""Offline fixtures: tiny seeded diffusers components, the sharpened-attention variant for label-level tests, and
the offline T5 tokenizer (the CLIP one is `clip_bpe.clip_tokenizer`).

Used by the tests, the benchmarks and the model families (goca_scfg/families/ name their builders here, and
`loading.TINY_MODELS`, the CLI's and the sweep's `--model tiny-random*`, come from them); no library module imports
it.
The tiny UNet has four resolution levels and two transformer blocks per down level (three per up level), so every
layer name of SD v1.5 exists and attention maps exist at latent/1, /2, /4 and /8.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

import torch

from .clip_bpe import clip_tokenizer
from .loading import swap_scheduler


@torch.no_grad()
def sharpen_attention(denoiser: torch.nn.Module, cross: float = 6.0, self_: float = 10.0) -> torch.nn.Module:
    """Peak a random denoiser's attention as a trained model's is (in place; returns `denoiser`).

    Cross-attention: `to_q` and `to_k` times `cross` (logits times cross²). Self-attention: `to_k := self_ · to_q`,
    so every query scores itself highest (diagonal-dominant, as a trained model's neighbourhoods are).
    Default-initialised attention is nearly uniform: there segmentation turns a last-bit difference (another batch
    shape, another attention processor, a reloaded copy) into flipped labels, so label-level tests across such runs
    need this model; plumbing tests keep the plain one. Joint attention (`_sharpen_joint`): the same on its text and
    image keys.
    """
    from .layout import ModelLayout, unwrap

    modules = dict(unwrap(denoiser).named_modules())
    layout = ModelLayout.of(denoiser)
    if layout.arch == "joint":
        for module in dict.fromkeys(x.name.rpartition(":")[0] for x in layout.layers):
            _sharpen_joint(modules[module], cross, self_)
        return denoiser
    for layer in layout.layers:
        attn = modules[layer.name]
        if layer.kind == "cross":
            attn.to_q.weight.mul_(cross)
            attn.to_k.weight.mul_(cross)
        else:
            attn.to_k.weight.copy_(attn.to_q.weight * self_)
            if attn.to_k.bias is not None and attn.to_q.bias is not None:
                attn.to_k.bias.copy_(attn.to_q.bias * self_)
    return denoiser


def _sharpen_joint(attn: torch.nn.Module, cross: float, self_: float) -> None:
    """Joint attention: image keys := image queries (diagonal-dominant image logits) and queries and text keys scaled.

    Without per-head norms, as `sharpen_attention` (queries and text keys ×`cross`, image keys `self_`·queries).
    With per-head RMSNorms (SD3.5, Flux) the norms fix each head vector's size, and text and image keys compete in one
    softmax: the norms' weights carry √`cross` (text logits ×`cross`) and the image keys get 2√`cross`/√d, so a
    token's logit on itself is about twice the spread of its text logits, not hundreds above them (which would make
    the model ignore its text). RoPE, one rotation per position, keeps q·k of a position with itself.
    """
    attn.to_k.weight.copy_(attn.to_q.weight)
    if attn.to_k.bias is not None and attn.to_q.bias is not None:
        attn.to_k.bias.copy_(attn.to_q.bias)
    norm_q, norm_k = getattr(attn, "norm_q", None), getattr(attn, "norm_k", None)
    if norm_q is not None and getattr(norm_q, "weight", None) is not None:
        s = cross**0.5
        head = attn.to_q.out_features // attn.heads
        norm_k.weight.copy_(norm_q.weight * 2 * s / head**0.5)
        norm_q.weight.mul_(s)
        text = getattr(attn, "norm_added_k", None)
        if text is not None and getattr(text, "weight", None) is not None:
            text.weight.mul_(s)
        return
    attn.to_q.weight.mul_(cross)
    attn.to_k.weight.copy_(attn.to_q.weight * self_ / cross)
    if getattr(attn, "add_k_proj", None) is not None:
        attn.add_k_proj.weight.mul_(cross)


def sharpened(components: dict[str, Any]) -> dict[str, Any]:
    """`components` with its UNet or transformer sharpened in place (`sharpen_attention`)."""
    sharpen_attention(components["unet"] if "unet" in components else components["transformer"])
    return components


# Shared by both architectures: SD v1.x's block layout and CLIP's special token ids.
_UNET_LAYOUT = dict(
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
_VAE_LAYOUT = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
)
_TEXT_LAYOUT = dict(
    vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407
)

# Tiny: four levels, SD-v1.5 layer names, seconds on a CPU. `attention_head_dim` is the head count (SD 1.x quirk).
_TINY = (
    dict(sample_size=16, block_out_channels=(16, 16, 32, 32), cross_attention_dim=32, attention_head_dim=2,
         norm_num_groups=8),
    dict(block_out_channels=(8, 8, 8, 8), norm_num_groups=4, layers_per_block=1, sample_size=128),
    dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, layer_norm_eps=1e-5),
)  # fmt: skip
# The published SD v1.5 unet / vae / text_encoder configs: random weights time exactly like real ones.
_SD15 = (
    dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
         norm_num_groups=32),
    dict(block_out_channels=(128, 256, 512, 512), norm_num_groups=32, layers_per_block=2, sample_size=512),
    dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
         hidden_act="quick_gelu"),
)  # fmt: skip


def _random_components(sizes: tuple[dict, dict, dict], seed: int, scheduler: str) -> dict[str, Any]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_cfg, vae_cfg, text_cfg = sizes
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**_UNET_LAYOUT, **unet_cfg)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**_VAE_LAYOUT, **vae_cfg)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**_TEXT_LAYOUT, **text_cfg))
    return {
        "unet": unet.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "tokenizer": clip_tokenizer(),
        "scheduler": make_scheduler(scheduler),
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
        "requires_safety_checker": False,
    }


def tiny_components(seed: int = 0, scheduler: str = "pndm") -> dict[str, Any]:
    """Tiny random `StableDiffusionPipeline` components (SD-v1.5-shaped, 4 levels), deterministic from `seed`."""
    return _random_components(_TINY, seed, scheduler)


def sd15_random_components(seed: int = 0, scheduler: str = "pndm") -> dict[str, Any]:
    """SD v1.5's architecture (860M-parameter UNet) with random weights, offline: for speed and memory benchmarks."""
    return _random_components(_SD15, seed, scheduler)


_SD15_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "set_alpha_to_one": False,
}


def make_scheduler(name: str = "pndm"):
    """A scheduler with SD v1.5's (and SDXL's) published noise schedule: "pndm" (SD v1.5's default), "euler"
    (SDXL's default), "ddim" or "dpm++". Its tensors are on the CPU, also inside `with torch.device("meta")`
    (components built on the meta device, bench/step_flops.py)."""
    with torch.device("cpu"):
        return _make_scheduler(name)


def _make_scheduler(name: str):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, PNDMScheduler

    if name == "euler":
        cfg = {k: v for k, v in _SD15_SCHEDULER.items() if k != "set_alpha_to_one"}
        return EulerDiscreteScheduler(timestep_spacing="leading", interpolation_type="linear", **cfg)
    if name == "pndm":
        return PNDMScheduler(skip_prk_steps=True, **_SD15_SCHEDULER)
    if name == "ddim":
        return DDIMScheduler(clip_sample=False, **_SD15_SCHEDULER)
    if name in ("dpm++", "dpmsolver++"):
        cfg = {k: v for k, v in _SD15_SCHEDULER.items() if k != "set_alpha_to_one"}
        return DPMSolverMultistepScheduler(solver_order=2, algorithm_type="dpmsolver++", **cfg)
    raise ValueError(f"unknown scheduler {name!r}; expected 'pndm', 'euler', 'ddim' or 'dpm++'")


def _ready(pipe, torch_dtype: torch.dtype | None):
    """A fixture pipeline cast to `torch_dtype` (fp32 stays) with its progress bars off."""
    if torch_dtype is not None and torch_dtype != torch.float32:
        pipe = pipe.to(dtype=torch_dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_pipeline(seed: int = 0, scheduler: str = "pndm", torch_dtype: torch.dtype | None = None):
    """A `StableDiffusionSCFGPipeline` over `tiny_components(seed)`."""
    from .pipeline import StableDiffusionSCFGPipeline

    return _ready(StableDiffusionSCFGPipeline(**tiny_components(seed, scheduler)), torch_dtype)


# SDXL: three levels, cross-attention at latent/2 (2 blocks per module) and latent/4 (10), two CLIP encoders whose
# hidden states are concatenated per token (cross_attention_dim = their sum), pooled text + size conditioning.
_SDXL_UNET_LAYOUT = dict(
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    use_linear_projection=True,
    addition_embed_type="text_time",
)
_TINY_XL = (
    dict(sample_size=16, block_out_channels=(16, 32, 64), attention_head_dim=(2, 4, 8), cross_attention_dim=64,
         addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8, norm_num_groups=8),
    _TINY[1],
    dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, layer_norm_eps=1e-5),
    dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, layer_norm_eps=1e-5,
         projection_dim=32),
)  # fmt: skip
# The published SDXL base 1.0 configs (unet, vae, CLIP ViT-L, OpenCLIP bigG): random weights time like real ones.
_SDXL = (
    dict(sample_size=128, block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20),
         cross_attention_dim=2048, addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
         norm_num_groups=32),
    dict(block_out_channels=(128, 256, 512, 512), norm_num_groups=32, layers_per_block=2, sample_size=1024,
         scaling_factor=0.13025, force_upcast=True),
    _SD15[2],
    dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32, hidden_act="gelu",
         projection_dim=1280),
)  # fmt: skip


def _random_xl_components(sizes: tuple[dict, dict, dict, dict], seed: int, scheduler: str) -> dict[str, Any]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    unet_cfg, vae_cfg, text_cfg, text2_cfg = sizes
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**_SDXL_UNET_LAYOUT, **unet_cfg)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**_VAE_LAYOUT, **vae_cfg)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**_TEXT_LAYOUT, **text_cfg))
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**{**_TEXT_LAYOUT, "pad_token_id": 0}, **text2_cfg))
    return {
        "unet": unet.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "text_encoder_2": text_encoder_2.eval(),
        "tokenizer": clip_tokenizer(),
        "tokenizer_2": clip_tokenizer(pad_token="!"),
        "scheduler": make_scheduler(scheduler),
        "image_encoder": None,
        "feature_extractor": None,
        "add_watermarker": False,
    }


def tiny_xl_components(seed: int = 0, scheduler: str = "euler") -> dict[str, Any]:
    """Tiny random `StableDiffusionXLPipeline` components with SDXL's block structure (1/2/10 transformer blocks)."""
    return _random_xl_components(_TINY_XL, seed, scheduler)


def sdxl_random_components(seed: int = 0, scheduler: str = "euler") -> dict[str, Any]:
    """SDXL base 1.0's architecture (2.6B-parameter UNet) with random weights, offline: for benchmarks."""
    return _random_xl_components(_SDXL, seed, scheduler)


def tiny_xl_pipeline(seed: int = 0, scheduler: str = "euler", torch_dtype: torch.dtype | None = None):
    """A `StableDiffusionXLSCFGPipeline` over `tiny_xl_components(seed)`."""
    from .pipeline_sdxl import StableDiffusionXLSCFGPipeline

    return _ready(StableDiffusionXLSCFGPipeline(**tiny_xl_components(seed, scheduler)), torch_dtype)


# diffusers' StableDiffusionPipeline fast-test UNet (tests/pipelines/stable_diffusion/test_stable_diffusion.py)
DIFFUSERS_TEST_UNET = dict(  # 2 levels, cross-attention only at latent/2
    block_out_channels=(32, 64),
    layers_per_block=2,
    sample_size=32,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32,
    norm_num_groups=2,
)


# ----------------------------------------------------------------------------------------------- PixArt-Sigma
_T5_SPECIALS = ["<pad>", "</s>", "<unk>"]  # T5's ids 0, 1, 2


@lru_cache(maxsize=1)
def _t5_unigram_vocab() -> tuple[tuple[str, float], ...]:
    """The offline T5 tokenizer's SentencePiece Unigram vocabulary (1000 pieces with `▁`, log-probabilities; T5's
    special pieces first), shipped in the package (goca_scfg/data/README.md). It was trained once on the first 3000
    COCO-30k captions (tests/test_tokens_t5.py retrains it and checks the pieces): the trainer's scores and order of
    near-tied pieces vary from run to run, so the fixture loads a fixed copy and every process gets the same ids."""
    from importlib.resources import files

    vocab = json.loads((files(__package__) / "data" / "t5_unigram_vocab.json").read_text(encoding="utf-8"))
    if [p for p, _ in vocab[:3]] != _T5_SPECIALS:
        raise RuntimeError("the shipped Unigram vocabulary does not start with T5's special pieces")
    return tuple((p, float(score)) for p, score in vocab)


def t5_tokenizer():
    """transformers' `T5Tokenizer` (Unigram, `▁` metaspace, `</s>` appended, `<pad>` = 0) over a small SentencePiece
    Unigram vocabulary trained on COCO captions: T5's behaviour with a 1000-piece vocabulary, offline.
    No sentinel (`<extra_id_*>`) tokens."""
    from transformers import T5Tokenizer

    return T5Tokenizer(vocab=list(_t5_unigram_vocab()), extra_ids=0)


# Tiny: PixArt-Sigma's 28 blocks (the authors' layers 10–17 exist) at minimal width; 256 px (binning bins exist).
_TINY_PIXART = (
    dict(num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16, caption_channels=16, sample_size=32),
    dict(block_out_channels=(8, 8, 8, 8), norm_num_groups=4, layers_per_block=1, sample_size=256),
    dict(d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2),
)  # fmt: skip
# PixArt-Sigma-XL-2 (1152 wide, 28 blocks, 4096-d captions) and SDXL's VAE; a one-layer 4096-d T5 (the text
# encoder runs once per call, the transformer's cost is what the benchmarks time).
_PIXART_SIGMA = (
    dict(num_attention_heads=16, attention_head_dim=72, cross_attention_dim=1152, caption_channels=4096),
    dict(block_out_channels=(128, 256, 512, 512), norm_num_groups=32, layers_per_block=2, sample_size=1024,
         scaling_factor=0.13025),
    dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=1, num_heads=64),
)  # fmt: skip
# PixArt-Sigma's published scheduler: DPM-Solver++ 2M over the linear β schedule 1e-4 … 0.02.
_PIXART_SCHEDULER = dict(
    beta_start=0.0001, beta_end=0.02, beta_schedule="linear", num_train_timesteps=1000, solver_order=2,
    algorithm_type="dpmsolver++", prediction_type="epsilon", lower_order_final=True,
)  # fmt: skip


def _pixart_components(sizes: tuple[dict, dict, dict], seed: int, sample_size: int | None = None) -> dict[str, Any]:
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    transformer_cfg, vae_cfg, text_cfg = sizes
    if sample_size is not None:
        transformer_cfg = {**transformer_cfg, "sample_size": sample_size}
    tokenizer = t5_tokenizer()
    with torch.device("cpu"):  # as `make_scheduler`: usable also when built on the meta device
        scheduler = DPMSolverMultistepScheduler(**_PIXART_SCHEDULER)
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(in_channels=4, out_channels=8, num_layers=28, **transformer_cfg)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**_VAE_LAYOUT, **vae_cfg)
    torch.manual_seed(seed + 2)
    text_config = T5Config(
        vocab_size=len(tokenizer), feed_forward_proj="gated-gelu", is_encoder_decoder=False, **text_cfg
    )
    return {
        "tokenizer": tokenizer,
        "text_encoder": T5EncoderModel(text_config).eval(),
        "vae": vae.eval(),
        "transformer": transformer.eval(),
        "scheduler": scheduler,
    }


def tiny_pixart_components(seed: int = 0) -> dict[str, Any]:
    """Tiny random `PixArtSigmaPipeline` components (28 blocks, 2 heads of 8, T5 of width 16, 256 px), seeded."""
    return _pixart_components(_TINY_PIXART, seed)


def pixart_sigma_random_components(seed: int = 0, size: int = 512) -> dict[str, Any]:
    """PixArt-Sigma-XL-2's transformer (`size` 512 or 1024 px) and SDXL's VAE with random weights, offline, for
    speed and memory benchmarks (the text encoder is one T5 layer of the real width)."""
    return _pixart_components(_PIXART_SIGMA, seed, sample_size=size // 8)


def tiny_pixart_pipeline(seed: int = 0, scheduler: str = "default", torch_dtype: torch.dtype | None = None):
    """A `PixArtSigmaSCFGPipeline` over `tiny_pixart_components(seed)`; `scheduler` as `loading.swap_scheduler`."""
    from .pipeline_pixart import PixArtSigmaSCFGPipeline

    pipe = PixArtSigmaSCFGPipeline(**tiny_pixart_components(seed))
    swap_scheduler(pipe, scheduler)
    return _ready(pipe, torch_dtype)


# ------------------------------------------------------------------------------------------ SD3 / SD3.5 and Flux
# MMDiTs: text tokens (CLIP's 77, then T5's) and image patches attend jointly; the latents have 16 channels and a
# VAE without quant convs whose `shift_factor`/`scaling_factor` differ between SD3 and Flux.
_MMDIT_VAE_LAYOUT = dict(
    _VAE_LAYOUT, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True
)
_SD3_VAE_SCALING = dict(shift_factor=0.0609, scaling_factor=1.5305)
_FLUX_VAE_SCALING = dict(shift_factor=0.1159, scaling_factor=0.3611)
# Published SD3 / SD3.5 / FLUX.1 vae config (16 latent channels, 4 levels: 8x down), random weights.
_MMDIT_VAE = dict(block_out_channels=(128, 256, 512, 512), norm_num_groups=32, layers_per_block=2, force_upcast=True)
# Tiny: 4 levels too (vae_scale_factor 8), so 64 px is an 8x8 latent: 4x4 patches of 2 (SD3), 4x4 packed tokens (Flux).
_TINY_MMDIT_VAE = dict(block_out_channels=(8, 8, 8, 8), norm_num_groups=4, layers_per_block=1)
_T5_LAYOUT = dict(feed_forward_proj="gated-gelu", is_encoder_decoder=False)  # T5 v1.1 (T5-XXL's architecture)
_TINY_T5 = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
_T5_XXL_1_LAYER = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=1, num_heads=64)  # T5-XXL's width, one layer
# CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 text towers at their real width, one layer each.
_CLIP_L_1_LAYER = dict(_SD15[2], num_hidden_layers=1, projection_dim=768)
_CLIP_G_1_LAYER = dict(_SDXL[3], num_hidden_layers=1)

# Tiny SD3: the SD3 transformer at minimal width. The CLIP towers are 16 wide so that their per-token hidden states,
# concatenated (16 + 16), fit `joint_attention_dim` (32) as SD3's (768 + 1280, zero-padded to 4096) do: the stock
# pipeline pads the concatenation to T5's width with `F.pad`, and a wider one (32 + 32) would be silently cut to
# its first 32 features, i.e. the second encoder's tokens dropped. Pooled: 32 + 32 = `pooled_projection_dim` 64.
_TINY_SD3_TRANSFORMER = dict(
    sample_size=32, patch_size=2, in_channels=16, num_layers=4, attention_head_dim=8, num_attention_heads=4,
    joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=64, out_channels=16,
)  # fmt: skip
_TINY_SD3_CLIP = dict(
    hidden_size=16, intermediate_size=37, num_attention_heads=2, num_hidden_layers=2, layer_norm_eps=1e-5,
    projection_dim=32,
)  # fmt: skip
# Published SD3.5-medium transformer config (stabilityai/stable-diffusion-3.5-medium, transformer/config.json):
# MMDiT-X, 24 blocks of 24 heads x 64 (1536 wide), self-attention added to the image stream in blocks 0-12.
_SD35_MEDIUM_TRANSFORMER = dict(
    patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
    qk_norm="rms_norm", dual_attention_layers=tuple(range(13)),
)  # fmt: skip
# SD3's published scheduler (SD3-medium and SD3.5): rectified flow, Euler, static shift 3.
_SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)

# Tiny Flux: 2 double-stream + 4 single-stream blocks, 2 heads of 16 (rope axes 4 + 4 + 8 = 16).
_TINY_FLUX_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8),
)  # fmt: skip
_TINY_FLUX_CLIP = dict(
    hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, layer_norm_eps=1e-5
)
# Published FLUX.1-dev transformer config (black-forest-labs/FLUX.1-dev, transformer/config.json): 19 double-stream
# and 38 single-stream blocks, 24 heads x 128 (3072 wide), 2x2-packed 16-channel latents (64 in), guidance-distilled.
_FLUX_DEV_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, axes_dims_rope=(16, 56, 56), guidance_embeds=True,
)  # fmt: skip
# FLUX.1's published scheduler: rectified flow, Euler, shift interpolated in the image's token count
# (0.5 at 256 tokens, 1.15 at 4096; the pipeline computes `mu`).
_FLUX_SCHEDULER = dict(
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
    base_image_seq_len=256, max_image_seq_len=4096,
)  # fmt: skip


def _flow_scheduler(config: dict):
    from diffusers import FlowMatchEulerDiscreteScheduler

    with torch.device("cpu"):  # as `make_scheduler`: usable also when built on the meta device
        return FlowMatchEulerDiscreteScheduler(**config)


class _building:  # lower case: used as `with _building(dtype, device):`
    """Build modules directly in `dtype` on `device` (torch's default dtype and device for the block, restored
    after): no fp32 copy is materialised first; the meta device gives shapes without memory."""

    def __init__(self, dtype: torch.dtype | None, device: str | torch.device | None):
        self.dtype, self.device = dtype, torch.device(device) if device is not None else None

    def __enter__(self):
        self.old_dtype = torch.get_default_dtype()
        if self.dtype is not None:
            torch.set_default_dtype(self.dtype)
        if self.device is not None:
            self.device.__enter__()

    def __exit__(self, *exc):
        if self.device is not None:
            self.device.__exit__(*exc)
        torch.set_default_dtype(self.old_dtype)


def _sd3_components(
    sizes: tuple[dict, dict, dict, dict, dict],
    seed: int,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    transformer_cfg, vae_cfg, clip_cfg, clip2_cfg, t5_cfg = sizes
    tokenizer_3 = t5_tokenizer()
    scheduler = _flow_scheduler(_SD3_SCHEDULER)
    with _building(dtype, device):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(**transformer_cfg)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**_MMDIT_VAE_LAYOUT, **_SD3_VAE_SCALING, **vae_cfg)
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**_TEXT_LAYOUT, **clip_cfg))
        torch.manual_seed(seed + 3)
        text_encoder_2 = CLIPTextModelWithProjection(
            CLIPTextConfig(**{**_TEXT_LAYOUT, "pad_token_id": 0}, **clip2_cfg)
        )
        torch.manual_seed(seed + 4)
        text_encoder_3 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_3), **_T5_LAYOUT, **t5_cfg))
    return {
        "transformer": transformer.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "text_encoder_2": text_encoder_2.eval(),
        "text_encoder_3": text_encoder_3.eval(),
        "tokenizer": clip_tokenizer(),
        "tokenizer_2": clip_tokenizer(pad_token="!"),  # SD3's CLIP-G tokenizer pads with "!" (id 0), as SDXL's
        "tokenizer_3": tokenizer_3,
        "scheduler": scheduler,
        "image_encoder": None,
        "feature_extractor": None,
    }


def tiny_sd3_components(seed: int = 0) -> dict[str, Any]:
    """Tiny random `StableDiffusion3Pipeline` components, seeded: an `SD3Transformer2DModel` (4 joint blocks,
    4 heads of 8, patch 2, `joint_attention_dim` 32, `pooled_projection_dim` 64), two `CLIPTextModelWithProjection`
    (hidden 16, projection 32; CLIP-L's and CLIP-G's padding), a T5 encoder (d_model 32, 2 layers) over
    `t5_tokenizer()`, a 16-channel VAE with 4 levels (vae_scale_factor 8; SD3's shift 0.0609 / scale 1.5305) and
    SD3's `FlowMatchEulerDiscreteScheduler` (shift 3). 64 px images: 8x8 latents, 16 image tokens;
    the text sequence is 77 CLIP + `max_sequence_length` (256 by default) T5 tokens."""
    return _sd3_components(
        (_TINY_SD3_TRANSFORMER, dict(_TINY_MMDIT_VAE, sample_size=64), _TINY_SD3_CLIP, _TINY_SD3_CLIP, _TINY_T5), seed
    )


def sd35_medium_random_components(
    seed: int = 0, size: int = 1024, dtype: torch.dtype = torch.bfloat16, device: str | torch.device | None = None
) -> dict[str, Any]:
    """Stable Diffusion 3.5 Medium's architecture with random weights, offline, for speed and memory benchmarks;
    built directly in `dtype` on `device` (`"meta"` for shapes only; None: torch's current default device, the CPU
    unless called inside `with torch.device(...)`, whose device it then keeps).

    Transformer: the published config (transformer/config.json of stabilityai/stable-diffusion-3.5-medium, cited
    from memory): `SD3Transformer2DModel(patch_size=2, in_channels=16, out_channels=16, num_layers=24,
    num_attention_heads=24, attention_head_dim=64, joint_attention_dim=4096, caption_projection_dim=1536,
    pooled_projection_dim=2048, pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=(0, ..., 12))`,
    about 2.24B parameters; `sample_size` is `size // 8` (published: 128, i.e. 1024 px), which sets the
    pipeline's default resolution. VAE: SD3's published 16-channel config (128/256/512/512, no quant convs,
    shift 0.0609, scale 1.5305). Text encoders: CLIP ViT-L/14 (768, projection 768), OpenCLIP bigG/14 (1280,
    projection 1280) and T5-XXL (d_model 4096, 64 heads, d_ff 10240) at their real widths but with ONE layer each
    (they run once per call; the transformer's cost is what the benchmarks time), T5's vocabulary that of the
    offline `t5_tokenizer()` (1000 pieces, not 32128). Scheduler: flow-matching Euler, shift 3."""
    transformer = dict(_SD35_MEDIUM_TRANSFORMER, sample_size=size // 8)
    vae = dict(_MMDIT_VAE, sample_size=size)
    return _sd3_components((transformer, vae, _CLIP_L_1_LAYER, _CLIP_G_1_LAYER, _T5_XXL_1_LAYER), seed, dtype, device)


def tiny_sd3_pipeline(seed: int = 0, scheduler: str = "default", torch_dtype: torch.dtype | None = None):
    """A `StableDiffusion3SCFGPipeline` over `tiny_sd3_components(seed)`; `scheduler` as `loading.swap_scheduler`
    ("default", flow-matching Euler, is the only one the model is trained for)."""
    from .pipeline_sd3 import StableDiffusion3SCFGPipeline

    pipe = StableDiffusion3SCFGPipeline(**tiny_sd3_components(seed))
    swap_scheduler(pipe, scheduler)
    return _ready(pipe, torch_dtype)


def _flux_components(
    sizes: tuple[dict, dict, dict, dict],
    seed: int,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    transformer_cfg, vae_cfg, clip_cfg, t5_cfg = sizes
    tokenizer_2 = t5_tokenizer()
    scheduler = _flow_scheduler(_FLUX_SCHEDULER)
    with _building(dtype, device):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(**transformer_cfg)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**_MMDIT_VAE_LAYOUT, **_FLUX_VAE_SCALING, **vae_cfg)
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(CLIPTextConfig(**_TEXT_LAYOUT, **clip_cfg))
        torch.manual_seed(seed + 3)
        text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), **_T5_LAYOUT, **t5_cfg))
    return {
        "transformer": transformer.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "text_encoder_2": text_encoder_2.eval(),
        "tokenizer": clip_tokenizer(),
        "tokenizer_2": tokenizer_2,
        "scheduler": scheduler,
        "image_encoder": None,
        "feature_extractor": None,
    }


def tiny_flux_components(seed: int = 0, guidance_embeds: bool = False) -> dict[str, Any]:
    """Tiny random `FluxPipeline` components, seeded: a `FluxTransformer2DModel` (2 double-stream + 4 single-stream
    blocks, 2 heads of 16, rope axes (4, 4, 8), `joint_attention_dim` 32, `pooled_projection_dim` 32; with
    `guidance_embeds=True` a guidance-distilled one, as FLUX.1-dev), a `CLIPTextModel` (hidden 32; its pooled
    output conditions), a T5 encoder (d_model 32, 2 layers) over `t5_tokenizer()` as `tokenizer_2`, a 16-channel
    VAE with 4 levels (vae_scale_factor 8; Flux's shift 0.1159 / scale 0.3611) and Flux's dynamically shifted
    `FlowMatchEulerDiscreteScheduler`. 64 px images: 8x8 latents packed 2x2, 16 image tokens; the text sequence
    is `max_sequence_length` (512 by default) T5 tokens (CLIP gives only the pooled vector)."""
    transformer = dict(_TINY_FLUX_TRANSFORMER, guidance_embeds=guidance_embeds)
    return _flux_components((transformer, dict(_TINY_MMDIT_VAE, sample_size=64), _TINY_FLUX_CLIP, _TINY_T5), seed)


def flux_dev_random_components(
    seed: int = 0, size: int = 1024, dtype: torch.dtype = torch.bfloat16, device: str | torch.device | None = None
) -> dict[str, Any]:
    """FLUX.1-dev's architecture with random weights, offline, for speed and memory benchmarks; built directly in
    `dtype` on `device` (`"meta"` for shapes only; None: torch's current default device, the CPU unless called
    inside `with torch.device(...)`, whose device it then keeps).

    Transformer: the published config (transformer/config.json of black-forest-labs/FLUX.1-dev, cited from
    memory): `FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
    num_attention_heads=24, attention_head_dim=128, joint_attention_dim=4096, pooled_projection_dim=768,
    axes_dims_rope=(16, 56, 56), guidance_embeds=True)`, about 11.9B parameters. VAE: FLUX.1's published
    16-channel config (128/256/512/512, no quant convs, shift 0.1159, scale 0.3611; `sample_size` = `size`).
    Text encoders: CLIP ViT-L/14 (768; pooled output) and T5-XXL (d_model 4096, 64 heads, d_ff 10240) at their
    real widths but with ONE layer each, T5's vocabulary that of the offline `t5_tokenizer()` (1000 pieces).
    Scheduler: flow-matching Euler with FLUX.1's dynamic shift (0.5 at 256 image tokens, 1.15 at 4096).
    `FluxPipeline` has no sample-size config (its default is 1024 px whatever `size` is): pass height/width."""
    vae = dict(_MMDIT_VAE, sample_size=size)
    return _flux_components((_FLUX_DEV_TRANSFORMER, vae, _CLIP_L_1_LAYER, _T5_XXL_1_LAYER), seed, dtype, device)


def tiny_flux_pipeline(
    seed: int = 0, scheduler: str = "default", torch_dtype: torch.dtype | None = None, guidance_embeds: bool = False
):
    """A `FluxSCFGPipeline` over `tiny_flux_components(seed, guidance_embeds)`; `scheduler` as
    `loading.swap_scheduler` ("default", Flux's flow-matching Euler, is the only one the model is trained for)."""
    from .pipeline_flux import FluxSCFGPipeline

    pipe = FluxSCFGPipeline(**tiny_flux_components(seed, guidance_embeds))
    swap_scheduler(pipe, scheduler)
    return _ready(pipe, torch_dtype)
