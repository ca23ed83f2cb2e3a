"""Offline fixtures: tiny seeded diffusers components and a real CLIP tokenizer built from open_clip's vocab.

Used by the tests, the benchmarks and `loading.TINY_MODELS` (the CLI's and the sweep's `--model tiny-random`); no
library module imports it at import time.
The tiny UNet has four resolution levels and two transformer blocks per down level (three per up level), so every
layer name of SD v1.5 exists and attention maps exist at latent/1, /2, /4 and /8.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from functools import lru_cache
from typing import Any

import torch

from .loading import SD15_MODEL_ID, load_pipeline, native_size, swap_scheduler  # noqa: F401 (moved; kept until eval/ imports them from loading)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-to-unicode table (the one both open_clip and transformers use)."""
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


@lru_cache(maxsize=1)
def _clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    import open_clip

    path = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    units = list(_bytes_to_unicode().values())
    vocab = units + [u + "</w>" for u in units] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def clip_tokenizer():
    """transformers `CLIPTokenizer` with SD v1.5's ids (49406 = `<|startoftext|>`, 49407 = EOS = pad), offline."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab_and_merges()
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt")
        with open(vocab_file, "w", encoding="utf-8") as f:
            json.dump(vocab, f)
        with open(merges_file, "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizer(vocab_file, merges_file, model_max_length=77, pad_token="<|endoftext|>")


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
    """A scheduler with SD v1.5's published noise schedule: "pndm" (the model default), "ddim" or "dpm++"."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler

    if name == "pndm":
        return PNDMScheduler(skip_prk_steps=True, **_SD15_SCHEDULER)
    if name == "ddim":
        return DDIMScheduler(clip_sample=False, **_SD15_SCHEDULER)
    if name in ("dpm++", "dpmsolver++"):
        cfg = {k: v for k, v in _SD15_SCHEDULER.items() if k != "set_alpha_to_one"}
        return DPMSolverMultistepScheduler(solver_order=2, algorithm_type="dpmsolver++", **cfg)
    raise ValueError(f"unknown scheduler {name!r}; expected 'pndm', 'ddim' or 'dpm++'")


def tiny_pipeline(seed: int = 0, scheduler: str = "pndm", torch_dtype: torch.dtype | None = None):
    """A `StableDiffusionSCFGPipeline` over `tiny_components(seed)`."""
    from .pipeline import StableDiffusionSCFGPipeline

    pipe = StableDiffusionSCFGPipeline(**tiny_components(seed, scheduler))
    if torch_dtype is not None and torch_dtype != torch.float32:
        pipe = pipe.to(dtype=torch_dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe
