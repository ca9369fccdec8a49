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
  folder of ``.parquet`` / ``.jsonl`` / ``.json`` / ``.csv`` / ``.txt``; records carry ``text`` or
  a title and a body (``title``/``body`` as ingest names them, or ``description``), optional
  ``date`` (ISO, or ``date_format``), ``label``, ``id``; in a folder, files that are not news are
  skipped and logged, and a folder that is mostly such files is refused). The main
  window is ``window_start`` <= date < ``window_end``; ``windows`` (explicit) or ``timeline``
  (monthly steps) add windows for drift over time;
* the exported bundle (``paths.bundle_dir``): tokenizer, classifier (embeddings = pooled hidden
  state, predictions) and language model, run with ONNX Runtime only (no torch).

Per window, :func:`pipeline_tasks.monitor.drift.featurize` computes the text descriptors of every text
and runs the model on a seeded sample of ``sample_rows`` texts (``reference_rows`` for the
reference); :func:`pipeline_tasks.monitor.drift.compare` tests them with evidently; the decision table
:func:`pipeline_tasks.monitor.drift.decide_drift` flags drift when ``min_signals`` signals reach their
thresholds: the configured ``thresholds``, raised on small windows to the permutation null of each
signal at the window's size (:mod:`pipeline_tasks.monitor.permutation`). Statistical tests run on
fixed-size samples on purpose: a p-value test on 100,000 rows flags differences nobody cares
about, and a fixed size keeps the false-alarm rate the same for every batch size. Descriptor
statistics in the summary cover every row.

Outputs (``paths.monitor_dir``, all six built in a temporary folder and swapped in together, so a
crash never pairs a new summary with an old reference; other files in the folder are kept):

* ``drift_report.html`` — evidently report of the main window (descriptor, bpb, prediction,
  label and embedding drift);
* ``drift_summary.json`` — ``drift_detected``, every signal with value / threshold / fired, the
  details (per-column scores, distributions, bits per byte), row counts and timings; DVC metrics;
* ``drift_over_time.csv`` + ``drift_over_time.png`` — one row per window (DVC plots);
* ``reference_stats.json`` — descriptor / prediction / label / bits-per-byte statistics of the
  reference (logged with the model by ``register``); ``manifest.json``.

Reading batches and writing the reports live in :mod:`pipeline_tasks.monitor.batches`, the
statistics and the decision table in :mod:`pipeline_tasks.monitor.drift`. Drift is a signal, not a
failure: the stage exits 0 either way and the drift DAG reads ``drift_detected``. Params: section
``monitor`` (:class:`pipeline_tasks.monitor.params.MonitorParams`). Command: ``lmpipe monitor``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline_tasks.artifacts import (
    MANIFEST_NAME,
    atomic_dir,
    atomic_write_json,
    atomic_write_text,
    sha256_file,
    write_manifest,
)
from pipeline_tasks.errors import DataError
from pipeline_tasks.monitor import drift
from pipeline_tasks.monitor.batches import (
    evidently_report,
    filter_window,
    month_windows,
    read_news_path,
    write_over_time,
)
from pipeline_tasks.monitor.params import MonitorParams, SliceParams, parse_iso_date
from pipeline_tasks.monitor.permutation import null_thresholds
from pipeline_tasks.ship.bundle import load_bundle

logger = logging.getLogger(__name__)

STAGE = "monitor"
REPORT_NAME = "drift_report.html"
SUMMARY_NAME = "drift_summary.json"
REFERENCE_STATS_NAME = "reference_stats.json"
OVER_TIME_CSV = "drift_over_time.csv"
OVER_TIME_PNG = "drift_over_time.png"
OUTPUT_NAMES = (REPORT_NAME, SUMMARY_NAME, REFERENCE_STATS_NAME, OVER_TIME_CSV, OVER_TIME_PNG, MANIFEST_NAME)


# ---------------------------------------------------------------------------------------------
# reading news rows


def slice_path(spec: SliceParams, paths) -> Path:
    if spec.source:
        return Path(paths.raw_news_dir) / f"{spec.source}.parquet"
    if spec.split:
        return Path(paths.prepared_dir) / f"{spec.split}.parquet"
    return Path(spec.path)


