"""Image folders as metric inputs: reading with errors that name the file, and exact-set checks against a manifest.

Metrics never run on a partial folder: a cell folder must hold exactly one `{image_id}.png` per
caption of the sweep, and every file must decode.
"""

from __future__ import annotations

import re
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

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


class DecodedImages:
    """Image files → `transform(RGB PIL image)` as a map-style dataset; a file that does not decode yields its error
    message instead of raising, so that data-loader worker processes never print a traceback (see `image_batches`)."""

    def __init__(self, files: Sequence[str | Path], transform: Callable[[Image.Image], Any]) -> None:
        self.files = [str(f) for f in files]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Any, str]:
        try:
            image = read_rgb(self.files[index])
        except ValueError as err:
            return None, str(err)
        return self.transform(image), ""


def _stack(items: list[tuple[Any, str]]) -> tuple[Any, list[str]]:
    import torch

    errors = [error for _, error in items if error]
    return (None if errors else torch.stack([x for x, _ in items])), errors


def image_batches(
    files: Sequence[str | Path],
    transform: Callable[[Image.Image], Any],
    batch_size: int,
    num_workers: int = 0,
    desc: str = "images",
    progress: bool = False,
) -> Iterator[Any]:
    """Stacked `transform`ed images in file order, `batch_size` at a time, decoded by `num_workers` processes.

    A file that does not decode raises one ValueError naming it in this process, whatever `num_workers` is.
    """
    import torch
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"the number of data-loader workers must be >= 0, got {num_workers}")
    loader = torch.utils.data.DataLoader(
        DecodedImages(files, transform), batch_size=batch_size, shuffle=False, num_workers=num_workers,
        collate_fn=_stack,
    )  # fmt: skip
    for batch, errors in tqdm(loader, desc=desc, disable=not progress, leave=False):
        if errors:
            more = f" (and {len(errors) - 1} more in this batch)" if len(errors) > 1 else ""
            raise ValueError(errors[0] + more)
        yield batch


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
