"""Where input data comes from: a local path, an offline mirror, or a URL, and how it is verified.

A :class:`SourceSpec` (one entry of ``ingest_wiki.sources`` / ``ingest_news.sources``) is resolved
by :func:`resolve_source` in this order:

1. ``path`` — a local file or folder (relative paths are relative to the project root);
2. ``mirror_path`` under the offline mirror directory ``$LMPIPE_DATA_MIRROR`` (air-gapped sites
   copy the public files there once; CI points it at ``../shared/corpora``);
3. ``url`` — downloaded into ``paths.downloads_dir`` with HTTP Range resume (guarded by
   ``If-Range`` so a file that changed on the server is never spliced), retries with exponential
   backoff (``Retry-After`` honoured), a descriptive User-Agent, then verified against ``sha256`` /
   ``sha1`` / ``md5`` (Wikimedia publishes md5 and sha1 per dump file). 4xx answers fail at once;
   5xx, timeouts and dropped connections are retried, keeping the partial ``.part`` file so the
   next attempt (or the next run) resumes. A checksum mismatch deletes the partial file and fails.

Files found locally or in the mirror are verified against the same checksums, so a changed input
can never slip in silently (DVC tracks the checksums through params; the files themselves live
outside the repo). A folder cannot carry a file checksum: it is verified with ``tree_sha256``, the
"folder digest" of the corpora README (:func:`tree_digest`). ``member`` names a file inside a zip
archive, read in place by streaming (:func:`open_binary`), never extracted to disk; its own
``member_sha256`` is optional. Compression and archives are recognised by their first bytes, not
their name (:func:`detect_container`): gzip / bz2 / xz are decompressed on the fly, and a zip
without ``member``, a tar or a zstd file is refused with the fix.

Written with the standard library only (urllib): the task image needs nothing more, and the
retry/resume policy must be exact and testable against a fault-injecting local server.
"""

from __future__ import annotations

import bz2
import contextlib
import dataclasses
import gzip
import hashlib
import http.client
import json
import logging
import lzma
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import IO

from pipeline_tasks import __version__
from pipeline_tasks.errors import SourceError

logger = logging.getLogger(__name__)

