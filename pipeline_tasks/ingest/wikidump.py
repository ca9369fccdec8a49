"""Streaming readers for Wikipedia sources: MediaWiki XML dumps and three plain-text layouts.

Every reader yields :class:`RawPage` records one at a time, so memory stays bounded by the
largest page, not by the file (a 20 GB dump streams through a few MB):

* ``mediawiki_xml`` — ``pages-articles`` exports, schema 0.9 to 0.11 (elements are matched by
  local name, so the namespace URI of the version does not matter), with or without
  ``<siteinfo>``, UTF-8 or UTF-16 with a BOM. Parsed with ``defusedxml`` iterparse with DTDs
  forbidden: entity-expansion bombs (billion laughs) and external entities are refused before
  anything is expanded. Finished ``<page>`` elements are cleared and detached from the root.
* ``wikitext_raw`` — WikiText-2/103 raw files: an article starts at a `` = Title = `` line,
  `` = = Section = = `` lines are headings; the `` @-@ `` / `` @,@ `` / `` @.@ `` escapes are undone.
* ``wikiextractor`` — ``<doc id=".." url=".." title="..">…</doc>`` blocks.
* ``jsonl`` — one ``{"id", "url", "title", "text"}`` object per line, read with
  :mod:`pipeline_tasks.ingest.jsonlines` (its ``FILE:LINE: ...`` error format).

Compression (bz2 single or multistream, xz, gzip) is detected from the magic bytes, not the file
name, and decompressed in a read-ahead thread (bz2/lzma/zlib release the GIL, so this overlaps with
XML parsing) or, for bz2 when a process pool is given, block by block in the pool
(:mod:`pipeline_tasks.ingest.bz2blocks`). Malformed input raises :class:`pipeline_tasks.errors.DataError`
naming the file, the position and the last complete page; truncation raises its subclass
:class:`TruncatedInputError`.
"""

from __future__ import annotations

import bz2
import gzip
import html
import io
import logging
import lzma
import os
import queue
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple
from xml.etree.ElementTree import ParseError

import defusedxml.ElementTree as safe_et
from defusedxml import DefusedXmlException

from pipeline_tasks.errors import DataError
from pipeline_tasks.ingest.bz2blocks import ChunkReader, ParallelBz2Reader
from pipeline_tasks.ingest.jsonlines import iter_json_objects

logger = logging.getLogger(__name__)

FORMATS = ("mediawiki_xml", "wikitext_raw", "wikiextractor", "jsonl")
MAGIC = ((b"BZh", "bz2"), (b"\xfd7zXZ\x00", "xz"), (b"\x1f\x8b", "gzip"), (b"\x28\xb5\x2f\xfd", "zstd"))
READ_CHUNK = 1 << 18  # 256 KiB; with a queue of 4 at most 1 MiB of decompressed data waits
# expat codes that mean "the document stopped early": no element found, unclosed token, partial char
TRUNCATION_CODES = frozenset({3, 5, 6})


class TruncatedInputError(DataError):
    """The input ends in the middle of the document (cut XML or a cut compressed stream)."""


class RawPage(NamedTuple):
    """One page as read from the source, before cleaning (a tuple: cheap to send to workers)."""

    page_id: str
    title: str
    ns: int
    redirect: bool
    timestamp: str | None
    text: str
    url: str | None = None


class SiteInfo(NamedTuple):
    dbname: str | None
    namespaces: dict[int, str]

    @property
    def lang(self) -> str | None:
        """``enwiki`` -> ``en``, ``zh_yuewiki`` -> ``zh-yue``; None for other projects."""
        match = re.fullmatch(r"([a-z][a-z_]*?)wiki", self.dbname or "")
        return match.group(1).replace("_", "-") if match else None


def detect_compression(path: Path) -> str:
    with open(path, "rb") as fh:
        head = fh.read(6)
    return next((kind for magic, kind in MAGIC if head.startswith(magic)), "none")


