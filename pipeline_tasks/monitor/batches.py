"""Reading news batches and writing the monitor's reports (helpers of :mod:`pipeline_tasks.monitor.monitor`).

* :func:`read_news_path` — a file or a folder of ``.parquet`` / ``.jsonl`` / ``.json`` / ``.ndjson``
  / ``.csv`` / ``.txt`` as one table ``id, text, label, date, source, kind`` (missing columns
  null; records carry ``text`` or a title and body: ingest's ``title``/``body`` or the fields of
  ``lmpipe predict``, :func:`pipeline_tasks.ship.bundle.record_text`), with a report of the files
  read and skipped; :func:`parse_dates` — dates, with counts of missing, unparseable and
  ambiguous ones;
* :func:`filter_window`, :func:`month_windows` — date windows;
* :func:`evidently_report` — the evidently ``Report`` of one window (same tests and thresholds as
  the decision), :func:`write_over_time` — the drift-over-time CSV and PNG.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import io
import logging
import math
import re
from collections.abc import Iterable
from pathlib import Path

import pandas as pd
from evidently import DataDefinition, Dataset, Report
from evidently.legacy.metrics.data_drift import embeddings_drift as tsne_widget
from evidently.metrics import EmbeddingsDrift, ValueDrift
from matplotlib.figure import Figure
from threadpoolctl import threadpool_limits

from pipeline_tasks.artifacts import atomic_path, atomic_write_text
from pipeline_tasks.errors import DataError
from pipeline_tasks.ingest.jsonlines import read_json_lines
from pipeline_tasks.monitor import drift
from pipeline_tasks.ship.bundle import record_text

logger = logging.getLogger(__name__)

DATA_SUFFIXES = (".parquet", ".jsonl", ".json", ".ndjson", ".csv", ".txt")
COLUMNS = ["id", "text", "label", "date", "source", "kind"]
# files named like these are documentation that ships with a corpus (README.txt, LICENSE.txt ...)
DOCUMENT_STEMS = frozenset(
    {"readme", "license", "licence", "copying", "notice", "changelog", "authors", "contributing"}
)
# news lines (headlines, sentences) have many words; one or two per line is a list (places, topics)
MIN_TXT_MEDIAN_WORDS = 3
DOCUMENTATION = "documentation"
_DAY_MONTH_YEAR = r"^(\d{1,2})[/.\-](\d{1,2})[/.\-]\d{2,4}\b"
OVER_TIME_FIELDS = ("window", "start", "end", "rows", "sampled", "drift_detected", "fired", *drift.SIGNALS)


def news_text(record: dict, where: str) -> str:
    """The text of one record: ``text``, or title and body under ingest's names or the serving ones.

    Ingest's canonical fields are ``title`` / ``body``; ``lmpipe predict`` also reads
    ``description`` (AG News) and ``headline`` / ``short_description`` (HuffPost).
    """
    body = record.get("body")
    if isinstance(body, str) and body.strip() and not record.get("description"):
        record = {**record, "description": body}
    try:
        return record_text(record, where)
    except DataError as exc:
        raise DataError(f"{where}: record has no 'text' and no 'title'/'body'; keys: {sorted(record)}") from exc


def _records_frame(records: Iterable[tuple[str, dict]]):
    """``(where, record)`` pairs as the news table; ``where`` (``file:line``) names a record without text."""
    rows = [
        {
            "id": rec.get("id"),
            "text": news_text(rec, where),
            "label": rec.get("label"),
            "date": rec.get("date"),
            "source": rec.get("source"),
            "kind": rec.get("kind"),
        }
        for where, rec in records
    ]
    return pd.DataFrame(rows, columns=COLUMNS)


def _blank(value) -> bool:
    return value is None or value is pd.NaT or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def parse_dates(values, date_format: str | None = None):
    """``(dates, counts)``: the values as UTC timestamps (NaT when unusable) and what happened to them.

    ISO 8601 is always read; ``date_format`` (a strptime format) reads the other values, ``None``
    reads them month first, as pandas and dateutil do. ``counts``: ``missing`` (no value),
    ``unparseable`` (a value that is no date, or an impossible one such as 31/02/1987) and, without
    a format, ``ambiguous`` (day and month could be swapped: 03/04/1987 was read as 4 March).
    """
    values = pd.Series(values).reset_index(drop=True)
    if pd.api.types.is_datetime64_any_dtype(values):
        dates = values.dt.tz_localize("UTC") if values.dt.tz is None else values.dt.tz_convert("UTC")
        counts = {"missing": int(dates.isna().sum()), "unparseable": 0, "ambiguous": 0}
        return dates, {**counts, "unparseable_examples": [], "ambiguous_examples": []}
    text = pd.Series([None if _blank(v) else str(v).strip() for v in values], dtype=object)
    present = text.notna() & (text != "")
    # ISO 8601 (year first) cannot be misread; the rest is read with the format, or month first
    dates = pd.to_datetime(text.where(present), format="ISO8601", utc=True, errors="coerce")
    rest = present & dates.isna()
    if rest.any():
        others = pd.to_datetime(
            text.where(rest), format=date_format or "mixed", dayfirst=False, utc=True, errors="coerce"
        )
        dates = dates.where(~rest, others)
    ambiguous = pd.Series(False, index=text.index)
    if not date_format:
        day_month = text.where(rest).str.extract(_DAY_MONTH_YEAR).astype(float)
        ambiguous = rest & dates.notna() & (day_month[0] <= 12) & (day_month[1] <= 12) & (day_month[0] != day_month[1])
    unparseable = present & dates.isna()
    counts = {
        "missing": int((~present).sum()),
        "unparseable": int(unparseable.sum()),
        "ambiguous": int(ambiguous.sum()),
        "unparseable_examples": list(pd.unique(text[unparseable]))[:3],
        "ambiguous_examples": list(pd.unique(text[ambiguous]))[:3],
    }
    return dates, counts


def read_news_file(path: Path, date_format: str | None = None):
    """One file as ``(frame, date counts)``; the frame has ``id, text, label, date, source, kind``."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        frame = pd.read_parquet(path)
        if "text" not in frame.columns:  # e.g. a table of ingest's raw fields: build the text the same way
            frame = _records_frame(
                (f"{path}:row {i}", {k: v for k, v in rec.items() if v is not None})
                for i, rec in enumerate(frame.to_dict("records"), start=1)
            )
    elif suffix in (".jsonl", ".json", ".ndjson"):
        frame = _records_frame((f"{path}:{number}", record) for number, record in read_json_lines(path))
    elif suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as fh:
            frame = _records_frame((f"{path}:{i}", row) for i, row in enumerate(csv.DictReader(fh), start=1))
    elif suffix == ".txt":
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        frame = pd.DataFrame({"text": lines})
    else:
        raise DataError(f"{path}: unsupported file type (use one of {', '.join(DATA_SUFFIXES)})")
    for column in ("id", "label", "date", "source", "kind"):
        if column not in frame.columns:
            frame[column] = None
    frame = frame.reset_index(drop=True)
    dates, counts = parse_dates(frame["date"], date_format)
    if suffix == ".txt":  # a text file has no dates: no row is missing one it could have had
        counts["missing"] = 0
    frame["date"] = dates
    return frame[COLUMNS], counts


