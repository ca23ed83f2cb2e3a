"""Metric CLI over sweep folders: every registered metric (eval.registry: FID, KID, CLIP score, CMMD) per cell.

`python -m eval.metrics ref-stats` caches FID reference statistics under a protocol-naming file; `python -m
eval.metrics score` checks that every cell folder of the sweep's manifest is complete and readable, then writes
`{run}/metrics/scores.csv` and one `{metric}_per_image.csv` per metric with per-image values (`clip_per_image.csv`).
Per-cell results are cached by the digest of the cell's image bytes, so reruns resume; cells are claimed while they
are computed, so two `score` runs on one folder share the work.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import io
from .captions import Caption, load_captions, select_captions
from .cli_common import OneLineParser, check_device, positive_seconds, report_error, whole_number
from .distributed import barrier, process_group, shared_rows
from .fid import FeatureExtractor, FIDProtocol, feature_statistics, image_features, load_stats, save_stats
from .fid import stats_file_name as stats_file_name
from .guidance_log import mean_effective_scale
from .images import expected_image_files, list_images
from .images import select_reference_images as select_reference_images
from .manifest import check_captions_file, read_manifest
from .metric_base import BuildContext, CellData, Metric, MetricEntry
from .metric_fid import FIDSetup as FIDSetup
from .metric_fid import add_protocol_options, check_inception_file, protocol_from_args
from .registry import entries

logger = logging.getLogger(__name__)

CACHE_FORMAT = 2  # 2: one record per registered metric, keyed by metric settings, features, images and captions


def score_columns(registered: Sequence[MetricEntry] | None = None) -> tuple[str, ...]:
    """`scores.csv` columns: the cell, one column per registered metric, the effective scale, provenance, digest."""
    registered = entries() if registered is None else registered
    return (
        "method",
        "scale",
        "seed",
        "n_images",
        *(e.name for e in registered),
        "effective_scale",
        *(c for e in registered for c in e.provenance),
        "images_digest",
    )


SCORE_COLUMNS = score_columns()


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
class CheckedRun:
    """A run whose every cell holds exactly the manifest's images, each with an RGB PNG header of its size."""

    dir: Path
    run: Run
    files: dict[Cell, list[Path]]


@dataclass(frozen=True)
class MetricResult:
    """One metric's value for one cell, the provenance columns it fills, and its per-image values (or None)."""

    value: float
    provenance: dict[str, str]
    per_image: dict[int, float] | None = None


@dataclass(frozen=True)
class CellScores:
    """The scores of one cell: a `scores.csv` row."""

    cell: Cell
    n_images: int
    images_digest: str
    effective_scale: float
    results: dict[str, MetricResult]

    def row(self, registered: Sequence[MetricEntry]) -> list[object]:
        """The row under `score_columns(registered)` (NaN and blanks where a metric was not computed)."""
        provenance: dict[str, str] = {}
        for result in self.results.values():
            provenance.update(result.provenance)
        values = [self.results[e.name].value if e.name in self.results else math.nan for e in registered]
        columns = [provenance.get(c, "") for e in registered for c in e.provenance]
        cell = self.cell
        return [cell.method, f"{cell.scale:g}", cell.seed, self.n_images, *values, self.effective_scale, *columns,
                self.images_digest]  # fmt: skip


@dataclass(frozen=True)
class RunScores:
    """What `score_run` wrote: `scores.csv`, the per-image files by metric name, and the cell records."""

    scores_csv: Path
    per_image: dict[str, Path]
    cells: tuple[CellScores, ...]


# ---------------------------------------------------------------- run folders