class _ReadAhead(ChunkReader):
    """Decompress in a background thread into a small bounded queue (``depth`` chunks in flight)."""

    def __init__(self, fileobj, chunk: int = READ_CHUNK, depth: int = 4):
        super().__init__()
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, args=(fileobj, chunk), daemon=True)
        self._thread.start()

    def _pump(self, fileobj, chunk: int) -> None:
        try:
            with fileobj:
                while not self._stop.is_set():
                    data = fileobj.read(chunk)
                    self._put(data)
                    if not data:
                        return
        except BaseException as exc:  # handed to the reading thread, re-raised there
            self._put(exc)

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _next_chunk(self) -> bytes | None:
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._eof = True  # the pump thread has ended: never wait on the queue again
            raise item
        return item or None

    def close(self) -> None:
        self._stop.set()
        super().close()


class _LargeInputDecompressor:
    """``read(n)`` over a bz2 / xz file that feeds the decompressor 1 MiB of input per call.

    Written by hand because ``bz2.open`` / ``lzma.open`` feed 8 KiB per call and release and
    re-take the GIL around each one: with the cleaner busy in the main thread, every re-take waits
    for the interpreter's switch interval, and the read-ahead thread (not the cleaner) became the
    bottleneck. Output per call is capped at ``n`` bytes (bounded memory on compression bombs).
    Concatenated streams (multistream dumps) are read through; trailing garbage after a complete
    stream ends the input as it does for ``bz2.open``; a stream cut short raises ``EOFError``.
    """

    def __init__(self, path: Path, factory, input_chunk: int = 1 << 20):
        self._fh = open(path, "rb")
        self._factory, self._input_chunk = factory, input_chunk
        self._decompressor = factory()
        self._done = False

    def read(self, size: int) -> bytes:
        while not self._done:
            dec = self._decompressor
            if dec.eof:
                rest = dec.unused_data or self._fh.read(self._input_chunk)
                if not rest:
                    self._done = True
                    break
                self._decompressor = self._factory()
                try:
                    data = self._decompressor.decompress(rest, size)
                except (OSError, lzma.LZMAError):  # not another stream: trailing garbage
                    self._done = True
                    break
            elif dec.needs_input:
                raw = self._fh.read(self._input_chunk)
                if not raw:
                    raise EOFError("Compressed file ended before the end-of-stream marker was reached")
                data = dec.decompress(raw, size)
            else:
                data = dec.decompress(b"", size)
            if data:
                return data
        return b""

    def close(self) -> None:
        self._fh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_decompressed(path: Path, pool=None) -> io.RawIOBase:
    """Binary stream of the decompressed content; multistream bz2 (concatenated streams) works.

    With a process ``pool``, bz2 is decompressed block by block in the pool (:mod:`bz2blocks`).
    """
    kind = detect_compression(path)
    if kind == "zstd":
        raise DataError(f"{path}: zstd-compressed input is not supported; decompress it (zstd -d) or use bz2/xz")
    if kind == "none":
        return open(path, "rb")
    if kind == "bz2" and pool is not None:
        return ParallelBz2Reader(path, pool, window=2 * (os.cpu_count() or 2))
    if kind == "gzip":
        return _ReadAhead(gzip.open(path, "rb"))
    factory = bz2.BZ2Decompressor if kind == "bz2" else lzma.LZMADecompressor
    return _ReadAhead(_LargeInputDecompressor(path, factory))


def _compression_error(path: Path, exc: BaseException) -> DataError:
    if isinstance(exc, EOFError):
        return TruncatedInputError(
            f"{path}: the compressed stream is truncated ({exc}); the file is incomplete: download it again"
        )
    return DataError(f"{path}: corrupt compressed data ({exc}); the file is damaged: download it again")


# ---------------------------------------------------------------------------- MediaWiki XML


def _local(tag: str) -> str:
    return tag[tag.rfind("}") + 1 :]


def _siteinfo(elem) -> SiteInfo:
    dbname, namespaces = None, {}
    for child in elem:
        name = _local(child.tag)
        if name == "dbname":
            dbname = (child.text or "").strip() or None
        elif name == "namespaces":
            for ns in child:
                try:
                    namespaces[int(ns.get("key", ""))] = ns.text or ""
                except ValueError:
                    continue
    return SiteInfo(dbname, namespaces)


