"""The sweep's effective-guidance records: one CSV per cell, written by `eval.sweep` and read by `eval.metrics`.

`{out}/guidance/{method}/cfg-{scale}/seed-{seed}.csv` has one row per image (`GUIDANCE_COLUMNS`). Each pipeline call
writes its rows as a part file; the cell's CSV is assembled from the parts once all exist. Standard library only, so
that the metrics read these records without importing the generator.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import io
from .captions import Caption

GUIDANCE_COLUMNS = (
    "image_id",
    "guidance_scale",
    "effective_scale",
    "mean_rate",
    "fg_mean_rate",
    "rate_per_step",
    "fg_rate_per_step",
)


def guidance_part_path(out: Path, cell: str, index: int) -> Path:
    """Per-group effective-guidance rows, assembled into `guidance_path` when the cell is complete."""
    return Path(out) / "guidance" / f"{cell}.parts" / f"group-{index:06d}.csv"


def guidance_path(out: Path, cell: str) -> Path:
    """`{out}/guidance/{method}/cfg-{scale}/seed-{seed}.csv`: one row per image (see `guidance_rows`)."""
    return Path(out) / "guidance" / f"{cell}.csv"


def guidance_rows(
    captions: Sequence[Caption], scale: float, rates: Sequence[Any] | None, iterations: int
) -> list[tuple]:
    """Effective guidance of each image of one call: the mean applied rate r per step over all pixels and over the
    foreground, their means over steps, and the effective scale mean_steps(w·mean(r)).

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


def write_guidance_part(out: Path, cell: str, index: int, rows: Sequence[tuple]) -> None:
    """Write one call's rows atomically (a temporary left by a killed writer of this part is removed first)."""
    part = guidance_part_path(out, cell, index)
    io.remove_partial_files(part.parent, {part.name})
    io.atomic_write_text(part, io.csv_text(GUIDANCE_COLUMNS, rows))


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
            f"{path} lists {len(found)} images, not the run's {len(image_ids)} in caption order (damaged, or written "
            "for other captions? rerun the sweep)"
        )
    return {r["image_id"]: r["effective_scale"] for r in rows}


def mean_effective_scale(out: Path, cell: str, image_ids: Sequence[int]) -> float:
    """Mean effective guidance scale of a cell's images, NaN when the run has no guidance records for it."""
    if not guidance_path(out, cell).is_file():
        return math.nan
    values = read_guidance(out, cell, image_ids)
    return math.fsum(values.values()) / len(values)
