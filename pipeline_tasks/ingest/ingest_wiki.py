"""Stage ``ingest_wiki``: Wikipedia dumps and plain-text Wikipedia corpora -> clean article Parquet.

Inputs: every entry of ``ingest_wiki.sources`` in params.yaml, resolved by
:func:`pipeline_tasks.ingest.sources.resolve_source` (local ``path`` > ``$LMPIPE_DATA_MIRROR/mirror_path``
> ``url`` download) and verified by checksum. ``format`` per source: ``mediawiki_xml`` (bz2 single
or multistream / xz / gzip / plain, schema 0.9-0.11, UTF-8 or UTF-16), ``wikitext_raw``
(WikiText-2/103), ``wikiextractor`` (``<doc>`` blocks) or ``jsonl``; readers in
:mod:`pipeline_tasks.ingest.wikidump`, wikitext cleaning in :mod:`pipeline_tasks.ingest.wikitext`.

Flow per source: the main process streams pages (bz2 blocks are decompressed in the worker pool,
:mod:`pipeline_tasks.ingest.bz2blocks`) and drops the cheap cases (other namespaces, redirects, oversized
pages) before any parsing; the rest go in batches of ``batch_pages`` to a pool of ``workers``
processes that detect disambiguation pages and clean the wikitext, each page under a
``page_timeout_s`` alarm. Results come back in input order (a bounded window of batches in flight,
so memory stays flat) and are written to Parquet one row group at a time. Every skip is counted
by reason: ``namespace``, ``redirect``, ``disambiguation``, ``too_large``, ``too_short``,
``parse_timeout``, ``parse_error``.

Outputs (``paths.raw_wiki_dir``, swapped in atomically; a failure leaves the previous one as is):

* ``<source>.parquet`` — ``id`` (``<source>:<page id>``), ``kind``="wiki", ``source``, ``lang``,
  ``title``, ``text``, ``date`` (revision timestamp, timestamp[s, UTC], null for plain sources;
  Parquet has no second unit, so it is stored as ms and read back as timestamp[ms, UTC]),
  ``url`` (``https://<lang>.wikipedia.org/wiki/<Title_with_underscores>`` when the language is known).
* ``stats.json`` — per source: pages seen / kept, skips per reason, chars, seconds, MB/s.
* ``manifest.json``.

Params section: ``ingest_wiki``. Command: ``python -m pipeline_tasks ingest_wiki``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import multiprocessing
import os
import signal
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline_tasks.artifacts import atomic_dir, atomic_write_json, sha256_file, write_manifest
from pipeline_tasks.errors import DataError
from pipeline_tasks.ingest.params import IngestWikiParams, WikiSourceParams
from pipeline_tasks.ingest.sources import resolve_source
from pipeline_tasks.ingest.wikidump import RawPage, SiteInfo, TruncatedInputError, iter_source
from pipeline_tasks.ingest.wikitext import (
    DEFAULT_DROP_NAMESPACES,
    clean_wikitext,
    is_disambiguation,
    is_redirect,
    namespace_aliases,
    normalize_plain,
)

logger = logging.getLogger(__name__)

STAGE = "ingest_wiki"
ROW_GROUP_ROWS = 5_000
ROW_GROUP_CHARS = 8_000_000  # ~8-25 MB of text per row group: the buffer is the stage's largest memory cost
LOG_EVERY_S = 30.0
AUTO_POOL_BZ2_WORKERS = 2
POOL_STOP_S = 10.0  # a terminated pool stops in well under a second unless it is deadlocked


@dataclasses.dataclass(frozen=True)
class CleanOptions:
    """What a worker needs to clean one batch (sent along with it)."""

    markup: bool = True  # wikitext (XML dumps) or already plain text
    cleaner: str = "fast"
    drop_namespaces: frozenset[str] = DEFAULT_DROP_NAMESPACES
    min_chars: int = 200
    skip_disambiguation: bool = True
    timeout_s: float = 0.0


# ---------------------------------------------------------------------------- worker side


class PageTimeoutError(Exception):
    pass


_ALARM = {"armed": False, "fired": False}


def _on_alarm(signum, frame):
    if _ALARM["armed"]:  # a late signal after the page finished is ignored
        # remembered as well as raised: code that clears the pending error (a C extension's own
        # error path) would otherwise let an over-limit page through as if it were on time
        _ALARM["fired"] = True
        raise PageTimeoutError


def clean_page(title: str, text: str, opts: CleanOptions) -> tuple[str | None, str]:
    """(skip reason or None, clean text) for one page."""
    if opts.skip_disambiguation and is_disambiguation(title, text if opts.markup else ""):
        return "disambiguation", ""
    clean = clean_wikitext(text, opts.drop_namespaces, opts.cleaner) if opts.markup else normalize_plain(text)
    if len(clean) < max(opts.min_chars, 1):
        return "too_short", ""
    return None, clean


def clean_batch(opts: CleanOptions, items: list[tuple[str, str] | None]) -> list[tuple[str | None, str] | None]:
    """Clean ``(title, text)`` items in order (None = dropped upstream), each under the time limit.

    The limit is a SIGALRM interval timer: it interrupts Python code (the cleaners and
    mwparserfromhell's tree building); C code such as one regex pass is bounded by max_page_bytes.
    """
    timed = opts.timeout_s > 0 and threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGALRM, _on_alarm) if timed else None
    out = []
    try:
        for item in items:
            if item is None:
                out.append(None)
                continue
            try:
                if timed:
                    _ALARM.update(armed=True, fired=False)
                    signal.setitimer(signal.ITIMER_REAL, opts.timeout_s)
                result = clean_page(item[0], item[1], opts)
                out.append(("parse_timeout", "") if _ALARM["fired"] else result)
            except PageTimeoutError:
                out.append(("parse_timeout", ""))
            except (RecursionError, ValueError, IndexError) as exc:  # parser trouble on one odd page
                out.append(("parse_error", f"{type(exc).__name__}: {exc}"))
            finally:
                if timed:
                    _ALARM["armed"] = False
                    signal.setitimer(signal.ITIMER_REAL, 0)
    finally:
        if timed:
            signal.signal(signal.SIGALRM, previous)
    return out


# ---------------------------------------------------------------------------- main process


def _prefilter(page: RawPage, cfg: IngestWikiParams, markup: bool) -> tuple[str | None, RawPage]:
    """Cheap skips before any parsing; oversize pages are skipped or truncated."""
    if page.ns not in cfg.namespaces:
        return "namespace", page
    if page.redirect or (markup and is_redirect(page.text)):
        return "redirect", page
    # A char is at most 4 UTF-8 bytes: encode only then. The reader stopped collecting a longer
    # text at max_page_bytes chars (flagged oversize), so at most that many chars are encoded.
    if page.oversize or len(page.text) * 4 > cfg.max_page_bytes:
        data = page.text.encode("utf-8")
        if page.oversize or len(data) > cfg.max_page_bytes:
            if cfg.on_oversize == "skip":
                return "too_large", page
            return "truncated", page._replace(text=data[: cfg.max_page_bytes].decode("utf-8", "ignore"))
    return None, page


def _page_url(lang: str | None, title: str, fallback: str | None) -> str | None:
    if not lang or not title:
        return fallback
    path = urllib.parse.quote(title.replace(" ", "_"), safe="/:(),'!*@$;=&+-._~")  # as Wikipedia links it
    return f"https://{lang}.wikipedia.org/wiki/{path}"


class _ParquetSink:
    """Append rows, write a row group every ROW_GROUP_ROWS rows / ROW_GROUP_CHARS chars, rename at close."""

    def __init__(self, path: Path, source: str):
        self.path, self.source, self.tmp = path, source, path.with_name(path.name + ".partial")
        self.schema = pa.schema(
            [
                ("id", pa.string()),
                ("kind", pa.string()),
                ("source", pa.string()),
                ("lang", pa.string()),
                ("title", pa.string()),
                ("text", pa.string()),
                ("date", pa.timestamp("s", tz="UTC")),
                ("url", pa.string()),
            ]
        )
        self.columns: dict[str, list] = {name: [] for name in self.schema.names}
        self.chars, self.writer = 0, None

    def add(self, page: RawPage, text: str, lang: str | None, url: str | None) -> None:
        for name, value in (
            ("id", f"{self.source}:{page.page_id}"),
            ("kind", "wiki"),
            ("source", self.source),
            ("lang", lang),
            ("title", page.title),
            ("text", text),
            ("date", page.timestamp),
            ("url", url),
        ):
            self.columns[name].append(value)
        self.chars += len(text)
        if len(self.columns["id"]) >= ROW_GROUP_ROWS or self.chars >= ROW_GROUP_CHARS:
            self.flush()

    def flush(self) -> None:
        arrays = {name: pa.array(values, pa.string()) for name, values in self.columns.items() if name != "date"}
        parsed = pc.strptime(
            pa.array(self.columns["date"], pa.string()), format="%Y-%m-%dT%H:%M:%SZ", unit="s", error_is_null=True
        )
        arrays["date"] = parsed.cast(pa.timestamp("s", tz="UTC"))
        table = pa.table([arrays[name] for name in self.schema.names], schema=self.schema)
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.tmp, self.schema, compression="zstd")
        self.writer.write_table(table)
        self.columns = {name: [] for name in self.schema.names}
        self.chars = 0

    def close(self) -> None:
        if self.columns["id"] or self.writer is None:
            self.flush()
        self.writer.close()
        os.replace(self.tmp, self.path)


def _results(jobs, pool, window: int, hard_timeout_s: float, path: Path):
    """Yield each batch's (metadata, results) in submission order, at most ``window`` in flight."""
    pending: collections.deque = collections.deque()
    for meta, opts, items in jobs:
        if pool is None:
            yield meta, clean_batch(opts, items)
            continue
        pending.append((meta, pool.apply_async(clean_batch, (opts, items))))
        while len(pending) >= window:
            yield _collect(pending.popleft(), pool, hard_timeout_s, path)
    while pending:
        yield _collect(pending.popleft(), pool, hard_timeout_s, path)


def _collect(entry, pool, hard_timeout_s: float, path: Path):
    meta, result = entry
    try:
        return meta, result.get(timeout=hard_timeout_s or None)
    except multiprocessing.TimeoutError:
        stop_pool(pool)
        first = next((page for reason, page in meta if reason is None), meta[0][1])
        raise DataError(
            f"{path}: a cleaning worker was stuck for {hard_timeout_s:.0f} s on the batch starting at "
            f"page id {first.page_id} {first.title!r} (C code ignores the per-page alarm); "
            "lower ingest_wiki.max_page_bytes"
        ) from None


def _read_pages(path: Path, source: WikiSourceParams, cfg: IngestWikiParams, pool, state: dict):
    """Pages of one source; the <siteinfo> updates ``state`` (language, localized namespaces)."""
    try:
        workers = cfg.workers or os.cpu_count() or 1
        use_pool = cfg.bz2_decoder == "pool" or (cfg.bz2_decoder == "auto" and workers >= AUTO_POOL_BZ2_WORKERS)
        for record in iter_source(path, source.format, pool if use_pool else None, cfg.max_page_bytes):
            if not isinstance(record, SiteInfo):
                yield record
                continue
            state["dbname"], state["drop"] = record.dbname, namespace_aliases(record.namespaces)
            if record.lang:
                if source.lang and source.lang != record.lang:
                    logger.warning(
                        "%s: <dbname>%s</dbname> means lang %r, params say %r; using %r",
                        path,
                        record.dbname,
                        record.lang,
                        source.lang,
                        record.lang,
                    )
                state["lang"] = record.lang
    except TruncatedInputError as exc:
        if cfg.on_truncated == "fail":
            raise
        logger.warning("%s; keeping the pages completed before the cut", exc)
        state["truncated_input"] = str(exc)


def _batches(pages, cfg: IngestWikiParams, markup: bool, state: dict):
    """(metadata, options, items) per ``batch_pages`` pages: metadata stays here, items go to a worker."""
    meta, items = [], []
    for page in pages:
        reason, page = _prefilter(page, cfg, markup)
        meta.append((reason, page._replace(text="")))
        items.append((page.title, page.text) if reason in (None, "truncated") else None)
        if len(items) >= cfg.batch_pages:
            yield meta, _clean_options(cfg, markup, state), items
            meta, items = [], []
    if meta:
        yield meta, _clean_options(cfg, markup, state), items


def _clean_options(cfg: IngestWikiParams, markup: bool, state: dict) -> CleanOptions:
    return CleanOptions(markup, cfg.cleaner, state["drop"], cfg.min_chars, cfg.skip_disambiguation, cfg.page_timeout_s)


def ingest_file(
    path: Path, out_path: Path, source: WikiSourceParams, cfg: IngestWikiParams, pool=None, window: int = 4
) -> dict[str, Any]:
    """Core of the stage for one source: read, clean (in ``pool`` when given), write ``out_path``.

    Pages are counted in input order as their batch comes back, so the counts, the output and
    where ``max_pages`` stops do not depend on the number of workers.
    """
    started = last_log = time.perf_counter()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    markup = source.format == "mediawiki_xml"
    state = {"lang": source.lang, "dbname": None, "drop": DEFAULT_DROP_NAMESPACES, "truncated_input": None}
    skipped: collections.Counter = collections.Counter()
    kept = seen = chars = truncated = 0
    hard_timeout = cfg.page_timeout_s * cfg.batch_pages * 2 + 60 if cfg.page_timeout_s else 0
    sink = _ParquetSink(out_path, source.name)
    batches = _batches(_read_pages(path, source, cfg, pool, state), cfg, markup, state)
    with (
        contextlib.closing(_results(batches, pool, window, hard_timeout, path)) as results,
        tqdm(desc=source.name, unit=" pages", disable=None) as bar,
    ):
        for meta, outcomes in results:
            for (reason, page), outcome in zip(meta, outcomes):
                seen += 1
                truncated += reason == "truncated"  # cut to max_page_bytes, then cleaned like the rest
                reason, text = outcome if outcome is not None else (reason, "")
                if reason == "parse_error":
                    logger.warning(
                        "%s: page id %s %r: cleaning failed (%s); skipped", path, page.page_id, page.title, text
                    )
                if reason is not None:
                    skipped[reason] += 1
                    continue
                kept += 1
                chars += len(text)
                sink.add(page, text, state["lang"], _page_url(state["lang"], page.title, page.url))
                if cfg.max_pages and kept >= cfg.max_pages:
                    break
            bar.update(len(meta))
            if time.perf_counter() - last_log > LOG_EVERY_S:
                last_log = time.perf_counter()
                logger.info("%s: %d pages seen, %d kept", source.name, seen, kept)
            if cfg.max_pages and kept >= cfg.max_pages:
                break
    sink.close()
    seconds = time.perf_counter() - started
    size = path.stat().st_size
    stats = {
        "file": str(path),
        "format": source.format,
        "bytes": size,
        "lang": state["lang"],
        "dbname": state["dbname"],
        "pages_seen": seen,
        "pages_kept": kept,
        "pages_truncated": truncated,
        "skipped": dict(sorted(skipped.items())),
        "chars": chars,
        "seconds": round(seconds, 3),
        "mb_per_s": round(size / 1e6 / seconds, 3),
        "pages_per_s": round(seen / seconds, 1),
        "truncated_input": state["truncated_input"],
    }
    logger.info(
        "%s: %d/%d pages kept, %d chars, %.2f s (%.2f MB/s); skipped %s",
        source.name,
        kept,
        seen,
        chars,
        seconds,
        stats["mb_per_s"],
        stats["skipped"],
    )
    return stats


@contextlib.contextmanager
def worker_pool(workers: int):
    """A process pool for ``workers`` > 1, else None (clean in the main process).

    fork: the workers need nothing but this module, and are started before any reader thread.
    """
    if workers <= 1:
        yield None
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    pool = multiprocessing.get_context(method).Pool(workers, initializer=_leave_the_process_group)
    try:
        yield pool
        pool.close()
    finally:
        stop_pool(pool)


def stop_pool(pool) -> None:
    """``Pool.terminate`` and join, killing the workers instead when that hangs.

    ``Pool.terminate`` takes the task and result queue locks, and a worker may hold one for good:
    blocked writing a large result that nobody reads any more, or killed while waiting for a task.
    After POOL_STOP_S the workers are killed; the pool's threads are daemons and die with us.
    """
    stopper = threading.Thread(target=pool.terminate, name="pool-terminate", daemon=True)
    stopper.start()
    stopper.join(POOL_STOP_S)
    if not stopper.is_alive():
        pool.join()
        return
    logger.warning("the cleaning workers did not stop within %.0f s; killing them", POOL_STOP_S)
    for child in multiprocessing.active_children():  # the pool's workers: this stage starts no other
        child.kill()


def _leave_the_process_group() -> None:
    """Pool worker initializer: signals sent to the stage's process group do not reach workers.

    An idle worker blocks in the task queue holding its lock; killed there (SIGTERM or Ctrl-C sent
    to the whole group), it leaves the lock taken and ``Pool.terminate`` waits for it forever.
    The parent stops its workers itself, with ``Pool.terminate``, when it unwinds.
    """
    os.setpgid(0, 0)


def run(params, **options) -> dict[str, Any]:
    """Resolve, ingest every source into ``paths.raw_wiki_dir`` (atomically) and write stats + manifest."""
    cfg: IngestWikiParams = params.ingest_wiki
    paths = params.paths
    if not cfg.sources:
        raise DataError("ingest_wiki.sources is empty: add at least one source to params.yaml")
    resolved = [(source, resolve_source(source, paths.downloads_dir)) for source in cfg.sources]
    workers = cfg.workers or os.cpu_count() or 1
    started = time.perf_counter()
    per_source = {}
    with atomic_dir(paths.raw_wiki_dir) as tmp, worker_pool(workers) as pool:
        for source, path in resolved:
            logger.info("%s: reading %s (%s)", source.name, path, source.format)
            per_source[source.name] = ingest_file(
                path, tmp / f"{source.name}.parquet", source, cfg, pool, window=2 * workers
            )
        totals = {
            key: sum(s[key] for s in per_source.values()) for key in ("pages_seen", "pages_kept", "chars", "bytes")
        }
        totals["seconds"] = round(time.perf_counter() - started, 3)
        atomic_write_json(
            tmp / "stats.json", {"workers": workers, "cleaner": cfg.cleaner, "totals": totals, "sources": per_source}
        )
        inputs = {source.name: source.sha256 or sha256_file(path) for source, path in resolved}
        write_manifest(tmp, STAGE, cfg, inputs=inputs, extra={"totals": totals})
    return {"stage": STAGE, "out_dir": str(paths.raw_wiki_dir), "sources": len(per_source), **totals}
