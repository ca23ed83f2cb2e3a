"""Metric CLI over sweep folders: reference statistics once, then FID and CLIP score per (method, scale, seed).

`python -m eval.metrics ref-stats` caches reference statistics under a protocol-naming file; `python -m eval.metrics
score` checks that every cell folder of the sweep's manifest is complete and readable, then writes
`{run}/metrics/scores.csv` and `{run}/metrics/clip_per_image.csv` (per-cell results are cached, so reruns resume).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from . import io
from .captions import Caption, load_captions, select_captions
from .clip_score import CLIPSpec, LoadedCLIP, clip_scores, load_clip
from .fid import (
    FeatureExtractor,
    FeatureStats,
    FIDProtocol,
    feature_statistics,
    frechet_distance,
    image_features,
    kernel_distance,
    load_inception,
    load_stats,
    save_stats,
    stats_file_name,
)
from .images import expected_image_files, list_images

logger = logging.getLogger(__name__)

SCORE_COLUMNS = (
    "method",
    "scale",
    "seed",
    "n_images",
    "fid",
    "kid",
    "clip",
    "effective_scale",
    "fid_protocol",
    "fid_extractor",
    "fid_reference",
    "clip_model",
    "images_digest",
)


@dataclass(frozen=True)
class Cell:
    """One generated folder of a sweep: `{run}/{method}/cfg-{scale}/seed-{seed}` (path relative to the run)."""

    method: str
    scale: float
    seed: int
    path: str


@dataclass(frozen=True)
class Run:
    """What a sweep's manifest promises: its cells, its captions and the (width, height) of every RGB image."""

    cells: list[Cell]
    captions: tuple[Caption, ...]
    size: tuple[int, int]


@dataclass(frozen=True)
class FIDSetup:
    """What FID needs: reference statistics (and an id for caching), the protocol and the feature extractor."""

    reference: FeatureStats
    reference_id: str
    protocol: FIDProtocol
    extractor: FeatureExtractor
    extractor_name: str


# ---------------------------------------------------------------- run folders


def read_run(run_dir: str | Path) -> Run:
    """The cells, captions and image size a sweep's `manifest.json` lists; the caption file must match its md5."""
    run_dir = Path(run_dir)
    manifest_path = run_dir / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"no manifest.json in {run_dir}; is it a sweep output folder (python -m eval.sweep)?")
    manifest = io.read_json(manifest_path)
    info = manifest["captions"]
    captions_path = run_dir / info["file"]
    if not captions_path.is_file():
        raise FileNotFoundError(f"{captions_path} listed by {manifest_path} is missing")
    if io.file_md5(captions_path) != info["md5"]:
        raise ValueError(f"{captions_path} does not match the md5 recorded in {manifest_path}")
    cells = [Cell(c["method"], float(c["scale"]), int(c["seed"]), c["path"]) for c in manifest["cells"]]
    size = (int(manifest["generation"]["width"]), int(manifest["generation"]["height"]))
    return Run(cells, load_captions(captions_path), size)


def _image_header_problem(path: Path, size: tuple[int, int]) -> str | None:
    """Why an image file's header does not promise an RGB image of `size` (width, height); None when it does."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            if image.size != tuple(size) or image.mode != "RGB":
                return f"{path.name}: {image.mode} {image.size[0]}x{image.size[1]}"
    except (OSError, SyntaxError, ValueError) as err:
        return f"{path.name}: unreadable ({err})"
    return None


def check_complete(run_dir: str | Path, run: Run, workers: int = 16) -> dict[Cell, list[Path]]:
    """Image files per cell, after checking every cell holds exactly the manifest's images and every image is RGB of
    the manifest's size (headers read by `workers` threads), before any feature is computed."""
    from concurrent.futures import ThreadPoolExecutor

    ids = [c.image_id for c in run.captions]
    files, problems = {}, []
    for cell in run.cells:
        try:
            files[cell] = expected_image_files(Path(run_dir) / cell.path, ids)
        except (FileNotFoundError, ValueError) as err:
            problems.append(str(err))
    if problems:
        more = f" (and {len(problems) - 3} more incomplete cells)" if len(problems) > 3 else ""
        raise ValueError("refusing to score a partial run: " + " | ".join(problems[:3]) + more)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for cell, paths in files.items():
            bad = [p for p in pool.map(lambda f: _image_header_problem(f, run.size), paths) if p]
            if bad:
                expected = f"RGB {run.size[0]}x{run.size[1]}"
                problems.append(f"{cell.path}: {len(bad)} image(s) unreadable or not {expected}, e.g. {bad[0]}")
    if problems:
        raise ValueError("refusing to score images the manifest does not describe: " + " | ".join(problems[:3]))
    return files


