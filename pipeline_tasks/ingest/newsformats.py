"""Pure parsing and cleaning helpers for news articles (no paths from params, no logging setup).

Used by :mod:`pipeline_tasks.ingest.ingest_news`. Three layouts are read from binary streams, one record
at a time, each yielding :class:`RawRecord` (a record that could not even be split into fields
carries an ``error`` instead of ``fields``):

* CSV (:func:`read_csv_records`): AG News (no header, every field quoted) or headered layouts
  (Kaggle ``class_index,title,description``); columns are mapped to the canonical fields by index
  or by header name. Bytes are decoded line by line, so one line of invalid UTF-8 costs one
  record, not the file.
* JSON lines (:func:`read_jsonl_records`): HuffPost (``headline``, ``short_description``,
  ``category``, ``date``, ``link``...), key order free, last line may lack its newline.
* a folder of one-article text files (:func:`read_folder_records`): BBC, ``<root>/<label>/<n>.txt``
  with the headline on the first line, a blank line, then the body. Files directly under the root
  (``README.TXT``) and symlinks are ignored.

:func:`build_row` turns a record into an output row (cleaned title/text, canonical label, UTC
date, stable id) or raises :class:`RecordError` with a short reason that is counted and
quarantined.

Measured on the real AG News files (not what its readme says): a lone backslash marks a former
line break (``A second\\team of``, ``social\\network``: the letter after it belongs to the
word, so ``\\n`` is *not* an escaped newline there), ``\\$`` is an escaped dollar, and entities
lost their ampersand to a space (``doesn #39;t``, ``Johnson  amp; Johnson``, `` quot;``). The
``backslash_breaks`` and ``repair_entities`` options undo exactly that.
"""

from __future__ import annotations

import codecs
import collections
import csv
import dataclasses
import datetime as dt
import hashlib
import html
import json
import re
import unicodedata
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

CANONICAL_LABELS = ("world", "sports", "business", "scitech")
FIELDS = ("title", "body", "label", "date", "url")

# Entities whose "&" became a whitespace character (AG News): " #39;", "  amp;", " quot;".
_DAMAGED_ENTITY = re.compile(r"(^|\s)(#\d{1,7};|#[xX][0-9a-fA-F]{1,6};|(?:quot|amp|lt|gt|apos|nbsp);)")
# Only real HTML element names count as tags, so "<TXN.N>" (a Reuters ticker) and "a < b" stay.
_TAG_NAMES = (
    "a|abbr|address|article|aside|b|big|blockquote|body|br|caption|center|cite|code|dd|del|div|dl|"
    "dt|em|embed|figcaption|figure|font|footer|form|h[1-6]|head|header|hr|html|i|iframe|img|input|"
    "ins|kbd|label|li|link|main|mark|marquee|meta|nav|nobr|noscript|object|ol|p|param|picture|pre|q|s|samp|"
    "section|small|source|span|strike|strong|sub|sup|table|tbody|td|tfoot|th|thead|time|title|tr|"
    "tt|u|ul|var|video|wbr"
)
_TAG = re.compile(rf"</?(?:{_TAG_NAMES})(?:\s[^<>]*)?/?>", re.IGNORECASE)
_SCRIPT = re.compile(r"<(script|style)\b[^>]*>.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
# C0/C1 controls except tab/newline/carriage return, zero-width space, BOM.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\ufeff]")


class FileFormatError(ValueError):
    """The whole file is unusable (empty, header lacks a mapped column, too many bad records)."""


class RecordError(ValueError):
    """One record is unusable; ``reason`` is a short category counted in stats.json."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# ---------------------------------------------------------------------------------------------
# Cleaning
# ---------------------------------------------------------------------------------------------
def repair_damaged_entities(text: str) -> str:
    """``doesn #39;t`` -> ``doesn&#39;t``: the whitespace before a bare entity was its ``&``."""
    return _DAMAGED_ENTITY.sub(r"&\2", text)


def decode_backslash_breaks(text: str) -> str:
    r"""AG News: ``\$`` is a dollar sign; any other run of backslashes was a line break."""
    return re.sub(r"\\+", " ", text.replace("\\$", "$"))


def unescape_html(text: str, max_passes: int = 3) -> str:
    """Unescape entities, repeatedly for double-escaped text (``&amp;lt;b&amp;gt;``)."""
    for _ in range(max_passes):
        unescaped = html.unescape(text)
        if unescaped == text:
            break
        text = unescaped
    return text


def strip_tags(text: str) -> str:
    """Drop script/style blocks, comments and HTML tags; a tag becomes a space (``a<br>b``)."""
    text = _SCRIPT.sub(" ", text)
    text = _COMMENT.sub(" ", text)
    return _TAG.sub(" ", text)


def collapse_whitespace(text: str, multiline: bool = False) -> str:
    """One space between words; with ``multiline`` non-empty lines are kept, joined by ``\\n``."""
    if not multiline:
        return " ".join(text.split())
    lines = (" ".join(line.split()) for line in text.splitlines())
    return "\n".join(line for line in lines if line)


def clean_text(
    text: str, *, multiline: bool = False, backslash_breaks: bool = False, repair_entities: bool = False
) -> str:
    """Entities unescaped, tags stripped, controls removed, NFKC, whitespace collapsed."""
    if repair_entities:
        text = repair_damaged_entities(text)
    if backslash_breaks:
        text = decode_backslash_breaks(text)
    text = strip_tags(unescape_html(text))
    text = _CONTROL.sub(" ", text)
    text = unicodedata.normalize("NFKC", text)
    return collapse_whitespace(text, multiline=multiline)


# ---------------------------------------------------------------------------------------------
# Fields
# ---------------------------------------------------------------------------------------------
def parse_date(value: str, date_format: str | None = None) -> dt.datetime:
    """ISO 8601 (``2022-09-23``, ``2022-09-23T10:00:00Z``) or ``strptime(date_format)``, as UTC.

    A naive date/time is taken as UTC. Raises ``ValueError`` when it does not parse.
    """
    value = value.strip()
    parsed = dt.datetime.strptime(value, date_format) if date_format else dt.datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=dt.UTC)
    return parsed.astimezone(dt.UTC)


