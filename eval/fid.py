"""FID as features → statistics → value (algorithm.md §3.3), with thin clean-fid wrappers for resizing and networks.

Two named preprocessing protocols: `clean` (clean-fid's default: PIL bicubic on float channels, torchscript
Inception) and `t2ib` (T2IBenchmark, as the paper: centre crop, PIL bicubic on uint8, pytorch-fid Inception).
Reference statistics are saved with their protocol and extractor and refuse to be compared across protocols.
Inception weights never download silently when offline: see `load_inception`.
"""

from __future__ import annotations

import io as _stdio
import json
import logging
import os
import pickle
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from scipy import linalg
from torch import Tensor

from .images import image_batches
from .io import atomic_write_bytes

logger = logging.getLogger(__name__)

FIDMode = Literal["clean", "t2ib"]
FeatureExtractor = Callable[[Tensor], Tensor]
"""Maps a (B, 3, S, S) float batch with values in [0, 255] to (B, D) features."""

CLEAN_INCEPTION_FILE = "inception-2015-12-05.pt"  # clean-fid / StyleGAN2-ADA torchscript port
CLEAN_INCEPTION_URL = (
    "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/" + CLEAN_INCEPTION_FILE
)
CLEAN_INCEPTION_DEFAULT_DIR = "/tmp"  # hard-coded by clean-fid (`cleanfid.features.feature_extractor`)
PYTORCH_FID_FILE = "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid port, used by T2IBenchmark
PYTORCH_FID_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + PYTORCH_FID_FILE


@dataclass(frozen=True)
class FIDProtocol:
    """Image → network-input preprocessing (algorithm.md §3.3) and the Inception port that goes with it.

    `clean`: RGB → optional centre crop → per-channel float PIL bicubic to 299 (no quantisation) → values in [0, 255].
    `t2ib`: RGB → centre crop → PIL bicubic to 299 on uint8 (quantised) → values in [0, 255].
    Deviation: clean-fid itself never crops; `center_crop=True` (default) keeps non-square references (COCO photos)
    comparable with square generations. The choice is part of `tag`, hence of every cached statistics file name.
    """

    mode: FIDMode = "clean"
    center_crop: bool = True
    size: int = 299

    def __post_init__(self) -> None:
        if self.mode not in ("clean", "t2ib"):
            raise ValueError(f"FID mode {self.mode!r} is not one of ('clean', 't2ib')")
        if self.mode == "t2ib" and not self.center_crop:
            raise ValueError("the t2ib protocol always centre-crops (T2IBenchmark utils/resizers.py)")
        if self.size < 1:
            raise ValueError(f"size must be >= 1, got {self.size}")

    @property
    def quantize(self) -> bool:
        """Whether the resized image is rounded to uint8 before the network (T2IBenchmark: yes; clean-fid: no)."""
        return self.mode == "t2ib"

    @property
    def network(self) -> str:
        """Name of the Inception port this protocol uses."""
        return "inception-torchscript" if self.mode == "clean" else "inception-pytorch-fid"

    @property
    def tag(self) -> str:
        """Short protocol name for file names, e.g. `clean-ccrop-299`."""
        return f"{self.mode}-{'ccrop' if self.center_crop else 'nocrop'}-{self.size}"


@dataclass(frozen=True, eq=False)
class FeatureStats:
    """Mean (D,) and covariance (D, D) of `count` feature vectors, with the protocol and extractor that made them.

    `features` (N, D): the vectors themselves when kept (KID needs them); `images_digest`: digest of the exact image
    bytes they were computed from (`io.files_digest`), so that a cache knows what it scored.
    """

    mu: np.ndarray
    sigma: np.ndarray
    count: int
    protocol: str
    extractor: str
    features: np.ndarray | None = None
    images_digest: str | None = None

    def __post_init__(self) -> None:
        if self.mu.ndim != 1 or self.sigma.shape != (self.mu.size, self.mu.size):
            raise ValueError(f"need mu (D,) and sigma (D, D), got {self.mu.shape} and {self.sigma.shape}")


# ---------------------------------------------------------------- preprocessing


def center_crop(image: np.ndarray) -> np.ndarray:
    """Largest centred square of an (H, W, C) image; offsets rounded down (T2IBenchmark `crop_center`)."""
    height, width = image.shape[:2]
    size = min(height, width)
    top, left = (height - size) // 2, (width - size) // 2
    return image[top : top + size, left : left + size]


