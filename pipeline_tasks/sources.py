"""Where input data comes from: a local path, an offline mirror, or a URL.

A :class:`SourceSpec` (one entry of ``ingest_wiki.sources`` / ``ingest_news.sources``) is resolved
by :func:`resolve_source` in this order:

1. ``path`` — a local file or folder (relative paths are relative to the project root);
2. ``mirror_path`` under the offline mirror directory ``$LMPIPE_DATA_MIRROR`` (air-gapped sites
   copy the public files there once; CI points it at ``../shared/corpora``);
3. ``url`` — downloaded into ``paths.downloads_dir`` with HTTP Range resume, retries with
   exponential backoff and a descriptive User-Agent, then verified against ``sha256`` / ``sha1`` /
   ``md5``. A checksum mismatch deletes the file and fails.

Files found locally or in the mirror are verified against the same checksums, so a changed input
can never slip in silently (DVC tracks the checksums through params, the files themselves live
outside the repo). Written with the standard library only (urllib): the task image needs nothing
more, and the retry/resume policy must be exact and testable against a fault-injecting server.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from pipeline_tasks import __version__
from pipeline_tasks.errors import SourceError

logger = logging.getLogger(__name__)

MIRROR_ENV = "LMPIPE_DATA_MIRROR"
USER_AGENT = f"lm-pipeline/{__version__} (+https://github.com/lm-pipeline/lm-pipeline; data ingest)"
HASH_NAMES = ("sha256", "sha1", "md5")


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """Where to find one input file or folder, and how to verify it."""

    name: str
    path: str | None = None
    mirror_path: str | None = None
    url: str | None = None
    sha256: str | None = None
    sha1: str | None = None
    md5: str | None = None

    def __post_init__(self):
        if not (self.path or self.mirror_path or self.url):
            raise ValueError(f"source {self.name!r}: give at least one of path, mirror_path, url")

    def checksums(self) -> dict[str, str]:
        return {h: getattr(self, h).lower() for h in HASH_NAMES if getattr(self, h)}


@dataclasses.dataclass(frozen=True)
class DownloadPolicy:
    retries: int = 5
    backoff_s: float = 1.0
    timeout_s: float = 60.0
    chunk_bytes: int = 1 << 20


def file_digests(path: Path, names: tuple[str, ...]) -> dict[str, str]:
    hashers = {n: hashlib.new(n) for n in names}
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            for h in hashers.values():
                h.update(chunk)
    return {n: h.hexdigest() for n, h in hashers.items()}


def verify_checksums(path: Path, expected: dict[str, str], origin: str) -> None:
    """Raise :class:`SourceError` naming the file and both digests when a checksum differs."""
    if not expected or path.is_dir():
        return
    actual = file_digests(path, tuple(expected))
    for name, want in expected.items():
        if actual[name] != want:
            raise SourceError(
                f"{path} ({origin}): {name} mismatch: expected {want}, got {actual[name]}. "
                "The file is corrupt or a different version; replace it or update the checksum in params.yaml"
            )


def mirror_dir() -> Path | None:
    value = os.environ.get(MIRROR_ENV)
    return Path(value) if value else None


def resolve_source(spec: SourceSpec, downloads_dir: str | os.PathLike, project_root: Path | None = None,
                   policy: DownloadPolicy = DownloadPolicy()) -> Path:
    """Return a verified local path for ``spec`` (see module docstring for the order)."""
    root = project_root or Path.cwd()
    tried = []
    if spec.path:
        local = Path(spec.path) if Path(spec.path).is_absolute() else root / spec.path
        if local.exists():
            verify_checksums(local, spec.checksums(), "local path")
            return local
        tried.append(f"path {local}")
    mirror = mirror_dir()
    if spec.mirror_path:
        if mirror is not None:
            candidate = mirror / spec.mirror_path
            if candidate.exists():
                verify_checksums(candidate, spec.checksums(), f"mirror ${MIRROR_ENV}")
                return candidate
            tried.append(f"mirror file {candidate}")
        else:
            tried.append(f"mirror (set ${MIRROR_ENV} to a folder holding {spec.mirror_path})")
    if spec.url:
        target = Path(downloads_dir) / spec.name / Path(urllib.request.url2pathname(spec.url.split("?")[0])).name
        try:
            return download(spec.url, target, spec.checksums(), policy)
        except SourceError as exc:
            tried.append(f"url {spec.url} ({exc})")
    raise SourceError(f"source {spec.name!r} not found; tried: " + "; ".join(tried))


def download(url: str, target: Path, checksums: dict[str, str], policy: DownloadPolicy = DownloadPolicy(),
             sleep: Callable[[float], None] = time.sleep) -> Path:
    """Resumable download of ``url`` to ``target``, verified; returns ``target``.

    The body goes to ``target.part``; an interrupted transfer resumes from its size with an HTTP
    Range request (a server that ignores Range restarts from zero). Only a complete, verified
    file is renamed to ``target``.
    """
    if target.exists():
        try:
            verify_checksums(target, checksums, "download cache")
            return target
        except SourceError:
            logger.warning("cached %s fails its checksum; downloading again", target)
            target.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    last_error: Exception | None = None
    for attempt in range(policy.retries + 1):
        if attempt:
            delay = policy.backoff_s * 2 ** (attempt - 1)
            logger.warning("download %s: attempt %d failed (%s); retrying in %.1f s", url, attempt, last_error, delay)
            sleep(delay)
        try:
            if _fetch_into(url, part, policy):
                break
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            if isinstance(exc, urllib.error.HTTPError) and 400 <= exc.code < 500 and exc.code not in (408, 416, 429):
                part.unlink(missing_ok=True)
                raise SourceError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
            last_error = exc
    else:
        raise SourceError(f"{url}: gave up after {policy.retries + 1} attempts: {last_error}")
    try:
        verify_checksums(part, checksums, f"downloaded from {url}")
    except SourceError:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, target)
    logger.info("downloaded %s -> %s (%d bytes)", url, target, target.stat().st_size)
    return target


def _fetch_into(url: str, part: Path, policy: DownloadPolicy) -> bool:
    """One transfer attempt appending to ``part``; True when the body is complete."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=policy.timeout_s)  # noqa: S310 (http/https only)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # already complete on a previous attempt
            return True
        raise
    with response:
        if offset and response.status != 206:
            offset = 0  # server ignored Range: start over
        expected_total = _expected_total(response, offset)
        with open(part, "ab" if offset else "wb") as fh:
            while chunk := response.read(policy.chunk_bytes):
                fh.write(chunk)
    size = part.stat().st_size
    if expected_total is not None and size < expected_total:
        raise OSError(f"connection closed at {size} of {expected_total} bytes")
    return True


def _expected_total(response, offset: int) -> int | None:
    content_range = response.headers.get("Content-Range")
    if content_range and "/" in content_range:
        total = content_range.rsplit("/", 1)[1]
        return int(total) if total.isdigit() else None
    length = response.headers.get("Content-Length")
    return offset + int(length) if length and length.isdigit() else None
