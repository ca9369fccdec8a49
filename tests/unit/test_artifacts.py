"""Atomic outputs: all or nothing, hashes and manifests."""

from __future__ import annotations

import json

import pytest

from pipeline_tasks.artifacts import atomic_dir, atomic_path, atomic_write_json, hash_tree, sha256_file, write_manifest


def test_atomic_dir_replaces_old_content_on_success(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic_dir(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_atomic_dir_keeps_old_content_on_failure(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "half.txt").write_text("partial")
        raise RuntimeError("boom")
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_dir_keep_carries_entries_and_returns_them_on_failure(tmp_path):
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "step1.pt").write_text("ckpt")
    with pytest.raises(ValueError), atomic_dir(out, keep=["checkpoints"]) as tmp:
        assert (tmp / "checkpoints" / "step1.pt").exists()
        raise ValueError
    assert (out / "checkpoints" / "step1.pt").read_text() == "ckpt"
    with atomic_dir(out, keep=["checkpoints"]) as tmp:
        (tmp / "model.pt").write_text("m")
    assert (out / "checkpoints" / "step1.pt").exists() and (out / "model.pt").exists()


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "file.bin"
    with pytest.raises(OSError), atomic_path(target) as tmp:
        tmp.write_bytes(b"x")
        raise OSError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_write_manifest_hashes_outputs(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    atomic_write_json(tmp_path / "b.json", {"k": 1})
    path = write_manifest(tmp_path, "unit", {"x": 1}, inputs={"in": "abc"})
    manifest = json.loads(path.read_text())
    assert manifest["stage"] == "unit"
    assert manifest["outputs"]["a.txt"] == sha256_file(tmp_path / "a.txt")
    assert "manifest.json" not in manifest["outputs"]
    assert manifest["params_sha256"] and manifest["libraries"]["python"]
    assert hash_tree(tmp_path) == manifest["outputs"]


def test_atomic_outputs_respect_umask_not_private_temp_modes(tmp_path):
    import os

    mask = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            atomic_write_json(tmp / "x.json", {})
    finally:
        os.umask(mask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "out" / "x.json").stat().st_mode & 0o777 == 0o644
