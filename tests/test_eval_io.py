"""Atomic writes, partial-file cleanup and manifests' JSON helpers (eval/io.py)."""

from __future__ import annotations

import os

import pytest

from eval import io


def test_atomic_write_leaves_only_the_complete_file(tmp_path):
    target = tmp_path / "sub" / "1.png"
    io.atomic_write_bytes(target, b"abc")
    assert target.read_bytes() == b"abc"
    assert sorted(p.name for p in target.parent.iterdir()) == ["1.png"]


def test_failed_write_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "a.json"
    io.atomic_write_text(target, "old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        io.atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert io.partial_files(tmp_path) == []


def test_partial_files_are_found_by_target_name(tmp_path):
    (tmp_path / ".12.png.host_a-11-abcd1234.tmp").write_bytes(b"half")
    (tmp_path / ".13.png.other-12-ffff0000.tmp").write_bytes(b"half")
    (tmp_path / "12.png").write_bytes(b"done")
    (tmp_path / ".hidden").write_bytes(b"")
    assert [p.name for p in io.partial_files(tmp_path)] == [
        ".12.png.host_a-11-abcd1234.tmp",
        ".13.png.other-12-ffff0000.tmp",
    ]
    assert io.remove_partial_files(tmp_path, {"13.png"}) == 1  # only what this process owns
    assert [p.name for p in io.partial_files(tmp_path)] == [".12.png.host_a-11-abcd1234.tmp"]
    assert io.remove_partial_files(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", "12.png"]
    assert io.partial_files(tmp_path / "missing") == []


def test_json_round_trip_and_errors_name_the_file(tmp_path):
    io.write_json(tmp_path / "m.json", {"b": [1, 2.5], "a": None})
    assert io.read_json(tmp_path / "m.json") == {"a": None, "b": [1, 2.5]}
    (tmp_path / "bad.json").write_text("{", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.json"):
        io.read_json(tmp_path / "bad.json")


def test_md5_and_versions(tmp_path):
    (tmp_path / "f").write_bytes(b"abc")
    assert io.file_md5(tmp_path / "f") == "900150983cd24fb0d6963f7d28e17f72"  # md5("abc"), RFC 1321
    versions = io.package_versions(["torch", "surely-not-installed-package"])
    assert versions["torch"] and versions["surely-not-installed-package"] is None


def test_claims_are_exclusive_and_stale_ones_are_taken_over(tmp_path):
    import json
    import socket
    import subprocess
    import sys
    import time

    claim = tmp_path / "claims" / "group-000001"
    assert io.try_claim(claim) and not io.try_claim(claim)  # held by this live process
    record = json.loads(claim.read_text())
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    io.release_claim(claim)
    assert io.try_claim(claim)

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    here = socket.gethostname()
    cases = {  # claim text → taken over?
        json.dumps({"host": here, "pid": int(dead.stdout), "time": time.time()}): True,  # its process is gone
        json.dumps({"host": "elsewhere", "pid": 1, "time": time.time()}): False,  # another host, recent
        json.dumps({"host": "elsewhere", "pid": 1, "time": time.time() - 7200}): True,  # older than the timeout
        "": False,  # being written right now
    }
    for text, stale in cases.items():
        claim.write_text(text)
        assert io.try_claim(claim, timeout=3600) == stale, text
    claim.write_text("")
    os.utime(claim, (time.time() - 120, time.time() - 120))
    assert io.try_claim(claim)  # an empty claim whose writer died long ago
    assert sorted(p.name for p in claim.parent.iterdir()) == ["group-000001"]


def test_png_problems_are_named(tmp_path):
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from eval.images import png_problem

    info = PngInfo()
    info.add_text("k", "v")
    buffer = tmp_path / "a.png"
    Image.new("RGB", (16, 8), (10, 20, 30)).save(buffer, pnginfo=info)
    data = buffer.read_bytes()
    assert png_problem(data, (16, 8), {"k": "v"}) is None
    assert png_problem(data, (8, 16)) == "RGB 16x8, expected RGB 8x16"
    assert png_problem(data, (16, 8), {"k": "w"}) == "written with other settings (k='v', expected 'w')"
    assert png_problem(b"", (16, 8)) == "empty file"
    assert png_problem(b"GIF89a", (16, 8)) == "not a PNG"
    assert png_problem(data[:-5], (16, 8)) == "truncated"
    middle = len(data) - 20  # inside the pixel data
    flipped = data[:middle] + bytes([data[middle] ^ 1]) + data[middle + 1 :]
    assert png_problem(flipped, (16, 8)) == "damaged IDAT chunk (CRC mismatch)"
    assert png_problem(data + b"x", (16, 8)) == "data after the end chunk"
