"""Tests of kdrun.atomic: complete new content or the old file, never a part, no temp files left."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from kdrun.atomic import atomic_write, atomic_write_bytes, atomic_write_json, atomic_write_text


def test_writes_replace_the_file_and_create_parent_dirs(tmp_path):
    path = tmp_path / "a" / "b" / "x.json"
    atomic_write_json(path, {"k": [1, 2.5, None]}, indent=None)
    assert path.read_text() == '{"k": [1, 2.5, null]}\n'
    atomic_write_text(path, "new", durable=True)
    assert path.read_text() == "new"
    atomic_write_bytes(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    # a torch.save through the generic callback (what checkpoints use)
    ckpt = tmp_path / "c" / "last.ckpt"
    atomic_write(ckpt, lambda tmp: torch.save({"w": torch.arange(3)}, tmp), durable=True)
    assert torch.equal(torch.load(ckpt, weights_only=True)["w"], torch.arange(3))
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.json"]


def test_failed_write_or_rename_leaves_the_old_file_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    atomic_write_json(path, {"old": 1})
    before = path.read_bytes()

    def half_then_fail(tmp):
        tmp.write_text('{"new": ')
        raise RuntimeError("writer failed")

    with pytest.raises(RuntimeError, match="writer failed"):
        atomic_write(path, half_then_fail)
    with pytest.raises(TypeError):
        atomic_write_json(path, {"bad": object()})

    def broken_replace(src, dst):
        raise OSError("injected rename failure")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="injected"):
        atomic_write_text(path, "new", durable=True)
    monkeypatch.undo()
    assert path.read_bytes() == before and json.loads(before) == {"old": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_new_files_get_the_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "run.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "run.json").stat().st_mode) == 0o644