def read_run(run_dir: str | Path) -> Run:
    """The cells, captions and image size a sweep's `manifest.json` lists; the caption file must match its md5."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    where = run_dir / "manifest.json"
    captions = load_captions(check_captions_file(run_dir, manifest))
    try:
        cells = [Cell(str(c["method"]), float(c["scale"]), int(c["seed"]), str(c["path"])) for c in manifest["cells"]]
        size = (int(manifest["generation"]["width"]), int(manifest["generation"]["height"]))
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{where}: a cell or the image size does not parse ({type(err).__name__}: {err})") from None
    if not cells:
        raise ValueError(f"{where} lists no cells")
    paths = [c.path for c in cells]
    if len(set(paths)) != len(paths):
        raise ValueError(f"{where} lists a cell folder twice: {sorted({p for p in paths if paths.count(p) > 1})}")
    return Run(cells, captions, size)


def _image_header_problem(path: Path, size: tuple[int, int]) -> str | None:
    """Why an image file's header does not promise an RGB PNG of `size` (width, height); None when it does."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            if image.format != "PNG":
                return f"{path.name}: {image.format} data, not PNG (the sweep writes PNGs)"
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


def check_run(run_dir: str | Path) -> CheckedRun:
    """`read_run` and `check_complete`: everything about a run folder that can be refused before a model loads."""
    run = read_run(run_dir)
    return CheckedRun(Path(run_dir), run, check_complete(run_dir, run))


# ---------------------------------------------------------------- per-cell cache


def _cell_cache_path(run_dir: Path, cell: Cell) -> Path:
    return run_dir / "metrics" / "cells" / f"{cell.path}.json"


def _claim_path(run_dir: Path, cell: Cell) -> Path:
    return run_dir / "metrics" / ".claims" / cell.path


def _read_cache(path: Path) -> dict[str, dict[str, Any]]:
    """{metric name: {key, value, provenance, per_image}} of a cell's cache; {} when absent, older or damaged."""
    if not path.is_file():
        return {}
    try:
        data = io.read_json(path)
    except (OSError, ValueError) as err:
        logger.warning("ignoring the damaged cache %s (%s); recomputing its cell", path, err)
        return {}
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or not isinstance(data.get("metrics"), dict):
        return {}
    return {k: v for k, v in data["metrics"].items() if isinstance(v, dict) and "key" in v and "value" in v}


def _write_cache(path: Path, records: dict[str, dict[str, Any]]) -> None:
    io.write_json(path, {"format": CACHE_FORMAT, "metrics": records})


def _full_key(metric: Metric, images_digest: str, captions_digest: str) -> dict[str, Any]:
    """What a cached value must have been computed from: the metric's settings, its features, the images, the
    captions; as read back from JSON."""
    key = {**metric.key(), "metric": metric.entry.name, "features": metric.features.id}
    key.update(images=images_digest, captions=captions_digest)
    return json.loads(json.dumps(key))


def _result(record: dict[str, Any]) -> MetricResult:
    per_image = record.get("per_image")
    return MetricResult(
        float(record["value"]),
        {str(k): str(v) for k, v in record.get("provenance", {}).items()},
        None if per_image is None else {int(k): float(v) for k, v in per_image.items()},
    )


def _record(key: dict[str, Any], result: MetricResult) -> dict[str, Any]:
    record = {"key": key, "value": result.value, "provenance": result.provenance}
    if result.per_image is not None:
        record["per_image"] = {str(k): v for k, v in result.per_image.items()}
    return record


# ---------------------------------------------------------------- scoring


def compute_cell(
    metrics: Sequence[Metric],
    files: Sequence[Path],
    captions: Sequence[Caption],
    batch_size: int,
    device: str,
    num_workers: int = 0,
    progress: bool = False,
) -> dict[str, MetricResult]:
    """The metrics of one cell: one feature pass per distinct `FeaturePass.id`, each shared by its metrics and split
    across the processes of a torch.distributed group in whole batches (`distributed.shared_rows`)."""
    n = len(files)
    passes: dict[str, list[Metric]] = {}
    for metric in metrics:
        passes.setdefault(metric.features.id, []).append(metric)
    ids, texts = tuple(c.image_id for c in captions), tuple(c.text for c in captions)

    def rows(compute):
        return shared_rows(compute, n, batch_size, device)

    results = {}
    for group in passes.values():
        feature_pass = group[0].features

        def features_of(items: list[int], feature_pass=feature_pass) -> np.ndarray:
            return feature_pass.compute([files[i] for i in items], batch_size, device, num_workers, progress)

        cell = CellData(rows(features_of), ids, texts, rows, batch_size, device)
        for metric in group:
            value = metric.compute(cell)
            per_image = None if value.per_image is None else dict(value.per_image)
            results[metric.entry.name] = MetricResult(float(value.value), metric.provenance(), per_image)
    return results