def map_label(raw: Any, label_map: Mapping[str, str]) -> tuple[str | None, str | None]:
    """``(canonical label or None, raw label or None)``; exact match after stripping."""
    raw_label = str(raw).strip() if raw is not None else ""
    if not raw_label:
        return None, None
    return label_map.get(raw_label), raw_label


def stable_key(values: Iterable[str]) -> str:
    """sha1 of the raw field values (unit-separator joined): independent of row order."""
    return hashlib.sha1("\x1f".join(values).encode("utf-8")).hexdigest()


class SeenKeys:
    """The set of keys seen so far, in ~18 bytes per key instead of a Python set of strings (~170).

    A key is kept as its blake2b-128 digest (two different keys collide with probability about
    ``n**2 / 2**129``). New digests wait in a small set; every PENDING_KEYS they become a sorted numpy
    run, and a run merges into the one before it while that one is at most twice its size, so there
    are O(log n) runs. A Bloom filter (BLOOM_BITS_PER_KEY bits a key, two probes, rebuilt twice as big
    when full) answers most "never seen" in pure Python: only ~1.5 % of new keys search the runs.
    10 M news rows hold ~180 MB. Hand-written: no maintained package offers a compact, exact,
    growable membership set of this kind.
    """

    PENDING_KEYS = 65_536
    BLOOM_BITS_PER_KEY = 16
    INITIAL_BLOOM_BITS = 1 << 20

    def __init__(self) -> None:
        import numpy  # here, not at the top: loading params (which imports this module) stays light

        self._np = numpy
        self._pending: set[bytes] = set()
        self._runs: list = []  # sorted |V16 numpy arrays, sizes decreasing
        self._count = 0
        self._bloom = bytearray(self.INITIAL_BLOOM_BITS // 8)
        self._mask = self.INITIAL_BLOOM_BITS - 1
        self._last: tuple[str | None, bytes] = (None, b"")

    def _digest(self, key: str) -> bytes:
        # `key in seen` then `seen.add(key)` is the pattern: hash each key once
        if self._last[0] != key:
            self._last = (key, hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).digest())
        return self._last[1]

    def __len__(self) -> int:
        return self._count

    def _maybe(self, digest: bytes) -> bool:
        first = int.from_bytes(digest[:8], "little") & self._mask
        second = int.from_bytes(digest[8:], "little") & self._mask
        bloom = self._bloom
        return bool(bloom[first >> 3] >> (first & 7) & 1 and bloom[second >> 3] >> (second & 7) & 1)

    def __contains__(self, key: str) -> bool:
        digest = self._digest(key)
        if digest in self._pending:
            return True
        if not self._maybe(digest):
            return False
        probe = self._np.frombuffer(digest, dtype="V16")[0]
        for run in self._runs:
            at = int(self._np.searchsorted(run, probe))
            if at < len(run) and run[at] == probe:
                return True
        return False

    def add(self, key: str) -> None:
        """Add a key that is not in the set (the caller checked: a seen id is quarantined)."""
        digest = self._digest(key)
        self._pending.add(digest)
        self._count += 1
        if self._count * self.BLOOM_BITS_PER_KEY > len(self._bloom) * 8:
            self._rebuild_bloom(2 * len(self._bloom) * 8)
        else:
            for half in (digest[:8], digest[8:]):
                bit = int.from_bytes(half, "little") & self._mask
                self._bloom[bit >> 3] |= 1 << (bit & 7)
        if len(self._pending) >= self.PENDING_KEYS:
            np = self._np
            self._runs.append(np.sort(np.frombuffer(b"".join(self._pending), dtype="V16")))
            self._pending.clear()
            while len(self._runs) > 1 and len(self._runs[-2]) <= 2 * len(self._runs[-1]):
                newest = self._runs.pop()
                self._runs[-1] = np.sort(np.concatenate([self._runs[-1], newest]))

    def _rebuild_bloom(self, bits: int) -> None:
        np = self._np
        digests = [*self._runs, np.frombuffer(b"".join(self._pending), dtype="V16")]
        halves = np.concatenate([d.view("<u8") for d in digests]) & np.uint64(bits - 1)
        bloom = np.zeros(bits // 8, dtype=np.uint8)
        np.bitwise_or.at(
            bloom, (halves >> np.uint64(3)).astype(np.int64), (1 << (halves & np.uint64(7))).astype(np.uint8)
        )
        self._bloom, self._mask = bytearray(bloom.tobytes()), bits - 1


# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class RawRecord:
    """One input record before cleaning. ``fields`` is None when ``error`` says why."""

    file: str  # the input file (an archive member as "archive.zip!member")
    record: int | None  # 1-based line of the record start; None for one-file-per-record layouts
    raw: str  # safely decoded source text, for quarantine
    fields: dict[str, Any] | None = None
    error: RecordError | None = None
    fallback_decoded: bool = False
    key: str | None = None  # stable key given by the layout (folder: relative path)


def decode_line(raw: bytes, fallback_encoding: str | None) -> tuple[str, str]:
    """``(text, status)`` with status ``ok`` | ``fallback`` | ``bad`` (bad text has U+FFFD)."""
    try:
        return raw.decode("utf-8"), "ok"
    except UnicodeDecodeError:
        pass
    if fallback_encoding:
        try:
            return raw.decode(fallback_encoding), "fallback"
        except UnicodeDecodeError:
            pass
    return raw.decode("utf-8", errors="replace"), "bad"


def safe_raw(data: bytes, limit: int) -> str:
    """Bytes for a quarantine line: invalid UTF-8 shown as ``\\xNN``, truncated to ``limit``."""
    text = data.decode("utf-8", errors="backslashreplace")
    return text if len(text) <= limit else text[:limit] + "…"


def _undecodable(fallback_encoding: str | None) -> RecordError:
    tried = f"utf-8 and the fallback {fallback_encoding}" if fallback_encoding else "utf-8 (no fallback_encoding set)"
    return RecordError("undecodable", f"invalid bytes for {tried}")


def read_csv_records(
    stream: IO[bytes],
    file: str,
    *,
    columns: Mapping[str, str | int],
    header: bool,
    num_columns: int | None = None,
    fallback_encoding: str | None = None,
    raw_chars: int = 1000,
) -> Iterator[RawRecord]:
    """Yield the data records of a CSV stream with ``fields`` keyed by canonical field name.

    Raises :class:`FileFormatError` for file-level problems (a header lacking a mapped column).
    """
    pending: list[tuple[bytes, str]] = []  # raw lines and decode status of the record being parsed

    def lines() -> Iterator[str]:
        for number, raw in enumerate(stream, 1):
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            text, status = decode_line(raw, fallback_encoding)
            pending.append((raw, status))
            yield text

    reader = csv.reader(lines(), strict=True)
    index: dict[str, int] = {}
    expected = num_columns
    consumed = 0
    while True:
        error = None
        try:
            row = next(reader)
        except StopIteration:
            if pending:  # the reader hit EOF inside a quoted field
                yield RawRecord(
                    file,
                    consumed + 1,
                    safe_raw(b"".join(r for r, _ in pending), raw_chars),
                    error=RecordError("csv_error", "unexpected end of file inside a quoted field"),
                )
            return
        except csv.Error as exc:
            row, error = None, RecordError("csv_error", str(exc))
        start, consumed = consumed + 1, consumed + len(pending)
        statuses = {status for _, status in pending}
        raw = safe_raw(b"".join(r for r, _ in pending), raw_chars)
        pending.clear()
        if row == []:  # blank line
            continue
        if not index and header:  # first real row: the header
            if error is not None or "bad" in statuses:
                raise FileFormatError(f"{file}: header line {start} is unreadable ({error or 'invalid UTF-8'})")
            names = [name.strip() for name in row]
            missing = [c for c in columns.values() if c not in names]
            if missing:
                raise FileFormatError(f"{file}: header {names} lacks mapped column(s) {missing}")
            index = {field: names.index(name) for field, name in columns.items()}
            expected = expected or len(names)
            continue
        if not index:  # headerless: columns are indices
            index = {field: int(col) for field, col in columns.items()}
            expected = expected or max(index.values()) + 1
        if error is None and "bad" in statuses:
            error = _undecodable(fallback_encoding)
        if error is None and len(row) != expected:
            error = RecordError("wrong_column_count", f"{len(row)} columns, expected {expected}")
        if error is not None:
            yield RawRecord(file, start, raw, error=error)
            continue
        yield RawRecord(
            file, start, raw, fields={f: row[i] for f, i in index.items()}, fallback_decoded="fallback" in statuses
        )


def read_jsonl_records(
    stream: IO[bytes],
    file: str,
    *,
    columns: Mapping[str, str],
    fallback_encoding: str | None = None,
    raw_chars: int = 1000,
) -> Iterator[RawRecord]:
    """Yield one record per non-blank line, ``fields`` keyed by canonical field name."""
    for number, raw in enumerate(stream, 1):
        if number == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8) :]
        if not raw.strip():
            continue
        shown = safe_raw(raw.rstrip(b"\r\n"), raw_chars)
        text, status = decode_line(raw, fallback_encoding)
        if status == "bad":
            yield RawRecord(file, number, shown, error=_undecodable(fallback_encoding))
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            yield RawRecord(file, number, shown, error=RecordError("invalid_json", str(exc)))
            continue
        if not isinstance(obj, dict):
            yield RawRecord(file, number, shown, error=RecordError("not_an_object", f"a JSON {type(obj).__name__}"))
            continue
        missing = [key for key in columns.values() if key not in obj]
        if missing:
            yield RawRecord(file, number, shown, error=RecordError("missing_field", ", ".join(missing)))
            continue
        values = {field: obj[key] for field, key in columns.items()}
        bad = [columns[f] for f, v in values.items() if isinstance(v, (dict, list))]
        if bad:
            yield RawRecord(file, number, shown, error=RecordError("bad_value", f"not a scalar: {', '.join(bad)}"))
            continue
        fields = {f: "" if v is None else str(v) for f, v in values.items()}
        yield RawRecord(file, number, shown, fields=fields, fallback_decoded=status == "fallback")