def preprocess(image: np.ndarray, protocol: FIDProtocol) -> np.ndarray:
    """(H, W, 3) uint8 RGB → (S, S, 3) float32 in [0, 255], per `protocol` (algorithm.md §3.3)."""
    from cleanfid.resize import make_resizer

    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {image.dtype} {image.shape}")
    if protocol.center_crop:
        image = center_crop(image)
    resize = make_resizer("PIL", protocol.quantize, "bicubic", (protocol.size, protocol.size))
    return np.asarray(resize(np.ascontiguousarray(image)), dtype=np.float32)


class InceptionInput:
    """RGB PIL image → (3, S, S) float tensor in [0, 255], per a protocol (`preprocess`); picklable for loaders."""

    def __init__(self, protocol: FIDProtocol) -> None:
        self.protocol = protocol

    def __call__(self, image: Any) -> Tensor:
        array = preprocess(np.asarray(image, dtype=np.uint8), self.protocol)
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()


# ---------------------------------------------------------------- features → statistics → value


@torch.no_grad()
def image_features(
    files: Sequence[str | Path],
    extractor: FeatureExtractor,
    protocol: FIDProtocol,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    progress: bool = False,
) -> np.ndarray:
    """(N, D) float64 features of image files: read → `preprocess` → `extractor`, in batches."""
    if not files:
        raise ValueError("no images to compute features for")
    batches = image_batches(files, InceptionInput(protocol), batch_size, num_workers, "FID features", progress)
    chunks = [extractor(batch.to(device)).detach().to("cpu", torch.float64).numpy() for batch in batches]
    features = np.concatenate(chunks)
    if features.ndim != 2 or features.shape[0] != len(files):
        raise ValueError(f"the extractor returned {features.shape} for {len(files)} images; expected (N, D)")
    return features