def _say_waiting(cell: Cell, claim: Path, timeout: float) -> None:
    holder = io.claim_holder(claim)
    who = "another process" if holder is None else f"pid {holder.pid} on {holder.host} ({holder.age:.0f} s ago)"
    logger.info(
        "%s is being scored by %s; scoring the other cells and then waiting for it, at most %.0f s (--claim-timeout)",
        cell.path,
        who,
        timeout - (holder.age if holder else 0.0),
    )


def score_run(
    run_dir: str | Path,
    metrics: Sequence[Metric],
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    force: bool = False,
    progress: bool = False,
    claim_timeout: float = 1800.0,
    checked: CheckedRun | None = None,
    poll: float = 0.2,
) -> RunScores:
    """Score every cell of a finished sweep with `metrics`; writes `{run}/metrics/scores.csv` and per-image files.

    A cached result is reused only when its key (metric settings, feature pass, digests of the cell's image bytes and
    of the captions) is unchanged; results of other registered metrics cached for the same images stay in the table.
    Alone, a process claims each cell it computes (`io.try_claim`), so concurrent `score` runs split the work. In a
    torch.distributed group (`accelerate launch -m eval.metrics score`) every process computes whole batches of every
    cell and the first process writes the files; the numbers equal one process's.
    """
    if not metrics:
        raise ValueError("nothing to compute: give at least one metric")
    names = [m.entry.name for m in metrics]
    if len(set(names)) != len(names):
        raise ValueError(f"each metric can be given once, got {names}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not (math.isfinite(claim_timeout) and claim_timeout > 0):
        raise ValueError(f"claim_timeout must be a finite number of seconds > 0, got {claim_timeout}")
    run_dir = Path(run_dir)
    checked = checked or check_run(run_dir)
    run, files = checked.run, checked.files
    device = str(device)
    rank, world = process_group()
    writer = rank == 0
    captions_digest = hashlib.sha256("\n".join(c.text for c in run.captions).encode("utf-8")).hexdigest()
    digests = {cell: io.files_digest(files[cell]) for cell in run.cells}
    caches = {cell: _read_cache(_cell_cache_path(run_dir, cell)) for cell in run.cells}
    barrier()  # every process decided from the same caches before the first one writes
    keys = {cell: {m.entry.name: _full_key(m, digests[cell], captions_digest) for m in metrics} for cell in run.cells}

    def stale(cell: Cell) -> list[Metric]:
        cached = caches[cell]
        return [m for m in metrics if force or cached.get(m.entry.name, {}).get("key") != keys[cell][m.entry.name]]

    done: set[Cell] = set()
    pending, announced = list(run.cells), set()
    while pending:
        waiting = []
        for cell in pending:
            todo = stale(cell) if cell not in done else []
            if not todo:
                continue
            claim = _claim_path(run_dir, cell) if world == 1 else None
            if claim is not None:
                if not io.try_claim(claim, claim_timeout):
                    waiting.append(cell)
                    if cell not in announced:
                        announced.add(cell)
                        _say_waiting(cell, claim, claim_timeout)
                    continue
                caches[cell] = _read_cache(_cell_cache_path(run_dir, cell))  # another run may have finished it
                todo = stale(cell)
            try:
                if todo:
                    fresh = compute_cell(todo, files[cell], run.captions, batch_size, device, num_workers, progress)
                    caches[cell] = {**caches[cell], **{n: _record(keys[cell][n], r) for n, r in fresh.items()}}
                    if writer:
                        _write_cache(_cell_cache_path(run_dir, cell), caches[cell])
                done.add(cell)  # with force, computed once per call
            finally:
                if claim is not None:
                    io.release_claim(claim)
        if waiting and len(waiting) == len(pending):
            time.sleep(poll)
        pending = waiting
    scores = tuple(
        _cell_scores(run_dir, run, cell, files[cell], digests[cell], captions_digest, caches[cell])
        for cell in run.cells
    )
    for record in scores:
        if writer:
            shown = ", ".join(f"{name} {r.value:.6g}" for name, r in record.results.items())
            logger.info("%s: %s", record.cell.path, shown or "no metric")
    return _write_scores(run_dir, scores, writer)


def _cell_scores(
    run_dir: Path,
    run: Run,
    cell: Cell,
    files: list[Path],
    digest: str,
    captions_digest: str,
    cached: dict[str, dict[str, Any]],
) -> CellScores:
    """A cell's record from its cache: every registered metric whose cached value was computed from these images and
    captions (the metrics of this call, and those an earlier call computed)."""
    results = {}
    for entry in entries():
        record = cached.get(entry.name)
        key = record.get("key", {}) if record else {}
        if record and key.get("images") == digest and key.get("captions") == captions_digest:
            results[entry.name] = _result(record)
    effective = mean_effective_scale(run_dir, cell.path, [c.image_id for c in run.captions])
    return CellScores(cell, len(files), digest, effective, results)


def _write_scores(run_dir: Path, scores: Sequence[CellScores], writer: bool) -> RunScores:
    """`scores.csv` and one `{metric}_per_image.csv` per per-image metric with values (stale ones removed)."""
    registered = entries()
    out = run_dir / "metrics" / "scores.csv"
    per_image_paths = {}
    for entry in (e for e in registered if e.per_image):
        path = out.with_name(entry.per_image_file)
        rows = [
            (s.cell.method, f"{s.cell.scale:g}", s.cell.seed, image_id, value)
            for s in scores
            if s.results.get(entry.name) is not None and s.results[entry.name].per_image is not None
            for image_id, value in s.results[entry.name].per_image.items()
        ]
        if rows:
            per_image_paths[entry.name] = path
            if writer:
                io.atomic_write_text(path, io.csv_text(("method", "scale", "seed", "image_id", entry.name), rows))
        elif writer:
            path.unlink(missing_ok=True)  # left by an earlier call: its values are not in this scores.csv
    if writer:
        io.atomic_write_text(out, io.csv_text(score_columns(registered), [s.row(registered) for s in scores]))
    return RunScores(out, per_image_paths, tuple(scores))


# ---------------------------------------------------------------- reference statistics (FID)


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
        try:
            cached = load_stats(path).images_digest
        except ValueError as err:
            logger.warning("%s; recomputing it", err)
            cached = None
        if cached == digest:
            logger.info("reusing cached reference statistics %s (same image bytes)", path)
            return path
        if cached is not None:
            logger.warning("the images behind %s changed since it was computed; recomputing", path)
    features = image_features(files, extractor, protocol, batch_size, device, num_workers, progress=progress)
    save_stats(feature_statistics(features, protocol.tag, extractor_name, keep=True, images_digest=digest), path)
    return path


# ---------------------------------------------------------------- CLI


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=whole_number(1), default=64)
    parser.add_argument("--workers", type=whole_number(0), default=4, help="data-loader processes for image decoding")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument(
        "--no-download",
        action="store_true",
        help="never download Inception or CLIP weights (implied by HF_HUB_OFFLINE=1)",
    )


