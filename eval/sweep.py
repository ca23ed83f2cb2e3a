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

from goca_scfg.checks import MAX_STEPS
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
from .cli_common import SEED_MAX, OneLineParser, check_device, positive_seconds, report_error, seed_list, whole_number
from .guidance_log import (  # noqa: F401  (GUIDANCE_COLUMNS, guidance_path, read_guidance: the records' public names)
    GUIDANCE_COLUMNS,
    assemble_guidance,
    guidance_part_path,
    guidance_path,
    guidance_rows,
    read_guidance,
    write_guidance_part,
)
from .images import png_problem
from .manifest import CAPTIONS_FILE, MANIFEST, check_captions_file, check_manifest

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = 2  # 2: fixed caption groups, settings tag in every PNG
DEFAULT_PRESET = "paper"
MAX_SIZE = 4096  # pixels per side, as `goca-scfg generate`
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
        bad = [s for s in self.seeds if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= SEED_MAX]
        if bad:
            raise ValueError(f"seeds must be whole numbers in 0 … 2**64 - 1 (torch's seed range), got {bad}")


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


def _check_batch_size(recorded: object, requested: int) -> None:
    if recorded != requested:
        raise ValueError(
            f"this output folder was generated with --batch-size {recorded}; the batch size decides pixels (fixed "
            f"caption groups), so resuming with --batch-size {requested} is refused. Pass --batch-size {recorded}, "
            "or use another --out."
        )