MIRROR_ENV = "LMPIPE_DATA_MIRROR"
USER_AGENT = f"lm-pipeline/{__version__} (+https://github.com/lm-pipeline/lm-pipeline; data ingest)"
HASH_NAMES = ("sha256", "sha1", "md5")
_HEX_LEN = {"sha256": 64, "sha1": 40, "md5": 32, "tree_sha256": 64, "member_sha256": 64}
# 4xx answers worth retrying: request timeout, too many requests (rate limit).
RETRYABLE_4XX = frozenset({408, 429})
# Transport failures that a retry can fix. HTTPException covers IncompleteRead / RemoteDisconnected.
TRANSIENT_ERRORS = (urllib.error.URLError, http.client.HTTPException, OSError)
PROGRESS_EVERY_S = 30.0
# First bytes of the containers a data file may come in. Empty and spanned zips have their own.
MAGIC = (
    (b"BZh", "bz2"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x1f\x8b", "gzip"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"PK\x03\x04", "zip"),
    (b"PK\x05\x06", "zip"),
    (b"PK\x07\x08", "zip"),
)
_DECOMPRESS = {"bz2": bz2.open, "xz": lzma.open, "gzip": gzip.open}
TAR_MAGIC_OFFSET = 257  # "ustar" in the first 512-byte header block (POSIX and GNU tar)


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """Where to find one input file, zip member or folder, and how to verify it."""

    name: str
    path: str | None = None
    mirror_path: str | None = None
    url: str | None = None
    sha256: str | None = None
    sha1: str | None = None
    md5: str | None = None
    member: str | None = None  # a file inside a zip archive, read in place
    member_sha256: str | None = None
    tree_sha256: str | None = None  # folder digest (see tree_digest)

    def __post_init__(self):
        if not (self.path or self.mirror_path or self.url):
            raise ValueError(f"source {self.name!r}: give at least one of path, mirror_path, url")
        for key, length in _HEX_LEN.items():
            value = getattr(self, key)
            if value is not None and not re.fullmatch(f"[0-9a-fA-F]{{{length}}}", value):
                raise ValueError(f"source {self.name!r}: {key} must be {length} hex digits, got {value!r}")
        if self.url:
            if urllib.parse.urlsplit(self.url).scheme not in ("http", "https"):
                raise ValueError(f"source {self.name!r}: url must be http(s), got {self.url!r}")
            if not self.checksums():
                raise ValueError(
                    f"source {self.name!r}: a url source needs sha256, sha1 or md5 so the download can be verified"
                )
            if self.tree_sha256:
                raise ValueError(f"source {self.name!r}: tree_sha256 is for folders; a url downloads one file")
        if self.member_sha256 and not self.member:
            raise ValueError(f"source {self.name!r}: member_sha256 needs member")
        if self.member:
            check_member_name(self.member, self.name)

    def checksums(self) -> dict[str, str]:
        return {h: getattr(self, h).lower() for h in HASH_NAMES if getattr(self, h)}


def check_member_name(member: str, owner: str = "source") -> None:
    """Reject archive member names that could escape a folder if ever extracted."""
    pure = PurePosixPath(member)
    if not member or "\\" in member or pure.is_absolute() or ".." in pure.parts or re.match(r"^[A-Za-z]:", member):
        raise ValueError(f"{owner}: unsafe archive member name {member!r} (absolute, '..' or backslash)")


@dataclasses.dataclass(frozen=True)
class DownloadPolicy:
    """Retry / timeout policy for URL sources (a ``download`` sub-section in params)."""

    retries: int = 5
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    timeout_s: float = 60.0
    chunk_bytes: int = 1 << 20

    def __post_init__(self):
        if self.retries < 0 or self.backoff_s < 0 or self.max_backoff_s < 0:
            raise ValueError("download: retries, backoff_s and max_backoff_s must be >= 0")
        if self.timeout_s <= 0 or self.chunk_bytes <= 0:
            raise ValueError("download: timeout_s and chunk_bytes must be > 0")


# ---------------------------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------------------------
def stream_digests(stream: IO[bytes], names: tuple[str, ...], chunk_size: int = 1 << 20) -> dict[str, str]:
    hashers = {n: hashlib.new(n) for n in names}
    for chunk in iter(lambda: stream.read(chunk_size), b""):
        for h in hashers.values():
            h.update(chunk)
    return {n: h.hexdigest() for n, h in hashers.items()}


def file_digests(path: Path, names: tuple[str, ...]) -> dict[str, str]:
    with open(path, "rb") as fh:
        return stream_digests(fh, names)


def _sha256sum_line(digest: str, rel: str) -> bytes:
    # GNU sha256sum escapes "\\" and "\n" in names and marks such lines with a leading backslash.
    if "\\" in rel or "\n" in rel:
        return f"\\{digest}  {rel.replace(chr(92), chr(92) * 2).replace(chr(10), chr(92) + 'n')}\n".encode()
    return f"{digest}  {rel}\n".encode()


def tree_digest(root: str | os.PathLike) -> str:
    """Folder digest of the corpora README: sha256 of ``sha256sum`` lines sorted by byte-order path.

    Equals ``cd ROOT && find . -type f | sed 's|^./||' | LC_ALL=C sort | xargs sha256sum | sha256sum``.
    """
    root = Path(root)
    files = sorted(
        (p for p in root.rglob("*") if p.is_file()), key=lambda p: os.fsencode(p.relative_to(root).as_posix())
    )
    outer = hashlib.sha256()
    for p in files:
        outer.update(_sha256sum_line(file_digests(p, ("sha256",))["sha256"], p.relative_to(root).as_posix()))
    return outer.hexdigest()


def verify_checksums(path: Path, expected: dict[str, str], origin: str) -> None:
    """Raise :class:`SourceError` naming the file and both digests when a checksum differs."""
    if not expected:
        return
    if path.is_dir():
        raise SourceError(
            f"{path} ({origin}) is a folder, but {'/'.join(expected)} checksums are for files; "
            "use tree_sha256 for a folder source"
        )
    actual = file_digests(path, tuple(expected))
    for name, want in expected.items():
        if actual[name] != want.lower():
            raise SourceError(
                f"{path} ({origin}): {name} mismatch: expected {want}, got {actual[name]}. "
                "The file is corrupt or a different version; replace it or update the checksum in params.yaml"
            )


def verify_source(path: Path, spec: SourceSpec, origin: str) -> None:
    """Verify a resolved file or folder against every checksum ``spec`` declares."""
    verify_checksums(path, spec.checksums(), origin)
    if spec.tree_sha256:
        if not path.is_dir():
            raise SourceError(f"{path} ({origin}): tree_sha256 is set but this is a file, not a folder")
        actual = tree_digest(path)
        if actual != spec.tree_sha256.lower():
            raise SourceError(
                f"{path} ({origin}): folder digest (tree_sha256) mismatch: expected {spec.tree_sha256}, "
                f"got {actual}. A file was added, removed or changed; restore the folder or update params.yaml"
            )


# ---------------------------------------------------------------------------------------------
# Resolution
# ---------------------------------------------------------------------------------------------
def mirror_dir() -> Path | None:
    value = os.environ.get(MIRROR_ENV)
    return Path(value) if value else None


def download_target(spec: SourceSpec, downloads_dir: str | os.PathLike) -> Path:
    """``downloads_dir/<source name>/<last url path segment>`` (never outside that folder)."""
    name = PurePosixPath(urllib.parse.unquote(urllib.parse.urlsplit(spec.url or "").path)).name
    if name in ("", ".", "..") or "\\" in name:
        name = "download"
    return Path(downloads_dir) / spec.name / name


def resolve_source(
    spec: SourceSpec,
    downloads_dir: str | os.PathLike,
    project_root: Path | None = None,
    policy: DownloadPolicy = DownloadPolicy(),
    sleep: Callable[[float], None] = time.sleep,
) -> Path:
    """Return a verified local path for ``spec`` (see module docstring for the order)."""
    root = project_root or Path.cwd()
    tried = []
    if spec.path:
        local = Path(spec.path) if Path(spec.path).is_absolute() else root / spec.path
        if local.exists():
            verify_source(local, spec, "local path")
            return local
        tried.append(f"path {local} does not exist")
    if spec.mirror_path:
        mirror = mirror_dir()
        if mirror is not None:
            candidate = mirror / spec.mirror_path
            if candidate.exists():
                verify_source(candidate, spec, f"mirror ${MIRROR_ENV}={mirror}")
                return candidate
            tried.append(f"mirror file {candidate} does not exist (${MIRROR_ENV}={mirror})")
        else:
            tried.append(f"mirror not set (set ${MIRROR_ENV} to a folder holding {spec.mirror_path})")
    if spec.url:
        try:
            return download(spec.url, download_target(spec, downloads_dir), spec.checksums(), policy, sleep)
        except SourceError as exc:
            tried.append(f"download failed: {exc}")
    else:
        tried.append("no url to download from")
    raise SourceError(f"source {spec.name!r} not found; tried: " + "; ".join(tried))


def detect_container(path: str | os.PathLike) -> str:
    """``bz2`` | ``xz`` | ``gzip`` | ``zstd`` | ``zip`` | ``none``, from the first bytes of ``path``."""
    with open(path, "rb") as fh:
        head = fh.read(6)
    return next((kind for magic, kind in MAGIC if head.startswith(magic)), "none")


def _zip_members(path: Path) -> str:
    try:
        with zipfile.ZipFile(path) as archive:
            names = [info.filename for info in archive.infolist() if not info.is_dir()]
    except (zipfile.BadZipFile, OSError):
        return "unreadable"
    return ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "") or "none"


