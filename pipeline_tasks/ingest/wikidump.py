"""Streaming readers for Wikipedia sources: MediaWiki XML dumps and three plain-text layouts.

Every reader yields :class:`RawPage` records one at a time, so memory stays bounded by the
largest page, not by the file (a 20 GB dump streams through a few MB); for XML dumps by
``max_text_chars`` (``ingest_wiki.max_page_bytes``), not by the largest page:

* ``mediawiki_xml`` — ``pages-articles`` exports, schema 0.9 to 0.11 (elements are matched by
  local name, so the namespace URI of the version does not matter), with or without
  ``<siteinfo>``, UTF-8 or UTF-16 with a BOM. Parsed with ``defusedxml``'s expat parser with DTDs
  forbidden: entity-expansion bombs (billion laughs) and external entities are refused before
  anything is expanded. No element tree is built: a parser target (:class:`_DumpTarget`) keeps
  only the fields a page needs, each cut at the cap while it streams in (a 300 MB page in a
  small compressed dump costs the cap, flagged ``oversize``, not 300 MB).
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
import contextlib
import functools
import gzip
import html
import io
import logging
import lzma
import math
import os
import queue
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple
from xml.etree.ElementTree import ParseError

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import DefusedXMLParser

from pipeline_tasks.errors import DataError
from pipeline_tasks.ingest.bz2blocks import ChunkReader, ParallelBz2Reader
from pipeline_tasks.ingest.jsonlines import iter_json_objects
from pipeline_tasks.ingest.sources import detect_container

logger = logging.getLogger(__name__)

FORMATS = ("mediawiki_xml", "wikitext_raw", "wikiextractor", "jsonl")
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
    oversize: bool = False  # the reader kept only the first max_page_bytes characters of the text


class SiteInfo(NamedTuple):
    dbname: str | None
    namespaces: dict[int, str]

    @property
    def lang(self) -> str | None:
        """``enwiki`` -> ``en``, ``zh_yuewiki`` -> ``zh-yue``; None for other projects."""
        match = re.fullmatch(r"([a-z][a-z_]*?)wiki", self.dbname or "")
        return match.group(1).replace("_", "-") if match else None


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
    kind = detect_container(path)
    if kind == "zstd":
        raise DataError(f"{path}: zstd-compressed input is not supported; decompress it (zstd -d) or use bz2/xz")
    if kind == "zip":
        raise DataError(f"{path}: this is a zip archive; extract the dump (or its .bz2 / .xz) and point path at it")
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


# The character data kept, by element path below <page> / <siteinfo>; everything else (comments,
# contributors, sha1...) is dropped as it streams past, so a hostile dump cannot grow memory there.
_PAGE_FIELDS = {("title",), ("ns",), ("id",), ("revision", "timestamp"), ("revision", "text")}
_SITEINFO_FIELDS = {("dbname",), ("namespaces", "namespace")}
_TEXT = ("revision", "text")


class _DumpTarget:
    """expat target that turns ``<siteinfo>`` and each ``<page>`` into records as they end.

    Only the fields above are collected, each to at most ``max_chars`` characters: the rest of an
    over-long text streams past uncollected, so memory is bounded by the cap and not by the
    largest page (a 300 MB page in a small compressed dump). A capped page text sets ``oversize``.
    """

    def __init__(self, name: str | Path, max_chars: int | None):
        self.name, self.max_chars = name, max_chars or math.inf
        self.records: list[SiteInfo | RawPage] = []  # finished, not yet yielded
        self.last = "none yet"  # the last complete page, for error messages
        self.root_seen = False
        self._depth = 0
        self._path: list[str] = []  # local names from the current <page> / <siteinfo> down
        self._fields: dict[tuple[str, ...], str] = {}
        self._key: tuple[str, ...] | None = None  # the field being collected, None when skipping
        self._chunks: list[str] = []
        self._room = self.max_chars
        self._redirect = self._oversize = False
        self._namespace_key = ""
        self._site_namespaces: dict[int, str] = {}
        self._namespaces: dict[int, str] = {}  # from <siteinfo>, for dumps without <ns>

    def start(self, tag: str, attrib: dict[str, str]) -> None:
        self._depth += 1
        local = _local(tag)
        if self._depth == 1:
            if local != "mediawiki":
                raise DataError(
                    f"{self.name}: root element is <{local}>, expected <mediawiki> "
                    "(a MediaWiki pages-articles XML export)"
                )
            self.root_seen = True
        elif self._depth == 2:
            self._path, self._fields, self._redirect, self._oversize = [local], {}, False, False
            self._site_namespaces = {}
        elif self._path:
            self._path.append(local)
            key = tuple(self._path[1:])
            wanted = _PAGE_FIELDS if self._path[0] == "page" else _SITEINFO_FIELDS
            if key == ("redirect",) and self._path[0] == "page":
                self._redirect = True
            elif key in wanted:
                self._key, self._chunks, self._room = key, [], self.max_chars
                self._namespace_key = attrib.get("key", "")
                if key == _TEXT:
                    self._oversize = False  # a history dump has several revisions: the last one wins

    def data(self, text: str) -> None:
        if self._key is None:
            return
        if len(text) > self._room:
            text = text[: self._room]
            self._oversize |= self._key == _TEXT
        self._room -= len(text)
        if text:
            self._chunks.append(text)

    def end(self, tag: str) -> None:
        self._depth -= 1
        if not self._path:
            return
        if self._depth == 1:
            kind, self._path = self._path[0], []
            if kind == "page":
                self.records.append(self._page())
            elif kind == "siteinfo":
                self._namespaces = self._site_namespaces
                self.records.append(SiteInfo(self._fields.get(("dbname",), "").strip() or None, self._namespaces))
            return
        if self._key is not None and len(self._path) == len(self._key) + 1:  # the collected element ends
            value, self._chunks = "".join(self._chunks), []
            if self._key == ("namespaces", "namespace"):
                with contextlib.suppress(ValueError):
                    self._site_namespaces[int(self._namespace_key)] = value
            else:
                self._fields[self._key] = value
            self._key = None
        self._path.pop()

    def _page(self) -> RawPage:
        fields = self._fields
        title = fields.get(("title",), "")
        if ("ns",) in fields:
            ns = int(fields[("ns",)].strip() or 0)
        else:  # exports before schema 0.6 have no <ns>: derive it from the title prefix
            prefix = title.partition(":")[0] if ":" in title else ""
            ns = next((key for key, name in self._namespaces.items() if prefix and name == prefix), 0)
        page = RawPage(
            fields.get(("id",), "").strip(),
            title,
            ns,
            self._redirect,
            fields.get(("revision", "timestamp"), "").strip() or None,
            fields.get(_TEXT, ""),
            oversize=self._oversize,
        )
        self.last = f"id {page.page_id} {page.title!r}"
        return page


def iter_mediawiki(stream, name: str | Path, max_text_chars: int | None = None) -> Iterator[SiteInfo | RawPage]:
    """Yield the :class:`SiteInfo` (if the dump has one) then every page, streaming.

    ``max_text_chars`` caps every collected field (see :class:`_DumpTarget`); None keeps all.
    """
    target = _DumpTarget(name, max_text_chars)
    parser = DefusedXMLParser(target=target, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    try:
        while chunk := stream.read(READ_CHUNK):
            parser.feed(chunk)
            yield from target.records
            target.records.clear()
        parser.close()
        yield from target.records
    except (EOFError, OSError) as exc:  # from the decompressor
        error = _compression_error(Path(name), exc)
        raise type(error)(f"{error} (last complete page: {target.last})") from exc
    except DefusedXmlException as exc:
        raise DataError(
            f"{name}: refused to parse: {exc!r}. The XML declares a DTD or entities, which can "
            "expand without bound (billion laughs) or read local files; Wikipedia dumps never "
            "contain one, so this file is not a genuine dump"
        ) from exc
    except ParseError as exc:
        line, column = exc.position
        if exc.code == 3 and not target.root_seen:
            raise DataError(f"{name}: no XML content (empty document)") from exc
        where = f"line {line}, column {column}; last complete page: {target.last}"
        if exc.code in TRUNCATION_CODES:
            raise TruncatedInputError(
                f"{name}: XML ends early ({exc}) at {where}; the file is truncated: "
                "download it again (or set on_truncated: keep_complete_pages)"
            ) from exc
        raise DataError(f"{name}: malformed XML ({exc}) at {where}") from exc
    if not target.root_seen:
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


def iter_source(path: Path, fmt: str, pool=None, max_text_chars: int | None = None) -> Iterator[SiteInfo | RawPage]:
    """Open ``path`` (any compression) and yield its records in format ``fmt``; errors name the file.

    ``pool``: a process pool to decompress bz2 blocks in parallel (None: a read-ahead thread).
    ``max_text_chars``: XML dumps keep at most this much of a page text (see :class:`_DumpTarget`).
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file (0 bytes); the download or copy failed: fetch it again")
    reader = {
        "mediawiki_xml": functools.partial(iter_mediawiki, max_text_chars=max_text_chars),
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