def _offline(args: argparse.Namespace) -> bool:
    return args.no_download or os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}


def _cmd_ref_stats(args: argparse.Namespace) -> int:
    from .fid import load_inception

    if args.device is not None:
        check_device("--device", args.device)
    device = args.device or _default_device()
    protocol = protocol_from_args(args)
    check_inception_file(args)
    if args.all_images and (args.captions is not None or args.limit is not None):
        raise ValueError("--all-images excludes --captions and --limit")
    files = list_images(args.images, recursive=True)
    if not args.all_images:
        chosen = select_captions(load_captions(args.captions), args.limit, args.subset_seed)
        files = select_reference_images(files, [c.image_id for c in chosen])
    if len(files) < 2:
        raise ValueError(f"{args.images} holds {len(files)} images; reference statistics need at least 2")
    stats_file_name(args.name, protocol, protocol.network, len(files))  # a bad --name fails before the model loads
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out} is a file; give a folder for the statistics")
    extractor = load_inception(protocol, args.inception, device=device, allow_download=not _offline(args))
    path = reference_stats(
        files, args.name, args.out, protocol, extractor, protocol.network, args.batch_size, device, args.workers, True
    )
    print(path)
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    if args.device is not None:
        check_device("--device", args.device)
    # Under `accelerate launch` / `torchrun` this joins the process group (gloo on the CPU); alone it is one process.
    use_cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    state = PartialState(cpu=use_cpu)
    device = args.device or (str(state.device) if state.num_processes > 1 else _default_device())
    checked = check_run(args.run)  # the folder, then every metric's inputs, before any model loads
    ctx = BuildContext(device, not _offline(args), args.batch_size, args.workers, checked.run.captions)
    requested = [entry for entry in entries() if entry.check(args, ctx)]
    if not requested:
        names = ", ".join(e.name for e in entries())
        raise ValueError(f"nothing to compute: every metric ({names}) is off or lacks its reference; see score --help")
    metrics = [entry.build(args, ctx) for entry in requested]
    scores = score_run(
        args.run,
        metrics,
        args.batch_size,
        device,
        args.workers,
        args.force,
        progress=True,
        claim_timeout=args.claim_timeout,
        checked=checked,
    )
    if state.is_main_process:
        print(scores.scores_csv.read_text(encoding="utf-8"), end="")
        print(f"scores: {scores.scores_csv}")
    return 0