# ---------------------------------------------------------------- several processes: whole batches, gathered in order


def _process_group() -> tuple[int, int]:
    """(rank, world size) of the initialised torch.distributed group, (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _owned_items(count: int, batch_size: int, rank: int, world: int) -> list[int]:
    """Indices of the batches (of `batch_size` consecutive items) numbered rank, rank + world, … in order."""
    batches = range(rank, math.ceil(count / batch_size), world)
    return [i for b in batches for i in range(b * batch_size, min(count, (b + 1) * batch_size))]


class _OrderedRows(Metric):
    """Rows computed by several processes, gathered with torchmetrics' state sync and put back in item order."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("rows", default=[], dist_reduce_fx="cat")
        self.add_state("index", default=[], dist_reduce_fx="cat")

    def update(self, rows: torch.Tensor, index: torch.Tensor) -> None:
        self.rows.append(rows)
        self.index.append(index)

    def compute(self) -> torch.Tensor:
        rows, index = dim_zero_cat(self.rows), dim_zero_cat(self.index)
        return rows[torch.argsort(index)]


def shared_rows(compute: Callable[[list[int]], np.ndarray], count: int, batch_size: int, device: str) -> np.ndarray:
    """`compute(items)` over all `count` items, split across the processes of a torch.distributed group.

    Every process takes whole batches (batch b goes to process b mod world), so each batch holds exactly the images a
    single process would batch together and the gathered rows equal one process's to the last digit.
    """
    rank, world = _process_group()
    if world == 1:
        return compute(list(range(count)))
    import torch.distributed as dist

    mine = _owned_items(count, batch_size, rank, world)
    rows = compute(mine or [0])  # a process without a batch computes one item to learn the row shape, keeps none
    rows = rows if mine else rows[:0]
    on = torch.device(device) if dist.get_backend() == "nccl" else torch.device("cpu")
    metric = _OrderedRows().to(on)
    metric.update(
        torch.from_numpy(np.ascontiguousarray(rows)).to(on), torch.tensor(mine, dtype=torch.int64, device=on)
    )
    return metric.compute().cpu().numpy()


# ---------------------------------------------------------------- scoring


def _cell_cache_path(run_dir: Path, cell: Cell) -> Path:
    return run_dir / "metrics" / "cells" / f"{cell.path}.json"


