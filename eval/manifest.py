"""A sweep folder's `manifest.json` and `captions.csv` as both the sweep and the metrics read them.

The sweep writes them (`eval.sweep.prepare_output`); a resumed sweep and `eval.metrics score` both refuse a manifest
that lacks what they need and a caption file whose md5 is no longer the one the manifest recorded. Standard library.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import io

MANIFEST = "manifest.json"
CAPTIONS_FILE = "captions.csv"

# key → (type, what it holds), for the one-line message naming what is missing
_REQUIRED: dict[str, tuple[type, str]] = {
    "generation": (dict, "the generation settings"),
    "captions": (dict, "the caption file and its md5"),
    "methods": (dict, "the methods"),
    "scales": (list, "the guidance scales"),
    "seeds": (list, "the seeds"),
    "cells": (list, "the cell folders"),
}
_CELL_KEYS = ("method", "scale", "seed", "path")


def check_manifest(manifest: Any, path: str | Path) -> dict[str, Any]:
    """`manifest` (read from `path`) has what a sweep wrote; otherwise one ValueError naming the first gap."""
    hint = "not a manifest written by eval.sweep (damaged or edited? rerun the sweep, or use another --out)"
    if not isinstance(manifest, dict):
        raise ValueError(f"{path} holds a {type(manifest).__name__}, {hint}")
    for key, (kind, what) in _REQUIRED.items():
        if not isinstance(manifest.get(key), kind):
            raise ValueError(f"{path} lacks {key!r} ({what}): {hint}")
    captions = manifest["captions"]
    if not isinstance(captions.get("file"), str) or not isinstance(captions.get("md5"), str):
        raise ValueError(f"{path}: 'captions' lacks 'file' or 'md5': {hint}")
    if Path(captions["file"]).name != captions["file"]:
        raise ValueError(f"{path}: the caption file {captions['file']!r} must be a name inside the run folder")
    for i, cell in enumerate(manifest["cells"]):
        if not isinstance(cell, dict) or any(k not in cell for k in _CELL_KEYS):
            raise ValueError(f"{path}: cell {i} is not a {{method, scale, seed, path}} record: {hint}")
        folder = Path(str(cell["path"]))
        if folder.is_absolute() or ".." in folder.parts:
            raise ValueError(f"{path}: cell path {cell['path']!r} leaves the run folder")
    return manifest


def read_manifest(run_dir: str | Path) -> dict[str, Any]:
    """The checked manifest of a sweep folder (FileNotFoundError when there is none)."""
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {run_dir}; is it a sweep output folder (python -m eval.sweep)?")
    return check_manifest(io.read_json(path), path)


def check_captions_file(run_dir: str | Path, manifest: dict[str, Any]) -> Path:
    """The run's caption file, after checking that it exists and still has the md5 the manifest recorded."""
    path = Path(run_dir) / manifest["captions"]["file"]
    if not path.is_file():
        raise FileNotFoundError(f"{path} listed by {Path(run_dir) / MANIFEST} is missing")
    found = io.file_md5(path)
    if found != manifest["captions"]["md5"]:
        raise ValueError(
            f"{path} was changed after the run (md5 {found}, but {MANIFEST} records {manifest['captions']['md5']}): "
            "its images belong to the recorded captions. Restore the file, or start a new --out for new captions"
        )
    return path
