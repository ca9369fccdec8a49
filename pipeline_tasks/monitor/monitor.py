"""Stage ``monitor``: drift of a batch of news against the training reference (evidently 0.7).

Inputs:

* the **reference** (``monitor.reference``): by default the news rows of the prepared train split
  (``paths.prepared_dir/train.parquet``) of the monitored feed (``sources``), i.e. the texts the
  model was trained on for that feed. ``start`` / ``end`` restrict it to a date window (e.g. the
  months before a launch). Rows whose ``id`` also appears in the batch are removed from the
  reference, so the main batch window is never compared with itself (drift-over-time windows
  that overlap the reference period are compared as they are);
* the **batch** (``monitor.batch``): an ingested source (``source: huffpost_v3`` ->
  ``paths.raw_news_dir/huffpost_v3.parquet``), a prepared ``split``, or any ``path`` (a file or a
  folder of ``.parquet`` / ``.jsonl`` / ``.json`` / ``.csv`` / ``.txt``; JSON and CSV records
  carry ``text`` or ``title``/``description``, optional ``date``, ``label``, ``id``). The main
  window is ``window_start`` <= date < ``window_end``; ``windows`` (explicit) or ``timeline``
  (monthly steps) add windows for drift over time;
* the exported bundle (``paths.bundle_dir``): tokenizer, classifier (embeddings = pooled hidden
  state, predictions) and language model, run with ONNX Runtime only (no torch).

Per window, :func:`pipeline_tasks.monitor.drift.featurize` computes the text descriptors of every text
and runs the model on a seeded sample of ``sample_rows`` texts (``reference_rows`` for the
reference); :func:`pipeline_tasks.monitor.drift.compare` tests them with evidently; the decision table
:func:`pipeline_tasks.monitor.drift.decide_drift` flags drift when ``min_signals`` signals reach their
``thresholds``. Statistical tests run on fixed-size samples on purpose: a p-value test on 100,000
rows flags differences nobody cares about, and a fixed size keeps the false-alarm rate the same
for every batch size. Descriptor statistics in the summary cover every row.

Outputs (``paths.monitor_dir``, each file written atomically):

* ``drift_report.html`` — evidently report of the main window (descriptor, bpb, prediction,
  label and embedding drift);
* ``drift_summary.json`` — ``drift_detected``, every signal with value / threshold / fired, the
  details (per-column scores, distributions, bits per byte), row counts and timings; DVC metrics;
* ``drift_over_time.csv`` + ``drift_over_time.png`` — one row per window (DVC plots);
* ``reference_stats.json`` — descriptor / prediction / label / bits-per-byte statistics of the
  reference (logged with the model by ``register``); ``manifest.json``.

Reading batches and writing the reports live in :mod:`pipeline_tasks.monitor.batches`, the statistics
and the decision table in :mod:`pipeline_tasks.monitor.drift`. Drift is a signal, not a failure: the stage exits 0 either way and the drift DAG reads
``drift_detected``. Params: section ``monitor`` (:class:`MonitorParams`). Command: ``lmpipe monitor``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import time
from pathlib import Path
from typing import Any, Literal

from pipeline_tasks.artifacts import atomic_path, atomic_write_json, atomic_write_text, sha256_file, write_manifest
from pipeline_tasks.monitor.drift import CATEGORICAL_METHODS, EMBEDDING_METHODS, NUMERIC_METHODS, SIGNALS
from pipeline_tasks.errors import DataError
from pipeline_tasks.monitor.batches import evidently_report, filter_window, month_windows, read_news_path, write_over_time

logger = logging.getLogger(__name__)

STAGE = "monitor"


def _parse_date(value: str | None, key: str) -> dt.datetime | None:
    if value is None:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError as exc:
        raise ValueError(f"{key}: {value!r} is not an ISO date (YYYY-MM-DD)") from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)


@dataclasses.dataclass(frozen=True)
class SliceParams:
    """A set of news rows: exactly one of ``source`` / ``split`` / ``path``, then filters."""

    source: str | None = None  # an ingested news source: paths.raw_news_dir/<source>.parquet
    split: Literal["train", "val", "test"] | None = None  # paths.prepared_dir/<split>.parquet
    path: str | None = None  # a file or folder (relative to the project root)
    sources: tuple[str, ...] = ()  # keep rows whose `source` is listed (empty: all)
    kinds: tuple[str, ...] = ()  # keep rows whose `kind` is listed (empty: all)
    start: str | None = None  # keep date >= start (ISO); rows without a date are dropped
    end: str | None = None  # keep date < end
    max_rows: int | None = None  # seeded random cap after filtering

    def __post_init__(self):
        given = [k for k in ("source", "split", "path") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(f"give exactly one of source, split, path (got {given or 'none'})")
        for key in ("start", "end"):
            _parse_date(getattr(self, key), key)
        if self.max_rows is not None and self.max_rows < 1:
            raise ValueError(f"max_rows must be >= 1 or null, got {self.max_rows}")


@dataclasses.dataclass(frozen=True)
class WindowParams:
    start: str
    end: str

    def __post_init__(self):
        if _parse_date(self.start, "start") >= _parse_date(self.end, "end"):
            raise ValueError(f"window start {self.start} must be before end {self.end}")


@dataclasses.dataclass(frozen=True)
class TimelineParams:
    """Monthly windows ``[start, end)`` for drift over time (both null: off)."""

    start: str | None = None
    end: str | None = None
    step_months: int = 1

    def __post_init__(self):
        if (self.start is None) != (self.end is None):
            raise ValueError("timeline: give both start and end, or neither")
        if self.step_months < 1:
            raise ValueError(f"timeline.step_months must be >= 1, got {self.step_months}")
        if self.start and _parse_date(self.start, "start") >= _parse_date(self.end, "end"):
            raise ValueError(f"timeline start {self.start} must be before end {self.end}")


@dataclasses.dataclass(frozen=True)
class ThresholdParams:
    """Decision table: a signal fires when its value reaches its threshold (null: disabled)."""

    descriptors: float | None = 0.5  # share of descriptor columns whose test fires
    embedding: float | None = 0.015  # evidently embedding drift score (MMD² for mmd, ROC AUC for model)
    prediction: float | None = 0.15  # Jensen-Shannon distance of predicted-class shares
    label: float | None = 0.15  # Jensen-Shannon distance of label shares (labelled batches only)
    bpb: float | None = 0.05  # |relative change| of the LM's mean bits per byte


@dataclasses.dataclass(frozen=True)
class MonitorParams:
    """Section ``monitor`` of params.yaml."""

    reference: SliceParams = SliceParams(split="train", kinds=("news",))
    batch: SliceParams = SliceParams(source="huffpost_v3")
    window_start: str | None = None  # main window of the batch (ISO dates, end exclusive)
    window_end: str | None = None
    windows: tuple[WindowParams, ...] = ()  # extra windows for drift over time
    timeline: TimelineParams = TimelineParams()
    sample_rows: int = 1000  # batch rows per window that go through the model and the tests
    reference_rows: int = 1000  # reference rows that go through the model and the tests
    min_window_rows: int = 30  # smaller windows are reported as skipped
    oov_max_pieces: int = 2  # a word split into more BPE pieces counts as out of vocabulary
    descriptor_method: str = "ks"  # evidently stat test per descriptor column
    descriptor_threshold: float = 0.05  # its threshold (p-value for ks, distance for wasserstein)
    embedding_method: Literal["mmd", "model", "ratio", "distance"] = "mmd"
    embedding_pca_components: int | None = None
    category_method: str = "jensenshannon"  # predictions and labels
    thresholds: ThresholdParams = ThresholdParams()
    min_signals: int = 1
    variant: str = "fp32"  # classifier variant for embeddings and predictions
    batch_size: int = 64
    intra_op_threads: int = 0  # ORT threads (0: ORT default)
    html_report: bool = True
    report_tsne_rows: int = 500  # rows per side in the report's t-SNE picture of the embeddings (plot only)

    def __post_init__(self):
        for key in ("window_start", "window_end"):
            _parse_date(getattr(self, key), key)
        if min(self.sample_rows, self.reference_rows) < 20 or self.min_window_rows < 2:
            raise ValueError("sample_rows and reference_rows must be >= 20 and min_window_rows >= 2")
        if self.min_signals < 1:
            raise ValueError(f"min_signals must be >= 1, got {self.min_signals}")
        if self.descriptor_method not in NUMERIC_METHODS:
            raise ValueError(f"descriptor_method {self.descriptor_method!r}: expected one of {list(NUMERIC_METHODS)}")
        if self.category_method not in CATEGORICAL_METHODS:
            raise ValueError(f"category_method {self.category_method!r}: expected one of {list(CATEGORICAL_METHODS)}")
        if self.report_tsne_rows < 50:
            raise ValueError(f"report_tsne_rows must be >= 50, got {self.report_tsne_rows}")
        if self.embedding_method not in EMBEDDING_METHODS or self.oov_max_pieces < 1 or self.batch_size < 1:
            raise ValueError("embedding_method must be mmd|model|ratio|distance, oov_max_pieces and batch_size >= 1")


# ---------------------------------------------------------------------------------------------
# reading news rows


def slice_path(spec: SliceParams, paths) -> Path:
    if spec.source:
        return Path(paths.raw_news_dir) / f"{spec.source}.parquet"
    if spec.split:
        return Path(paths.prepared_dir) / f"{spec.split}.parquet"
    return Path(spec.path)


def load_slice(spec: SliceParams, paths, seed: int):
    """The rows of ``spec`` after its filters, with a clean RangeIndex."""
    root = slice_path(spec, paths)
    if not root.exists():
        hint = "run `lmpipe ingest_news`" if spec.source else "run `lmpipe prepare`" if spec.split else "check the path"
        raise DataError(f"{root}: not found ({hint}; set in params.yaml monitor.reference / monitor.batch)")
    frame = read_news_path(root)
    frame = frame[frame["text"].fillna("").str.strip() != ""]
    if spec.sources:
        frame = frame[frame["source"].isin(spec.sources)]
    if spec.kinds:
        frame = frame[frame["kind"].isin(spec.kinds)]
    frame = filter_window(frame, _parse_date(spec.start, "start"), _parse_date(spec.end, "end"))
    if spec.max_rows is not None and len(frame) > spec.max_rows:
        frame = frame.sample(spec.max_rows, random_state=seed).sort_index()
    return frame.reset_index(drop=True)


def batch_windows(params: MonitorParams) -> list[tuple[str, dt.datetime | None, dt.datetime | None]]:
    """(name, start, end) of the main window first, then the drift-over-time windows."""
    main = ("main", _parse_date(params.window_start, "window_start"), _parse_date(params.window_end, "window_end"))
    extra = [(f"{w.start}..{w.end}", _parse_date(w.start, "start"), _parse_date(w.end, "end")) for w in params.windows]
    if params.timeline.start:
        extra += [(f"{a.date()}..{b.date()}", a, b) for a, b in month_windows(
            _parse_date(params.timeline.start, "start"), _parse_date(params.timeline.end, "end"),
            params.timeline.step_months)]
    return [main, *extra]


def sample_indices(n: int, size: int, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=size, replace=False)) if n > size else np.arange(n)


# ---------------------------------------------------------------------------------------------
# the stage


def threshold_table(params: MonitorParams) -> dict[str, float | None]:
    return dataclasses.asdict(params.thresholds)


def _labels(frame) -> list | None:
    if "label" not in frame or not frame["label"].notna().any():
        return None
    return [v if isinstance(v, str) and v else None for v in frame["label"].tolist()]


def evaluate_window(bundle, reference, frame, params: MonitorParams, seed: int, timings: dict) -> dict[str, Any]:
    """Featurize one window of the batch and decide; ``reference`` is the reference's Features."""
    from pipeline_tasks.monitor.monitor import drift

    texts = frame["text"].tolist()
    sample = sample_indices(len(texts), params.sample_rows, seed)
    current = drift.featurize(bundle, texts, _labels(frame), sample, oov_max_pieces=params.oov_max_pieces,
                              variant=params.variant, batch_size=params.batch_size, timings=timings)
    started = time.perf_counter()
    values, details = drift.compare(reference, current, params)
    timings["evidently_s"] = timings.get("evidently_s", 0.0) + time.perf_counter() - started
    decision = drift.decide_drift(values, threshold_table(params), params.min_signals)
    return {"features": current, "values": values, "details": details, "decision": decision}


