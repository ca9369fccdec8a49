"""Params sections ``ingest_wiki`` and ``ingest_news``: typed, frozen, checked on load.

Kept apart from the stage modules so that loading params.yaml imports only the standard library:
the sources' locations and checksums come from :mod:`pipeline_tasks.ingest.sources`, the news
fields and labels from :mod:`pipeline_tasks.ingest.newsformats` (both stdlib-only).
"""

from __future__ import annotations

import codecs
import dataclasses
import re
from typing import Literal

from pipeline_tasks.ingest.newsformats import CANONICAL_LABELS, FIELDS
from pipeline_tasks.ingest.sources import DownloadPolicy, SourceSpec

# A source's name names its output file, so it must be a safe file name.
_WIKI_SOURCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_NEWS_SOURCE_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]*")


@dataclasses.dataclass(frozen=True)
class WikiSourceParams(SourceSpec):
    """One Wikipedia source: where it is (:class:`SourceSpec`) and how to read it."""

    format: Literal["mediawiki_xml", "wikitext_raw", "wikiextractor", "jsonl"] = "mediawiki_xml"
    lang: str | None = None  # used when the dump has no <siteinfo><dbname>

    def __post_init__(self):
        if not _WIKI_SOURCE_NAME.fullmatch(self.name):
            raise ValueError(
                f"source {self.name!r}: name must match {_WIKI_SOURCE_NAME.pattern} (it names the output file)"
            )
        super().__post_init__()  # path/mirror/url and checksum checks


@dataclasses.dataclass(frozen=True)
class IngestWikiParams:
    """Section ``ingest_wiki`` of params.yaml."""

    sources: tuple[WikiSourceParams, ...] = ()
    workers: int = 0  # cleaning processes; 0 = os.cpu_count(), 1 = in the main process
    batch_pages: int = 64  # pages per task sent to a worker
    namespaces: tuple[int, ...] = (0,)  # MediaWiki namespaces kept (0 = articles)
    max_pages: int = 0  # articles kept per source, for sampling (0 = all)
    min_chars: int = 200  # shorter cleaned articles (stubs) are skipped
    max_page_bytes: int = 2_097_152  # wikitext per page (MediaWiki's own limit is 2 MiB)
    on_oversize: Literal["skip", "truncate"] = "skip"
    page_timeout_s: float = 30.0  # per page cleaning time limit (0 = none)
    on_truncated: Literal["fail", "keep_complete_pages"] = "fail"
    cleaner: Literal["fast", "mwparserfromhell"] = "fast"
    skip_disambiguation: bool = True
    # bz2: "thread" decodes in a read-ahead thread, "pool" block by block in the worker pool,
    # "auto" = pool from 2 workers on: on an idle 2-core machine the pool took 0.27 s and 0.47 CPU-s
    # for the gensim sample against 0.38 s and 0.54 CPU-s with the read-ahead thread (bench/ingest_wiki.py).
    bz2_decoder: Literal["auto", "thread", "pool"] = "auto"

    def __post_init__(self):
        names = [s.name for s in self.sources]
        if len(names) != len(set(names)):
            raise ValueError(f"sources: duplicate names in {names}")
        if self.workers < 0 or self.batch_pages < 1 or self.max_pages < 0 or self.min_chars < 0:
            raise ValueError("workers, max_pages and min_chars must be >= 0 and batch_pages >= 1")
        if self.max_page_bytes < 1 or self.page_timeout_s < 0:
            raise ValueError("max_page_bytes must be >= 1 and page_timeout_s >= 0")


