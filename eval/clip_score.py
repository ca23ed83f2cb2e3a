"""CLIP score as features → per-pair cosine → ×100 (algorithm.md §3.4), with a thin open_clip wrapper for the features.

The paper's numbers (≈ 30–31.6) are 100 × the mean cosine similarity of ViT-B/32 image and caption embeddings, with
no clipping at 0 and no 2.5 factor (unlike Hessel et al.'s CLIPScore). torchmetrics' `CLIPScore` is not used: it is
broken with transformers 5.
"""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .images import image_batches

logger = logging.getLogger(__name__)

CLIP_SCALE = 100.0  # the paper's scale (algorithm.md §3.4)


@dataclass(frozen=True)
class CLIPSpec:
    """Which CLIP: an open_clip architecture and a pretrained tag, optionally loaded from a local weights file.

    `pretrained=None` builds random weights, seeded with 0 (tests and smoke runs; the scores mean nothing).
    `weights` is a local file with the tag's weights (offline use); the tag still decides QuickGELU (OpenAI weights
    need it).
    """

    model: str = "ViT-B-32"
    pretrained: str | None = "openai"
    weights: str | None = None

    @property
    def name(self) -> str:
        """`model/pretrained`, recorded next to every score."""
        return f"{self.model}/{self.pretrained or 'random'}"


@dataclass(frozen=True, eq=False)
class LoadedCLIP:
    """An open_clip model in eval mode with its validation transform and tokenizer."""

    spec: CLIPSpec
    model: Any
    preprocess: Any
    tokenizer: Any


def _quick_gelu(spec: CLIPSpec) -> bool:
    """Whether the pretrained tag was trained with QuickGELU (open_clip does not force it for a tag or a file)."""
    import open_clip

    if spec.pretrained is None:
        return False
    return bool(open_clip.get_pretrained_cfg(spec.model, spec.pretrained).get("quick_gelu", False))


_OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_NO_WEIGHTS_HINT = "pass --clip-weights FILE (the tag's weights file), or --clip-pretrained none for a smoke test"


def _hub_cache() -> Path:
    """The Hugging Face hub cache folder, read from the environment at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"


def cached_clip_weights(spec: CLIPSpec) -> tuple[Path | None, str]:
    """(cached weights file or None, where they are looked for) for a pretrained tag of open_clip."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(spec.model, spec.pretrained)
    if not cfg:
        raise ValueError(f"open_clip has no pretrained tag {spec.pretrained!r} for {spec.model}")
    if cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache

        repo = cfg["hf_hub"].strip("/")
        cache = _hub_cache()
        for name in _OPEN_CLIP_FILES:
            found = try_to_load_from_cache(repo, name, cache_dir=cache)
            if isinstance(found, str):
                return Path(found), str(cache / f"models--{repo.replace('/', '--')}")
        return None, str(cache / f"models--{repo.replace('/', '--')}")
    path = Path.home() / ".cache" / "clip" / os.path.basename(cfg["url"])  # open_clip's download folder for URLs
    return (path if path.is_file() else None), str(path)