def list_folder_files(root: Path, file_glob: str) -> tuple[list[Path], list[str]]:
    """``(article files, ignored relative paths)``: files in ``root/<label>/`` matching the glob."""
    files, ignored = [], []
    for entry in sorted(root.iterdir()):
        if entry.is_dir() and not entry.is_symlink() and not entry.name.startswith("."):
            for path in sorted(entry.iterdir()):
                if path.is_file() and not path.is_symlink() and path.match(file_glob) and not path.name.startswith("."):
                    files.append(path)
                else:
                    ignored.append(path.relative_to(root).as_posix())
        else:
            ignored.append(entry.relative_to(root).as_posix())
    return files, ignored


def read_folder_records(
    root: Path, files: Iterable[Path], *, fallback_encoding: str | None = None, raw_chars: int = 1000
) -> Iterator[RawRecord]:
    """One record per file: first line the title, the rest the body, the folder name the label."""
    for path in files:
        rel = path.relative_to(root).as_posix()
        data = path.read_bytes()
        if data.startswith(codecs.BOM_UTF8):
            data = data[len(codecs.BOM_UTF8) :]
        text, status = decode_line(data, fallback_encoding)
        if status == "bad":
            yield RawRecord(str(path), None, safe_raw(data, raw_chars), error=_undecodable(fallback_encoding), key=rel)
            continue
        title, _, body = text.replace("\r\n", "\n").replace("\r", "\n").lstrip("\n").partition("\n")
        yield RawRecord(
            str(path),
            None,
            safe_raw(data, raw_chars),
            key=rel,
            fallback_decoded=status == "fallback",
            fields={"title": title, "body": body, "label": path.parent.name},
        )


# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RowOptions:
    """Per-source settings :func:`build_row` needs (a view of the source params)."""

    source: str
    lang: str
    label_map: Mapping[str, str]
    split: str | None = None
    date_format: str | None = None
    id_fields: tuple[str, ...] = ("title", "body")
    backslash_breaks: bool = False
    repair_entities: bool = False


def build_row(record: RawRecord, opts: RowOptions) -> dict[str, Any]:
    """Clean one record into an output row; raises :class:`RecordError` when it is unusable."""
    if record.error is not None:
        raise record.error
    fields = record.fields or {}
    clean = dict(backslash_breaks=opts.backslash_breaks, repair_entities=opts.repair_entities)
    title = clean_text(fields.get("title", ""), **clean)
    body = clean_text(fields.get("body", ""), multiline=True, **clean)
    text = "\n".join(part for part in (title, body) if part)
    if not text:
        raise RecordError("empty_text", "title and body are empty after cleaning")
    date = None
    if fields.get("date", "").strip():
        try:
            date = parse_date(fields["date"], opts.date_format)
        except ValueError as exc:
            raise RecordError("bad_date", f"{fields['date']!r}: {exc}") from None
    label, raw_label = map_label(fields.get("label"), opts.label_map)
    if record.key is not None:
        key = record.key
    else:
        key = stable_key(fields.get(name, "") for name in opts.id_fields)
    return {
        "id": f"{opts.source}:{key}",
        "kind": "news",
        "source": opts.source,
        "lang": opts.lang,
        "title": title,
        "text": text,
        "label": label,
        "raw_label": raw_label,
        "date": date,
        "url": fields.get("url", "").strip() or None,
        "split": opts.split,
    }