@dataclasses.dataclass(frozen=True)
class NewsSourceParams(SourceSpec):
    """One news source: where it is (:class:`SourceSpec`) and how to read and label it."""

    format: Literal["csv", "jsonl", "folder"] = "csv"
    lang: str = "en"
    columns: dict[str, str | int] = dataclasses.field(default_factory=dict)
    header: bool = False  # csv: first row names the columns
    num_columns: int | None = None  # csv: expected columns per row (default: header / max index + 1)
    label_map: dict[str, str] = dataclasses.field(default_factory=dict)
    date_format: str | None = None  # strptime format; None = ISO 8601
    split: Literal["train", "val", "test"] | None = None
    id_fields: tuple[str, ...] = ("title", "body")  # sha1 of these raw fields (folder: relative path)
    backslash_breaks: bool = False  # AG News "\" line breaks and "\$"
    repair_entities: bool = False  # AG News " #39;" entities that lost their "&"
    fallback_encoding: str | None = None  # decode invalid UTF-8 with this instead of quarantining
    file_glob: str = "*.txt"  # folder: article files inside each label folder
    max_bad_share: float | None = None  # overrides the section default for this source

    def __post_init__(self):
        super().__post_init__()
        where = f"source {self.name!r}"
        if not _NEWS_SOURCE_NAME.fullmatch(self.name):
            raise ValueError(f"{where}: name must match {_NEWS_SOURCE_NAME.pattern} (it names the output file)")
        bad_labels = sorted(set(self.label_map.values()) - set(CANONICAL_LABELS))
        if bad_labels:
            raise ValueError(f"{where}: label_map targets {bad_labels} are not canonical {list(CANONICAL_LABELS)}")
        if self.fallback_encoding:
            try:
                codecs.lookup(self.fallback_encoding)
            except LookupError:
                raise ValueError(f"{where}: unknown fallback_encoding {self.fallback_encoding!r}") from None
        if self.max_bad_share is not None and not 0 <= self.max_bad_share <= 1:
            raise ValueError(f"{where}: max_bad_share must be within [0, 1]")
        if self.format == "folder":
            if self.columns or self.member:
                raise ValueError(f"{where}: a folder source takes no columns or member (label = folder name)")
            return
        if self.tree_sha256:
            raise ValueError(f"{where}: tree_sha256 is only for format: folder")
        unknown = sorted(set(self.columns) - set(FIELDS))
        if unknown or not ({"title", "body"} & set(self.columns)):
            raise ValueError(
                f"{where}: columns must map some of {list(FIELDS)} including title or body (unknown: {unknown})"
            )
        by_index = self.format == "csv" and not self.header
        if any(isinstance(c, int) != by_index or (by_index and c < 0) for c in self.columns.values()):
            kind = "column indices (0, 1, ...)" if by_index else "column / key names"
            raise ValueError(f"{where}: columns must be {kind} for format {self.format} (header: {self.header})")
        missing_id = sorted(set(self.id_fields) - set(self.columns))
        if not self.id_fields or missing_id:
            raise ValueError(f"{where}: id_fields must be mapped columns (missing: {missing_id})")


@dataclasses.dataclass(frozen=True)
class IngestNewsParams:
    """Section ``ingest_news`` of params.yaml."""

    sources: tuple[NewsSourceParams, ...] = ()
    max_bad_share: float = 0.05  # per source; above it the stage fails
    max_raw_chars: int = 1000  # quarantine keeps this much of a bad record
    max_records_per_source: int | None = None  # a quick, smaller run; None reads everything
    # a source over max_bad_share fails the stage, and its quarantine is kept here to inspect
    failed_quarantine_dir: str = "reports/ingest_news/quarantine"
    download: DownloadPolicy = DownloadPolicy()

    def __post_init__(self):
        if not self.sources:
            raise ValueError("sources: list at least one news source")
        names = [s.name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"sources: duplicate source names {dupes} (each names its output file)")
        if not 0 <= self.max_bad_share <= 1:
            raise ValueError("max_bad_share must be within [0, 1]")
        if self.max_raw_chars < 16 or (self.max_records_per_source is not None and self.max_records_per_source < 1):
            raise ValueError("max_raw_chars must be >= 16 and max_records_per_source >= 1")
        if not self.failed_quarantine_dir.strip():
            raise ValueError("failed_quarantine_dir must name a folder, e.g. reports/ingest_news/quarantine")
