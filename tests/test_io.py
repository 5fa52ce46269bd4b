"""Atomic outputs: nothing partial on failure, normal permissions on success."""

from __future__ import annotations

import json
import os
import stat

import pytest

from prunelab.io import atomic_dir, atomic_file, write_json


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "half.txt").write_text("partial")
            raise RuntimeError("boom")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_replaces_previous_result_only_on_success(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "v.txt").write_text("1")
    with pytest.raises(ValueError):
        with atomic_dir(target) as tmp:
            (tmp / "v.txt").write_text("2")
            raise ValueError
    assert (target / "v.txt").read_text() == "1"
    with atomic_dir(target) as tmp:
        (tmp / "v.txt").write_text("3")
    assert (target / "v.txt").read_text() == "3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_outputs_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "d"):
            pass
        write_json(tmp_path / "f.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "f.json").stat().st_mode) == 0o644
    assert json.loads((tmp_path / "f.json").read_text()) == {"a": 1}


def test_atomic_file_keeps_old_content_on_failure(tmp_path):
    target = tmp_path / "x.txt"
    target.write_text("old")
    with pytest.raises(KeyError):
        with atomic_file(target) as fh:
            fh.write("new")
            raise KeyError
    assert target.read_text() == "old"
