"""COCO-30k generation sweep: methods × guidance scales × seeds (algorithm.md §3.2), resumable and sharded.

Output: `{out}/{method}/cfg-{scale}/seed-{seed}/{image_id}.png`, `{out}/captions.csv` (the captions used),
`{out}/manifest.json` (exact configuration, cells, package versions) and `{out}/guidance/{cell}.csv` (effective
guidance per image, `guidance_rows`). Every PNG is written atomically and carries a digest of the settings that decided
its pixels; a rerun checks every image (intact, manifest size and mode, same settings) and regenerates the rest.

One image, one answer: the caption list is cut into fixed groups of `batch_size` (`caption_groups`) and one group is
always one pipeline call, so pixels never depend on `--shard i/n`, on the processes of `accelerate launch --multi_gpu
-m eval.sweep` (or `torchrun`), on interruption or on resume order. Shards and processes take whole groups; a group
with an unfinished image is recomputed whole and only its unfinished files are written. Groups are claimed while they
run (`io.try_claim`), so several sweeps started on one `--out` share the work and generate each image once.

manifest.json: `generation` (GenerationSettings, resolved), `captions` (file, md5, count, source, limit, subset_seed),
`batch_size`, `methods` (name → segmentor and configs), `scales`, `seeds`, `cells` ([{method, scale, seed, path}]),
`versions`, `command`. A rerun may add methods, scales or seeds; anything that decides pixels (including the batch
size) must match (`merge_manifest`).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io as _stdio
import json
import logging
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from goca_scfg.families import FAMILIES
from goca_scfg.loading import SD15_MODEL_ID, load_pipeline, native_size, swap_scheduler
from goca_scfg.vocab import (
    AUTO_DTYPE,
    DTYPE_NAMES,
    METHOD_NAMES,
    SCHEDULER_NAMES,
    Method,
    check_scheduler,
    get_method,
    torch_dtype,
)

from . import io
from .captions import DEFAULT_CAPTIONS, Caption, format_captions, load_captions, select_captions
from .images import png_problem

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CAPTIONS_FILE = "captions.csv"
MANIFEST_FORMAT = 2  # 2: fixed caption groups, settings tag in every PNG
SeedMode = Literal["same", "per-image"]
Dtype = str  # a `goca_scfg.vocab` dtype name or "auto"
_VERSIONED = ("goca-scfg", "torch", "diffusers", "transformers", "accelerate", "numpy", "pillow", "safetensors")


# ---------------------------------------------------------------- settings and presets


@dataclass(frozen=True)
class GenerationSettings:
    """Everything that decides an image besides (method, scale, seed, caption); must not change within a run.

    `height`/`width` None: the model's native size (512 for SD v1.5). `seed_mode` "same": every caption starts from
    the same noise, `torch.Generator(...).manual_seed(seed)` per image (algorithm.md §5.23, the paper's protocol);
    "per-image": a seed derived from (seed, image_id). `generator_device` "device" draws the noise on the pipeline's
    device (as the reference code, which seeds the global CUDA RNG); "cpu" gives device-independent noise.
    """

    model: str = SD15_MODEL_ID
    dtype: Dtype = "fp16"
    scheduler: str = "default"  # a `goca_scfg.vocab` scheduler name
    steps: int = 50
    height: int | None = None
    width: int | None = None
    seed_mode: SeedMode = "same"
    generator_device: Literal["device", "cpu"] = "device"

    def __post_init__(self) -> None:
        if self.dtype not in (AUTO_DTYPE, *DTYPE_NAMES):
            raise ValueError(f"dtype {self.dtype!r} is not one of {(AUTO_DTYPE, *DTYPE_NAMES)}")
        check_scheduler(self.scheduler)
        if self.seed_mode not in ("same", "per-image"):
            raise ValueError(f"seed_mode {self.seed_mode!r} is not 'same' or 'per-image'")
        if self.generator_device not in ("device", "cpu"):
            raise ValueError(f"generator_device {self.generator_device!r} is not 'device' or 'cpu'")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (value < 8 or value % 8):
                raise ValueError(f"{name}={value} must be a positive multiple of 8")


@dataclass(frozen=True)
class Preset:
    """A named protocol: generation settings plus the default methods, scales and seeds."""

    settings: GenerationSettings
    methods: tuple[str, ...]
    scales: tuple[float, ...]
    seeds: tuple[int, ...]


# Each model family's protocols (goca_scfg/families/: "paper" and "per-image" on SD v1.5, "sdxl", "pixart-sigma").
PRESETS: dict[str, Preset] = {
    preset.name: Preset(
        GenerationSettings(model=family.model_id, **preset.settings), preset.methods, preset.scales, preset.seeds
    )
    for family in FAMILIES
    for preset in family.sweep_presets
}


@dataclass(frozen=True)
class CaptionSource:
    """Where the captions of a run came from, for the manifest."""

    path: str
    md5: str
    limit: int | None
    subset_seed: int | None


@dataclass(frozen=True)
class SweepPlan:
    """What one sweep generates: methods × scales × seeds × captions under fixed settings, into `out`."""

    out: Path
    methods: tuple[Method, ...]
    scales: tuple[float, ...]
    seeds: tuple[int, ...]
    captions: tuple[Caption, ...]
    source: CaptionSource
    settings: GenerationSettings
    batch_size: int = 4

    def __post_init__(self) -> None:
        for name in ("methods", "scales", "seeds", "captions"):
            values = getattr(self, name)
            if not values:
                raise ValueError(f"a sweep needs at least one of {name}")
            if len(set(values)) != len(values):
                raise ValueError(f"duplicate {name} in {values!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        bad = [w for w in self.scales if not (math.isfinite(w) and w > 0)]
        if bad:
            raise ValueError(f"guidance scales must be finite and > 0, got {bad}")


@dataclass(frozen=True)
class Shard:
    """Part `index` of `count`: caption group g (`caption_groups`) of every cell belongs to shard g mod count."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"shard {self.index}/{self.count}: need 0 <= index < count")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """`"i/n"` → Shard(i, n)."""
        try:
            index, count = (int(part) for part in text.split("/"))
        except ValueError:
            raise ValueError(f"shard {text!r} must look like i/n, e.g. 0/4") from None
        return cls(index, count)

    def split(self, processes: int, process_index: int) -> Shard:
        """This shard further divided among `processes` (e.g. accelerate's processes), part `process_index`."""
        return Shard(self.index * processes + process_index, self.count * processes)

    def select(self, captions: Sequence[Caption]) -> tuple[Caption, ...]:
        """The items (caption groups) this shard owns."""
        return tuple(captions[self.index :: self.count])


@dataclass(frozen=True)
class SweepResult:
    """Counts of one process's sweep: images written now, owned images found finished (or written by a concurrent
    sweep), and how many of the written ones replaced a damaged or foreign file."""

    generated: int
    skipped: int
    replaced: int = 0


# ---------------------------------------------------------------- layout, seeds, manifest


def cell_path(method: str, scale: float, seed: int) -> str:
    """`{method}/cfg-{scale}/seed-{seed}` (scale as a float: cfg-2.0, cfg-7.5, as the reference scripts)."""
    return f"{method}/cfg-{float(scale)}/seed-{seed}"


def image_seed(seed: int, image_id: int, mode: SeedMode) -> int:
    """The generator seed of one image: `seed` itself ("same") or a hash of (seed, image_id) ("per-image")."""
    if mode == "same":
        return seed
    digest = hashlib.sha256(f"{seed}/{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1  # 63 bits: valid for torch.Generator.manual_seed


def resolve_dtype(name: Dtype, device: torch.device) -> Dtype:
    """fp16/bf16 need an accelerator: on the CPU they fall back to fp32 with a warning; "auto": fp16 on CUDA."""
    if name == AUTO_DTYPE:
        return "fp16" if device.type == "cuda" else "fp32"
    if name in ("fp16", "bf16") and device.type == "cpu":
        logger.warning("dtype %s requested on the CPU; using fp32 (recorded in the manifest)", name)
        return "fp32"
    return name


def _versions(device: torch.device) -> dict[str, Any]:
    versions: dict[str, Any] = dict(io.package_versions(_VERSIONED))
    versions["python"] = platform.python_version()
    versions["cuda"] = torch.version.cuda
    versions["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return versions


def _cells(methods: Sequence[str], scales: Sequence[float], seeds: Sequence[int]) -> list[dict[str, Any]]:
    return [
        {"method": m, "scale": float(w), "seed": s, "path": cell_path(m, w, s)}
        for m in methods
        for w in scales
        for s in seeds
    ]


def build_manifest(plan: SweepPlan, captions_md5: str, device: torch.device) -> dict[str, Any]:
    """The manifest of `plan` as plain JSON values (format in the module docstring)."""
    manifest = {
        "format": MANIFEST_FORMAT,
        "generation": dataclasses.asdict(plan.settings),
        "captions": {
            "file": CAPTIONS_FILE,
            "md5": captions_md5,
            "count": len(plan.captions),
            "source": plan.source.path,
            "source_md5": plan.source.md5,
            "limit": plan.source.limit,
            "subset_seed": plan.source.subset_seed,
        },
        "methods": {m.name: m.describe() for m in plan.methods},
        "scales": [float(w) for w in plan.scales],
        "seeds": list(plan.seeds),
        "cells": _cells([m.name for m in plan.methods], plan.scales, plan.seeds),
        "batch_size": plan.batch_size,
        "versions": _versions(device),
        "command": list(sys.argv),
    }
    return json.loads(json.dumps(manifest))  # tuples → lists, as read back from disk


def merge_manifest(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Extend an existing run with more methods, scales or seeds; anything that decides pixels must be unchanged."""
    if old.get("format") == new["format"] and old.get("batch_size") != new["batch_size"]:
        raise ValueError(
            f"this output folder was generated with --batch-size {old.get('batch_size')}; the batch size decides "
            f"pixels (fixed caption groups), so resuming with --batch-size {new['batch_size']} is refused. Pass "
            f"--batch-size {old.get('batch_size')}, or use another --out."
        )
    for key in ("format", "generation", "captions"):
        if old.get(key) != new[key]:
            raise ValueError(
                f"this output folder was generated with different {key!r}:\n  existing: {old.get(key)}\n"
                f"  requested: {new[key]}\nUse another --out, or the same settings to resume."
            )
    for name, spec in new["methods"].items():
        if name in old["methods"] and old["methods"][name] != spec:
            raise ValueError(f"method {name!r} had another configuration in this folder: {old['methods'][name]}")
    methods = {**old["methods"], **new["methods"]}
    scales = sorted(set(old["scales"]) | set(new["scales"]))
    seeds = sorted(set(old["seeds"]) | set(new["seeds"]))
    known = {c["path"] for c in old["cells"]}
    cells = old["cells"] + [c for c in new["cells"] if c["path"] not in known]
    return {**new, "methods": methods, "scales": scales, "seeds": seeds, "cells": cells}


def prepare_output(plan: SweepPlan, device: torch.device, write: bool) -> dict[str, Any]:
    """Check `plan` against an existing manifest and (when `write`) store captions.csv and the merged manifest."""
    captions_text = format_captions(plan.captions)
    captions_md5 = hashlib.md5(captions_text.encode("utf-8")).hexdigest()
    manifest = build_manifest(plan, captions_md5, device)
    path = plan.out / MANIFEST
    lock = plan.out / ".claims" / "manifest"
    while write and not io.try_claim(lock, timeout=60.0):  # concurrent sweeps merge their cells one at a time
        time.sleep(0.05)
    try:
        if path.is_file():
            manifest = merge_manifest(io.read_json(path), manifest)
        if write:
            if not (plan.out / CAPTIONS_FILE).is_file():
                io.atomic_write_text(plan.out / CAPTIONS_FILE, captions_text)
            io.write_json(path, manifest)
    finally:
        if write:
            io.release_claim(lock)
    return manifest


# ---------------------------------------------------------------- generation


def load_sweep_pipeline(settings: GenerationSettings, device: torch.device) -> Any:
    """The pipeline for `settings` on `device`, scheduler swapped and progress bars off."""
    dtype = torch_dtype(resolve_dtype(settings.dtype, device))
    pipe = load_pipeline(settings.model, torch_dtype=None if dtype == torch.float32 else dtype, device=str(device))
    swap_scheduler(pipe, settings.scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def resolve_settings(settings: GenerationSettings, pipe: Any, device: torch.device) -> GenerationSettings:
    """Settings with the dtype and the image size made explicit (as recorded in the manifest)."""
    native = native_size(pipe)
    return dataclasses.replace(
        settings,
        dtype=resolve_dtype(settings.dtype, device),
        height=settings.height or native[0],
        width=settings.width or native[1],
    )


def caption_groups(captions: Sequence[Caption], batch_size: int) -> tuple[tuple[Caption, ...], ...]:
    """Fixed batches of the caption list: group g = captions[g·bs, (g+1)·bs). One group is always one pipeline call,
    so an image's pixels never depend on how the work was split, interrupted or resumed."""
    return tuple(tuple(captions[start : start + batch_size]) for start in range(0, len(captions), batch_size))


@dataclass(frozen=True)
class GroupWork:
    """One pipeline call of a sweep: caption group `index` of the cell (method, scale, seed)."""

    method: Method
    scale: float
    seed: int
    index: int
    captions: tuple[Caption, ...]

    @property
    def cell(self) -> str:
        return cell_path(self.method.name, self.scale, self.seed)


def image_tag(plan: SweepPlan, method: Method, scale: float, seed: int) -> str:
    """Digest of every setting that decides the pixels of one cell, stored in each PNG (text chunk `TAG_KEY`)."""
    captions_md5 = hashlib.md5(format_captions(plan.captions).encode("utf-8")).hexdigest()
    spec = {k: v for k, v in method.describe().items() if k != "summary"}
    key = [dataclasses.asdict(plan.settings), captions_md5, plan.batch_size, spec, float(scale), seed]
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:32]


TAG_KEY = "goca-scfg-settings"


def _png_bytes(image: Any, tag: str) -> bytes:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(TAG_KEY, tag)
    buffer = _stdio.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def _claim_path(out: Path, work: GroupWork) -> Path:
    return out / ".claims" / work.cell / f"group-{work.index:06d}"


def guidance_part_path(out: Path, cell: str, index: int) -> Path:
    """Per-group effective-guidance rows, assembled into `guidance_path` when the cell is complete."""
    return out / "guidance" / f"{cell}.parts" / f"group-{index:06d}.csv"


def guidance_path(out: Path, cell: str) -> Path:
    """`{out}/guidance/{method}/cfg-{scale}/seed-{seed}.csv`: one row per image (see `guidance_rows`)."""
    return out / "guidance" / f"{cell}.csv"


GUIDANCE_COLUMNS = (
    "image_id",
    "guidance_scale",
    "effective_scale",
    "mean_rate",
    "fg_mean_rate",
    "rate_per_step",
    "fg_rate_per_step",
)


def guidance_rows(
    captions: Sequence[Caption], scale: float, rates: Sequence[Any] | None, iterations: int
) -> list[tuple]:
    """Effective guidance of each image of one call (item 9): the mean applied rate r per step over all pixels and over
    the foreground, their means over steps, and the effective scale mean_steps(w·mean(r)).

    `rates` is the pipeline output's `rates` (one `SCFGStepRates` per denoising-loop iteration), None for plain CFG,
    where r = 1 at each of the `iterations` and the effective scale is exactly w.
    """
    rows = []
    for i, caption in enumerate(captions):
        if rates is None:
            scales, means, fg = [float(scale)] * iterations, [1.0] * iterations, [1.0] * iterations
        else:
            scales = [float(r.guidance_scale) for r in rates]
            means = [float(r.mean[i]) for r in rates]
            fg = [float(r.fg_mean[i]) for r in rates]
        effective = math.fsum(w * m for w, m in zip(scales, means)) / len(means)
        finite_fg = [v for v in fg if math.isfinite(v)]
        rows.append(
            (
                caption.image_id,
                repr(float(scale)),
                repr(effective),
                repr(math.fsum(means) / len(means)),
                repr(math.fsum(finite_fg) / len(finite_fg)) if finite_fg else "nan",
                " ".join(map(repr, means)),
                " ".join(map(repr, fg)),
            )
        )
    return rows


def assemble_guidance(out: Path, cell: str, groups: int) -> bool:
    """Write the cell's guidance CSV from its per-group parts once all exist (idempotent); True when written."""
    parts = [guidance_part_path(out, cell, g) for g in range(groups)]
    if not all(p.is_file() for p in parts):
        return False
    lines = [p.read_text(encoding="utf-8").splitlines(keepends=True) for p in parts]
    text = lines[0][0] + "".join(line for part in lines for line in part[1:])
    target = guidance_path(out, cell)
    if not target.is_file() or target.read_text(encoding="utf-8") != text:
        io.atomic_write_text(target, text)
    return True


def read_guidance(out: Path, cell: str, image_ids: Sequence[int]) -> dict[int, float]:
    """{image_id: effective scale} of a cell's guidance CSV; it must list exactly `image_ids`, in order."""
    path = guidance_path(out, cell)
    rows = io.read_table(path, {"image_id": int, "effective_scale": float})
    found = [r["image_id"] for r in rows]
    if found != list(image_ids):
        raise ValueError(
            f"{path} lists {len(found)} images, not the run's {len(image_ids)} (damaged? rerun the sweep)"
        )
    return {r["image_id"]: r["effective_scale"] for r in rows}


def group_problems(plan: SweepPlan, work: GroupWork, tag: str) -> dict[Caption, str]:
    """Images of a group that are not finished, with the reason (missing, truncated, other size, other settings…).

    A finished image decodes (every chunk intact), has the manifest's size and mode and carries this cell's settings
    tag. The group's guidance part must exist too (reported under the first caption when only it is missing).
    """
    folder = plan.out / work.cell
    size = (plan.settings.width, plan.settings.height)
    problems = {}
    for caption in work.captions:
        path = folder / f"{caption.image_id}.png"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            problems[caption] = "missing"
            continue
        problem = png_problem(data, size, {TAG_KEY: tag})
        if problem is not None:
            problems[caption] = problem
    if not problems and not guidance_part_path(plan.out, work.cell, work.index).is_file():
        problems[work.captions[0]] = "guidance record missing"
    return problems


def _generate_group(plan: SweepPlan, pipe: Any, work: GroupWork, tag: str, problems: dict[Caption, str]) -> int:
    """Run the whole group in one call; write only its unfinished images and its guidance part; count files written."""
    settings = plan.settings
    folder = plan.out / work.cell
    removed = io.remove_partial_files(folder, {f"{c.image_id}.png" for c in work.captions})
    if removed:
        logger.info("removed %d partial file(s) left by an interrupted run in %s", removed, folder)
    generator_device = pipe.device if settings.generator_device == "device" else torch.device("cpu")
    generators = [
        torch.Generator(generator_device).manual_seed(image_seed(work.seed, c.image_id, settings.seed_mode))
        for c in work.captions
    ]
    out = pipe(
        prompt=[c.text for c in work.captions],
        height=settings.height,
        width=settings.width,
        num_inference_steps=settings.steps,
        guidance_scale=work.scale,
        generator=generators,
        output_type="pil",
        **work.method.pipeline_kwargs(),
    )
    written = 0
    for caption, image in zip(work.captions, out.images):
        if problems.get(caption, "guidance record missing") != "guidance record missing":
            io.atomic_write_bytes(folder / f"{caption.image_id}.png", _png_bytes(image, tag))
            written += 1
    iterations = len(pipe.scheduler.timesteps)  # e.g. PNDM runs steps + 1 iterations
    rows = guidance_rows(work.captions, work.scale, getattr(out, "rates", None), iterations)
    part = guidance_part_path(plan.out, work.cell, work.index)
    io.remove_partial_files(part.parent, {part.name})  # left by a process killed while writing it
    io.atomic_write_text(part, io.csv_text(GUIDANCE_COLUMNS, rows))
    return written


def _report_damaged(work: GroupWork, problems: dict[Caption, str]) -> int:
    damaged = {c: p for c, p in problems.items() if p not in ("missing", "guidance record missing")}
    if damaged:
        listed = ", ".join(f"{c.image_id}.png ({p})" for c, p in list(damaged.items())[:5])
        more = f" and {len(damaged) - 5} more" if len(damaged) > 5 else ""
        logger.warning("%s: regenerating %d unfinished image(s): %s%s", work.cell, len(damaged), listed, more)
    return len(damaged)


def run_sweep(
    plan: SweepPlan,
    pipe: Any,
    shard: Shard = Shard(),
    progress: bool = False,
    claim_timeout: float = 1800.0,
    poll: float = 0.2,
) -> SweepResult:
    """Generate the unfinished images of the caption groups `shard` owns; the manifest must already exist.

    Each group is claimed (`io.try_claim`) while it runs, so concurrent sweeps on one folder split the work; groups
    another live process holds are waited for and then re-checked. Damaged or foreign images are regenerated with
    their whole group and named in the log.
    """
    settings = plan.settings
    if settings.height is None or settings.width is None:
        raise ValueError("resolve the image size first (resolve_settings)")
    groups = caption_groups(plan.captions, plan.batch_size)
    owned = shard.select(tuple(range(len(groups))))
    queue = [
        GroupWork(method, float(scale), seed, g, groups[g])
        for method in plan.methods
        for scale in plan.scales
        for seed in plan.seeds
        for g in owned
    ]
    tags = {(w.method.name, w.scale, w.seed): image_tag(plan, w.method, w.scale, w.seed) for w in queue}
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    total = sum(len(w.captions) for w in queue)
    bar = tqdm(total=total, desc=f"sweep {shard.index}/{shard.count}", disable=not progress, unit="img")
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:  # zlib and reads release the GIL
        finished = list(pool.map(lambda w: not group_problems(plan, w, tags[(w.method.name, w.scale, w.seed)]), queue))
    bar.update(sum(len(w.captions) for w, done in zip(queue, finished) if done))
    queue = [w for w, done in zip(queue, finished) if not done]  # checked again under the claim
    generated = replaced = 0
    while queue:
        waiting = []
        for work in queue:
            tag = tags[(work.method.name, work.scale, work.seed)]
            claim = _claim_path(plan.out, work)
            if not io.try_claim(claim, claim_timeout):
                waiting.append(work)  # another process runs this group now; re-check it when released
                continue
            try:
                problems = group_problems(plan, work, tag)
                if problems:
                    replaced += _report_damaged(work, problems)
                    generated += _generate_group(plan, pipe, work, tag, problems)
            finally:
                io.release_claim(claim)
            bar.update(len(work.captions))
            bar.set_postfix_str(work.cell, refresh=False)
        if waiting and len(waiting) == len(queue):
            time.sleep(poll)
        queue = waiting
    bar.close()
    cells = {cell_path(m.name, w, s) for m in plan.methods for w in plan.scales for s in plan.seeds}
    for cell in sorted(cells):
        assemble_guidance(plan.out, cell, len(groups))
    return SweepResult(generated=generated, skipped=total - generated, replaced=replaced)


# ---------------------------------------------------------------- CLI


def _csv(cast: type) -> Any:
    def parse(text: str) -> tuple:
        parts = [part.strip() for part in text.split(",")]
        if not all(parts):
            raise argparse.ArgumentTypeError(f"{text!r} has an empty item; give a comma-separated list like 2,3,7.5")
        try:
            return tuple(cast(part) for part in parts)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {cast.__name__}") from None

    return parse


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of `python -m eval.sweep`; unset options come from `--preset`."""
    p = argparse.ArgumentParser(prog="goca-scfg-sweep", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output folder (resumes if it exists)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="paper", help="protocol defaults (default: paper)")
    p.add_argument("--model", help="hub id or local path; 'tiny-random' is the offline fixture")
    p.add_argument("--methods", type=_csv(str), help=f"comma list of {', '.join(METHOD_NAMES)}")
    p.add_argument("--scales", type=_csv(float), help="guidance scales, e.g. 2,3,5,7.5,10")
    p.add_argument("--seeds", type=_csv(int), help="seeds, e.g. 42 or 0,1,2")
    p.add_argument("--captions", type=Path, help=f"image_id,text CSV (default: {DEFAULT_CAPTIONS.name}, COCO-30k)")
    p.add_argument("--limit", type=int, help="first N captions (or a random N with --subset-seed)")
    p.add_argument("--subset-seed", type=int, help="seed of a random caption subset of size --limit")
    p.add_argument("--steps", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--scheduler", choices=SCHEDULER_NAMES)
    p.add_argument("--dtype", choices=(AUTO_DTYPE, *DTYPE_NAMES))
    p.add_argument("--seed-mode", choices=("same", "per-image"))
    p.add_argument("--generator-device", choices=("device", "cpu"))
    p.add_argument(
        "--batch-size", type=int, help="prompts per pipeline call; decides pixels, fixed per --out (default 4)"
    )
    p.add_argument(
        "--claim-timeout",
        type=float,
        default=1800.0,
        help="seconds after which another host's claim on a caption group counts as abandoned (default 1800)",
    )
    p.add_argument("--shard", type=Shard.parse, default=Shard(), help="i/n: this job's part of the work")
    p.add_argument("--device", help="single-process device override (default: accelerate's choice)")
    p.add_argument("--no-progress", action="store_true")
    return p


def plan_from_args(args: argparse.Namespace) -> SweepPlan:
    """A `SweepPlan` from parsed arguments, preset values filling what was not given."""
    preset = PRESETS[args.preset]
    overrides = {
        name: getattr(args, name)
        for name in ("model", "dtype", "scheduler", "steps", "height", "width", "seed_mode", "generator_device")
        if getattr(args, name) is not None
    }
    settings = dataclasses.replace(preset.settings, **overrides)
    source = args.captions if args.captions is not None else DEFAULT_CAPTIONS
    if args.subset_seed is not None and args.limit is None:
        raise ValueError("--subset-seed needs --limit")
    return SweepPlan(
        out=args.out,
        methods=tuple(get_method(name) for name in (args.methods or preset.methods)),
        scales=tuple(float(w) for w in (args.scales or preset.scales)),
        seeds=tuple(args.seeds or preset.seeds),
        captions=select_captions(load_captions(source), args.limit, args.subset_seed),
        source=CaptionSource(str(source), io.file_md5(source), args.limit, args.subset_seed),
        settings=settings,
        batch_size=args.batch_size if args.batch_size is not None else _recorded_batch_size(args.out),
    )


def _recorded_batch_size(out: Path) -> int:
    """The batch size an existing run in `out` used (so a plain resume keeps it), else the default 4."""
    path = out / MANIFEST
    return int(io.read_json(path).get("batch_size", 4)) if path.is_file() else 4


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m eval.sweep`, `goca-scfg-sweep` and `accelerate launch --multi_gpu -m eval.sweep`."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _sweep(args)
    except (OSError, ValueError) as err:  # bad input: one clear line, no traceback
        logger.debug("error details", exc_info=True)
        print(f"error: {err}", file=sys.stderr)
        return 2


def _sweep(args: argparse.Namespace) -> int:
    """Run the sweep described by parsed arguments in this process (one of possibly several)."""
    from accelerate import PartialState

    plan = plan_from_args(args)
    # Without an accelerator, accelerate only recognises several launched processes when asked for the CPU.
    use_cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    state = PartialState(cpu=use_cpu)
    if args.device is not None and state.num_processes > 1:
        raise ValueError("--device cannot be combined with several accelerate processes")
    device = torch.device(args.device) if args.device is not None else state.device
    shard = args.shard.split(state.num_processes, state.process_index)
    settings = dataclasses.replace(plan.settings, dtype=resolve_dtype(plan.settings.dtype, device))
    pipe = load_sweep_pipeline(settings, device)
    plan = dataclasses.replace(plan, settings=resolve_settings(settings, pipe, device))
    prepare_output(plan, device, write=state.is_main_process)
    result = run_sweep(plan, pipe, shard, progress=not args.no_progress, claim_timeout=args.claim_timeout)
    state.wait_for_everyone()
    replaced = f" ({result.replaced} replaced damaged or foreign files)" if result.replaced else ""
    print(
        f"shard {shard.index}/{shard.count}: generated {result.generated}{replaced}, "
        f"skipped {result.skipped} finished, output {plan.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
