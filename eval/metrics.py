"""Metric CLI over sweep folders: reference statistics once, then FID and CLIP score per (method, scale, seed).

`python -m eval.metrics ref-stats` caches reference statistics under a protocol-naming file; `python -m eval.metrics
score` checks that every cell folder of the sweep's manifest is complete and readable, then writes
`{run}/metrics/scores.csv` and `{run}/metrics/clip_per_image.csv` (per-cell results are cached, so reruns resume).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

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
    "clip",
    "fid_protocol",
    "fid_extractor",
    "fid_reference",
    "clip_model",
)


@dataclass(frozen=True)
class Cell:
    """One generated folder of a sweep: `{run}/{method}/cfg-{scale}/seed-{seed}` (path relative to the run)."""

    method: str
    scale: float
    seed: int
    path: str


@dataclass(frozen=True)
class FIDSetup:
    """What FID needs: reference statistics (and an id for caching), the protocol and the feature extractor."""

    reference: FeatureStats
    reference_id: str
    protocol: FIDProtocol
    extractor: FeatureExtractor
    extractor_name: str


# ---------------------------------------------------------------- run folders


def read_run(run_dir: str | Path) -> tuple[list[Cell], tuple[Caption, ...]]:
    """The cells and captions a sweep's `manifest.json` lists; the caption file must match its recorded md5."""
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
    return cells, load_captions(captions_path)


def check_complete(run_dir: str | Path, cells: Sequence[Cell], captions: Sequence[Caption]) -> dict[Cell, list[Path]]:
    """Image files per cell, after checking every cell holds exactly the manifest's images (issue item 7)."""
    ids = [c.image_id for c in captions]
    files, problems = {}, []
    for cell in cells:
        try:
            files[cell] = expected_image_files(Path(run_dir) / cell.path, ids)
        except (FileNotFoundError, ValueError) as err:
            problems.append(str(err))
    if problems:
        more = f" (and {len(problems) - 3} more incomplete cells)" if len(problems) > 3 else ""
        raise ValueError("refusing to score a partial run: " + " | ".join(problems[:3]) + more)
    return files


# ---------------------------------------------------------------- scoring


def _cell_cache_path(run_dir: Path, cell: Cell) -> Path:
    return run_dir / "metrics" / "cells" / f"{cell.path}.json"


def _score_cell(
    cell_files: list[Path],
    captions: Sequence[Caption],
    cached: dict,
    fid: FIDSetup | None,
    clip: LoadedCLIP | None,
    batch_size: int,
    device: str | torch.device,
    num_workers: int,
    progress: bool,
) -> dict:
    """FID and per-image CLIP of one cell, reusing cached values computed with the same settings."""
    result = dict(cached)
    if fid is not None:
        key = {"reference": fid.reference_id, "protocol": fid.protocol.tag, "extractor": fid.extractor_name}
        if result.get("fid_key") != key:
            features = image_features(
                cell_files, fid.extractor, fid.protocol, batch_size, device, num_workers, progress=progress
            )
            stats = feature_statistics(features, fid.protocol.tag, fid.extractor_name)
            result.update(fid=frechet_distance(stats, fid.reference), fid_key=key)
    if clip is not None:
        key = {"model": clip.spec.name, "weights": clip.spec.weights}
        if result.get("clip_key") != key:
            texts = [c.text for c in captions]
            scores = clip_scores(clip, cell_files, texts, batch_size, device, num_workers, progress=progress)
            per_image = {str(c.image_id): float(s) for c, s in zip(captions, scores)}
            result.update(clip_per_image=per_image, clip=float(scores.mean()), clip_key=key)
    result["n_images"] = len(cell_files)
    return result


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
    """Score every cell of a finished sweep; writes and returns `{run}/metrics/scores.csv` (+ `clip_per_image.csv`)."""
    if fid is None and clip is None:
        raise ValueError("nothing to compute: give FID settings, a CLIP model, or both")
    run_dir = Path(run_dir)
    cells, captions = read_run(run_dir)
    files = check_complete(run_dir, cells, captions)
    rows, per_image_rows = [], []
    for cell in cells:
        cache_path = _cell_cache_path(run_dir, cell)
        cached = io.read_json(cache_path) if cache_path.is_file() and not force else {}
        result = _score_cell(files[cell], captions, cached, fid, clip, batch_size, device, num_workers, progress)
        if result != cached:
            io.write_json(cache_path, result)
        logger.info("%s: FID %s, CLIP %s", cell.path, result.get("fid"), result.get("clip"))
        fid_key, clip_key = result.get("fid_key", {}), result.get("clip_key", {})
        rows.append(
            (
                cell.method,
                f"{cell.scale:g}",
                cell.seed,
                result["n_images"],
                result.get("fid", math.nan),
                result.get("clip", math.nan),
                fid_key.get("protocol", ""),
                fid_key.get("extractor", ""),
                fid_key.get("reference", ""),
                clip_key.get("model", ""),
            )
        )
        for image_id, score in result.get("clip_per_image", {}).items():
            per_image_rows.append((cell.method, f"{cell.scale:g}", cell.seed, image_id, score))
    out = run_dir / "metrics" / "scores.csv"
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
    """Compute and cache reference statistics under `stats_file_name(...)`; an existing file is reused."""
    path = Path(out_dir) / stats_file_name(name, protocol, extractor_name, len(files))
    if path.is_file():
        logger.info("reusing cached reference statistics %s", path)
        return path
    features = image_features(files, extractor, protocol, batch_size, device, num_workers, progress=progress)
    save_stats(feature_statistics(features, protocol.tag, extractor_name), path)
    return path


# ---------------------------------------------------------------- CLI


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _add_fid_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", choices=("clean", "t2ib"), default="clean", help="FID protocol (default clean)")
    parser.add_argument("--no-center-crop", action="store_true", help="clean mode: resize without centre crop")
    parser.add_argument("--inception", type=Path, help="local Inception weights file (see README, offline use)")
    parser.add_argument(
        "--no-download", action="store_true", help="never download weights (implied by HF_HUB_OFFLINE=1)"
    )


def _common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=4, help="data-loader processes for image decoding")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")


def _protocol(args: argparse.Namespace) -> FIDProtocol:
    return FIDProtocol(args.mode, center_crop=not args.no_center_crop)


def _inception(args: argparse.Namespace, protocol: FIDProtocol, device: str) -> FeatureExtractor:
    offline = args.no_download or os.environ.get("HF_HUB_OFFLINE") == "1"
    return load_inception(protocol, args.inception, device=device, allow_download=not offline)


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
    device = args.device or _default_device()
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
        clip = load_clip(CLIPSpec(args.clip_model, pretrained, args.clip_weights), device=device)
    out = score_run(args.run, fid, clip, args.batch_size, device, args.workers, args.force, progress=True)
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
