"""Atomic outputs, hashes and stage manifests shared by every stage.

A stage never leaves a half-written output where downstream would read it: files are written to
a temporary sibling and renamed (:func:`atomic_write_bytes` and friends); whole output
directories are built in a temporary sibling directory and swapped in at the end
(:func:`atomic_dir`). Each output directory gets a ``manifest.json`` (stage, params hash, input
and output hashes, git sha, library versions).

Temporary siblings are named ``.<name>.<random>.tmp`` (``atomic_path`` keeps the target's
suffix) and are removed when the body fails, SIGTERM included (the CLI turns it into an
exception). A process killed outright (SIGKILL, OOM) cannot clean up, so every writer first
sweeps the stale temporaries of its target: its writer holds an ``flock`` on each temporary
while it lives, and the kernel drops that lock when the process dies, so a temporary nobody
holds and older than :data:`STALE_TEMP_AFTER_S` is garbage. Two writers of the same output never
delete each other's work.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline_tasks.config import to_plain

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
DEFAULT_LIBRARIES = (
    "numpy",
    "pandas",
    "pyarrow",
    "torch",
    "tokenizers",
    "onnx",
    "onnxruntime-gpu",
    "onnxruntime",
    "great-expectations",
    "evidently",
    "mlflow",
    "dvc",
)


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_json(obj: Any) -> str:
    """Stable hash of a JSON-able object (sorted keys), e.g. a params section."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, default=str).encode("utf-8"))


def hash_tree(root: str | os.PathLike, exclude: Iterable[str] = (MANIFEST_NAME,)) -> dict[str, str]:
    """sha256 of every file under ``root`` keyed by its posix path relative to ``root``."""
    root = Path(root)
    excluded = set(exclude)
    if root.is_file():
        return {root.name: sha256_file(root)}
    return {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in excluded
    }


# An unlocked temporary younger than this may belong to a writer between creating and locking
# it (microseconds); anything older that nobody holds was left by a dead process.
STALE_TEMP_AFTER_S = 60.0
_held_locks: set[int] = set()  # descriptors holding the flock of our live temporaries


def _drop_inherited_locks() -> None:
    # A forked child (a worker pool) must not keep the parent's temporaries locked after the
    # parent dies. Closing the child's copies keeps the parent's lock: flock belongs to the
    # open file description, released only when its last descriptor closes.
    for fd in list(_held_locks):
        with contextlib.suppress(OSError):
            os.close(fd)
    _held_locks.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