def _page(elem, namespaces: dict[int, str]) -> RawPage:
    title, ns, page_id, redirect, timestamp, text = "", None, "", False, None, ""
    for child in elem:
        name = _local(child.tag)
        if name == "title":
            title = child.text or ""
        elif name == "ns":
            ns = int((child.text or "0").strip() or 0)
        elif name == "id":
            page_id = (child.text or "").strip()
        elif name == "redirect":
            redirect = True
        elif name == "revision":  # a history dump has several: the last one wins
            for part in child:
                part_name = _local(part.tag)
                if part_name == "timestamp":
                    timestamp = (part.text or "").strip() or None
                elif part_name == "text":
                    text = part.text or ""
    if ns is None:  # exports before schema 0.6 have no <ns>: derive it from the title prefix
        prefix = title.partition(":")[0] if ":" in title else ""
        ns = next((key for key, name in namespaces.items() if prefix and name == prefix), 0)
    return RawPage(page_id, title, ns, redirect, timestamp, text)


def iter_mediawiki(stream, name: str | Path) -> Iterator[SiteInfo | RawPage]:
    """Yield the :class:`SiteInfo` (if the dump has one) then every page, streaming."""
    root, namespaces, last = None, {}, "none yet"
    events = safe_et.iterparse(
        stream, events=("start", "end"), forbid_dtd=True, forbid_entities=True, forbid_external=True
    )
    try:
        for event, elem in events:
            if event == "start":
                if root is None:
                    root = elem
                    if _local(elem.tag) != "mediawiki":
                        raise DataError(
                            f"{name}: root element is <{_local(elem.tag)}>, expected <mediawiki> "
                            "(a MediaWiki pages-articles XML export)"
                        )
                continue
            local = _local(elem.tag)
            if local == "page":
                page = _page(elem, namespaces)
                root.clear()  # detach finished pages from the root: memory stays flat
                last = f"id {page.page_id} {page.title!r}"
                yield page
            elif local == "siteinfo":
                info = _siteinfo(elem)
                namespaces = info.namespaces
                root.clear()
                yield info
    except (EOFError, OSError) as exc:  # from the decompressor, raised through iterparse
        error = _compression_error(Path(name), exc)
        raise type(error)(f"{error} (last complete page: {last})") from exc
    except DefusedXmlException as exc:
        raise DataError(
            f"{name}: refused to parse: {exc!r}. The XML declares a DTD or entities, which can "
            "expand without bound (billion laughs) or read local files; Wikipedia dumps never "
            "contain one, so this file is not a genuine dump"
        ) from exc
    except ParseError as exc:
        line, column = exc.position
        if exc.code == 3 and root is None:
            raise DataError(f"{name}: no XML content (empty document)") from exc
        where = f"line {line}, column {column}; last complete page: {last}"
        if exc.code in TRUNCATION_CODES:
            raise TruncatedInputError(
                f"{name}: XML ends early ({exc}) at {where}; the file is truncated: "
                "download it again (or set on_truncated: keep_complete_pages)"
            ) from exc
        raise DataError(f"{name}: malformed XML ({exc}) at {where}") from exc
    if root is None:
        raise DataError(f"{name}: no XML content (empty document)")


# ---------------------------------------------------------------------------- plain text

WIKITEXT_TITLE_RE = re.compile(r"= (?!=)(.+?) =")  # on the stripped line
WIKITEXT_HEADING_RE = re.compile(r"(?:= )+(.+?)(?: =)+")
WIKITEXT_ESCAPES = ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."))
DOC_OPEN_RE = re.compile(r"<doc\b([^>]*)>")
DOC_ATTR_RE = re.compile(r'(\w+)="([^"]*)"')