@contextlib.contextmanager
def open_binary(path: Path, member: str | None = None, member_sha256: str | None = None) -> Iterator[IO[bytes]]:
    """Open a resolved source file for streaming reads.

    With ``member`` the file is a zip archive and the member is streamed from it in place (zipfile
    checks its CRC at the end). Without it, gzip / bz2 / xz content is decompressed on the fly
    whatever the file is called, and archives are refused with the fix (:class:`SourceError`):
    parsed as text, their bytes would be quarantined as junk records or, under a lax
    ``max_bad_share``, ingested.
    """
    if member is None:
        kind = detect_container(path)
        if kind == "zip":
            raise SourceError(
                f"{path}: this is a zip archive: set member to the file to read inside it "
                f"(members: {_zip_members(path)})"
            )
        if kind == "zstd":
            raise SourceError(f"{path}: zstd-compressed input is not supported; decompress it (zstd -d) first")
        with _DECOMPRESS.get(kind, open)(path, "rb") as fh:
            head = fh.read(TAR_MAGIC_OFFSET + 5)
            if head[TAR_MAGIC_OFFSET:] == b"ustar":
                raise SourceError(
                    f"{path}: this is a tar archive; extract the file to read from it and point the source's path at it"
                )
            fh.seek(0)
            yield fh
        return
    check_member_name(member, str(path))
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise SourceError(f"{path}: cannot read as a zip archive to get member {member!r}: {exc}") from exc
    with archive:
        try:
            info = archive.getinfo(member)
        except KeyError:
            raise SourceError(
                f"{path}: archive has no member {member!r} (members: {', '.join(archive.namelist()[:20])})"
            ) from None
        if info.is_dir():
            raise SourceError(f"{path}: member {member!r} is a folder, not a file")
        try:
            if member_sha256:
                with archive.open(info) as fh:
                    actual = stream_digests(fh, ("sha256",))["sha256"]
                if actual != member_sha256.lower():
                    raise SourceError(
                        f"{path}!{member}: member sha256 mismatch: expected {member_sha256}, "
                        f"got {actual}; replace the archive or update member_sha256 in params.yaml"
                    )
            stream = archive.open(info)
        except (zipfile.BadZipFile, RuntimeError, NotImplementedError) as exc:  # CRC error, encrypted, method
            raise SourceError(f"{path}!{member}: cannot read member: {exc}") from exc
        with stream:
            try:
                yield stream
            except zipfile.BadZipFile as exc:  # CRC mismatch found at the end of the stream
                raise SourceError(f"{path}!{member}: archive member is corrupt: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# Download
# ---------------------------------------------------------------------------------------------
class _RetryableError(OSError):
    """A transfer problem that the next attempt can fix (short read, range mismatch...)."""


def _retry_after_s(exc: BaseException) -> float | None:
    headers = getattr(exc, "headers", None)
    value = headers.get("Retry-After") if headers is not None else None
    return float(value) if value and value.strip().isdigit() else None


def download(
    url: str,
    target: Path,
    checksums: dict[str, str],
    policy: DownloadPolicy = DownloadPolicy(),
    sleep: Callable[[float], None] = time.sleep,
) -> Path:
    """Resumable download of ``url`` to ``target``, verified; returns ``target``.

    The body goes to ``target.part`` (kept across attempts and runs for resume; its validator
    ETag / Last-Modified sits in ``target.part.json``). An interrupted transfer resumes from its
    size with ``Range`` + ``If-Range``; a server that ignores Range (200) or whose file changed
    restarts from zero. Only a complete, verified file is renamed to ``target``.
    """
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise SourceError(f"{url}: only http(s) URLs are downloaded")
    if not checksums:
        logger.warning("download %s: no checksum given, the file cannot be verified", url)
    if target.exists():
        try:
            verify_checksums(target, checksums, "download cache")
            return target
        except SourceError:
            logger.warning("cached %s fails its checksum; downloading again", target)
            target.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    meta = target.with_name(target.name + ".part.json")
    resumed = _transfer(url, part, meta, policy, sleep)
    try:
        verify_checksums(part, checksums, f"downloaded from {url}")
    except SourceError:
        if not resumed:
            _discard(part, meta)
            raise
        # A spliced file can be wrong even with If-Range (a server without validators): one clean retry.
        logger.warning("download %s: resumed file fails its checksum; downloading once more from zero", url)
        _discard(part, meta)
        _transfer(url, part, meta, policy, sleep)
        try:
            verify_checksums(part, checksums, f"downloaded from {url}")
        except SourceError:
            _discard(part, meta)
            raise
    os.replace(part, target)
    meta.unlink(missing_ok=True)
    logger.info("downloaded %s -> %s (%d bytes)", url, target, target.stat().st_size)
    return target


def _discard(part: Path, meta: Path) -> None:
    part.unlink(missing_ok=True)
    meta.unlink(missing_ok=True)


def _transfer(url: str, part: Path, meta: Path, policy: DownloadPolicy, sleep: Callable[[float], None]) -> bool:
    """Run attempts until ``part`` holds the whole body; True when any byte came from a resume."""
    resumed = False
    last_error: BaseException | None = None
    for attempt in range(policy.retries + 1):
        if attempt:
            delay = min(policy.backoff_s * 2 ** (attempt - 1), policy.max_backoff_s)
            delay = max(delay, min(_retry_after_s(last_error) or 0.0, policy.max_backoff_s))
            logger.warning(
                "download %s: attempt %d/%d failed (%s); retrying in %.1f s",
                url,
                attempt,
                policy.retries + 1,
                last_error,
                delay,
            )
            sleep(delay)
        try:
            resumed |= _fetch_into(url, part, meta, policy)
            return resumed
        except urllib.error.HTTPError as exc:
            exc.close()  # an HTTPError holds the open error response
            if 400 <= exc.code < 500 and exc.code not in RETRYABLE_4XX:
                _discard(part, meta)
                raise SourceError(
                    f"{url}: HTTP {exc.code} {exc.reason} (not retried: fix the url in params.yaml)"
                ) from exc
            last_error = exc
        except TRANSIENT_ERRORS as exc:
            last_error = exc
    kept = f"; the partial file {part} is kept and the next run resumes it" if part.exists() else ""
    raise SourceError(f"{url}: gave up after {policy.retries + 1} attempts: {last_error}{kept}")


def _read_meta(meta: Path) -> dict:
    try:
        return json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _fetch_into(url: str, part: Path, meta: Path, policy: DownloadPolicy) -> bool:
    """One transfer attempt appending to ``part``; returns True if it resumed. Raises when incomplete."""
    offset = part.stat().st_size if part.exists() else 0
    validator = _read_meta(meta).get("validator") if offset else None
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if validator:
            headers["If-Range"] = validator
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=policy.timeout_s)  # noqa: S310 (scheme checked)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            exc.close()
            total = _total_from_content_range(exc.headers.get("Content-Range"))
            if total == offset:
                return True  # the previous attempt had already received everything
            _discard(part, meta)
            raise _RetryableError(f"server refused range {offset}- (size {total}); restarting from zero") from exc
        raise
    with response:
        resumed = False
        if offset and response.status == 206:
            start = _start_from_content_range(response.headers.get("Content-Range"))
            if start != offset:
                _discard(part, meta)
                raise _RetryableError(f"server sent range start {start}, asked for {offset}; restarting")
            resumed = True
        elif offset:
            logger.info("download %s: server ignored Range (status %d); restarting from zero", url, response.status)
            offset = 0
        etag = response.headers.get("ETag")
        # If-Range needs a strong validator: a weak ETag (W/"...") falls back to Last-Modified.
        new_validator = etag if etag and not etag.startswith("W/") else response.headers.get("Last-Modified")
        if not resumed:
            meta.write_text(json.dumps({"url": url, "validator": new_validator}), encoding="utf-8")
        expected_total = _expected_total(response, offset)
        last_log = time.monotonic()
        with open(part, "ab" if resumed else "wb") as fh:
            while chunk := response.read(policy.chunk_bytes):
                fh.write(chunk)
                if time.monotonic() - last_log > PROGRESS_EVERY_S:  # large dumps take minutes
                    last_log = time.monotonic()
                    logger.info("download %s: %d of %s bytes", url, fh.tell(), expected_total or "?")
    size = part.stat().st_size
    if expected_total is not None and size < expected_total:
        raise _RetryableError(f"connection closed at {size} of {expected_total} bytes")
    if expected_total is not None and size > expected_total:
        _discard(part, meta)
        raise _RetryableError(f"received {size} bytes but the server announced {expected_total}; restarting")
    return resumed


def _total_from_content_range(value: str | None) -> int | None:
    if value and "/" in value:
        total = value.rsplit("/", 1)[1].strip()
        return int(total) if total.isdigit() else None
    return None


def _start_from_content_range(value: str | None) -> int | None:
    match = re.match(r"\s*bytes\s+(\d+)-\d+/", value or "")
    return int(match.group(1)) if match else None


def _expected_total(response, offset: int) -> int | None:
    total = _total_from_content_range(response.headers.get("Content-Range"))
    if total is not None:
        return total
    length = response.headers.get("Content-Length")
    return offset + int(length) if length and length.strip().isdigit() else None
