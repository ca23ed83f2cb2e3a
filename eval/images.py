"""Image folders as metric inputs: reading with errors that name the file, and exact-set checks against a manifest.

Metrics never run on a partial folder: a cell folder must hold exactly one `{image_id}.png` per
caption of the sweep, and every file must decode.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_MODES = {(8, 0): "L", (8, 2): "RGB", (8, 4): "LA", (8, 6): "RGBA", (8, 3): "P"}


def read_rgb(path: str | Path, size: tuple[int, int] | None = None) -> Image.Image:
    """Decode an image file fully as RGB; a missing, truncated or corrupt file raises ValueError naming it.

    With `size` (width, height) the file must be an RGB image of exactly that size (generated images are checked
    against the sweep's manifest so that a wrong-size or grayscale file is never scored).
    """
    try:
        with Image.open(path) as image:
            if size is not None and (image.size != tuple(size) or image.mode != "RGB"):
                raise ValueError(
                    f"{image.mode} {image.size[0]}x{image.size[1]}, but the manifest says RGB {size[0]}x{size[1]}"
                )
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from err


def png_problem(data: bytes, size: tuple[int, int], text: dict[str, str] | None = None) -> str | None:
    """Why PNG bytes are not a finished RGB image of `size` (width, height) with these text chunks; None if they are.

    Checks the signature, every chunk's CRC, the header, the end chunk at the very end of the file and the length of
    the decompressed pixel data, i.e. everything a full decode reads, without unfiltering the rows.
    """
    if not data:
        return "empty file"
    if not data.startswith(_PNG_SIGNATURE):
        return "not a PNG"
    pos, header, found, pixels = len(_PNG_SIGNATURE), None, {}, []
    while True:
        if pos + 8 > len(data):
            return "truncated"
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        end = pos + 12 + length
        if end > len(data):
            return "truncated"
        body = data[pos + 8 : pos + 8 + length]
        if zlib.crc32(kind + body) != struct.unpack(">I", data[pos + 8 + length : end])[0]:
            return f"damaged {kind.decode('latin-1')} chunk (CRC mismatch)"
        pos = end
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            pixels.append(body)
        elif kind == b"tEXt":
            key, _, value = body.partition(b"\0")
            found[key.decode("latin-1")] = value.decode("latin-1")
        elif kind == b"IEND":
            break
    if pos != len(data):
        return "data after the end chunk"
    if header is None:
        return "no header chunk"
    width, height, depth, colour = header[:4]
    mode = _PNG_MODES.get((depth, colour), f"{depth}-bit type {colour}")
    if (width, height) != tuple(size) or mode != "RGB":
        return f"{mode} {width}x{height}, expected RGB {size[0]}x{size[1]}"
    try:
        raw = zlib.decompress(b"".join(pixels))
    except zlib.error as err:
        return f"pixel data does not decompress ({err})"
    if len(raw) != height * (1 + 3 * width) or header[6] != 0:
        return "pixel data has the wrong length"
    for key, value in (text or {}).items():
        if found.get(key) != value:
            return f"written with other settings ({key}={found.get(key)!r}, expected {value!r})"
    return None


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