def _window_row(name: str, start, end, rows: int, result: dict | None) -> dict[str, Any]:
    row: dict[str, Any] = {"window": name, "start": start.date().isoformat() if start else "",
                           "end": end.date().isoformat() if end else "", "rows": rows}
    if result is None:  # too few rows: reported, not evaluated
        return {**row, "sampled": 0, "drift_detected": "", "fired": "", **{s: "" for s in SIGNALS}}
    decision = result["decision"]
    return {**row, "sampled": len(result["features"].sample), "drift_detected": decision.drift_detected,
            "fired": len(decision.fired),
            **{s: ("" if result["values"].get(s) is None else round(float(result["values"][s]), 6)) for s in SIGNALS}}


def reference_statistics(features, frame, spec: SliceParams) -> dict[str, Any]:
    import numpy as np

    from pipeline_tasks.monitor.monitor import drift

    return {
        "spec": dataclasses.asdict(spec),
        "rows": int(len(frame)),
        "sampled": int(len(features.sample)),
        "date_range": [str(frame["date"].min()), str(frame["date"].max())] if frame["date"].notna().any() else None,
        "descriptors": drift.describe(features.descriptors),
        "bpb": drift.describe({"bpb": features.bpb})["bpb"],
        "prediction": drift.distribution(features.predictions),
        "label": drift.distribution(features.labels) if features.labels is not None else None,
        "embedding": {"dim": int(features.embeddings.shape[1]),
                      "mean_norm": float(np.linalg.norm(features.embeddings, axis=1).mean())},
    }


