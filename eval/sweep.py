"""COCO-30k generation sweep: methods × guidance scales × seeds (algorithm.md §3.2), resumable and sharded.

Output: `{out}/{method}/cfg-{scale}/seed-{seed}/{image_id}.png`, `{out}/captions.csv` (the captions used) and
`{out}/manifest.json` (exact configuration, cells, package versions). Every PNG is written atomically and a finished
PNG is never regenerated, so a killed sweep resumes where it stopped. Work is split by caption index across
`--shard i/n` jobs and across the processes of `accelerate launch --multi_gpu -m eval.sweep` (or `torchrun`),
without overlap.

manifest.json: `generation` (GenerationSettings, resolved), `captions` (file, md5, count, source, limit, subset_seed),
`methods` (name → segmentor and configs), `scales`, `seeds`, `cells` ([{method, scale, seed, path}]), `versions`,
`command`. A rerun may add methods, scales or seeds; anything that decides pixels must match (`merge_manifest`).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io as _stdio
import json
import logging
import os
import platform
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from goca_scfg import GoCAConfig, SCFGConfig
from goca_scfg.config import describe
from goca_scfg.testing import SD15_MODEL_ID, load_pipeline, native_size, swap_scheduler

from . import io
from .captions import DEFAULT_CAPTIONS, Caption, format_captions, load_captions, select_captions

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CAPTIONS_FILE = "captions.csv"
MANIFEST_FORMAT = 1
SeedMode = Literal["same", "per-image"]
Dtype = Literal["auto", "fp16", "bf16", "fp32"]
SchedulerName = Literal["default", "pndm", "ddim", "dpm++"]
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_VERSIONED = ("goca-scfg", "torch", "diffusers", "transformers", "accelerate", "numpy", "pillow", "safetensors")


# ---------------------------------------------------------------- methods: the one table of names → pipeline kwargs


@dataclass(frozen=True)
class Method:
    """A named guidance method: the `segmentor` and configs passed to `StableDiffusionSCFGPipeline.__call__`."""

    name: str
    segmentor: str | None
    scfg_config: SCFGConfig | None
    goca_config: GoCAConfig | None
    summary: str

    def pipeline_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the pipeline call for this method."""
        return {"segmentor": self.segmentor, "scfg_config": self.scfg_config, "goca_config": self.goca_config}

    def describe(self) -> dict[str, Any]:
        """Plain-dict view for the manifest."""
        return {
            "segmentor": self.segmentor,
            "scfg_config": describe(self.scfg_config) if self.scfg_config else None,
            "goca_config": describe(self.goca_config) if self.goca_config else None,
            "summary": self.summary,
        }


METHODS: tuple[Method, ...] = (
    Method("cfg", None, None, None, "plain classifier-free guidance (Table 3 'CFG')"),
    Method("scfg", "scfg", SCFGConfig(), None, "official S-CFG masks and rate (algorithm.md §1)"),
    Method("scfg-paper", "scfg", SCFGConfig.paper(), None, "S-CFG with the paper's SSGC (mean of S..S⁴)"),
    Method("goca", "goca", SCFGConfig(), GoCAConfig(), "GoCA masks in S-CFG, released config (Table 3 'Ours')"),
    Method("goca-vanilla", "goca", SCFGConfig(), GoCAConfig.vanilla(), "GoCA pipeline, vanilla config (cfg15v)"),
    Method("goca-paper", "goca", SCFGConfig(), GoCAConfig.paper(), "GoCA, rescaling over content tokens (Eq. 11)"),
    Method("goca-fast", "goca", SCFGConfig(), GoCAConfig.fast(), "GoCA fast mode (approximate layer weights)"),
)


def get_method(name: str) -> Method:
    """Look a method up by name."""
    for method in METHODS:
        if method.name == name:
            return method
    raise ValueError(f"unknown method {name!r}; expected one of {[m.name for m in METHODS]}")


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
    scheduler: SchedulerName = "default"
    steps: int = 50
    height: int | None = None
    width: int | None = None
    seed_mode: SeedMode = "same"
    generator_device: Literal["device", "cpu"] = "device"

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", *_DTYPES):
            raise ValueError(f"dtype {self.dtype!r} is not one of {('auto', *_DTYPES)}")
        if self.scheduler not in ("default", "pndm", "ddim", "dpm++"):
            raise ValueError(f"scheduler {self.scheduler!r} is not one of default, pndm, ddim, dpm++")
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