def _text_lines(stream, name) -> Iterator[tuple[int, str]]:
    """(line number, line without newline); CRLF and CR normalised; BOM-detected UTF-8/16."""
    buffered = stream if hasattr(stream, "peek") else io.BufferedReader(stream)
    head = buffered.peek(4)[:4]
    encoding = "utf-16" if head[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig"
    text = io.TextIOWrapper(buffered, encoding=encoding, newline=None)
    lineno = 0
    try:
        for lineno, line in enumerate(text, 1):
            yield lineno, line.rstrip("\n")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{name}: line {lineno + 1} is not valid {encoding} ({exc.reason}); re-encode the file as UTF-8"
        ) from exc


def iter_wikitext_raw(stream, name) -> Iterator[RawPage]:
    """WikiText-2/103 raw: one article per `` = Title = `` line."""
    title, body, count = None, [], 0

    def flush():
        text = "\n".join(body)
        for escaped, plain in WIKITEXT_ESCAPES:
            text = text.replace(escaped, plain)
        return RawPage(str(count), title, 0, False, None, text)

    for _, line in _text_lines(stream, name):
        line = line.strip()
        match = WIKITEXT_TITLE_RE.fullmatch(line)
        if match:
            if title is not None:
                yield flush()
            title, body, count = match.group(1), [], count + 1
            continue
        heading = WIKITEXT_HEADING_RE.fullmatch(line)
        body.append(f"\n{heading.group(1)}" if heading else line)
    if title is not None:
        yield flush()


def iter_wikiextractor(stream, name) -> Iterator[RawPage]:
    """WikiExtractor output: ``<doc id url title>`` … ``</doc>``; the repeated title line is dropped."""
    attrs, body, start = None, [], 0
    for lineno, line in _text_lines(stream, name):
        if attrs is None:
            match = DOC_OPEN_RE.match(line.strip())
            if match:
                attrs = {k: html.unescape(v) for k, v in DOC_ATTR_RE.findall(match.group(1))}
                body, start = [], lineno
            elif line.strip():
                raise DataError(f"{name}: line {lineno}: text outside a <doc> block: {line[:80]!r}")
            continue
        if line.strip() == "</doc>":
            title = attrs.get("title", "")
            if body and html.unescape(body[0].strip()) == title:  # body is HTML-escaped (--html-safe)
                body = body[1:]
            yield RawPage(attrs.get("id", str(start)), title, 0, False, None, "\n".join(body), attrs.get("url"))
            attrs = None
        else:
            body.append(line)
    if attrs is not None:
        raise TruncatedInputError(
            f"{name}: <doc> opened at line {start} (id {attrs.get('id')}) is never closed; the file is truncated"
        )


def iter_jsonl(stream, name) -> Iterator[RawPage]:
    """JSON lines with ``text`` and optional ``id``, ``url``, ``title``."""
    lines = (line for _, line in _text_lines(stream, name))  # iter_json_objects numbers them from 1 too
    for lineno, record in iter_json_objects(lines, str(name)):
        if not isinstance(record.get("text"), str):
            raise DataError(f"{name}:{lineno}: expected an object with a string 'text'")
        title, text = str(record.get("title") or ""), record["text"]
        if title and text.startswith(title + "\n"):  # wiki_zh-style text repeats the title first
            text = text[len(title) + 1 :]
        yield RawPage(str(record.get("id", lineno)), title, 0, False, None, text, record.get("url"))


def iter_source(path: Path, fmt: str, pool=None) -> Iterator[SiteInfo | RawPage]:
    """Open ``path`` (any compression) and yield its records in format ``fmt``; errors name the file.

    ``pool``: a process pool to decompress bz2 blocks in parallel (None: a read-ahead thread).
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file (0 bytes); the download or copy failed: fetch it again")
    reader = {
        "mediawiki_xml": iter_mediawiki,
        "wikitext_raw": iter_wikitext_raw,
        "wikiextractor": iter_wikiextractor,
        "jsonl": iter_jsonl,
    }[fmt]
    stream = open_decompressed(path, pool)
    try:
        yield from reader(stream, path)
    except (EOFError, OSError) as exc:
        raise _compression_error(path, exc) from exc
    except DataError:
        raise
    except ValueError as exc:  # ParseError wrapping a decompression error, encoding trouble
        raise DataError(f"{path}: {exc}") from exc
    finally:
        stream.close()