def _score_cell(
    cell_files: list[Path],
    images_digest: str,
    captions: Sequence[Caption],
    cached: dict,
    fid: FIDSetup | None,
    clip: LoadedCLIP | None,
    batch_size: int,
    device: str | torch.device,
    num_workers: int,
    progress: bool,
) -> dict:
    """FID, KID and per-image CLIP of one cell, reusing cached values computed from the same images and settings."""
    result = dict(cached)
    n = len(cell_files)
    if fid is not None:
        key = {
            "reference": fid.reference_id,
            "protocol": fid.protocol.tag,
            "extractor": fid.extractor_name,
            "images": images_digest,
        }
        if result.get("fid_key") != key:

            def features_of(items: list[int]) -> np.ndarray:
                chosen = [cell_files[i] for i in items]
                return image_features(chosen, fid.extractor, fid.protocol, batch_size, device, num_workers, progress)

            features = shared_rows(features_of, n, batch_size, str(device))
            stats = feature_statistics(features, fid.protocol.tag, fid.extractor_name)
            kid = kernel_distance(features, fid.reference) if fid.reference.features is not None else math.nan
            result.update(fid=frechet_distance(stats, fid.reference), kid=kid, fid_key=key)
    if clip is not None:
        texts = [c.text for c in captions]
        key = {
            "model": clip.spec.name,
            "weights": clip.spec.weights,
            "images": images_digest,
            "captions": hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest(),
        }
        if result.get("clip_key") != key:

            def scores_of(items: list[int]) -> np.ndarray:
                chosen, chosen_texts = [cell_files[i] for i in items], [texts[i] for i in items]
                return clip_scores(clip, chosen, chosen_texts, batch_size, device, num_workers, progress)

            scores = shared_rows(scores_of, n, batch_size, str(device))
            per_image = {str(c.image_id): float(s) for c, s in zip(captions, scores)}
            result.update(clip_per_image=per_image, clip=float(scores.mean()), clip_key=key)
    result["n_images"] = n
    return result


def cell_effective_scale(run_dir: Path, cell: Cell, captions: Sequence[Caption]) -> float:
    """Mean effective guidance scale of a cell's images (the sweep's guidance CSV), NaN when the run has none."""
    from .sweep import guidance_path, read_guidance

    if not guidance_path(run_dir, cell.path).is_file():
        return math.nan
    values = read_guidance(run_dir, cell.path, [c.image_id for c in captions])
    return math.fsum(values.values()) / len(values)


def score_run(
    run_dir: str | Path,
    fid: FIDSetup | None = None,
    clip: LoadedCLIP | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    force: bool = False,
    progress: bool = False,
) -> Path:
    """Score every cell of a finished sweep; writes and returns `{run}/metrics/scores.csv` (+ `clip_per_image.csv`).

    A cached cell result is reused only when its images (content digest), reference and settings are unchanged. In a
    torch.distributed group (`accelerate launch -m eval.metrics score`), every process computes whole batches and the
    first process writes the files.
    """
    if fid is None and clip is None:
        raise ValueError("nothing to compute: give FID settings, a CLIP model, or both")
    run_dir = Path(run_dir)
    run = read_run(run_dir)
    files = check_complete(run_dir, run)
    writer = _process_group()[0] == 0
    rows, per_image_rows = [], []
    for cell in run.cells:
        digest = io.files_digest(files[cell])
        cache_path = _cell_cache_path(run_dir, cell)
        cached = io.read_json(cache_path) if cache_path.is_file() and not force else {}
        result = _score_cell(
            files[cell], digest, run.captions, cached, fid, clip, batch_size, device, num_workers, progress
        )
        result["images_digest"] = digest
        result["effective_scale"] = cell_effective_scale(run_dir, cell, run.captions)
        if result != cached and writer:
            io.write_json(cache_path, result)
        if writer:
            logger.info("%s: FID %s, CLIP %s", cell.path, result.get("fid"), result.get("clip"))
        fid_key, clip_key = result.get("fid_key", {}), result.get("clip_key", {})
        rows.append(
            (
                cell.method,
                f"{cell.scale:g}",
                cell.seed,
                result["n_images"],
                result.get("fid", math.nan),
                result.get("kid", math.nan),
                result.get("clip", math.nan),
                result["effective_scale"],
                fid_key.get("protocol", ""),
                fid_key.get("extractor", ""),
                fid_key.get("reference", ""),
                clip_key.get("model", ""),
                digest,
            )
        )
        for image_id, score in result.get("clip_per_image", {}).items():
            per_image_rows.append((cell.method, f"{cell.scale:g}", cell.seed, image_id, score))
    out = run_dir / "metrics" / "scores.csv"
    if writer:
        io.atomic_write_text(out, io.csv_text(SCORE_COLUMNS, rows))
        if per_image_rows:
            columns = ("method", "scale", "seed", "image_id", "clip")
            io.atomic_write_text(out.with_name("clip_per_image.csv"), io.csv_text(columns, per_image_rows))
    return out


