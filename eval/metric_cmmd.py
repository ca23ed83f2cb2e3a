"""CMMD (Jayasumana et al., "Rethinking FID: Towards a Better Evaluation Metric for Image Generation", CVPR 2024):
the MMD between CLIP image embeddings of generated and reference images, Gaussian kernel σ = 10, scaled by 1000.

The embedding is CLIP ViT-L/14 at 336 px (open_clip `ViT-L-14-336`, tag `openai`; `--cmmd-model` picks another).
It is the open_clip image-embedding pass CLIP score reads (`metric_clip.clip_feature_pass`), so with one model for
both the images are embedded once. Reference embeddings are cached per reference folder by the content digest of its
images (`reference_embeddings`), like FID's reference statistics.
"""

from __future__ import annotations

import argparse
import io as _stdio
import json
import logging
import math
import re
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import io
from .metric_base import BuildContext, CellData, Metric, MetricEntry, MetricValue
from .metric_clip import check_spec, clip_feature_pass, load_once, spec_from_args

if TYPE_CHECKING:
    from .clip_score import LoadedCLIP

logger = logging.getLogger(__name__)

SIGMA = 10.0  # the paper's Gaussian kernel bandwidth on unit-norm CLIP embeddings
SCALE = 1000.0  # the paper reports 1000 × MMD²
DEFAULT_MODEL, DEFAULT_PRETRAINED = "ViT-L-14-336", "openai"  # the paper's CLIP ViT-L/14 at 336 px
_BLOCK = 2048  # rows per block of the kernel sums: bounded memory at 30k images


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, in float64 (CMMD compares unit-norm CLIP embeddings)."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if x.ndim != 2 or not np.all(norms > 0) or not np.isfinite(x).all():
        raise ValueError(f"need (N, D) finite embeddings with non-zero rows, got shape {x.shape}")
    return x / norms


def gaussian_kernel_mean(x: np.ndarray, y: np.ndarray | None = None, sigma: float = SIGMA) -> float:
    """Mean of exp(−‖x_i − y_j‖² / (2σ²)) over all pairs (i, j); with `y` None, over the pairs i ≠ j of `x`
    (the unbiased within-set term). Summed in blocks of rows, in float64."""
    within = y is None
    y = x if within else y
    gamma = 1.0 / (2.0 * sigma**2)
    x_sq, y_sq = np.einsum("ij,ij->i", x, x), np.einsum("ij,ij->i", y, y)
    total = 0.0
    for start in range(0, x.shape[0], _BLOCK):
        stop = min(start + _BLOCK, x.shape[0])
        distance = x_sq[start:stop, None] + y_sq[None, :] - 2.0 * (x[start:stop] @ y.T)
        kernel = np.exp(-gamma * np.maximum(distance, 0.0))
        if within:
            rows = np.arange(start, stop)
            kernel[rows - start, rows] = 0.0
        total += math.fsum(kernel.sum(axis=1))
    pairs = x.shape[0] * (x.shape[0] - 1) if within else x.shape[0] * y.shape[0]
    return total / pairs