def feature_statistics(
    features: np.ndarray, protocol: str, extractor: str, keep: bool = False, images_digest: str | None = None
) -> FeatureStats:
    """Mean and `np.cov(rowvar=False)` of (N, D) features in float64 (as clean-fid and T2IBenchmark); `keep` stores
    the features too (for KID)."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need (N >= 2, D) features for a covariance, got {features.shape}")
    return FeatureStats(
        features.mean(axis=0),
        np.cov(features, rowvar=False),
        int(features.shape[0]),
        protocol,
        extractor,
        features if keep else None,
        images_digest,
    )


def frechet_distance(a: FeatureStats, b: FeatureStats, eps: float = 1e-6) -> float:
    """‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2(Σ_a Σ_b)^½), with scipy `sqrtm` (algorithm.md §3.3).

    As clean-fid and T2IBenchmark: a singular product gets `eps` on both diagonals (logged), and an imaginary part
    above 1e-3 on the diagonal raises. Statistics from different protocols or extractors are refused.
    Deviation: written here rather than calling `cleanfid.fid.frechet_distance`, which passes `sqrtm(disp=False)`,
    an argument SciPy 1.18 removes.
    """
    if (a.protocol, a.extractor) != (b.protocol, b.extractor):
        raise ValueError(
            f"statistics were made differently: {a.protocol}/{a.extractor} vs {b.protocol}/{b.extractor}; "
            "recompute the reference statistics with the same protocol and network"
        )
    if a.mu.shape != b.mu.shape:
        raise ValueError(f"feature dimensions differ: {a.mu.shape[0]} vs {b.mu.shape[0]}")
    for stats in (a, b):
        if not (np.isfinite(stats.mu).all() and np.isfinite(stats.sigma).all()):
            raise ValueError("Fréchet distance: statistics with NaN or inf values (features of a broken extractor?)")
    covmean = linalg.sqrtm(a.sigma @ b.sigma)
    if not np.isfinite(covmean).all():
        logger.warning("Fréchet distance: singular covariance product; adding %g to the diagonals", eps)
        offset = np.eye(a.mu.size) * eps
        covmean = linalg.sqrtm((a.sigma + offset) @ (b.sigma + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Fréchet distance: imaginary component {np.max(np.abs(covmean.imag)):.3g} in sqrtm")
        covmean = covmean.real
    diff = a.mu - b.mu
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * np.trace(covmean))


def kernel_distance(
    features: np.ndarray, reference: FeatureStats, subsets: int = 100, subset_size: int = 1000
) -> float:
    """KID: clean-fid's unbiased polynomial-kernel MMD² (`cleanfid.fid.kernel_distance`) between (N, D) features and
    the reference's kept features, averaged over `subsets` random subsets of min(N, N_ref, `subset_size`) vectors.

    clean-fid draws the subsets from NumPy's global RNG; it is seeded with 0 here (and restored after), so a number is
    reproducible. Unlike FID, KID is unbiased in N, so subsets of 1k–5k images give comparable values.
    """
    from cleanfid.fid import kernel_distance as _clean_kid

    if reference.features is None:
        raise ValueError("the reference statistics kept no features; recompute them with `ref-stats` for KID")
    if (features.shape[1],) != reference.mu.shape:
        raise ValueError(f"feature dimensions differ: {features.shape[1]} vs {reference.mu.shape[0]}")
    state = np.random.get_state()
    try:
        np.random.seed(0)
        return float(_clean_kid(np.asarray(features), reference.features, subsets, subset_size))
    finally:
        np.random.set_state(state)


def fid_from_features(features: np.ndarray, reference: FeatureStats) -> float:
    """FID of (N, D) features against reference statistics of the same protocol and extractor."""
    return frechet_distance(feature_statistics(features, reference.protocol, reference.extractor), reference)


# ---------------------------------------------------------------- cached reference statistics


def stats_file_name(name: str, protocol: FIDProtocol, extractor: str, count: int) -> str:
    """`{name}_{protocol tag}_{extractor}_n{count}.npz`: statistics named by how they were made."""
    if not name or any(c in name for c in "/\\_ "):
        raise ValueError(f"statistics name {name!r} must be non-empty without '/', '\\', '_' or spaces")
    return f"{name}_{protocol.tag}_{extractor}_n{count}.npz"


def save_stats(stats: FeatureStats, path: str | Path) -> None:
    """Write statistics with their provenance (and kept features, in float32 when that is lossless) to an `.npz`."""
    meta = {
        "count": stats.count,
        "protocol": stats.protocol,
        "extractor": stats.extractor,
        "images_digest": stats.images_digest,
    }
    arrays = {"mu": stats.mu, "sigma": stats.sigma, "meta": np.array(json.dumps(meta))}
    if stats.features is not None:
        single = stats.features.astype(np.float32)
        arrays["features"] = single if np.array_equal(single, stats.features) else stats.features
    buffer = _stdio.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def load_stats(path: str | Path, assume: tuple[str, str] | None = None) -> FeatureStats:
    """Read statistics written by `save_stats`.

    A foreign `.npz` with only `mu` and `sigma` (e.g. T2IBenchmark's `MS-COCO_val2014_fid_stats.npz`) loads only when
    `assume=(protocol tag, extractor)` states how it was made.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"reference statistics not found: {path}. Compute them once with "
            "`python -m eval.metrics ref-stats --images <COCO val2014 folder> ...`"
        )
    mu, sigma, meta, features = _read_stats_npz(path)
    if meta is None:
        if assume is None:
            raise ValueError(
                f"{path} does not record its protocol; pass assume=(protocol, extractor), e.g. "
                "('t2ib-ccrop-299', 'inception-pytorch-fid') for T2IBenchmark's COCO statistics"
            )
        meta = {"count": -1, "protocol": assume[0], "extractor": assume[1]}
    try:
        count, protocol, extractor = int(meta["count"]), str(meta["protocol"]), str(meta["extractor"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{path}: its 'meta' lacks count/protocol/extractor; not written by ref-stats") from None
    return FeatureStats(mu, sigma, count, protocol, extractor, features, meta.get("images_digest"))


_ZIP_MAGIC = b"PK\x03\x04"


def _read_stats_npz(path: Path) -> tuple[np.ndarray, np.ndarray, dict | None, np.ndarray | None]:
    """(mu, sigma, meta or None, features or None) of a statistics `.npz`, each checked: one ValueError naming the
    file for a file that is not an `.npz` (a text file, a `.npy`), a truncated or damaged one, missing arrays,
    shapes that do not fit, and NaN or inf values (which would make the Fréchet distance's sqrtm run for ever)."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head != _ZIP_MAGIC:
        raise ValueError(f"{path} is not an .npz file (reference statistics are written by `eval.metrics ref-stats`)")
    try:
        with np.load(path, allow_pickle=False) as data:
            if "mu" not in data or "sigma" not in data:
                raise ValueError(f"{path} has no 'mu'/'sigma' arrays; not FID statistics")
            mu, sigma = np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
            meta = json.loads(str(data["meta"])) if "meta" in data else None
            features = np.asarray(data["features"], np.float64) if "features" in data else None
    except (zipfile.BadZipFile, EOFError, OSError, KeyError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is damaged or truncated ({type(err).__name__}: {err})") from None
    except ValueError as err:  # numpy: an object array (needs pickle) or a malformed member
        raise ValueError(f"{path} cannot be read as statistics: {err}") from None
    if meta is not None and not isinstance(meta, dict):
        raise ValueError(f"{path}: its 'meta' record is not a JSON object")
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size) or mu.size == 0:
        raise ValueError(f"{path}: need mu (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}")
    if features is not None and (features.ndim != 2 or features.shape[1] != mu.size):
        raise ValueError(f"{path}: the kept features have shape {features.shape}, not (N, {mu.size})")
    for name, array in (("mu", mu), ("sigma", sigma), ("features", features)):
        if array is not None and not np.isfinite(array).all():
            raise ValueError(f"{path}: {name} holds NaN or inf values; recompute the statistics")
    return mu, sigma, meta, features


# ---------------------------------------------------------------- Inception weights (thin clean-fid wrappers)


@contextmanager
def _torch_hub_checkpoint(weights: Path, file_name: str):
    """Expose a local weights file as `torch.hub`'s cached `file_name` for the duration (hub dir restored after)."""
    previous = torch.hub.get_dir()
    with tempfile.TemporaryDirectory() as hub:
        os.makedirs(os.path.join(hub, "checkpoints"))
        os.symlink(weights.resolve(), os.path.join(hub, "checkpoints", file_name))
        torch.hub.set_dir(hub)
        try:
            yield
        finally:
            torch.hub.set_dir(previous)


def _check_weights(path: Path, url: str, allow_download: bool) -> bool:
    """True when `path` exists; otherwise raise (offline) or allow the library to download `url`."""
    if path.is_file():
        return True
    if not allow_download:
        raise FileNotFoundError(
            f"Inception weights not found at {path}. Download {url} on a machine with internet access and place it "
            "there (or pass its path), or allow downloading."
        )
    return False


@contextmanager
def _naming_damaged_weights(path: Path):
    """Turn torch's errors for a weights file that does not load (truncated, another file, other weights) into one
    ValueError naming the file and how to replace it."""
    try:
        yield
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"--inception {path}: the Inception weights do not load ({first}); the file is damaged or not the "
            "expected one: download it again (see the README, offline use)"
        ) from None


def load_inception(
    protocol: FIDProtocol,
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    allow_download: bool = False,
) -> FeatureExtractor:
    """The protocol's 2048-d Inception feature extractor, from local weights when given or cached.

    `clean`: clean-fid's torchscript model, file `inception-2015-12-05.pt`, looked up in clean-fid's cache `/tmp`
    unless `weights` names the file. `t2ib`: pytorch-fid's port (`cleanfid.inception_pytorch.InceptionV3`), file
    `pt_inception-2015-12-05-6726825d.pth`, from `weights` or torch.hub's cache (`$TORCH_HOME/hub/checkpoints`).
    """
    if protocol.mode == "clean":
        from cleanfid.inception_torchscript import InceptionV3W

        path = Path(weights) if weights is not None else Path(CLEAN_INCEPTION_DEFAULT_DIR) / CLEAN_INCEPTION_FILE
        if path.name != CLEAN_INCEPTION_FILE:
            raise ValueError(f"clean-fid loads its Inception from a file named {CLEAN_INCEPTION_FILE}, got {path}")
        present = _check_weights(path, CLEAN_INCEPTION_URL, allow_download)
        with _naming_damaged_weights(path):
            model = InceptionV3W(str(path.parent), download=not present, resize_inside=False).to(device).eval()
        return lambda x: model(x)

    from cleanfid.inception_pytorch import InceptionV3

    hub_path = Path(torch.hub.get_dir()) / "checkpoints" / PYTORCH_FID_FILE
    path = Path(weights) if weights is not None else hub_path
    present = _check_weights(path, PYTORCH_FID_URL, allow_download)
    with _naming_damaged_weights(path):
        if weights is not None and present:
            with _torch_hub_checkpoint(path, PYTORCH_FID_FILE):
                model = InceptionV3(output_blocks=[3], resize_input=False, normalize_input=True)
        else:
            model = InceptionV3(output_blocks=[3], resize_input=False, normalize_input=True)
    model = model.to(device).eval()
    # T2IBenchmark feeds ToTensor(uint8) = x / 255 and maps it to 2x − 1; normalize_input=True does the 2x − 1.
    return lambda x: model(x / 255.0)[0].flatten(1)