def _not_news_reason(path: Path) -> str | None:
    """Why a file in a batch folder is not read as news (None: it is read)."""
    suffix = path.suffix.lower()
    if suffix not in DATA_SUFFIXES:
        return f"not a news file type ({suffix or 'no suffix'})"
    if suffix == ".txt":
        if re.split(r"[-_.]", path.stem.lower())[0] in DOCUMENT_STEMS:
            return DOCUMENTATION
        words = sorted(len(ln.split()) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip())
        if words and words[len(words) // 2] < MIN_TXT_MEDIAN_WORDS:
            return f"a list, not news text (median {words[len(words) // 2]} words per line)"
    return None


def _add_counts(total: dict, counts: dict) -> None:
    for key, value in counts.items():
        if isinstance(value, list):
            total[key] = list(dict.fromkeys(total.get(key, []) + value))[:3]
        else:
            total[key] = total.get(key, 0) + value


def read_news_path(root: Path, date_format: str | None = None):
    """Every news file under ``root`` (or ``root`` itself) as ``(frame, report)``.

    In a folder, files that are not news (other types, word lists, unreadable ones) and
    documentation (README, LICENSE ...) are skipped and logged with the reason; ``report`` counts
    the files read and skipped and the dates of :func:`parse_dates`. A folder where more files are
    skipped than read (documentation aside) is refused: the verdict would be about the wrong data.
    """
    if not root.is_dir():
        frame, dates = read_news_file(root, date_format)
        return frame, {"path": str(root), "files_read": 1, "files_skipped": 0, "skipped": [], "dates": dates}
    candidates = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    frames, skipped, dates = [], [], {}
    for path in candidates:
        try:
            reason = _not_news_reason(path)
            if reason is None:
                frame, counts = read_news_file(path, date_format)
                logger.info("batch: read %s (%d rows)", path, len(frame))
                frames.append(frame)
                _add_counts(dates, counts)
                continue
        except (DataError, UnicodeDecodeError, ValueError, OSError) as exc:
            reason = f"unreadable: {str(exc).splitlines()[0][:200]}"
        logger.warning("batch: skipped %s: %s", path, reason)
        skipped.append({"file": str(path.relative_to(root)), "reason": reason})
    unrecognised = [s for s in skipped if s["reason"] != DOCUMENTATION]
    logger.info(
        "batch %s: %d files read, %d skipped (%d documentation)",
        root,
        len(frames),
        len(skipped),
        len(skipped) - len(unrecognised),
    )
    if not frames or len(unrecognised) > len(frames):
        shown = "; ".join(f"{s['file']}: {s['reason']}" for s in unrecognised[:5])
        raise DataError(
            f"{root}: {len(unrecognised)} files are not news the monitor can read and only {len(frames)} are "
            f"({shown}{' ...' if len(unrecognised) > 5 else ''}); refusing to judge drift on this folder. "
            f"Point monitor.batch.path at the news files ({', '.join(DATA_SUFFIXES)} with one record or "
            "headline per line)"
        )
    report = {
        "path": str(root),
        "files_read": len(frames),
        "files_skipped": len(skipped),
        "skipped": skipped[:20],
        "dates": dates,
    }
    return pd.concat(frames, ignore_index=True), report


def filter_window(frame, start: dt.datetime | None, end: dt.datetime | None):
    if start is None and end is None:
        return frame
    keep = frame["date"].notna()
    if start is not None:
        keep &= frame["date"] >= start
    if end is not None:
        keep &= frame["date"] < end
    return frame[keep]


def month_windows(start: dt.datetime, end: dt.datetime, step: int) -> list[tuple[dt.datetime, dt.datetime]]:
    """``[start, end)`` cut at calendar-month steps (the first window starts at ``start``)."""
    out, cursor = [], start
    while cursor < end:
        month = cursor.month - 1 + step
        nxt = cursor.replace(year=cursor.year + month // 12, month=month % 12 + 1, day=1, hour=0, minute=0, second=0)
        out.append((cursor, min(nxt, end)))
        cursor = nxt
    return out


def evidently_report(reference, current, params, thresholds: dict | None = None):
    """The evidently Report of the main window (same tests and thresholds as the decision).

    ``thresholds``: the window's thresholds by signal (default: the configured ones)."""
    ref_frame, cur_frame = reference.sample_frame(), current.sample_frame()
    with_labels = "label" in cur_frame and "label" in ref_frame and (cur_frame["label"] != drift.UNLABELLED).any()
    categorical = ["prediction", *(["label"] if with_labels else [])]
    emb_cols = [c for c in cur_frame.columns if c.startswith("emb_")]
    definition = DataDefinition(
        numerical_columns=[*drift.DESCRIPTORS, "bpb"], categorical_columns=categorical, embeddings={"pooled": emb_cols}
    )
    t = {**dataclasses.asdict(params.thresholds), **(thresholds or {})}
    metrics = [
        ValueDrift(column=name, method=params.descriptor_method, threshold=params.descriptor_threshold)
        for name in drift.DESCRIPTORS
    ]
    metrics.append(ValueDrift(column="bpb", method="ks", threshold=0.05))
    metrics.append(
        ValueDrift(
            column="prediction",
            method=params.category_method,
            threshold=t["prediction"] if t["prediction"] is not None else 0.1,
        )
    )
    if with_labels:
        metrics.append(
            ValueDrift(
                column="label",
                method=params.category_method,
                threshold=t["label"] if t["label"] is not None else 0.1,
            )
        )
    metrics.append(
        EmbeddingsDrift(
            embeddings_name="pooled",
            drift_method=drift.embedding_drift_method(
                params.embedding_method, t["embedding"], params.embedding_pca_components
            ),
        )
    )
    columns = [*drift.DESCRIPTORS, "bpb", *categorical, *emb_cols]
    # evidently 0.7 draws a t-SNE of up to SAMPLE_CONSTANT (2,500) rows per side for the embedding
    # widget, two thirds of the report's time; the drift score itself always uses every sampled row
    saved = tsne_widget.SAMPLE_CONSTANT
    tsne_widget.SAMPLE_CONSTANT = params.report_tsne_rows
    # one OpenMP thread: t-SNE's busy-waiting threads collapse on a shared CPU (measured on 2
    # oversubscribed cores: 33 s with the default threads, 5.6 s with one, for 1,000 points)
    limits = threadpool_limits(limits=1)
    try:
        snapshot = Report(metrics, include_tests=True).run(
            Dataset.from_pandas(cur_frame[columns], data_definition=definition),  # current first, reference second
            Dataset.from_pandas(ref_frame[columns], data_definition=definition),
        )
    finally:
        tsne_widget.SAMPLE_CONSTANT = saved
        limits.restore_original_limits()
    scores = {}
    for metric in snapshot.dict()["metrics"]:
        config = metric.get("config", {})
        key = config.get("column") or config.get("embeddings_name")
        scores[key] = float(metric["value"]) if metric.get("value") is not None else None
    return snapshot, scores


def write_over_time(rows: list[dict], csv_path: Path, png_path: Path, thresholds: dict[str, float | None]) -> None:
    """The drift-over-time table (DVC plots) and a PNG of each signal relative to its threshold."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=OVER_TIME_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(csv_path, buffer.getvalue())

    # the plot is about time: the over-time windows in order, or the main window when it is alone
    evaluated = [r for r in rows if r.get("drift_detected") != "" and (r["window"] != "main" or len(rows) == 1)]
    # a bare Figure, not pyplot: no global backend switch and no figure registry to close
    fig = Figure(figsize=(max(6.0, 0.35 * len(evaluated) + 3), 4))
    ax = fig.subplots()
    xs = list(range(len(evaluated)))
    for name in drift.SIGNALS:
        # each window against its own threshold (the permutation null raises small windows')
        limits = [r.get("thresholds", thresholds).get(name) for r in evaluated]
        ys = [
            r[name] / limit if limit and r.get(name) not in ("", None) else float("nan")
            for r, limit in zip(evaluated, limits)
        ]
        if any(y == y for y in ys):
            ax.plot(xs, ys, marker="o", label=name)
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="threshold")
    for x, r in zip(xs, evaluated):
        if r["drift_detected"]:
            ax.axvspan(x - 0.4, x + 0.4, color="red", alpha=0.12)
    ax.set_xticks(xs, [r["window"] for r in evaluated], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("signal / threshold")
    ax.set_title("drift over time (shaded: drift detected)")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