@contextlib.contextmanager
def _lock_while_written(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the temporary ``path`` (file or folder) while it is in use."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        yield
        return
    _held_locks.add(fd)
    try:
        with contextlib.suppress(OSError):  # no flock on this filesystem: sweepers cannot lock it either
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield
    finally:
        _held_locks.discard(fd)
        os.close(fd)


def _is_abandoned(path: str) -> bool:
    """True when nobody holds ``path``'s lock: its writer is gone."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:  # EWOULDBLOCK: a live writer; anything else: cannot tell, keep it
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            logger.debug("cannot lock %s to check it is stale: %s", path, exc)
        return False
    finally:
        os.close(fd)
    return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


def sweep_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporaries of ``path`` that interrupted writers left beside it; returns them.

    Matches only the names this module creates (``.<name>.<8 random chars><.tmp | suffix>``, and
    the ``.<name>.old-<pid>`` backup of :func:`atomic_dir` once ``path`` exists and that pid is
    gone), and only those no live writer holds (see the module docstring).
    """
    path = Path(path)
    suffixes = {".tmp", path.suffix} - {""}
    temp_name = re.compile(
        re.escape(f".{path.name}.") + r"(?:[a-z0-9_]{8}(?:" + "|".join(map(re.escape, suffixes)) + r")|old-(\d+))"
    )
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return []
    removed = []
    now = time.time()
    for entry in entries:
        match = temp_name.fullmatch(entry.name)
        if match is None:
            continue
        if match.group(1):  # a backup: garbage once the new output is in place and its writer gone
            stale = path.exists() and not _pid_alive(int(match.group(1)))
        else:
            try:
                young = now - entry.stat(follow_symlinks=False).st_mtime < STALE_TEMP_AFTER_S
            except OSError:
                continue
            stale = not young and not entry.is_symlink() and _is_abandoned(entry.path)
        if not stale:
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
        logger.warning("removed %s, a temporary output left by an interrupted run", entry.path)
        removed.append(Path(entry.path))
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _tmp_sibling(path: Path, suffix: str = ".tmp") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temporaries(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    # mkstemp creates 0600; outputs are shared with other users (containers, DVC cache readers)
    os.fchmod(fd, 0o666 & ~_umask())
    os.close(fd)
    return Path(name)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    tmp = _tmp_sibling(path)
    try:
        with open(tmp, "wb") as fh, _lock_while_written(tmp):
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path next to ``path``; rename onto ``path`` only on success.

    For writers that want a file name (pyarrow, torch.save, onnx.save).
    """
    path = Path(path)
    tmp = _tmp_sibling(path, suffix=path.suffix or ".tmp")
    try:
        with _lock_while_written(tmp):
            yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, keep: Iterable[str] = ()) -> Iterator[Path]:
    """Build a directory in a temporary sibling and swap it in for ``path`` on success.

    On any exception (SIGTERM included, see :mod:`pipeline_tasks.cli`) the temporary directory is
    removed and ``path`` keeps its old content. ``keep`` names entries of the old directory
    carried into the new one before the body runs (e.g. a training checkpoint directory that
    must survive a re-run). Stale temporaries of ``path`` are swept first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temporaries(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    backup = path.with_name(f".{path.name}.old-{os.getpid()}")
    swapped = False
    try:
        with _lock_while_written(tmp):
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700
            for name in keep:
                old = path / name
                if old.exists():
                    shutil.move(str(old), str(tmp / name))
            yield tmp
            if path.exists():
                os.replace(path, backup)
            os.replace(tmp, path)
            swapped = True
    except BaseException:
        if not swapped:
            if backup.exists() and not path.exists():  # interrupted between the two renames
                os.replace(backup, path)
            for name in keep:  # give kept entries back so a failed run loses nothing
                moved = tmp / name
                if moved.exists() and not (path / name).exists():
                    path.mkdir(parents=True, exist_ok=True)
                    shutil.move(str(moved), str(path / name))
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if swapped:
            shutil.rmtree(backup, ignore_errors=True)


def git_sha(cwd: str | os.PathLike | None = None) -> str | None:
    """Current commit (with ``-dirty`` when the work tree has changes), or None outside git."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("LMPIPE_GIT_SHA")
    return f"{sha}-dirty" if dirty else sha


def library_versions(names: Iterable[str] = DEFAULT_LIBRARIES) -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def build_manifest(
    stage: str,
    params_section: Any,
    inputs: dict[str, str] | None = None,
    outputs_dir: str | os.PathLike | None = None,
    extra: dict[str, Any] | None = None,
    libraries: Iterable[str] = DEFAULT_LIBRARIES,
) -> dict[str, Any]:
    plain = to_plain(params_section)
    manifest = {
        "stage": stage,
        "created_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "params": plain,
        "params_sha256": sha256_json(plain),
        "inputs": dict(inputs or {}),
        "git_sha": git_sha(),
        "libraries": library_versions(libraries),
    }
    if outputs_dir is not None:
        manifest["outputs"] = hash_tree(outputs_dir)
    if extra:
        manifest.update(extra)
    return manifest


def write_manifest(
    directory: str | os.PathLike,
    stage: str,
    params_section: Any,
    inputs: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``manifest.json`` into ``directory`` (hashing everything already in it)."""
    directory = Path(directory)
    manifest = build_manifest(stage, params_section, inputs, directory, extra)
    return atomic_write_json(directory / MANIFEST_NAME, manifest)


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)