def merge_manifest(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Extend an existing run with more methods, scales or seeds; anything that decides pixels must be unchanged."""
    if old.get("format") == new["format"]:
        _check_batch_size(old.get("batch_size"), new["batch_size"])
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


def check_existing_run(plan: SweepPlan) -> None:
    """What a resume of `plan.out` refuses and can be told before the pipeline loads: a damaged manifest, a caption
    file edited after the run, other captions, another batch size. The rest (the generation settings, resolved by the
    pipeline) is checked by `prepare_output`."""
    path = plan.out / MANIFEST
    if not path.is_file():
        return
    old = check_manifest(io.read_json(path), path)
    if (plan.out / old["captions"]["file"]).exists():
        check_captions_file(plan.out, old)
    md5 = hashlib.md5(format_captions(plan.captions).encode("utf-8")).hexdigest()
    if old["captions"]["md5"] != md5:
        raise ValueError(
            f"{plan.out} was generated for other captions ({old['captions'].get('count')} from "
            f"{old['captions'].get('source')}, limit {old['captions'].get('limit')}); pass the same "
            "--captions/--limit/--subset-seed to resume, or use another --out"
        )
    if old.get("format") == MANIFEST_FORMAT:
        _check_batch_size(old.get("batch_size"), plan.batch_size)


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
            old = check_manifest(io.read_json(path), path)
            if (plan.out / old["captions"]["file"]).exists():
                check_captions_file(plan.out, old)  # edited after the run: its images belong to other captions
            manifest = merge_manifest(old, manifest)
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


@dataclass(frozen=True)
class Unfinished:
    """Why one image of a group is not finished.

    `kind`: "missing" (no file), "damaged" (truncated, other size or mode, other settings; `reason` says which) or
    "guidance" (the image is fine, the group's guidance record is not).
    """

    kind: Literal["missing", "damaged", "guidance"]
    reason: str = ""

    @property
    def rewrite_image(self) -> bool:
        """Whether the image file itself must be (re)written."""
        return self.kind != "guidance"


def group_problems(plan: SweepPlan, work: GroupWork, tag: str) -> dict[Caption, Unfinished]:
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
            problems[caption] = Unfinished("missing")
            continue
        except IsADirectoryError:
            raise ValueError(f"{path} is a folder, where the sweep writes an image; move it away") from None
        problem = png_problem(data, size, {TAG_KEY: tag})
        if problem is not None:
            problems[caption] = Unfinished("damaged", problem)
    if not problems and not guidance_part_path(plan.out, work.cell, work.index).is_file():
        problems[work.captions[0]] = Unfinished("guidance", "guidance record missing")
    return problems


def _guidance_kwargs(pipe: Any, work: GroupWork) -> dict[str, Any]:
    """The call keywords of the guidance scale w, as the pipeline's family names them: `guidance_scale`, or Flux's
    `true_cfg_scale` with the empty negative prompt its true CFG needs."""
    from goca_scfg.families import family_of

    return family_of(pipe).guidance_kwargs(work.scale, len(work.captions))


def _generate_group(plan: SweepPlan, pipe: Any, work: GroupWork, tag: str, problems: dict[Caption, Unfinished]) -> int:
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
        generator=generators,
        output_type="pil",
        **_guidance_kwargs(pipe, work),
        **work.method.pipeline_kwargs(),
    )
    written = 0
    for caption, image in zip(work.captions, out.images):
        if caption in problems and problems[caption].rewrite_image:
            io.atomic_write_bytes(folder / f"{caption.image_id}.png", _png_bytes(image, tag))
            written += 1
    iterations = len(pipe.scheduler.timesteps)  # e.g. PNDM runs steps + 1 iterations
    rows = guidance_rows(work.captions, work.scale, getattr(out, "rates", None), iterations)
    write_guidance_part(plan.out, work.cell, work.index, rows)
    return written


def _report_damaged(work: GroupWork, problems: dict[Caption, Unfinished]) -> int:
    damaged = {c: p.reason for c, p in problems.items() if p.kind == "damaged"}
    if damaged:
        listed = ", ".join(f"{c.image_id}.png ({p})" for c, p in list(damaged.items())[:5])
        more = f" and {len(damaged) - 5} more" if len(damaged) > 5 else ""
        logger.warning("%s: regenerating %d unfinished image(s): %s%s", work.cell, len(damaged), listed, more)
    return len(damaged)


def _say_waiting(work: GroupWork, claim: Path, timeout: float) -> None:
    """Log which claim another live process holds and how long this sweep may wait for it."""
    holder = io.claim_holder(claim)
    if holder is None:
        logger.info("%s group %d: claimed by another process; waiting for it (%s)", work.cell, work.index, claim)
        return
    left = max(0.0, timeout - holder.age)
    logger.info(
        "%s group %d is being generated by pid %s on %s (claimed %.0f s ago, %s); this sweep does its other work "
        "and waits for it until it is released, at most %.0f s more (--claim-timeout %g)",
        work.cell,
        work.index,
        holder.pid,
        holder.host,
        holder.age,
        claim,
        left,
        timeout,
    )


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
    another live process holds are waited for (each named once in the log, with how long the wait may last) and then
    re-checked. Damaged or foreign images are regenerated with their whole group and named in the log.
    """
    settings = plan.settings
    if settings.height is None or settings.width is None:
        raise ValueError("resolve the image size first (resolve_settings)")
    if not (math.isfinite(claim_timeout) and claim_timeout > 0):
        raise ValueError(f"claim_timeout must be a finite number of seconds > 0, got {claim_timeout}")
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
    announced: set[Path] = set()
    while queue:
        waiting = []
        for work in queue:
            tag = tags[(work.method.name, work.scale, work.seed)]
            claim = _claim_path(plan.out, work)
            if not io.try_claim(claim, claim_timeout):
                waiting.append(work)  # another process runs this group now; re-check it when released
                if claim not in announced:
                    announced.add(claim)
                    _say_waiting(work, claim, claim_timeout)
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
    p = OneLineParser(prog="goca-scfg-sweep", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output folder (resumes if it exists)")
    p.add_argument("--preset", choices=sorted(PRESETS), help=f"protocol defaults (default: {DEFAULT_PRESET})")
    p.add_argument("--model", help="hub id or local path; 'tiny-random' is the offline fixture")
    p.add_argument("--methods", type=_csv(str), help=f"comma list of {', '.join(METHOD_NAMES)}")
    p.add_argument("--scales", type=_csv(float), help="guidance scales, e.g. 2,3,5,7.5,10")
    p.add_argument("--seeds", type=seed_list, help="seeds in 0 … 2**64 - 1, e.g. 42 or 0,1,2")
    p.add_argument("--captions", type=Path, help=f"image_id,text CSV (default: {DEFAULT_CAPTIONS.name}, COCO-30k)")
    p.add_argument("--limit", type=whole_number(1), help="first N captions (or a random N with --subset-seed)")
    p.add_argument("--subset-seed", type=whole_number(0), help="seed of a random caption subset of size --limit")
    p.add_argument("--steps", type=whole_number(1, MAX_STEPS), help=f"denoising steps, 1 … {MAX_STEPS}")
    p.add_argument("--height", type=whole_number(8, MAX_SIZE), help=f"pixels, a multiple of 8 up to {MAX_SIZE}")
    p.add_argument("--width", type=whole_number(8, MAX_SIZE), help=f"pixels, a multiple of 8 up to {MAX_SIZE}")
    p.add_argument("--scheduler", choices=SCHEDULER_NAMES)
    p.add_argument("--dtype", choices=(AUTO_DTYPE, *DTYPE_NAMES))
    p.add_argument("--seed-mode", choices=("same", "per-image"))
    p.add_argument("--generator-device", choices=("device", "cpu"))
    p.add_argument(
        "--batch-size",
        type=whole_number(1),
        help="prompts per pipeline call; decides pixels, fixed per --out (default 4)",
    )
    p.add_argument(
        "--claim-timeout",
        type=positive_seconds,
        default=1800.0,
        help="seconds after which a claim on a caption group counts as abandoned, also one of a live process "
        "(default 1800); a claim of a process that died on this host is taken over at once",
    )
    p.add_argument("--shard", type=Shard.parse, default=Shard(), help="i/n: this job's part of the work")
    p.add_argument("--device", help="single-process device override (default: accelerate's choice)")
    p.add_argument("--no-progress", action="store_true")
    return p


def plan_from_args(args: argparse.Namespace) -> SweepPlan:
    """A `SweepPlan` from parsed arguments, preset values filling what was not given."""
    preset = PRESETS[args.preset or DEFAULT_PRESET]
    overrides = {
        name: getattr(args, name)
        for name in ("model", "dtype", "scheduler", "steps", "height", "width", "seed_mode", "generator_device")
        if getattr(args, name) is not None
    }
    settings = dataclasses.replace(preset.settings, **overrides)
    source = args.captions if args.captions is not None else DEFAULT_CAPTIONS
    if args.subset_seed is not None and args.limit is None:
        raise ValueError("--subset-seed needs --limit")
    _check_out(args.out)
    captions = load_captions(source)
    if args.limit is not None and args.limit > len(captions):
        raise ValueError(f"--limit {args.limit} exceeds the {len(captions)} captions of {source}")
    return SweepPlan(
        out=args.out,
        methods=tuple(get_method(name) for name in (args.methods or preset.methods)),
        scales=tuple(float(w) for w in (args.scales or preset.scales)),
        seeds=tuple(args.seeds or preset.seeds),
        captions=select_captions(captions, args.limit, args.subset_seed),
        source=CaptionSource(str(source), io.file_md5(source), args.limit, args.subset_seed),
        settings=settings,
        batch_size=args.batch_size if args.batch_size is not None else _recorded_batch_size(args.out),
    )


def _check_out(out: Path) -> None:
    """`--out` is a folder (or can become one) this process may write into."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder (it is created, or resumed when it exists)")
    existing = next((p for p in (out, *out.parents) if p.exists()), Path("."))
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: no permission to write in {existing}")


def _recorded_batch_size(out: Path) -> int:
    """The batch size an existing run in `out` used (so a plain resume keeps it), else the default 4."""
    path = out / MANIFEST
    if not path.is_file():
        return 4
    value = check_manifest(io.read_json(path), path).get("batch_size", 4)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{path} records the batch size {value!r}, not a whole number >= 1 (damaged manifest?)")
    return value


def check_pipeline(plan: SweepPlan, pipe: Any, preset: str | None = None) -> None:
    """Refuse, before anything is written, what the pipeline would refuse at its first call: a method its denoiser
    cannot segment (S-CFG on a transformer), a size its attention grids do not divide, more steps than its schedule
    has; and an explicit `--preset` of another model family than the model's."""
    from goca_scfg.families import family_of

    family = family_of(pipe)
    owner = next(f for f in FAMILIES if any(p.name == (preset or DEFAULT_PRESET) for p in f.sweep_presets))
    if owner.name != family.name:
        mine = ", ".join(p.name for p in family.sweep_presets) or "none"
        text = (
            f"--preset {preset or DEFAULT_PRESET} is the {owner.title} protocol, but --model {plan.settings.model} "
            f"is a {family.title} model (its presets: {mine})"
        )
        if preset is not None:
            raise ValueError(text)
        logger.warning("%s; the default preset's settings apply where no option is given", text)
    train_steps = getattr(pipe.scheduler.config, "num_train_timesteps", None)
    if train_steps is not None and plan.settings.steps > train_steps:
        raise ValueError(f"--steps {plan.settings.steps} exceeds the {train_steps} timesteps of the model's schedule")
    segmenting = [m for m in plan.methods if m.segmentor is not None]
    if segmenting:
        from goca_scfg.layout import ModelLayout

        height, width = plan.settings.height, plan.settings.width
        try:
            pipe.check_segmentation_size(height, width, ModelLayout.of(pipe.denoiser))
        except ValueError as err:
            names = ",".join(m.name for m in segmenting)
            raise ValueError(f"--height/--width {height}x{width} with --methods {names}: {err}") from None
    prompt = plan.captions[0].text
    for method in segmenting:
        try:
            pipe.spatial_guidance(
                method.segmentor,
                prompt,
                plan.settings.height,
                plan.settings.width,
                scfg_config=method.scfg_config,
                goca_config=method.goca_config,
            )
        except ValueError as err:
            raise ValueError(f"--methods {method.name}: {err}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m eval.sweep`, `goca-scfg-sweep` and `accelerate launch --multi_gpu -m eval.sweep`."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _sweep(args)
    except (OSError, ValueError) as err:  # bad input: one clear line, no traceback
        return report_error(err)


def _sweep(args: argparse.Namespace) -> int:
    """Run the sweep described by parsed arguments in this process (one of possibly several).

    Order: every argument check, the device, the pipeline and what it would refuse (`check_pipeline`), and only then
    the first write (`prepare_output`): a refused sweep leaves nothing behind.
    """
    from accelerate import PartialState

    plan = plan_from_args(args)
    check_existing_run(plan)
    if args.device is not None:
        check_device("--device", args.device)
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
    check_pipeline(plan, pipe, args.preset)
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