def load_slice(spec: SliceParams, paths, seed: int):
    """``(rows, report)``: the rows of ``spec`` after its filters (clean RangeIndex), and what was read.

    ``report``: files read and skipped, the date counts of the rows read (``missing``,
    ``unparseable``, ``ambiguous``; :func:`pipeline_tasks.monitor.batches.parse_dates`), and
    ``rows`` / ``undated_rows`` after the source and kind filters, before any date filter.
    """
    root = slice_path(spec, paths)
    if not root.exists():
        hint = "run `lmpipe ingest_news`" if spec.source else "run `lmpipe prepare`" if spec.split else "check the path"
        raise DataError(f"{root}: not found ({hint}; set in params.yaml monitor.reference / monitor.batch)")
    frame, report = read_news_path(root, spec.date_format)
    report["rows_read"] = int(len(frame))
    frame = frame[frame["text"].fillna("").str.strip() != ""]
    if spec.sources:
        frame = frame[frame["source"].isin(spec.sources)]
    if spec.kinds:
        frame = frame[frame["kind"].isin(spec.kinds)]
    # after the source / kind filters: rows of other feeds (wiki articles have no date) do not count
    report["rows"], report["undated_rows"] = int(len(frame)), int(frame["date"].isna().sum())
    frame = filter_window(frame, parse_iso_date(spec.start, "start"), parse_iso_date(spec.end, "end"))
    if spec.max_rows is not None and len(frame) > spec.max_rows:
        frame = frame.sample(spec.max_rows, random_state=seed).sort_index()
    return frame.reset_index(drop=True), report


def report_dates(name: str, report: dict, windowed: bool) -> None:
    """Log what date parsing did to a slice: rows a date window cannot hold, day/month guesses."""
    dates = report["dates"]
    if windowed and report["undated_rows"]:
        examples = ", ".join(repr(e) for e in dates.get("unparseable_examples", []))
        logger.warning(
            "%s: %d of %d rows have no usable date (of all rows read: %d without one, %d unparseable%s); "
            "they fall in no date window",
            name,
            report["undated_rows"],
            report["rows"],
            dates.get("missing", 0),
            dates.get("unparseable", 0),
            f", e.g. {examples}" if examples else "",
        )
    if dates.get("ambiguous"):
        logger.warning(
            "%s: %d dates such as %r could be day or month first and were read month first; "
            "set monitor.%s.date_format (e.g. '%%d/%%m/%%Y') if the day comes first",
            name,
            dates["ambiguous"],
            dates["ambiguous_examples"][0],
            name,
        )


def load_inputs(p: MonitorParams, paths, seed: int):
    """``(batch, reference, reports)``, both large enough; reference rows in the main window are dropped."""
    batch, batch_report = load_slice(p.batch, paths, seed)
    reference, reference_report = load_slice(p.reference, paths, seed)
    batch_windowed = any((p.window_start, p.window_end, p.windows, p.timeline.start, p.batch.start, p.batch.end))
    report_dates("batch", batch_report, batch_windowed)
    report_dates("reference", reference_report, bool(p.reference.start or p.reference.end))
    main_rows = filter_window(
        batch, parse_iso_date(p.window_start, "window_start"), parse_iso_date(p.window_end, "window_end")
    )
    if len(main_rows) < p.min_window_rows:
        undated = batch_report["undated_rows"]
        raise DataError(
            f"batch {slice_path(p.batch, paths)} window [{p.window_start}, {p.window_end}) has "
            f"{len(main_rows)} rows (need >= {p.min_window_rows}"
            + (f"; {undated} of {batch_report['rows']} rows have no usable date" if undated else "")
            + "); check monitor.batch / window_start / window_end / batch.date_format"
        )
    if main_rows["id"].notna().any() and reference["id"].notna().any():
        overlap = reference["id"].isin(set(main_rows["id"].dropna()))
        if overlap.any():
            logger.info("reference: dropped %d rows that are also in the main batch window", int(overlap.sum()))
            reference = reference[~overlap].reset_index(drop=True)
    if len(reference) < p.min_window_rows:
        raise DataError(
            f"reference {slice_path(p.reference, paths)} has {len(reference)} rows after filters "
            f"(need >= {p.min_window_rows}); widen monitor.reference"
        )
    return batch, reference, {"batch": batch_report, "reference": reference_report}


