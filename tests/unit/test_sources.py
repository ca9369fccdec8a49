"""Source resolution and the resumable downloader, against a fault-injecting HTTP server on 127.0.0.1.

The server runs in a thread (ThreadingHTTPServer, port 0) and plays a per-test script of
responses: drop the connection half-way through the body, 503, ignore Range, 404, wrong bytes.
Loopback only; every loop is bounded by DownloadPolicy.retries; sleeps are recorded, not slept.
"""

from __future__ import annotations

import gzip
import hashlib
import http.server
import subprocess
import threading
import zipfile
from pathlib import Path

import pytest

from pipeline_tasks.errors import SourceError
from pipeline_tasks.ingest.sources import (
    MIRROR_ENV,
    USER_AGENT,
    DownloadPolicy,
    SourceSpec,
    download,
    open_binary,
    resolve_source,
    tree_digest,
    verify_source,
)

PAYLOAD = bytes(range(256)) * 400  # 102,400 bytes, every byte value
SHA256 = hashlib.sha256(PAYLOAD).hexdigest()
ETAG = '"v1-payload"'
POLICY = DownloadPolicy(retries=3, backoff_s=0.01, max_backoff_s=0.05, timeout_s=5.0, chunk_bytes=8192)


class FaultHandler(http.server.BaseHTTPRequestHandler):
    """Plays ``server.script`` (one action per request; ``ok`` once the script is used up)."""

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):  # noqa: N802 (http.server API)
        server = self.server
        with server.lock:
            server.requests.append(dict(self.headers))
            action = server.script.pop(0) if server.script else "ok"
        body = server.payload
        if action in ("404", "503"):
            self.send_response(int(action))
            if action == "503":
                self.send_header("Retry-After", "0")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start = 0
        range_header = self.headers.get("Range")
        if range_header and action != "ignore_range" and self.headers.get("If-Range", ETAG) == ETAG:
            start = int(range_header.split("=")[1].split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        part = body[start:]
        self.send_header("Content-Length", str(len(part)))
        self.send_header("ETag", ETAG)
        self.end_headers()
        if action == "drop_half":  # full Content-Length announced, half the bytes sent, then close
            self.wfile.write(part[: len(part) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(part)


@pytest.fixture()
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FaultHandler)
    httpd.daemon_threads = True
    httpd.script, httpd.requests, httpd.payload, httpd.lock = [], [], PAYLOAD, threading.Lock()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/data/file.bin"
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture()
def sleeps():
    return []


def fetch(server, tmp_path, sleeps, checksums=None):
    return download(
        server.url, tmp_path / "dl" / "file.bin", checksums or {"sha256": SHA256}, POLICY, sleep=sleeps.append
    )


def leftovers(tmp_path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "dl").iterdir()) if (tmp_path / "dl").exists() else []


# ---------------------------------------------------------------------------------------------
# download
# ---------------------------------------------------------------------------------------------
def test_download_dropped_connection_resumes_with_range(server, tmp_path, sleeps):
    server.script = ["drop_half", "ok"]
    target = fetch(server, tmp_path, sleeps)
    assert target.read_bytes() == PAYLOAD
    assert len(server.requests) == 2
    assert "Range" not in server.requests[0]
    assert server.requests[1]["Range"] == f"bytes={len(PAYLOAD) // 2}-"
    assert server.requests[1]["If-Range"] == ETAG  # the resume is tied to the same file version
    assert leftovers(tmp_path) == ["file.bin"]  # no .part / .part.json left behind
    assert len(sleeps) == 1


def test_download_sends_descriptive_user_agent(server, tmp_path, sleeps):
    fetch(server, tmp_path, sleeps)
    assert server.requests[0]["User-Agent"] == USER_AGENT
    assert "lm-pipeline" in USER_AGENT and "http" in USER_AGENT


def test_download_503_is_retried_with_backoff_then_succeeds(server, tmp_path, sleeps):
    server.script = ["503", "503", "ok"]
    target = fetch(server, tmp_path, sleeps)
    assert target.read_bytes() == PAYLOAD
    assert len(server.requests) == 3
    assert sleeps == [pytest.approx(0.01), pytest.approx(0.02)]  # exponential


def test_download_gives_up_after_retries_and_names_url(server, tmp_path, sleeps):
    server.script = ["503"] * 10
    with pytest.raises(SourceError, match=r"gave up after 4 attempts.*503"):
        fetch(server, tmp_path, sleeps)
    assert len(server.requests) == POLICY.retries + 1
    assert all(s <= POLICY.max_backoff_s for s in sleeps)


def test_download_wrong_checksum_fails_and_leaves_no_file(server, tmp_path, sleeps):
    with pytest.raises(SourceError, match="sha256 mismatch"):
        fetch(server, tmp_path, sleeps, {"sha256": "0" * 64})
    assert leftovers(tmp_path) == []


def test_download_md5_and_sha1_are_verified(server, tmp_path, sleeps):
    good = {"md5": hashlib.md5(PAYLOAD).hexdigest(), "sha1": hashlib.sha1(PAYLOAD).hexdigest()}
    assert fetch(server, tmp_path, sleeps, good).read_bytes() == PAYLOAD
    (tmp_path / "dl" / "file.bin").unlink()
    with pytest.raises(SourceError, match="md5 mismatch"):
        fetch(server, tmp_path, sleeps, {"md5": "f" * 32})
    assert leftovers(tmp_path) == []


def test_download_server_ignoring_range_restarts_from_zero(server, tmp_path, sleeps):
    server.script = ["drop_half", "ignore_range"]
    target = fetch(server, tmp_path, sleeps)
    assert target.read_bytes() == PAYLOAD  # not half + whole
    assert "Range" in server.requests[1]


def test_download_404_fails_at_once_without_retries(server, tmp_path, sleeps):
    server.script = ["404"]
    with pytest.raises(SourceError, match=r"HTTP 404.*not retried"):
        fetch(server, tmp_path, sleeps)
    assert len(server.requests) == 1
    assert sleeps == []
    assert leftovers(tmp_path) == []


def test_download_partial_file_survives_a_failed_run_and_is_resumed(server, tmp_path, sleeps):
    server.script = ["drop_half"] + ["503"] * POLICY.retries
    with pytest.raises(SourceError, match="next run resumes"):
        fetch(server, tmp_path, sleeps)
    part = tmp_path / "dl" / "file.bin.part"
    assert part.stat().st_size == len(PAYLOAD) // 2
    server.requests.clear()
    target = fetch(server, tmp_path, sleeps)  # a new run
    assert target.read_bytes() == PAYLOAD
    assert server.requests[0]["Range"] == f"bytes={len(PAYLOAD) // 2}-"


def test_download_changed_file_on_server_restarts_instead_of_splicing(server, tmp_path, sleeps):
    server.script = ["drop_half"] + ["503"] * POLICY.retries
    with pytest.raises(SourceError):
        fetch(server, tmp_path, sleeps)
    (tmp_path / "dl" / "file.bin.part.json").write_text('{"validator": "\\"v0-old\\""}')
    server.requests.clear()
    assert fetch(server, tmp_path, sleeps).read_bytes() == PAYLOAD
    assert server.requests[0]["If-Range"] == '"v0-old"'  # server answered 200: full body


def test_download_complete_part_answered_416_is_verified_and_kept(server, tmp_path, sleeps):
    (tmp_path / "dl").mkdir()
    (tmp_path / "dl" / "file.bin.part").write_bytes(PAYLOAD)
    assert fetch(server, tmp_path, sleeps).read_bytes() == PAYLOAD
    assert len(server.requests) == 1


def test_download_cached_target_with_good_checksum_is_not_refetched(server, tmp_path, sleeps):
    fetch(server, tmp_path, sleeps)
    fetch(server, tmp_path, sleeps)
    assert len(server.requests) == 1


def test_download_rejects_non_http_urls(tmp_path):
    with pytest.raises(SourceError, match="http"):
        download("file:///etc/passwd", tmp_path / "x", {"sha256": SHA256})


# ---------------------------------------------------------------------------------------------
# resolution
# ---------------------------------------------------------------------------------------------
@pytest.fixture()
def three_places(tmp_path, server, monkeypatch):
    """The same payload as a local file, in a mirror folder, and on the server."""
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "file.bin").write_bytes(PAYLOAD)
    (tmp_path / "mirror" / "sub").mkdir(parents=True)
    (tmp_path / "mirror" / "sub" / "file.bin").write_bytes(PAYLOAD)
    monkeypatch.setenv(MIRROR_ENV, str(tmp_path / "mirror"))
    return SourceSpec(name="demo", path="local/file.bin", mirror_path="sub/file.bin", url=server.url, sha256=SHA256)