PRESETS: dict[str, Preset] = {
    # algorithm.md §3.2: SD v1.5, fp16, 512² (native size), 50 steps, the model's PNDM, seed 42 for every caption.
    "paper": Preset(GenerationSettings(), ("cfg", "scfg", "goca"), (2.0, 3.0, 5.0, 7.5, 10.0), (42,)),
    # As "paper" but every caption gets its own noise, drawn on the CPU so that any device reproduces it.
    "per-image": Preset(
        GenerationSettings(seed_mode="per-image", generator_device="cpu"),
        ("cfg", "scfg", "goca"),
        (2.0, 3.0, 5.0, 7.5, 10.0),
        (42,),
    ),
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


@dataclass(frozen=True)
class Shard:
    """Part `index` of `count`: caption k of every cell belongs to shard k mod count."""

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
        """The captions this shard owns."""
        return tuple(captions[self.index :: self.count])


@dataclass(frozen=True)
class SweepResult:
    """Counts of one process's sweep: images generated now and images found finished."""

    generated: int
    skipped: int


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
    if name == "auto":
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
    if path.is_file():
        manifest = merge_manifest(io.read_json(path), manifest)
    if write:
        if not (plan.out / CAPTIONS_FILE).is_file():
            io.atomic_write_text(plan.out / CAPTIONS_FILE, captions_text)
        io.write_json(path, manifest)
    return manifest


# ---------------------------------------------------------------- generation


def load_sweep_pipeline(settings: GenerationSettings, device: torch.device) -> Any:
    """The pipeline for `settings` on `device`, scheduler swapped and progress bars off."""
    dtype = _DTYPES[resolve_dtype(settings.dtype, device)]
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


def _png_bytes(image: Any) -> bytes:
    buffer = _stdio.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _batches(items: Sequence[Caption], size: int) -> Iterator[Sequence[Caption]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def pending_images(folder: Path, owned: Sequence[Caption]) -> list[Caption]:
    """Owned captions whose PNG is not finished; stale partial files of owned images are removed first."""
    names = {f"{c.image_id}.png" for c in owned}
    removed = io.remove_partial_files(folder, names)
    if removed:
        logger.info("removed %d partial file(s) left by an interrupted run in %s", removed, folder)
    done = set(os.listdir(folder)) if folder.is_dir() else set()
    return [c for c in owned if f"{c.image_id}.png" not in done]


def run_sweep(
    plan: SweepPlan,
    pipe: Any,
    shard: Shard = Shard(),
    progress: bool = False,
) -> SweepResult:
    """Generate the images of `plan` owned by `shard`, skipping finished ones. The manifest must already exist."""
    settings = plan.settings
    if settings.height is None or settings.width is None:
        raise ValueError("resolve the image size first (resolve_settings)")
    owned = shard.select(plan.captions)
    work = []
    for method in plan.methods:
        for scale in plan.scales:
            for seed in plan.seeds:
                folder = plan.out / cell_path(method.name, scale, seed)
                work.append((method, scale, seed, folder, pending_images(folder, owned)))
    total = sum(len(p) for *_, p in work)
    skipped = len(owned) * len(work) - total
    generator_device = pipe.device if settings.generator_device == "device" else torch.device("cpu")
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=f"sweep {shard.index}/{shard.count}", disable=not progress, unit="img")
    for method, scale, seed, folder, pending in work:
        for batch in _batches(pending, plan.batch_size):
            generators = [
                torch.Generator(generator_device).manual_seed(image_seed(seed, c.image_id, settings.seed_mode))
                for c in batch
            ]
            images = pipe(
                prompt=[c.text for c in batch],
                height=settings.height,
                width=settings.width,
                num_inference_steps=settings.steps,
                guidance_scale=scale,
                generator=generators,
                output_type="pil",
                **method.pipeline_kwargs(),
            ).images
            for caption, image in zip(batch, images):
                io.atomic_write_bytes(folder / f"{caption.image_id}.png", _png_bytes(image))
            bar.update(len(batch))
            bar.set_postfix_str(cell_path(method.name, scale, seed), refresh=False)
    bar.close()
    return SweepResult(generated=total, skipped=skipped)


# ---------------------------------------------------------------- CLI


def _csv(cast: type) -> Any:
    def parse(text: str) -> tuple:
        try:
            return tuple(cast(part) for part in text.split(",") if part.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {cast.__name__}") from None

    return parse


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of `python -m eval.sweep`; unset options come from `--preset`."""
    p = argparse.ArgumentParser(prog="goca-scfg-sweep", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output folder (resumes if it exists)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="paper", help="protocol defaults (default: paper)")
    p.add_argument("--model", help="hub id or local path; 'tiny-random' is the offline fixture")
    p.add_argument("--methods", type=_csv(str), help=f"comma list of {', '.join(m.name for m in METHODS)}")
    p.add_argument("--scales", type=_csv(float), help="guidance scales, e.g. 2,3,5,7.5,10")
    p.add_argument("--seeds", type=_csv(int), help="seeds, e.g. 42 or 0,1,2")
    p.add_argument("--captions", type=Path, help=f"image_id,text CSV (default: {DEFAULT_CAPTIONS.name}, COCO-30k)")
    p.add_argument("--limit", type=int, help="first N captions (or a random N with --subset-seed)")
    p.add_argument("--subset-seed", type=int, help="seed of a random caption subset of size --limit")
    p.add_argument("--steps", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--scheduler", choices=("default", "pndm", "ddim", "dpm++"))
    p.add_argument("--dtype", choices=("auto", *_DTYPES))
    p.add_argument("--seed-mode", choices=("same", "per-image"))
    p.add_argument("--generator-device", choices=("device", "cpu"))
    p.add_argument("--batch-size", type=int, default=4, help="prompts per pipeline call (default 4)")
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
        batch_size=args.batch_size,
    )


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
    result = run_sweep(plan, pipe, shard, progress=not args.no_progress)
    state.wait_for_everyone()
    print(
        f"shard {shard.index}/{shard.count}: generated {result.generated}, "
        f"skipped {result.skipped} finished, output {plan.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
