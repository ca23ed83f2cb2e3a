"""Files that survive interruption: atomic writes, leftovers of killed writers, JSON manifests, package versions.

A file is written under a hidden temporary name in its final folder and renamed into place, so a reader (or a resumed
sweep) sees either nothing or the complete file, never a half-written one. Standard library only.
"""

from __future__ import annotations

import csv
import hashlib
import io as _stdio
import json
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

_TMP_SUFFIX = ".tmp"


def _temporary_name(path: Path) -> Path:
    """Hidden sibling `.{name}.{host}-{pid}-{random}.tmp`; `partial_files` maps it back to `name`."""
    token = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}".replace(".", "_")
    return path.with_name(f".{path.name}.{token}{_TMP_SUFFIX}")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that `path` is either absent/old or complete (temp file, fsync, `os.replace`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    """Atomically write `obj` as indented, key-sorted JSON."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path) -> Any:
    """Read a JSON file, naming the file in the error when it is not valid JSON."""
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None


def partial_files(folder: str | Path, targets: Iterable[str] | None = None) -> list[Path]:
    """Temporary files left in `folder` by killed writers, optionally only those whose final name is in `targets`."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    wanted = None if targets is None else set(targets)
    found = []
    for entry in folder.iterdir():
        name = entry.name
        if not (name.startswith(".") and name.endswith(_TMP_SUFFIX)):
            continue
        target = name[1:].rsplit(".", 2)[0]
        if wanted is None or target in wanted:
            found.append(entry)
    return sorted(found)


def remove_partial_files(folder: str | Path, targets: Iterable[str] | None = None) -> int:
    """Delete `partial_files(folder, targets)`; returns how many were removed.

    Pass the names this process owns as `targets` when other processes may be writing into the same folder.
    """
    removed = 0
    for path in partial_files(folder, targets):
        path.unlink(missing_ok=True)
        removed += 1
    return removed


def csv_text(columns: Iterable[str], rows: Iterable[Iterable[object]]) -> str:
    """CSV text with a header row (for `atomic_write_text`)."""
    buffer = _stdio.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(columns)
    writer.writerows(rows)
    return buffer.getvalue()


def _file_hexdigest(path: str | Path, algorithm: str) -> str:
    """Hex digest of a file's bytes, streamed in 1 MiB blocks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_md5(path: str | Path) -> str:
    """Hex md5 of a file's bytes (manifests record the caption file they used)."""
    return _file_hexdigest(path, "md5")


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    return _file_hexdigest(path, "sha256")


def files_digest(paths: Sequence[str | Path], workers: int = 16) -> str:
    """One sha256 over the ordered per-file sha256 of `paths`: changes when any file changes, is added, removed or
    reordered. Files are hashed by `workers` threads (hashlib releases the GIL, so reads and hashing overlap)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        digests = list(pool.map(file_sha256, paths, chunksize=64))
    return hashlib.sha256("\n".join(digests).encode("ascii")).hexdigest()


def read_table(
    path: str | Path, columns: Mapping[str, Callable[[str], Any]], optional: Mapping[str, Callable[[str], Any]] = {}
) -> list[dict[str, Any]]:
    """Rows of a CSV file as dicts of the `columns` converted by their callables (other columns ignored); `optional`
    columns are converted when the header has them and are None otherwise.

    A missing file or column, a row with the wrong number of fields (e.g. a truncated last line) or a value that does
    not convert raises ValueError naming the file and the line.
    """
    path = Path(path)
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: empty file, expected a header with {', '.join(columns)}")
        missing = [c for c in columns if c not in header]
        if missing:
            raise ValueError(f"{path}, line 1: the header lacks the columns {missing}")
        wanted = {**columns, **{c: f for c, f in optional.items() if c in header}}
        where = {c: header.index(c) for c in wanted}
        rows = []
        for record in reader:
            line = reader.line_num
            if len(record) != len(header):
                raise ValueError(
                    f"{path}, line {line}: {len(record)} fields, expected {len(header)} (damaged or truncated file?)"
                )
            row = dict.fromkeys(optional)
            for name, convert in wanted.items():
                try:
                    row[name] = convert(record[where[name]])
                except ValueError:
                    raise ValueError(f"{path}, line {line}: bad {name} {record[where[name]]!r}") from None
            rows.append(row)
    return rows


def package_versions(names: Iterable[str]) -> dict[str, str | None]:
    """Installed distribution versions (None when absent), for manifests."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


# ---------------------------------------------------------------- claims: one writer per piece of work


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class ClaimHolder:
    """Who holds a claim: host, process id, and how many seconds ago it was taken."""

    host: str
    pid: int
    age: float


def claim_holder(path: str | Path) -> ClaimHolder | None:
    """The holder a claim file records; None when the file is gone or not (yet) a complete record."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
        return ClaimHolder(str(record["host"]), int(record["pid"]), max(0.0, time.time() - float(record["time"])))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _claim_is_stale(path: Path, text: str, timeout: float) -> bool:
    """A claim is stale when its process (on this host) is gone, or it is older than `timeout` seconds.

    A claim file still empty (its writer died between creating and filling it) is stale after a minute.
    """
    try:
        record = json.loads(text)
        host, pid, started = record["host"], int(record["pid"]), float(record["time"])
    except (ValueError, KeyError, TypeError):
        try:
            return time.time() - path.stat().st_mtime > 60
        except FileNotFoundError:
            return False
    if host == socket.gethostname() and not _pid_alive(pid):
        return True
    return time.time() - started > timeout


def _reclaim(path: Path, seen: str) -> None:
    """Remove the stale claim `path` whose text was `seen`, unless another process replaced it meanwhile."""
    grave = path.with_name(f"{path.name}.stale-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, grave)
    except FileNotFoundError:
        return  # another process reclaimed it first
    try:
        if grave.read_text(encoding="utf-8") != seen:  # a fresh claim was moved: put it back (never over a newer one)
            try:
                os.link(grave, path)
            except FileExistsError:
                pass
    finally:
        grave.unlink(missing_ok=True)


def try_claim(path: str | Path, timeout: float = 1800.0) -> bool:
    """Create the claim file `path` (O_CREAT|O_EXCL, recording host, pid and time); True when this process holds it.

    A stale claim (see `_claim_is_stale`) is removed and the claim retried, so a killed process never blocks the work
    for longer than `timeout`. Release with `release_claim`. Safe on one machine and on shared file systems with
    atomic exclusive create and rename; in the worst race two processes do the same work and write the same bytes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()})
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                text = path.read_text(encoding="utf-8")
            except FileNotFoundError:
                continue  # released meanwhile
            if not _claim_is_stale(path, text, timeout):
                return False
            _reclaim(path, text)
            continue
        try:
            os.write(fd, record.encode("utf-8"))
        finally:
            os.close(fd)
        return True
    return False


def release_claim(path: str | Path) -> None:
    """Remove a claim this process holds."""
    Path(path).unlink(missing_ok=True)