def test_resolve_source_prefers_path_then_mirror_then_url(three_places, tmp_path, server, monkeypatch, sleeps):
    def resolve():
        return resolve_source(three_places, tmp_path / "downloads", tmp_path, POLICY, sleeps.append)

    assert resolve() == tmp_path / "local" / "file.bin"
    (tmp_path / "local" / "file.bin").unlink()
    assert resolve() == tmp_path / "mirror" / "sub" / "file.bin"
    monkeypatch.delenv(MIRROR_ENV)
    assert server.requests == []
    got = resolve()
    assert got == tmp_path / "downloads" / "demo" / "file.bin"
    assert got.read_bytes() == PAYLOAD and len(server.requests) == 1


def test_resolve_source_verifies_mirror_files(three_places, tmp_path):
    (tmp_path / "local" / "file.bin").unlink()
    (tmp_path / "mirror" / "sub" / "file.bin").write_bytes(b"tampered")
    with pytest.raises(SourceError, match=r"file\.bin.*sha256 mismatch"):
        resolve_source(three_places, tmp_path / "downloads", tmp_path, POLICY)


def test_resolve_source_not_found_names_env_var_and_file(tmp_path, monkeypatch):
    spec = SourceSpec(name="news", path="nowhere/x.csv", mirror_path="ag_news/missing.csv")
    monkeypatch.delenv(MIRROR_ENV, raising=False)
    with pytest.raises(SourceError) as err:
        resolve_source(spec, tmp_path / "dl", tmp_path)
    assert MIRROR_ENV in str(err.value) and "ag_news/missing.csv" in str(err.value)
    assert str(tmp_path / "nowhere" / "x.csv") in str(err.value)
    monkeypatch.setenv(MIRROR_ENV, str(tmp_path))
    with pytest.raises(SourceError) as err:
        resolve_source(spec, tmp_path / "dl", tmp_path)
    assert MIRROR_ENV in str(err.value) and str(tmp_path / "ag_news" / "missing.csv") in str(err.value)