def load_clip(
    spec: CLIPSpec = CLIPSpec(), device: str | torch.device = "cpu", allow_download: bool = True
) -> LoadedCLIP:
    """Build the open_clip model for `spec` (from `spec.weights` when given, else open_clip's cache or download).

    open_clip caches tagged weights in the Hugging Face cache (`$HF_HOME/hub`, repo
    `timm/vit_base_patch32_clip_224.openai` for ViT-B-32/openai); with `HF_HUB_OFFLINE=1` a pre-filled cache works.
    Weights that are neither given nor cached, with `allow_download=False` or a failed download, raise one
    FileNotFoundError naming the file or cache looked in and the options to pass.
    """
    import open_clip

    if spec.weights is not None and not os.path.isfile(spec.weights):
        raise FileNotFoundError(f"CLIP weights not found: {spec.weights}")
    source = spec.weights if spec.weights is not None else spec.pretrained
    if spec.weights is None and spec.pretrained is not None:
        cached, where = cached_clip_weights(spec)
        if cached is None and not allow_download:
            raise FileNotFoundError(
                f"CLIP weights {spec.name} are not in {where} and downloading is off (--no-download or "
                f"HF_HUB_OFFLINE=1); {_NO_WEIGHTS_HINT}"
            )
    with torch.random.fork_rng(devices=[]):  # random weights (pretrained=None) are seeded, the global RNG untouched
        torch.manual_seed(0)
        muted = logging.root.manager.disable
        logging.disable(logging.ERROR)  # open_clip logs a failed download before raising; it is reported once below
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                spec.model, pretrained=source, force_quick_gelu=_quick_gelu(spec), device=device
            )
        except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
            # open_clip's failed download, or a weights file that is damaged or holds other weights
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            where = f" from {spec.weights}" if spec.weights is not None else ""
            raise FileNotFoundError(
                f"CLIP weights {spec.name} could not be loaded{where} ({first}); {_NO_WEIGHTS_HINT}"
            ) from None
        finally:
            logging.disable(muted)
    model.eval()
    return LoadedCLIP(spec, model, preprocess, open_clip.get_tokenizer(spec.model))


def clip_scores_from_features(image_features: Tensor, text_features: Tensor) -> Tensor:
    """100 · cos(image_i, text_i) for each row pair (algorithm.md §3.4). (N, D), (N, D) → (N,), computed in fp32."""
    if image_features.shape != text_features.shape or image_features.ndim != 2:
        raise ValueError(f"need matching (N, D) features, got {image_features.shape} and {text_features.shape}")
    image = torch.nn.functional.normalize(image_features.float(), dim=-1)
    text = torch.nn.functional.normalize(text_features.float(), dim=-1)
    return CLIP_SCALE * (image * text).sum(dim=-1)


@torch.no_grad()
def image_embeddings(
    clip: LoadedCLIP,
    images: Sequence[str | Path],
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    progress: bool = False,
) -> np.ndarray:
    """(N, D) float64 image embeddings (`encode_image`, not normalised) of image files, through the model's own
    validation transform, in batches of `batch_size`. CLIP score and CMMD read these rows."""
    if not images:
        raise ValueError("no images to embed")
    batches = image_batches(images, clip.preprocess, batch_size, num_workers, "CLIP images", progress)
    rows = [clip.model.encode_image(pixels.to(device)).detach().to("cpu", torch.float64).numpy() for pixels in batches]
    return np.concatenate(rows)


@torch.no_grad()
def text_embeddings(
    clip: LoadedCLIP, captions: Sequence[str], batch_size: int = 64, device: str | torch.device = "cpu"
) -> np.ndarray:
    """(N, D) float64 caption embeddings (`encode_text`, not normalised), in batches of `batch_size`."""
    rows = []
    for start in range(0, len(captions), batch_size):
        tokens = clip.tokenizer(list(captions[start : start + batch_size])).to(device)
        rows.append(clip.model.encode_text(tokens).detach().to("cpu", torch.float64).numpy())
    return np.concatenate(rows)


def clip_scores(
    clip: LoadedCLIP,
    images: Sequence[str | Path],
    captions: Sequence[str],
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    progress: bool = False,
) -> np.ndarray:
    """Per-image CLIP scores (100 · cosine) of image files against their captions, in batches. Returns (N,)."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    image = image_embeddings(clip, images, batch_size, device, num_workers, progress)
    text = text_embeddings(clip, captions, batch_size, device)
    return scores_from_embeddings(image, text)


def scores_from_embeddings(image: np.ndarray, text: np.ndarray) -> np.ndarray:
    """`clip_scores_from_features` on float64 rows that hold fp32 embeddings (exactly as the model returned them)."""
    features = (torch.from_numpy(np.asarray(image)).float(), torch.from_numpy(np.asarray(text)).float())
    return clip_scores_from_features(*features).double().numpy()