def batch_windows(params: MonitorParams) -> list[tuple[str, dt.datetime | None, dt.datetime | None]]:
    """(name, start, end) of the main window first, then the drift-over-time windows."""
    main = (
        "main",
        parse_iso_date(params.window_start, "window_start"),
        parse_iso_date(params.window_end, "window_end"),
    )
    extra = [
        (f"{w.start}..{w.end}", parse_iso_date(w.start, "start"), parse_iso_date(w.end, "end")) for w in params.windows
    ]
    if params.timeline.start:
        extra += [
            (f"{a.date()}..{b.date()}", a, b)
            for a, b in month_windows(
                parse_iso_date(params.timeline.start, "start"),
                parse_iso_date(params.timeline.end, "end"),
                params.timeline.step_months,
            )
        ]
    return [main, *extra]


def sample_indices(n: int, size: int, seed: int):
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
    texts = frame["text"].tolist()
    sample = sample_indices(len(texts), params.sample_rows, seed)
    current = drift.featurize(
        bundle,
        texts,
        _labels(frame),
        sample,
        oov_max_pieces=params.oov_max_pieces,
        variant=params.variant,
        batch_size=params.batch_size,
        timings=timings,
    )
    started = time.perf_counter()
    values, details = drift.compare(reference, current, params)
    timings["evidently_s"] = timings.get("evidently_s", 0.0) + time.perf_counter() - started
    started = time.perf_counter()
    thresholds, details["null"] = null_thresholds(reference, current, params, seed)
    timings["null_s"] = timings.get("null_s", 0.0) + time.perf_counter() - started
    decision = drift.decide_drift(values, thresholds, params.min_signals)
    return {"features": current, "values": values, "details": details, "decision": decision, "thresholds": thresholds}


def _window_row(name: str, start, end, rows: int, result: dict | None) -> dict[str, Any]:
    row: dict[str, Any] = {
        "window": name,
        "start": start.date().isoformat() if start else "",
        "end": end.date().isoformat() if end else "",
        "rows": rows,
    }
    if result is None:  # too few rows: reported, not evaluated
        return {**row, "sampled": 0, "drift_detected": "", "fired": "", **{s: "" for s in drift.SIGNALS}}
    decision = result["decision"]
    return {
        **row,
        "sampled": len(result["features"].sample),
        "thresholds": result["thresholds"],
        "drift_detected": decision.drift_detected,
        "fired": len(decision.fired),
        **{s: ("" if result["values"].get(s) is None else round(float(result["values"][s]), 6)) for s in drift.SIGNALS},
    }