def _metrics_help() -> str:
    lines = ["Metrics (each an entry of eval/registry.py; options in the groups below):"]
    lines += [f"  {e.name:6s} {e.summary}" for e in entries()]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of `python -m eval.metrics`."""
    parser = OneLineParser(prog="goca-scfg-metrics", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    ref = sub.add_parser("ref-stats", help="compute (once) and cache reference FID statistics of real images")
    ref.add_argument("--images", type=Path, required=True, help="folder of real images, searched recursively")
    ref.add_argument("--captions", type=Path, help="keep only the images of these caption ids (default set: COCO-30k)")
    ref.add_argument("--all-images", action="store_true", help="use every image in --images (no id selection)")
    ref.add_argument("--limit", type=whole_number(1), help="ids of the first N captions (or a seeded subset)")
    ref.add_argument("--subset-seed", type=whole_number(0), help="random subset of --limit captions")
    ref.add_argument("--name", default="coco-val2014", help="dataset name in the cached file name")
    ref.add_argument("--out", type=Path, default=Path("stats"), help="folder of cached statistics (default stats/)")
    add_protocol_options(ref)
    _common_options(ref)

    score = sub.add_parser(
        "score",
        help=f"the registered metrics ({', '.join(e.label for e in entries())}) of every cell of a finished sweep",
        description="Score every cell of a finished sweep.\n\n" + _metrics_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    score.add_argument("--run", type=Path, required=True, help="sweep output folder (with manifest.json)")
    score.add_argument("--force", action="store_true", help="recompute cached per-cell results")
    score.add_argument(
        "--claim-timeout",
        type=positive_seconds,
        default=1800.0,
        help="seconds after which another score run's claim on a cell counts as abandoned (default 1800)",
    )
    _common_options(score)
    for entry in entries():
        if entry.add_options is not None:
            entry.add_options(score.add_argument_group(f"{entry.label} ({entry.name})", entry.summary))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m eval.metrics` / `goca-scfg-metrics`."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _cmd_ref_stats(args) if args.command == "ref-stats" else _cmd_score(args)
    except (OSError, ValueError) as err:  # bad input: one clear line, no traceback
        return report_error(err)


if __name__ == "__main__":
    raise SystemExit(main())