def run(params, **_options) -> dict[str, Any]:
    from tqdm import tqdm

    from pipeline_tasks.monitor.monitor import drift
    from pipeline_tasks.ship.bundle import load_bundle

    p: MonitorParams = params.monitor
    paths, seed = params.paths, int(params.seed)
    out_dir = Path(paths.monitor_dir)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    bundle = load_bundle(paths.bundle_dir, intra_op_threads=p.intra_op_threads)
    batch = load_slice(p.batch, paths, seed)
    reference = load_slice(p.reference, paths, seed)
    main_rows = filter_window(batch, _parse_date(p.window_start, "window_start"), _parse_date(p.window_end, "window_end"))
    if len(main_rows) < p.min_window_rows:
        raise DataError(f"batch {slice_path(p.batch, paths)} window [{p.window_start}, {p.window_end}) has "
                        f"{len(main_rows)} rows (need >= {p.min_window_rows}); check monitor.batch / window_start / "
                        "window_end")
    if main_rows["id"].notna().any() and reference["id"].notna().any():
        overlap = reference["id"].isin(set(main_rows["id"].dropna()))
        if overlap.any():
            logger.info("reference: dropped %d rows that are also in the main batch window", int(overlap.sum()))
            reference = reference[~overlap].reset_index(drop=True)
    if len(reference) < p.min_window_rows:
        raise DataError(f"reference {slice_path(p.reference, paths)} has {len(reference)} rows after filters "
                        f"(need >= {p.min_window_rows}); widen monitor.reference")
    logger.info("reference: %d rows, batch: %d rows; model on <= %d / %d sampled rows", len(reference), len(batch),
                p.reference_rows, p.sample_rows)
    ref_features = drift.featurize(bundle, reference["text"].tolist(), _labels(reference),
                                   sample_indices(len(reference), p.reference_rows, seed),
                                   oov_max_pieces=p.oov_max_pieces, variant=p.variant, batch_size=p.batch_size,
                                   timings=timings)
    rows, main = [], None
    for index, (name, start, end) in enumerate(tqdm(batch_windows(p), desc="monitor windows", disable=None)):
        frame = filter_window(batch, start, end).reset_index(drop=True)
        if len(frame) < p.min_window_rows:  # the main window was checked above
            logger.warning("window %s: %d rows < min_window_rows %d, skipped", name, len(frame), p.min_window_rows)
            rows.append(_window_row(name, start, end, len(frame), None))
            continue
        result = evaluate_window(bundle, ref_features, frame, p, seed + index, timings)
        logger.info("window %s (%d rows): %s", name, len(frame), result["decision"].summary())
        rows.append(_window_row(name, start, end, len(frame), result))
        if name == "main":
            main = {**result, "rows": len(frame), "start": start, "end": end}

    out_dir.mkdir(parents=True, exist_ok=True)
    report_scores = None
    if p.html_report:
        report_started = time.perf_counter()
        snapshot, report_scores = evidently_report(ref_features, main["features"], p)
        with atomic_path(out_dir / "drift_report.html") as tmp:
            snapshot.save_html(str(tmp))
        timings["html_report_s"] = time.perf_counter() - report_started
    else:
        atomic_write_text(out_dir / "drift_report.html", "<html><body>monitor.html_report is false</body></html>\n")
    decision = main["decision"]
    timings["total_s"] = time.perf_counter() - started
    summary = {
        **decision.to_dict(),
        "values": main["values"],
        "details": main["details"],
        "batch": {"spec": dataclasses.asdict(p.batch), "rows": main["rows"], "sampled": len(main["features"].sample),
                  "window": [main["start"].isoformat() if main["start"] else None,
                             main["end"].isoformat() if main["end"] else None],
                  "descriptors": drift.describe(main["features"].descriptors)},
        "reference": {"rows": int(len(reference)), "sampled": int(len(ref_features.sample))},
        "evidently_report": report_scores,
        "windows": rows,
        "bundle_manifest_sha256": sha256_file(Path(paths.bundle_dir) / "manifest.json"),
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }
    atomic_write_json(out_dir / "drift_summary.json", summary)
    atomic_write_json(out_dir / "reference_stats.json", reference_statistics(ref_features, reference, p.reference))
    write_over_time(rows, out_dir / "drift_over_time.csv", out_dir / "drift_over_time.png", threshold_table(p))
    write_manifest(out_dir, STAGE, p, inputs={"bundle_manifest": summary["bundle_manifest_sha256"]},
                   extra={"drift_detected": decision.drift_detected})
    logger.info("monitor: %s (report %s)", decision.summary(), out_dir / "drift_report.html")
    return {"drift_detected": decision.drift_detected, "fired": decision.fired, "rows": main["rows"],
            "windows": len(rows), "summary": str(out_dir / "drift_summary.json")}