def cmmd(
    x: np.ndarray, y: np.ndarray, sigma: float = SIGMA, scale: float = SCALE, y_within: float | None = None
) -> float:
    """`scale` × the unbiased MMD² estimate between rows `x` (N, D) and `y` (M, D) with a Gaussian kernel:
    mean_{i≠j} k(x_i, x_j) + mean_{i≠j} k(y_i, y_j) − 2 mean_{i,j} k(x_i, y_j) (paper Eq. 3).

    `y_within`: the second term when already known (a cached reference). Rows are used as given: CMMD passes
    unit-norm embeddings (`normalize_rows`).
    Deviation: the authors' released code averages the within-set kernels over all pairs, the diagonal included
    (a biased estimate); this is the paper's unbiased formula.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"need (N, D) and (M, D) embeddings, got {x.shape} and {y.shape}")
    if x.shape[0] < 2 or y.shape[0] < 2:
        raise ValueError(f"the unbiased MMD needs at least 2 rows on each side, got {x.shape[0]} and {y.shape[0]}")
    yy = gaussian_kernel_mean(y, sigma=sigma) if y_within is None else y_within
    return scale * (gaussian_kernel_mean(x, sigma=sigma) + yy - 2.0 * gaussian_kernel_mean(x, y, sigma))


# ---------------------------------------------------------------- reference embeddings, cached by content digest


@dataclass(frozen=True, eq=False)
class CMMDReference:
    """Unit-norm reference embeddings (M, D), an id naming them (folder, count, content digest) and their cached
    within-set kernel mean at σ = `SIGMA`."""

    embeddings: np.ndarray
    id: str
    within: float


def reference_from_embeddings(raw: np.ndarray, reference_id: str) -> CMMDReference:
    """A `CMMDReference` from raw (not normalised) embeddings."""
    unit = normalize_rows(raw)
    if unit.shape[0] < 2:
        raise ValueError(f"a CMMD reference needs at least 2 images, got {unit.shape[0]}")
    return CMMDReference(unit, reference_id, gaussian_kernel_mean(unit))


def cache_file_name(folder: Path, model: str, count: int, digest: str) -> str:
    """`cmmd-ref_{folder}_{model}_n{count}_{digest[:12]}.npz`: one file per reference folder, model and content."""
    safe = re.sub(r"[^A-Za-z0-9.-]+", "-", folder.resolve().name or "root").strip("-") or "root"
    return f"cmmd-ref_{safe}_{re.sub(r'[^A-Za-z0-9.-]+', '-', model)}_n{count}_{digest[:12]}.npz"


def save_reference(path: Path, raw: np.ndarray, meta: dict[str, Any]) -> None:
    """Raw embeddings (float32 when lossless) and their provenance, written atomically."""
    single = raw.astype(np.float32)
    buffer = _stdio.BytesIO()
    np.savez(buffer, embeddings=single if np.array_equal(single, raw) else raw, meta=np.array(json.dumps(meta)))
    io.atomic_write_bytes(path, buffer.getvalue())


def load_reference(path: Path, model: str | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """(raw embeddings, meta) of a cache file; refused when it is damaged or made with another CLIP model."""
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":
            raise ValueError(f"{path} is not an .npz file (CMMD reference embeddings are cmmd-ref_*.npz files)")
    try:
        with np.load(path, allow_pickle=False) as data:
            raw, meta = np.asarray(data["embeddings"], np.float64), json.loads(str(data["meta"]))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path} is damaged or not a CMMD reference file ({type(err).__name__}: {err})") from None
    if not isinstance(meta, dict) or raw.ndim != 2 or not np.isfinite(raw).all():
        raise ValueError(f"{path}: not a CMMD reference file (embeddings {raw.shape}, meta {type(meta).__name__})")
    if model is not None and meta.get("model") != model:
        raise ValueError(f"{path} holds {meta.get('model')} embeddings, not {model}; pass the matching --cmmd-model")
    return raw, meta


def _reference_id(folder_name: str, count: int, digest: str) -> str:
    """`{folder}/n{count}/{digest[:12]}`: the reference in `scores.csv` and in cache keys."""
    return f"{folder_name}/n{count}/{digest[:12]}"


def reference_from_file(path: Path, raw: np.ndarray, meta: dict[str, Any]) -> CMMDReference:
    """The reference a cache file (`load_reference(path)` = raw, meta) holds, named as when made from its folder."""
    folder_name = Path(str(meta.get("folder", path.stem))).name
    return reference_from_embeddings(raw, _reference_id(folder_name, raw.shape[0], str(meta.get("images_digest", ""))))


def reference_embeddings(
    files: Sequence[Path],
    folder: Path,
    embed: Callable[[list[Path]], np.ndarray],
    model: str,
    cache_dir: Path | None,
    rows_of: Callable[[Callable[[list[int]], np.ndarray], int], np.ndarray] | None = None,
    write: bool = True,
) -> CMMDReference:
    """Embeddings `embed(files)` of the reference images `files` (of `folder`), cached in `cache_dir`.

    The cache file (`cache_file_name`) is named by the folder, the model and a digest of the exact image bytes
    (`io.files_digest`), so it is reused only for the same images and model and recomputed when any image changes.
    `rows_of(compute, count)` computes per-item rows (split across processes in a group; default: here); only a
    `write` process writes the file.
    """
    digest = io.files_digest(files)
    path = None if cache_dir is None else Path(cache_dir) / cache_file_name(folder, model, len(files), digest)
    reference_id = _reference_id(folder.resolve().name, len(files), digest)
    if path is not None and path.is_file():
        try:
            raw, meta = load_reference(path, model)
        except ValueError as err:  # damaged (e.g. a killed copy): the images are at hand, so compute them again
            logger.warning("%s; recomputing it", err)
            raw, meta = np.zeros((0, 0)), {}
        if meta.get("images_digest") == digest and raw.shape[0] == len(files):
            logger.info("reusing cached CMMD reference embeddings %s (same image bytes)", path)
            return reference_from_embeddings(raw, reference_id)
        if meta:
            logger.warning("%s does not hold these images' embeddings; recomputing", path)
    rows_of = rows_of or (lambda compute, count: compute(list(range(count))))
    raw = rows_of(lambda items: embed([files[i] for i in items]), len(files))
    if path is not None and write:
        meta = {"model": model, "images_digest": digest, "count": len(files), "folder": str(folder.resolve())}
        save_reference(path, raw, meta)
        logger.info("cached CMMD reference embeddings in %s", path)
    return reference_from_embeddings(raw, reference_id)


# ---------------------------------------------------------------- the metric


class CMMD(Metric):
    """1000 × unbiased Gaussian-kernel MMD² (σ = 10) between a cell's unit-norm CLIP image embeddings and the
    reference's."""

    def __init__(self, clip: LoadedCLIP, reference: CMMDReference) -> None:
        self.clip = clip
        self.reference = reference
        self.features = clip_feature_pass(clip)

    def key(self) -> dict[str, Any]:
        spec = self.clip.spec
        return {"model": spec.name, "weights": spec.weights, "reference": self.reference.id, "sigma": SIGMA,
                "scale": SCALE, "estimator": "unbiased"}  # fmt: skip

    def provenance(self) -> dict[str, str]:
        return {"cmmd_model": self.clip.spec.name, "cmmd_reference": self.reference.id}

    def compute(self, cell: CellData) -> MetricValue:
        embeddings = normalize_rows(cell.features)
        return MetricValue(cmmd(embeddings, self.reference.embeddings, y_within=self.reference.within))