# ---------------------------------------------------------------------------------------------
# Per-source statistics and the bad-share gate
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class SourceStats:
    """Counts for ``stats.json``; :meth:`check` enforces ``max_bad_share``."""

    source: str
    file: str
    kept: int = 0
    quarantined: int = 0
    reasons: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: list = dataclasses.field(default_factory=list)
    labels: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    unmapped_raw_labels: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    dated: int = 0
    date_min: dt.datetime | None = None
    date_max: dt.datetime | None = None
    fallback_decoded: list = dataclasses.field(default_factory=list)
    ignored_files: list = dataclasses.field(default_factory=list)
    truncated: bool = False

    @property
    def records(self) -> int:
        return self.kept + self.quarantined

    def add_bad(self, record: RawRecord, error: RecordError) -> None:
        self.quarantined += 1
        self.reasons[error.reason] += 1
        if len(self.examples) < 5:
            where = f"record {record.record}" if record.record is not None else (record.key or record.file)
            self.examples.append(f"{where} ({error})")

    def add_good(self, row: Mapping[str, Any], record: RawRecord) -> None:
        self.kept += 1
        self.labels[row["label"] or "null"] += 1
        if row["label"] is None and row["raw_label"] is not None:
            self.unmapped_raw_labels[row["raw_label"]] += 1
        if record.fallback_decoded:
            self.fallback_decoded.append(record.key or f"{record.file}:{record.record}")
        if row["date"] is not None:
            self.dated += 1
            self.date_min = min(self.date_min or row["date"], row["date"])
            self.date_max = max(self.date_max or row["date"], row["date"])

    def bad_share(self) -> float:
        return self.quarantined / self.records if self.records else 0.0

    def check(self, max_bad_share: float) -> None:
        """Raise :class:`FileFormatError` (file, share, top reasons, first records) when over the limit."""
        if self.records == 0:
            raise FileFormatError(
                f"{self.file}: no records (the file is empty, or holds only a header or blank "
                f"lines); source {self.source!r}"
            )
        share = self.bad_share()
        if share > max_bad_share:
            top = ", ".join(f"{reason} {count}" for reason, count in self.reasons.most_common(3))
            raise FileFormatError(
                f"{self.file}: {self.quarantined} of {self.records} records bad ({share:.2%} > max_bad_share "
                f"{max_bad_share:.2%}) in source {self.source!r}; top reasons: {top}; first: "
                f"{'; '.join(self.examples[:3])}. Fix the input, its columns/encoding settings, or raise "
                f"ingest_news.max_bad_share"
            )

    def to_dict(self) -> dict[str, Any]:
        iso = lambda d: d.isoformat() if d else None
        return {
            "file": self.file,
            "records": self.records,
            "kept": self.kept,
            "quarantined": self.quarantined,
            "bad_share": round(self.bad_share(), 6),
            "reasons": dict(self.reasons.most_common()),
            "labels": dict(sorted(self.labels.items())),
            "unmapped_raw_labels": dict(self.unmapped_raw_labels.most_common(20)),
            "dated": self.dated,
            "date_min": iso(self.date_min),
            "date_max": iso(self.date_max),
            "fallback_decoded": self.fallback_decoded,
            "ignored_files": self.ignored_files,
            "truncated": self.truncated,
        }