def test_resolve_source_reports_failed_download(tmp_path, server, monkeypatch):
    server.script = ["404"]
    monkeypatch.delenv(MIRROR_ENV, raising=False)
    spec = SourceSpec(name="demo", mirror_path="x.bin", url=server.url, sha256=SHA256)
    with pytest.raises(SourceError, match=rf"{MIRROR_ENV}.*HTTP 404"):
        resolve_source(spec, tmp_path / "dl", tmp_path, POLICY)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"url": "http://127.0.0.1/x"}, "needs sha256"),
        ({"url": "ftp://127.0.0.1/x", "sha256": SHA256}, "must be http"),
        ({"path": "a.zip", "member": "../evil.csv"}, "unsafe archive member"),
        ({"path": "a.zip", "member": "/etc/passwd"}, "unsafe archive member"),
        ({"path": "a.zip", "sha256": "xyz"}, "64 hex digits"),
        ({}, "at least one of"),
    ],
)
def test_source_spec_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SourceSpec(name="s", **kwargs)


# ---------------------------------------------------------------------------------------------
# folders and archives
# ---------------------------------------------------------------------------------------------
def make_tree(root: Path) -> Path:
    (root / "b").mkdir(parents=True)
    (root / "a.txt").write_text("alpha\n")
    (root / "b" / "c.txt").write_text("gamma\n")
    (root / "B.txt").write_text("upper sorts first in byte order\n")
    return root


def test_tree_digest_matches_sha256sum_recipe(tmp_path):
    root = make_tree(tmp_path / "tree")
    recipe = subprocess.run(
        "find . -type f | sed 's|^\\./||' | LC_ALL=C sort | xargs sha256sum | sha256sum",
        shell=True,
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()[0]
    assert tree_digest(root) == recipe


def test_tree_digest_of_real_bbc_folder_matches_readme(corpora):
    bbc = corpora / "bbc_news" / "dejanbatanjac_bbc-article-classify-bert" / "bbc"
    assert tree_digest(bbc) == "a84377445249a825211155f1669042f423e3908103a46fff431c9698b8413c1e"


def test_verify_source_folder_checks(tmp_path):
    root = make_tree(tmp_path / "tree")
    good = tree_digest(root)
    verify_source(root, SourceSpec(name="t", path=str(root), tree_sha256=good), "test")
    (root / "b" / "c.txt").write_text("changed\n")
    with pytest.raises(SourceError, match="tree_sha256"):
        verify_source(root, SourceSpec(name="t", path=str(root), tree_sha256=good), "test")
    with pytest.raises(SourceError, match="is a folder"):
        verify_source(root, SourceSpec(name="t", path=str(root), sha256=good), "test")


def test_open_binary_streams_zip_member_in_place(tmp_path):
    archive = tmp_path / "a.zip"
    data = b"class_index,title,description\n1,T,D\n"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("train.csv", data)
    with open_binary(archive, "train.csv", hashlib.sha256(data).hexdigest()) as fh:
        assert fh.read() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zip"]  # nothing extracted
    with pytest.raises(SourceError, match="member sha256 mismatch"):
        with open_binary(archive, "train.csv", "0" * 64):
            pass
    with pytest.raises(SourceError, match="no member 'test.csv'"):
        with open_binary(archive, "test.csv"):
            pass
    with pytest.raises(SourceError, match="zip archive"):
        with open_binary(_not_zip(tmp_path), "x"):
            pass


def _not_zip(tmp_path: Path) -> Path:
    path = tmp_path / "plain.csv"
    path.write_bytes(b"a,b\n")
    return path


def test_open_binary_decompresses_gzip(tmp_path):
    path = tmp_path / "x.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"a": 1}\n'))
    with open_binary(path) as fh:
        assert fh.read() == b'{"a": 1}\n'
