"""Atomic outputs: all or nothing, hashes and manifests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
    mask = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            atomic_write_json(tmp / "x.json", {})
    finally:
        os.umask(mask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "out" / "x.json").stat().st_mode & 0o777 == 0o644


# A second writer of the same output, in its own process: it enters atomic_dir, says where its
# temporary folder is, and commits only when told to.
LIVE_WRITER = """
import sys
from pipeline_tasks.artifacts import atomic_dir
with atomic_dir(sys.argv[1]) as tmp:
    (tmp / "who.txt").write_text("live writer")
    print(tmp, flush=True)
    sys.stdin.readline()
"""


def _backdate(path, seconds: float = 3600) -> None:
    then = path.stat().st_mtime - seconds
    os.utime(path, (then, then))


def test_atomic_dir_sweeps_stale_temporaries_of_its_output_only(tmp_path):
    out = tmp_path / "out"
    stale_dir = tmp_path / ".out.k1ll3d_x.tmp"  # what a SIGKILLed atomic_dir leaves
    (stale_dir / "sub").mkdir(parents=True)
    (stale_dir / "sub" / "half.parquet").write_text("partial")
    stale_file = tmp_path / ".out.zz9_0abc.tmp"  # ... and a killed atomic_write_bytes
    stale_file.write_text("partial")
    young = tmp_path / ".out.y0ungabc.tmp"  # may belong to a writer that has not locked it yet
    young.mkdir()
    others = [tmp_path / ".output.abcdefgh.tmp", tmp_path / ".out.notes", tmp_path / "out.abcdefgh.tmp"]
    for other in others:
        other.write_text("not ours")
    for path in (stale_dir, stale_file, *others):
        _backdate(path)
    with atomic_dir(out) as tmp:
        (tmp / "new.txt").write_text("new")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["out", young.name, *(p.name for p in others)])


def test_atomic_dir_never_sweeps_the_temporary_of_a_live_writer(tmp_path, repo_root):
    out = tmp_path / "out"
    writer = subprocess.Popen(
        [sys.executable, "-c", LIVE_WRITER, str(out)],
        cwd=repo_root,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        live = Path(writer.stdout.readline().strip())
        assert live.is_dir() and live.name.startswith(".out.")
        _backdate(live)  # old enough to be swept, were it not locked by its writer
        with atomic_dir(out) as tmp:
            (tmp / "who.txt").write_text("second writer")
        assert (out / "who.txt").read_text() == "second writer" and live.is_dir()
        writer.communicate("go\n", timeout=60)
    finally:
        writer.kill()
    assert writer.returncode == 0 and (out / "who.txt").read_text() == "live writer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_write_sweeps_a_stale_temporary_file_beside_its_target(tmp_path):
    stale = tmp_path / ".model.pt.q8rs7x2a.pt"  # a killed atomic_path("model.pt")
    stale.write_bytes(b"half a checkpoint")
    _backdate(stale)
    with atomic_path(tmp_path / "model.pt") as tmp:
        tmp.write_bytes(b"checkpoint")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
