"""Image folders as metric inputs: reading with errors that name the file, and exact-set checks against a manifest.

Metrics never run on a partial folder (issue item 7): a cell folder must hold exactly one `{image_id}.png` per
caption of the sweep, and every file must decode.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def read_rgb(path: str | Path) -> Image.Image:
    """Decode an image file fully as RGB; a missing, truncated or corrupt file raises ValueError naming it."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from err


def read_rgb_array(path: str | Path) -> np.ndarray:
    """`read_rgb` as a (H, W, 3) uint8 array."""
    return np.asarray(read_rgb(path), dtype=np.uint8)


def list_images(folder: str | Path, recursive: bool = False) -> list[Path]:
    """Image files in `folder` (sorted; hidden temporaries excluded); raises when the folder does not exist."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    entries = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(
        p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
    )


def _preview(names: Iterable[str], limit: int = 5) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names) - limit} more)" if len(names) > limit else "")


def expected_image_files(folder: str | Path, image_ids: Iterable[int]) -> list[Path]:
    """The files `{folder}/{image_id}.png` for `image_ids`, after checking that the folder holds exactly those.

    Raises ValueError naming the folder, the counts and the first missing or unexpected files.
    """
    folder = Path(folder)
    expected = {f"{i}.png": i for i in image_ids}
    present = {p.name for p in list_images(folder)}
    missing = set(expected) - present
    extra = present - set(expected)
    if missing or extra:
        parts = [f"{folder} holds {len(present)} images but the manifest lists {len(expected)}"]
        if missing:
            parts.append(f"missing: {_preview(missing)}")
        if extra:
            parts.append(f"not in the manifest: {_preview(extra)}")
        raise ValueError("; ".join(parts) + ". Finish the sweep (it resumes) before computing metrics.")
    return [folder / name for name in expected]
