"""Reading news batches and writing the monitor's reports (helpers of :mod:`pipeline_tasks.monitor.monitor`).

* :func:`read_news_path` — a file or a folder of ``.parquet`` / ``.jsonl`` / ``.json`` / ``.ndjson``
  / ``.csv`` / ``.txt`` as one table ``id, text, label, date, source, kind`` (missing columns
  null; JSON and CSV records carry ``text`` or ``title``/``description`` like ``lmpipe predict``,
  :func:`pipeline_tasks.ship.bundle.record_text`);
* :func:`filter_window`, :func:`month_windows` — date windows;
* :func:`evidently_report` — the evidently ``Report`` of one window (same tests and thresholds as
  the decision), :func:`write_over_time` — the drift-over-time CSV and PNG.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import logging
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
OVER_TIME_FIELDS = ("window", "start", "end", "rows", "sampled", "drift_detected", "fired", *drift.SIGNALS)


def _records_frame(records: Iterable[tuple[str, dict]]):
    """``(where, record)`` pairs as the news table; ``where`` (``file:line``) names a record without text."""
    rows = [
        {
            "id": rec.get("id"),
            "text": record_text(rec, where),
            "label": rec.get("label"),
            "date": rec.get("date"),
            "source": rec.get("source"),
            "kind": rec.get("kind"),
        }
        for where, rec in records
    ]
    return pd.DataFrame(rows, columns=COLUMNS)


def read_news_file(path: Path):
    """One file as a DataFrame with ``id, text, label, date, source, kind`` (missing columns null)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        frame = pd.read_parquet(path)
        if "text" not in frame.columns:
            raise DataError(f"{path}: no 'text' column (columns: {list(frame.columns)})")
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
    frame["date"] = pd.to_datetime(frame["date"], utc=True, errors="coerce")
    return frame[COLUMNS]


def read_news_path(root: Path):
    """Every news file under ``root`` (or ``root`` itself) as one table."""
    if root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)
        if not files:
            raise DataError(f"{root}: no news files ({', '.join(DATA_SUFFIXES)}) in this folder")
    else:
        files = [root]
    return pd.concat([read_news_file(f) for f in files], ignore_index=True)


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


def evidently_report(reference, current, params):
    """The evidently Report of the main window (same tests and thresholds as the decision)."""
    ref_frame, cur_frame = reference.sample_frame(), current.sample_frame()
    with_labels = "label" in cur_frame and "label" in ref_frame and (cur_frame["label"] != drift.UNLABELLED).any()
    categorical = ["prediction", *(["label"] if with_labels else [])]
    emb_cols = [c for c in cur_frame.columns if c.startswith("emb_")]
    definition = DataDefinition(
        numerical_columns=[*drift.DESCRIPTORS, "bpb"], categorical_columns=categorical, embeddings={"pooled": emb_cols}
    )
    t = params.thresholds
    metrics = [
        ValueDrift(column=name, method=params.descriptor_method, threshold=params.descriptor_threshold)
        for name in drift.DESCRIPTORS
    ]
    metrics.append(ValueDrift(column="bpb", method="ks", threshold=0.05))
    metrics.append(
        ValueDrift(
            column="prediction",
            method=params.category_method,
            threshold=t.prediction if t.prediction is not None else 0.1,
        )
    )
    if with_labels:
        metrics.append(
            ValueDrift(column="label", method=params.category_method, threshold=t.label if t.label is not None else 0.1)
        )
    metrics.append(
        EmbeddingsDrift(
            embeddings_name="pooled",
            drift_method=drift.embedding_drift_method(
                params.embedding_method, t.embedding, params.embedding_pca_components
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
        threshold = thresholds.get(name)
        ys = [r[name] / threshold if threshold and r.get(name) not in ("", None) else float("nan") for r in evaluated]
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
