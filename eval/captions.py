"""Caption sets for the COCO-30k protocol (algorithm.md §3.1): the vendored CSV, any user CSV, and seeded subsets.

A caption set is an ordered tuple of `Caption(image_id, text)`. Texts are kept byte for byte (no stripping): the
reference generation script passes them to the pipeline as read.
"""

from __future__ import annotations

import csv
import io
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CAPTIONS = Path(__file__).resolve().parent / "data" / "coco30k_captions.csv"
COLUMNS = ("image_id", "text")


@dataclass(frozen=True)
class Caption:
    """One (COCO image id, caption) pair; `image_id` also names the generated file (`{image_id}.png`)."""

    image_id: int
    text: str


def parse_captions(text: str, source: str = "<string>") -> tuple[Caption, ...]:
    """Parse `image_id,text` CSV content with a real CSV parser (algorithm.md §3.1: quoted fields hold newlines)."""
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if header is None or tuple(h.strip().lstrip("\ufeff") for h in header) != COLUMNS:
        raise ValueError(f"{source}: expected the header {','.join(COLUMNS)}, got {header!r}")
    captions: list[Caption] = []
    seen: set[int] = set()
    for row in reader:
        if not row:
            continue
        if len(row) != 2:
            raise ValueError(f"{source}: record {len(captions) + 1} has {len(row)} fields, expected 2: {row!r}")
        try:
            image_id = int(row[0])
        except ValueError:
            raise ValueError(
                f"{source}: image_id {row[0]!r} of record {len(captions) + 1} is not an integer"
            ) from None
        if image_id < 0:
            raise ValueError(f"{source}: image_id {image_id} must be >= 0")
        if image_id in seen:
            raise ValueError(f"{source}: image_id {image_id} appears twice; ids name the output files")
        seen.add(image_id)
        captions.append(Caption(image_id, row[1]))
    if not captions:
        raise ValueError(f"{source}: no captions")
    return tuple(captions)


def load_captions(path: str | Path | None = None) -> tuple[Caption, ...]:
    """Read a caption CSV (default: the vendored COCO-30k set, `eval/data/coco30k_captions.csv`)."""
    path = Path(path) if path is not None else DEFAULT_CAPTIONS
    if not path.is_file():
        raise FileNotFoundError(f"caption file not found: {path}")
    with open(path, encoding="utf-8", newline="") as f:
        return parse_captions(f.read(), source=str(path))


def select_captions(
    captions: Sequence[Caption], limit: int | None = None, subset_seed: int | None = None
) -> tuple[Caption, ...]:
    """The first `limit` captions, or a seeded random subset of `limit` captions kept in file order."""
    if limit is None:
        return tuple(captions)
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if limit > len(captions):
        raise ValueError(f"limit {limit} exceeds the {len(captions)} captions available")
    if subset_seed is None:
        return tuple(captions[:limit])
    chosen = sorted(random.Random(subset_seed).sample(range(len(captions)), limit))
    return tuple(captions[i] for i in chosen)


def format_captions(captions: Sequence[Caption]) -> str:
    """CSV text (header `image_id,text`, CRLF records like the source file) that `parse_captions` reads back."""
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(COLUMNS)
    writer.writerows((c.image_id, c.text) for c in captions)
    return buffer.getvalue()
