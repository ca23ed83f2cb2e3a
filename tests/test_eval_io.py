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