def _options(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--cmmd-ref",
        type=Path,
        help="reference images for CMMD: a folder (the images of the run's caption ids, found by COCO id as in "
        "ref-stats; every image with --cmmd-ref-all), or a cmmd-ref_*.npz written by an earlier run. CMMD is "
        "computed when this is given",
    )
    group.add_argument("--cmmd-ref-all", action="store_true", help="use every image under --cmmd-ref")
    group.add_argument("--no-cmmd", action="store_true", help="skip CMMD even with --cmmd-ref")
    group.add_argument(
        "--cmmd-cache",
        type=Path,
        default=Path("stats"),
        help="folder of cached reference embeddings (default stats/; reused while the images are byte-identical)",
    )
    group.add_argument("--cmmd-model", default=DEFAULT_MODEL, help=f"open_clip architecture (default {DEFAULT_MODEL})")
    group.add_argument(
        "--cmmd-pretrained",
        default=DEFAULT_PRETRAINED,
        help=f"open_clip pretrained tag (default {DEFAULT_PRETRAINED}; 'none': random weights, smoke tests only)",
    )
    group.add_argument("--cmmd-weights", help="local file with the tag's weights (offline)")


def _spec(args: argparse.Namespace):
    return spec_from_args(args.cmmd_model, args.cmmd_pretrained, args.cmmd_weights)


def _reference_source(args: argparse.Namespace, ctx: BuildContext) -> tuple[str, Any]:
    """("files", (folder, files)) or ("npz", (raw, meta)) for `--cmmd-ref`, checked without loading a model."""
    from .images import list_images, select_reference_images

    def make():
        path = args.cmmd_ref
        if path.is_dir():
            files = list_images(path, recursive=True)
            if not args.cmmd_ref_all:
                try:
                    files = select_reference_images(files, [c.image_id for c in ctx.captions])
                except ValueError as err:
                    raise ValueError(f"--cmmd-ref {path}: {err} (or pass --cmmd-ref-all to use every image)") from None
            if len(files) < 2:
                raise ValueError(f"--cmmd-ref {path} holds {len(files)} images; CMMD needs at least 2")
            return "files", (path, files)
        if path.is_file():
            raw, meta = load_reference(path, _spec(args).name)
            return "npz", (raw, meta)
        raise FileNotFoundError(f"--cmmd-ref {path}: no such folder or file")

    return ctx.once("cmmd-reference-source", make)


def _check(args: argparse.Namespace, ctx: BuildContext) -> bool:
    if args.cmmd_ref is None or args.no_cmmd:
        return False
    if args.cmmd_cache.exists() and not args.cmmd_cache.is_dir():
        raise ValueError(f"--cmmd-cache {args.cmmd_cache} is a file; give a folder")
    check_spec(_spec(args), "--cmmd-model/--cmmd-pretrained/--cmmd-weights", ctx.allow_download)
    _reference_source(args, ctx)
    return True


def _build(args: argparse.Namespace, ctx: BuildContext) -> CMMD:
    from .distributed import process_group, shared_rows

    clip = load_once(_spec(args), ctx)
    kind, source = _reference_source(args, ctx)
    if kind == "npz":
        return CMMD(clip, reference_from_file(args.cmmd_ref, *source))
    folder, files = source
    features = clip_feature_pass(clip)

    def embed(chosen: list[Path]) -> np.ndarray:
        return features.compute(chosen, ctx.batch_size, ctx.device, ctx.num_workers, ctx.progress)

    def rows_of(compute, count: int) -> np.ndarray:
        return shared_rows(compute, count, ctx.batch_size, ctx.device)

    writer = process_group()[0] == 0
    reference = reference_embeddings(files, folder, embed, clip.spec.name, args.cmmd_cache, rows_of, write=writer)
    return CMMD(clip, reference)


ENTRY = MetricEntry(
    name="cmmd",
    label="CMMD",
    summary="CMMD (Jayasumana et al., CVPR 2024): 1000 × unbiased MMD² of CLIP ViT-L/14-336 image embeddings, "
    "Gaussian kernel σ = 10, against --cmmd-ref",
    lower_is_better=True,
    digits=3,
    provenance=("cmmd_model", "cmmd_reference"),
    note="CMMD: 1000 × unbiased MMD² of unit-norm CLIP image embeddings (Gaussian kernel, σ = 10)",
    add_options=_options,
    check=_check,
    build=_build,
)
CMMD.entry = ENTRY