def evaluate_windows(
    bundle, reference, batch, params: MonitorParams, seed: int, timings: dict
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One drift-over-time row per window, and the main window's result (with its rows and bounds)."""
    rows, main = [], None
    for index, (name, start, end) in enumerate(tqdm(batch_windows(params), desc="monitor windows", disable=None)):
        frame = filter_window(batch, start, end).reset_index(drop=True)
        if len(frame) < params.min_window_rows:  # the main window was checked by load_inputs
            logger.warning("window %s: %d rows < min_window_rows %d, skipped", name, len(frame), params.min_window_rows)
            rows.append(_window_row(name, start, end, len(frame), None))
            continue
        result = evaluate_window(bundle, reference, frame, params, seed + index, timings)
        logger.info("window %s (%d rows): %s", name, len(frame), result["decision"].summary())
        rows.append(_window_row(name, start, end, len(frame), result))
        if name == "main":
            main = {**result, "rows": len(frame), "start": start, "end": end}
    return rows, main


def reference_statistics(features, frame, spec: SliceParams) -> dict[str, Any]:
    return {
        "spec": dataclasses.asdict(spec),
        "rows": int(len(frame)),
        "sampled": int(len(features.sample)),
        "date_range": [str(frame["date"].min()), str(frame["date"].max())] if frame["date"].notna().any() else None,
        "descriptors": drift.describe(features.descriptors),
        "bpb": drift.describe({"bpb": features.bpb})["bpb"],
        "prediction": drift.distribution(features.predictions),
        "label": drift.distribution(features.labels) if features.labels is not None else None,
        "embedding": {
            "dim": int(features.embeddings.shape[1]),
            "mean_norm": float(np.linalg.norm(features.embeddings, axis=1).mean()),
        },
    }


def write_report(path: Path, reference, current, params: MonitorParams, thresholds: dict, timings: dict) -> dict | None:
    """The evidently HTML report of the main window (a placeholder when it is off); its scores.

    ``thresholds`` are the main window's (after the permutation null), so that the report's test
    verdicts agree with the decision."""
    if not params.html_report:
        atomic_write_text(path, "<html><body>monitor.html_report is false</body></html>\n")
        return None
    started = time.perf_counter()
    snapshot, scores = evidently_report(reference, current, params, thresholds)
    snapshot.save_html(str(path))
    timings["html_report_s"] = time.perf_counter() - started
    return scores


def drift_summary(
    main: dict,
    rows: list[dict],
    params: MonitorParams,
    reference,
    ref_features,
    report_scores: dict | None,
    read_reports: dict,
    bundle_sha: str,
    timings: dict,
) -> dict[str, Any]:
    """``drift_summary.json``: the main window's decision, values and details, every window, timings."""
    return {
        **main["decision"].to_dict(),
        "values": main["values"],
        "details": main["details"],
        "batch": {
            "spec": dataclasses.asdict(params.batch),
            "rows": main["rows"],
            "sampled": len(main["features"].sample),
            "window": [
                main["start"].isoformat() if main["start"] else None,
                main["end"].isoformat() if main["end"] else None,
            ],
            "descriptors": drift.describe(main["features"].descriptors),
            "read": read_reports["batch"],
        },
        "reference": {
            "rows": int(len(reference)),
            "sampled": int(len(ref_features.sample)),
            "read": read_reports["reference"],
        },
        "evidently_report": report_scores,
        "windows": rows,
        "bundle_manifest_sha256": bundle_sha,
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }


def _unowned_entries(out_dir: Path) -> list[str]:
    """Entries of ``out_dir`` that monitor does not write: dvc.yaml declares the six files, not the
    folder, so ``paths.monitor_dir`` may be shared and the swap must carry the rest over."""
    return sorted(p.name for p in out_dir.iterdir() if p.name not in OUTPUT_NAMES) if out_dir.is_dir() else []


def run(params, **_options) -> dict[str, Any]:
    p: MonitorParams = params.monitor
    paths, seed = params.paths, int(params.seed)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    bundle = load_bundle(paths.bundle_dir, intra_op_threads=p.intra_op_threads)
    batch, reference, read_reports = load_inputs(p, paths, seed)
    logger.info(
        "reference: %d rows, batch: %d rows; model on <= %d / %d sampled rows",
        len(reference),
        len(batch),
        p.reference_rows,
        p.sample_rows,
    )
    ref_features = drift.featurize(
        bundle,
        reference["text"].tolist(),
        _labels(reference),
        sample_indices(len(reference), p.reference_rows, seed),
        oov_max_pieces=p.oov_max_pieces,
        variant=p.variant,
        batch_size=p.batch_size,
        timings=timings,
    )
    rows, main = evaluate_windows(bundle, ref_features, batch, p, seed, timings)
    decision = main["decision"]
    bundle_sha = sha256_file(Path(paths.bundle_dir) / "manifest.json")
    out_dir = Path(paths.monitor_dir)
    with atomic_dir(out_dir, keep=_unowned_entries(out_dir)) as out:
        report_scores = write_report(out / REPORT_NAME, ref_features, main["features"], p, main["thresholds"], timings)
        timings["total_s"] = time.perf_counter() - started
        atomic_write_json(
            out / SUMMARY_NAME,
            drift_summary(main, rows, p, reference, ref_features, report_scores, read_reports, bundle_sha, timings),
        )
        atomic_write_json(out / REFERENCE_STATS_NAME, reference_statistics(ref_features, reference, p.reference))
        write_over_time(rows, out / OVER_TIME_CSV, out / OVER_TIME_PNG, threshold_table(p))
        write_manifest(
            out, STAGE, p, inputs={"bundle_manifest": bundle_sha}, extra={"drift_detected": decision.drift_detected}
        )
    logger.info("monitor: %s (report %s)", decision.summary(), out_dir / REPORT_NAME)
    return {
        "drift_detected": decision.drift_detected,
        "fired": decision.fired,
        "rows": main["rows"],
        "windows": len(rows),
        "summary": str(out_dir / SUMMARY_NAME),
    }