# ---------------------------------------------------------------- reference statistics

_COCO_ID = re.compile(r"(\d+)$")


def select_reference_images(files: Sequence[Path], image_ids: Sequence[int]) -> list[Path]:
    """Files whose name ends in one of `image_ids` (`COCO_val2014_000000521669.jpg`, `521669.png`), in id order."""
    by_id: dict[int, Path] = {}
    for path in files:
        match = _COCO_ID.search(path.stem)
        if match:
            image_id = int(match.group(1))
            if image_id in by_id:
                raise ValueError(f"two files for COCO id {image_id}: {by_id[image_id]} and {path}")
            by_id[image_id] = path
    missing = [i for i in image_ids if i not in by_id]
    if missing:
        raise ValueError(f"{len(missing)} of {len(image_ids)} caption ids have no image, e.g. {missing[:5]}")
    return [by_id[i] for i in image_ids]


def reference_stats(
    files: Sequence[Path],
    name: str,
    out_dir: str | Path,
    protocol: FIDProtocol,
    extractor: FeatureExtractor,
    extractor_name: str,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    progress: bool = False,
) -> Path:
    """Compute and cache reference statistics (and features, for KID) under `stats_file_name(...)`.

    An existing file is reused only when it was computed from the same image bytes (`io.files_digest`).
    """
    path = Path(out_dir) / stats_file_name(name, protocol, extractor_name, len(files))
    digest = io.files_digest(files)
    if path.is_file():
        if load_stats(path).images_digest == digest:
            logger.info("reusing cached reference statistics %s (same image bytes)", path)
            return path
        logger.warning("the images behind %s changed since it was computed; recomputing", path)
    features = image_features(files, extractor, protocol, batch_size, device, num_workers, progress=progress)
    save_stats(feature_statistics(features, protocol.tag, extractor_name, keep=True, images_digest=digest), path)
    return path


# ---------------------------------------------------------------- CLI


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _add_fid_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preset",
        choices=("paper",),
        help="paper: the protocol of the paper's Table 3 (T2IBenchmark's t2ib preprocessing and Inception port)",
    )
    parser.add_argument(
        "--mode",
        choices=("clean", "t2ib"),
        help="FID protocol (default clean, or t2ib with --preset paper); clean is not comparable with the paper",
    )
    parser.add_argument("--no-center-crop", action="store_true", help="clean mode: resize without centre crop")
    parser.add_argument("--inception", type=Path, help="local Inception weights file (see README, offline use)")
    parser.add_argument(
        "--no-download",
        action="store_true",
        help="never download Inception or CLIP weights (implied by HF_HUB_OFFLINE=1)",
    )


def _common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=4, help="data-loader processes for image decoding")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")


def _protocol(args: argparse.Namespace) -> FIDProtocol:
    """`--mode` / `--preset`: the paper's preset is the t2ib protocol (algorithm.md §3.3)."""
    if args.preset == "paper":
        if args.mode not in (None, "t2ib") or args.no_center_crop:
            raise ValueError("--preset paper scores with --mode t2ib (centre crop); drop --mode/--no-center-crop")
        return FIDProtocol("t2ib")
    return FIDProtocol(args.mode or "clean", center_crop=not args.no_center_crop)


def _offline(args: argparse.Namespace) -> bool:
    return args.no_download or os.environ.get("HF_HUB_OFFLINE") == "1"


def _inception(args: argparse.Namespace, protocol: FIDProtocol, device: str) -> FeatureExtractor:
    return load_inception(protocol, args.inception, device=device, allow_download=not _offline(args))


def _cmd_ref_stats(args: argparse.Namespace) -> int:
    device = args.device or _default_device()
    protocol = _protocol(args)
    files = list_images(args.images, recursive=True)
    if not args.all_images:
        chosen = select_captions(load_captions(args.captions), args.limit, args.subset_seed)
        files = select_reference_images(files, [c.image_id for c in chosen])
    elif args.captions is not None or args.limit is not None:
        raise ValueError("--all-images excludes --captions and --limit")
    if len(files) < 2:
        raise ValueError(f"{args.images} holds {len(files)} images; reference statistics need at least 2")
    extractor = _inception(args, protocol, device)
    path = reference_stats(
        files, args.name, args.out, protocol, extractor, protocol.network, args.batch_size, device, args.workers, True
    )
    print(path)
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    # Under `accelerate launch` / `torchrun` this joins the process group (gloo on the CPU); alone it is one process.
    use_cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    state = PartialState(cpu=use_cpu)
    device = args.device or (str(state.device) if state.num_processes > 1 else _default_device())
    fid = clip = None
    if not args.no_fid:
        if args.ref_stats is None:
            raise ValueError("FID needs --ref-stats (or pass --no-fid)")
        protocol = _protocol(args)
        assume = (protocol.tag, protocol.network) if args.ref_stats_foreign else None
        reference = load_stats(args.ref_stats, assume=assume)
        fid = FIDSetup(
            reference, io.file_md5(args.ref_stats), protocol, _inception(args, protocol, device), protocol.network
        )
    if not args.no_clip:
        pretrained = None if args.clip_pretrained.lower() == "none" else args.clip_pretrained
        spec = CLIPSpec(args.clip_model, pretrained, args.clip_weights)
        clip = load_clip(spec, device=device, allow_download=not _offline(args))
    out = score_run(args.run, fid, clip, args.batch_size, device, args.workers, args.force, progress=True)
    if state.is_main_process:
        print(out.read_text(encoding="utf-8"), end="")
        print(f"scores: {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of `python -m eval.metrics`."""
    parser = argparse.ArgumentParser(prog="goca-scfg-metrics", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    ref = sub.add_parser("ref-stats", help="compute (once) and cache reference FID statistics of real images")
    ref.add_argument("--images", type=Path, required=True, help="folder of real images, searched recursively")
    ref.add_argument("--captions", type=Path, help="keep only the images of these caption ids (default set: COCO-30k)")
    ref.add_argument("--all-images", action="store_true", help="use every image in --images (no id selection)")
    ref.add_argument("--limit", type=int, help="ids of the first N captions (or a seeded subset)")
    ref.add_argument("--subset-seed", type=int, help="random subset of --limit captions")
    ref.add_argument("--name", default="coco-val2014", help="dataset name in the cached file name")
    ref.add_argument("--out", type=Path, default=Path("stats"), help="folder of cached statistics (default stats/)")
    _add_fid_options(ref)
    _common_options(ref)

    score = sub.add_parser("score", help="FID and CLIP score of every cell of a finished sweep")
    score.add_argument("--run", type=Path, required=True, help="sweep output folder (with manifest.json)")
    score.add_argument("--ref-stats", type=Path, help="reference statistics .npz from `ref-stats`")
    score.add_argument(
        "--ref-stats-foreign",
        action="store_true",
        help="the .npz has only mu/sigma (e.g. T2IBenchmark's); assume it used --mode's protocol and network",
    )
    score.add_argument("--no-fid", action="store_true")
    score.add_argument("--no-clip", action="store_true")
    score.add_argument("--clip-model", default="ViT-B-32")
    score.add_argument(
        "--clip-pretrained",
        default="openai",
        help="open_clip pretrained tag (default openai; 'none': random weights, for smoke tests only)",
    )
    score.add_argument("--clip-weights", help="local file with the tag's weights (offline)")
    score.add_argument("--force", action="store_true", help="recompute cached per-cell results")
    _add_fid_options(score)
    _common_options(score)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m eval.metrics` / `goca-scfg-metrics`."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _cmd_ref_stats(args) if args.command == "ref-stats" else _cmd_score(args)
    except (OSError, ValueError) as err:  # bad input: one clear line, no traceback
        logger.debug("error details", exc_info=True)
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
