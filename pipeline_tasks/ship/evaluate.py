"""Stage ``evaluate``: score every bundle variant, time it, apply the gates, write the model card.

Inputs: ``bundle_dir`` (verified), ``prepared_dir/test.parquet``, ``tokens_dir/{val.bin,meta.json}``
(LM bits per byte from the exported LM), ``compress_dir/model.pt`` (the PyTorch reference score of
the shipped model) and, for a student of ``compress``, ``compress_dir/teacher_int8.onnx``,
``export_reports_dir/parity.json`` and the data statistics for the card; the production model's
metrics from ``paths.champion_metrics_path`` when that file exists (champion/challenger).

Outputs (``evaluate_dir``, written atomically with a manifest):

* ``metrics.json`` (DVC metrics) — the serving variant's ``accuracy``, ``macro_f1`` (+ bootstrap
  ``*_ci_low/high``), ``int8_accuracy_drop``, ``latency_p50_ms`` / ``latency_p95_ms`` (batch 1),
  ``throughput_rows_per_s`` (batch 32), ``size_mb``, ``lm_val_bpb`` at the top level (the gate
  inputs; the production metrics file has the same layout), then ``variants`` (every ONNX
  variant and ``torch``), ``per_class``, ``slices`` (per source, per month/year of ``date``),
  ``cuda`` (when a GPU is present); ``baseline_accuracy`` and ``gain_over_baseline`` (served
  accuracy minus the n-gram baseline's, with a paired bootstrap ``*_ci_low/high``) at the top
  level and the baseline's own scores, selection and cost in ``baseline``
  (:mod:`pipeline_tasks.ship.baseline`, trained here on finetune's rows); ``compressed`` and, for
  a student, ``student_accuracy_drop`` and ``student_speedup`` (teacher vs served student, same
  rows, timed side by side) with the teacher's numbers in ``student``;
* ``gates.json`` — every gate (value, threshold, passed, why) and the overall verdict;
* ``plots/`` — ``confusion.csv``, ``per_class.csv``, ``latency.csv``, ``slices.csv`` (DVC plots)
  and PNGs;
* ``model_card.md`` and ``model_card.html``.

A failed gate is a recorded decision: the stage exits 0 with ``passed: false`` and logs a
``GATES FAILED: ...`` banner; ``register`` refuses such a model.

Params: section ``evaluate`` (:class:`~pipeline_tasks.ship.params.EvaluateParams`, thresholds in
``evaluate.gates``).
Command: ``lmpipe evaluate`` (``dvc repro evaluate``).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import logging
import math
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from pipeline_tasks.artifacts import (
    atomic_dir,
    atomic_write_json,
    atomic_write_text,
    git_sha,
    read_json,
    sha256_file,
    write_manifest,
)
from pipeline_tasks.config import to_plain
from pipeline_tasks.dataset.prepared import read_labelled_split
from pipeline_tasks.dataset.shards import load_meta, open_shard
from pipeline_tasks.errors import DataError
from pipeline_tasks.metrics import (
    accuracy,
    bootstrap_ci,
    classification_report,
    confusion_matrix,
    macro_f1,
    paired_bootstrap_diff,
)
from pipeline_tasks.ship.baseline import predict_baseline, train_baseline
from pipeline_tasks.ship.bundle import length_order, load_bundle, make_session
from pipeline_tasks.ship.gates import decide
from pipeline_tasks.ship.model_card import build_card, render_html, render_markdown
from pipeline_tasks.ship.onnx_tools import latency_stats, paired_latency, throughput
from pipeline_tasks.ship.params import EvaluateParams
from pipeline_tasks.train.model import load_classifier

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# scoring


def score(y, pred, labels, evaluate_params: EvaluateParams, seed: int) -> dict[str, Any]:
    """Accuracy and macro-F1 with seeded bootstrap intervals, plus per-class numbers."""
    report = classification_report(y, pred, labels)
    out = {"n": report["n"], "accuracy": report["accuracy"], "macro_f1": report["macro_f1"]}
    for key, fn in (("accuracy", accuracy), ("macro_f1", lambda t, p: macro_f1(t, p, len(labels)))):
        out[f"{key}_ci_low"], out[f"{key}_ci_high"] = bootstrap_ci(
            y, pred, fn, evaluate_params.bootstrap_resamples, evaluate_params.confidence, seed
        )
    out["per_class"] = report["per_class"]
    return out


def time_window_key(dates, mode: str):
    """Series of ``YYYY-MM`` or ``YYYY`` strings (None where the date is missing)."""
    dates = pd.to_datetime(dates, utc=True, errors="coerce")
    if mode == "auto":
        valid = dates.dropna()
        span = (
            (valid.max().year * 12 + valid.max().month) - (valid.min().year * 12 + valid.min().month)
            if len(valid)
            else 0
        )
        mode = "month" if span <= 36 else "year"
    fmt = "%Y-%m" if mode == "month" else "%Y"
    return dates.dt.strftime(fmt).where(dates.notna(), None), mode


def slice_scores(frame, pred, labels, evaluate_params: EvaluateParams, seed: int) -> dict[str, dict[str, Any]]:
    """Per-source and per-time-window scores of one variant's predictions."""
    y = frame["label_idx"].to_numpy()
    keys = {"source": frame["source"] if "source" in frame else None}
    if "date" in frame and frame["date"].notna().any():
        window, mode = time_window_key(frame["date"], evaluate_params.time_window)
        keys[mode] = window
    slices: dict[str, dict[str, Any]] = {}
    for kind, column in keys.items():
        if column is None:
            continue
        out = {}
        for name in sorted(column.dropna().unique()):
            idx = np.flatnonzero((column == name).to_numpy())
            entry: dict[str, Any] = {"n": int(idx.size)}
            if idx.size >= evaluate_params.slice_min_rows:
                entry["accuracy"] = accuracy(y[idx], pred[idx])
                entry["macro_f1"] = macro_f1(y[idx], pred[idx], len(labels))
                entry["accuracy_ci_low"], entry["accuracy_ci_high"] = bootstrap_ci(
                    y[idx], pred[idx], accuracy, evaluate_params.bootstrap_resamples, evaluate_params.confidence, seed
                )
            out[str(name)] = entry
        slices[kind] = out
    return slices


LATENCY_TEXTS = 64  # real test texts the batch-1 latency runs cycle through


def encoded_feed(bundle, batch) -> dict[str, Any]:
    """ONNX Runtime inputs of ``batch`` (texts) in the bundle's encoding."""
    ids, mask = bundle.encode(batch)
    return {"input_ids": ids, "attention_mask": mask}


def time_variant(bundle, variant: str, texts, evaluate_params: EvaluateParams, device: str = "cpu") -> dict[str, float]:
    """Batch-1 latency (p50/p95) and batch-``throughput_batch`` rows/s of one variant on real texts."""
    session = make_session(bundle.variant_path(variant), device, evaluate_params.intra_op_threads)

    def run(feed):
        return session.run(["logits"], feed)

    singles = [encoded_feed(bundle, [t]) for t in texts[:LATENCY_TEXTS]]
    lat = latency_stats(run, singles, evaluate_params.latency_warmup, evaluate_params.latency_runs)
    bs = evaluate_params.throughput_batch
    batches = [encoded_feed(bundle, texts[i : i + bs]) for i in range(0, min(len(texts), 8 * bs), bs)]
    rows = [b["input_ids"].shape[0] for b in batches]
    return {
        "latency_p50_ms": lat["p50_ms"],
        "latency_p95_ms": lat["p95_ms"],
        "latency_mean_ms": lat["mean_ms"],
        "throughput_rows_per_s": throughput(run, batches, rows, 2, evaluate_params.throughput_runs),
        "providers": ",".join(session.get_providers()),
    }


def score_variants(bundle, texts, y, labels, evaluate_params: EvaluateParams, seed: int):
    """``(variants, predictions, scores)`` of every bundle variant the CPU execution provider can run."""
    variants: dict[str, dict[str, Any]] = {}
    preds: dict[str, np.ndarray] = {}
    scored: dict[str, dict[str, Any]] = {}
    for variant in bundle.variants:
        info = bundle.config["variants"][variant]
        if not info.get("cpu_runnable", True):
            variants[variant] = {"skipped": info.get("note", "not runnable on the CPU execution provider")}
            continue
        preds[variant] = bundle.logits(texts, variant, evaluate_params.batch_size).argmax(1)
        scores = scored[variant] = score(y, preds[variant], labels, evaluate_params, seed)
        timing = time_variant(bundle, variant, texts, evaluate_params)
        variants[variant] = {
            **{k: v for k, v in scores.items() if k != "per_class"},
            **timing,
            "size_mb": info["bytes"] / 1e6,
        }
        logger.info(
            "evaluate: %-12s accuracy %.4f macro-F1 %.4f p95 %.2f ms %.0f rows/s",
            variant,
            scores["accuracy"],
            scores["macro_f1"],
            timing["latency_p95_ms"],
            timing["throughput_rows_per_s"],
        )
    return variants, preds, scored


def predict_torch(finetune_pt: Path, bundle, texts, batch_size: int) -> np.ndarray:
    """Classes the PyTorch checkpoint predicts for the bundle's own encoding of ``texts``."""
    model, _ = load_classifier(finetune_pt)
    out = np.zeros(len(texts), dtype=np.int64)
    order = length_order(texts)  # batches of similar length: little padding to compute
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            idx = order[i : i + batch_size]
            ids, mask = bundle.encode([texts[j] for j in idx])
            out[idx] = model(torch.from_numpy(ids), torch.from_numpy(mask)).argmax(1).numpy()
    return out


def time_on_cuda(bundle, texts, serving: str, evaluate_params: EvaluateParams) -> dict[str, Any]:
    """CUDA timings of fp16, fp32 and the serving variant when asked for (or, on ``auto``, when a GPU is present)."""
    cuda: dict[str, Any] = {}
    if evaluate_params.cuda == "on" or (evaluate_params.cuda == "auto" and torch.cuda.is_available()):
        for variant in ("fp16", "fp32", serving):  # make_session raises if ORT fell back to CPU
            if variant in bundle.config["variants"] and variant not in cuda:
                cuda[variant] = time_variant(bundle, variant, texts, evaluate_params, device="cuda")
    return cuda


def lm_bits_per_byte(bundle, tokens_dir: Path, windows: int) -> float | None:
    """Bits per byte of the exported LM on ``val.bin`` windows (same definition as pretrain)."""
    if not windows or bundle.config.get("lm") is None:
        return None
    meta = load_meta(tokens_dir)
    data = open_shard(tokens_dir, "val", meta)
    block = int(bundle.config["lm"]["model_config"]["block_size"])
    if len(data) < block + 2:
        return None
    starts = np.linspace(0, len(data) - block - 2, windows).astype(np.int64)
    nll, count = 0.0, 0
    for start in starts:
        x = np.asarray(data[start : start + block], dtype=np.int64)[None]
        y = np.asarray(data[start + 1 : start + 1 + block], dtype=np.int64)
        logits = bundle.lm_logits(x)[0].astype(np.float64)  # (T, V)
        logz = logits.max(-1) + np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1))
        nll += float((logz - logits[np.arange(block), y]).sum())
        count += block
    split = meta["splits"]["val"]
    tokens_per_byte = split["tokens"] / max(split["bytes"], 1)
    return nll / count * tokens_per_byte / math.log(2)


def int8_accuracy_drop(variants: dict[str, dict[str, Any]], serving: str) -> float | None:
    """fp32 accuracy minus int8 accuracy (the serving variant if it is int8, else int8_dynamic)."""
    int8 = serving if serving.startswith("int8") else "int8_dynamic"
    if "accuracy" in variants.get(int8, {}) and "accuracy" in variants.get("fp32", {}):
        return variants["fp32"]["accuracy"] - variants[int8]["accuracy"]
    return None


def baseline_comparison(params, labels, texts, y, served_pred, evaluate_params: EvaluateParams) -> dict[str, Any]:
    """The baseline's scores on the test rows and the served model's gain over it (empty: no baseline)."""
    model, info = train_baseline(params, labels)
    if model is None:
        return {}
    pred, predict_seconds = predict_baseline(model, texts)
    scores = score(y, pred, labels, evaluate_params, params.seed)
    resamples, confidence = evaluate_params.bootstrap_resamples, evaluate_params.confidence
    gain, low, high = paired_bootstrap_diff(y, served_pred, pred, accuracy, resamples, confidence, params.seed)
    f1_gain, f1_low, f1_high = paired_bootstrap_diff(
        y, served_pred, pred, lambda t, p: macro_f1(t, p, len(labels)), resamples, confidence, params.seed
    )
    logger.info(
        "evaluate: baseline accuracy %.4f; served model %+.4f [%+.4f, %+.4f] over it",
        scores["accuracy"],
        gain,
        low,
        high,
    )
    return {
        "baseline_accuracy": scores["accuracy"],
        "gain_over_baseline": gain,
        "gain_over_baseline_ci_low": low,
        "gain_over_baseline_ci_high": high,
        "baseline": {
            **info,
            **{k: v for k, v in scores.items() if k != "per_class"},
            "gain_macro_f1": f1_gain,
            "gain_macro_f1_ci_low": f1_low,
            "gain_macro_f1_ci_high": f1_high,
            "predict_seconds": predict_seconds,
        },
    }


def student_comparison(
    params, bundle, texts, y, labels, served: dict[str, Any], serving: str, evaluate_params: EvaluateParams
) -> dict[str, Any]:
    """The served student against its teacher (compress): accuracy drop and side-by-side speed-up.

    The teacher is compress's int8 ONNX of the fine-tuned model, checked against the sha256 the
    student's checkpoint recorded: a stale teacher would make both gates meaningless.
    """
    compression = bundle.config.get("compression")
    if not compression or not compression.get("enabled"):
        return {"compressed": False}
    path = Path(params.paths.compress_dir) / compression["teacher_onnx"]
    if not path.is_file() or sha256_file(path) != compression.get("teacher_onnx_sha256"):
        raise DataError(
            f"{path}: the teacher of the served student is missing or is not the one compress measured "
            "(sha256 differs); re-run compress and export (dvc repro does)"
        )
    teacher = make_session(path, "cpu", 0)
    teacher_pred = bundle.logits(texts, batch_size=evaluate_params.batch_size, session=teacher).argmax(1)
    teacher_scores = score(y, teacher_pred, labels, evaluate_params, params.seed)
    timed = {
        name: make_session(p, "cpu", evaluate_params.intra_op_threads)
        for name, p in (("student", bundle.variant_path(serving)), ("teacher", path))
    }
    feeds = [encoded_feed(bundle, [text]) for text in texts[:LATENCY_TEXTS]]
    latency = paired_latency(
        {name: (lambda feed, s=s: s.run(["logits"], feed)) for name, s in timed.items()},
        feeds,
        evaluate_params.latency_warmup,
        evaluate_params.latency_runs,
    )
    speedup = latency["teacher"]["p50_ms"] / max(latency["student"]["p50_ms"], 1e-9)
    drop = teacher_scores["accuracy"] - served["accuracy"]
    logger.info(
        "evaluate: student accuracy %.4f vs teacher %.4f (drop %+.4f), %.2fx faster (p50 %.3f vs %.3f ms)",
        served["accuracy"],
        teacher_scores["accuracy"],
        drop,
        speedup,
        latency["student"]["p50_ms"],
        latency["teacher"]["p50_ms"],
    )
    return {
        "compressed": True,
        "student_accuracy_drop": drop,
        "student_speedup": speedup,
        "student": {
            "method": compression.get("method"),
            "teacher_accuracy": teacher_scores["accuracy"],
            "teacher_macro_f1": teacher_scores["macro_f1"],
            "teacher_latency_p50_ms": latency["teacher"]["p50_ms"],
            "teacher_latency_p95_ms": latency["teacher"]["p95_ms"],
            "student_latency_p50_ms": latency["student"]["p50_ms"],
            "student_latency_p95_ms": latency["student"]["p95_ms"],
            "teacher_size_mb": path.stat().st_size / 1e6,
            "teacher_params": compression.get("teacher_params"),
            "student_params": compression.get("student_params"),
            "agreement": float((teacher_pred == served["pred"]).mean()),
        },
    }


HEADLINE_SCORES = ("accuracy", "macro_f1", "accuracy_ci_low", "accuracy_ci_high", "macro_f1_ci_low", "macro_f1_ci_high")
HEADLINE_TIMINGS = ("latency_p50_ms", "latency_p95_ms", "throughput_rows_per_s", "size_mb")


def headline_metrics(
    serving: str, served: dict[str, Any], variants: dict[str, dict[str, Any]], n_test: int
) -> dict[str, Any]:
    """The serving variant's numbers that open ``metrics.json`` (the gate inputs)."""
    return {
        "serving_variant": serving,
        "n_test": n_test,
        **{k: served[k] for k in HEADLINE_SCORES},
        "int8_accuracy_drop": int8_accuracy_drop(variants, serving),
        **{k: variants[serving][k] for k in HEADLINE_TIMINGS},
    }


# ---------------------------------------------------------------------------------------------
# outputs


def _write_csv(path: Path, header, rows) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def write_plot_tables(plots_dir: Path, y, pred, labels, result: dict[str, Any]) -> None:
    """The CSV files ``dvc plots`` reads."""
    _write_csv(plots_dir / "confusion.csv", ["actual", "predicted"], [(labels[a], labels[b]) for a, b in zip(y, pred)])
    _write_csv(
        plots_dir / "per_class.csv",
        ["class", "precision", "recall", "f1", "support"],
        [
            (c, round(v["precision"], 6), round(v["recall"], 6), round(v["f1"], 6), v["support"])
            for c, v in result["per_class"].items()
        ],
    )
    timing_keys = ("latency_p50_ms", "latency_p95_ms", "throughput_rows_per_s", "size_mb", "accuracy")
    _write_csv(
        plots_dir / "latency.csv",
        ["variant", *timing_keys],
        [
            (v, *(round(m[k], 6) if m.get(k) is not None else "" for k in timing_keys))
            for v, m in result["variants"].items()
        ],
    )
    slice_keys = ("accuracy", "accuracy_ci_low", "accuracy_ci_high")
    _write_csv(
        plots_dir / "slices.csv",
        ["slice_type", "slice", "n", *slice_keys],
        [
            (kind, name, s["n"], *(s.get(k, "") for k in slice_keys))
            for kind, group in result["slices"].items()
            for name, s in group.items()
        ],
    )


def _save_figure(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_confusion(path: Path, y, pred, labels, serving: str) -> None:
    cm = confusion_matrix(y, pred, len(labels))
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.imshow(cm, cmap="Blues")
    ax.set(
        xticks=range(len(labels)),
        yticks=range(len(labels)),
        xticklabels=labels,
        yticklabels=labels,
        xlabel="predicted",
        ylabel="actual",
        title=f"confusion ({serving})",
    )
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
    _save_figure(fig, path)


def plot_per_class(path: Path, per_class: dict[str, dict[str, Any]]) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = list(per_class)
    for k, key in enumerate(("precision", "recall", "f1")):
        ax.bar([i + 0.27 * (k - 1) for i in range(len(names))], [per_class[n][key] for n in names], 0.27, label=key)
    ax.set(xticks=range(len(names)), xticklabels=names, ylim=(0, 1), title="per class")
    ax.legend()
    _save_figure(fig, path)


def plot_latency(path: Path, variants: dict[str, dict[str, Any]]) -> None:
    """p50 and p95 bars of every timed variant; no file when nothing was timed."""
    timed = [(v, m) for v, m in variants.items() if m.get("latency_p50_ms") is not None]
    if not timed:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.barh([v for v, _ in timed], [m["latency_p50_ms"] for _, m in timed], label="p50")
    ax.barh(
        [v for v, _ in timed],
        [m["latency_p95_ms"] - m["latency_p50_ms"] for _, m in timed],
        left=[m["latency_p50_ms"] for _, m in timed],
        label="p95",
        alpha=0.5,
    )
    ax.set(xlabel="ms per request (batch 1, CPU)", title="latency")
    ax.legend()
    _save_figure(fig, path)


def write_plots(plots_dir: Path, y, pred, labels, result: dict[str, Any]) -> None:
    """CSV for ``dvc plots`` and PNGs for people."""
    matplotlib.use("Agg")  # files only: task containers have no display
    write_plot_tables(plots_dir, y, pred, labels, result)
    plot_confusion(plots_dir / "confusion.png", y, pred, labels, result["serving_variant"])
    plot_per_class(plots_dir / "per_class.png", result["per_class"])
    plot_latency(plots_dir / "latency.png", result["variants"])


def read_champion(path: Path) -> dict[str, Any] | None:
    """The production model's metrics, or ``None`` when nothing is in production yet."""
    if not path.is_file():
        return None
    try:
        champion = read_json(path)
    except ValueError as exc:
        raise DataError(
            f"{path}: production metrics are not valid JSON ({exc}); fix or remove the file "
            "(the register stage rewrites it on promotion)"
        ) from exc
    if not isinstance(champion, dict):
        raise DataError(f"{path}: expected a JSON object of metrics, got {type(champion).__name__}")
    return champion


def _optional_json(path: Path) -> Any:
    try:
        return read_json(path) if path.is_file() else None
    except ValueError:
        logger.warning("%s is not valid JSON; left out of the model card", path)
        return None


def card_context(params, bundle, result, decision, created: str) -> dict[str, Any]:
    """Everything the model card shows that is not a metric: data sources, counts, training params."""
    paths = params.paths
    sources = []
    for section, kind in (("ingest_news", "news"), ("ingest_wiki", "wiki")):
        try:
            for src in to_plain(getattr(params, section)).get("sources", []):
                sources.append({"kind": kind, **src})
        except AttributeError:
            continue
    raw_stats: dict[str, Any] = {"sources": {}}
    for key in ("raw_news_dir", "raw_wiki_dir"):
        stats = _optional_json(Path(getattr(paths, key)) / "stats.json") or {}
        raw_stats["sources"].update(stats.get("sources", {}) if isinstance(stats, dict) else {})
    prepared = _optional_json(Path(getattr(paths, "prepare_reports_dir", paths.prepared_dir)) / "stats.json")
    prepared = prepared if isinstance(prepared, dict) else {}
    split_counts = {k: v.get("docs") if isinstance(v, dict) else v for k, v in (prepared.get("splits") or {}).items()}
    training = {}
    for section in ("model", "pretrain", "finetune"):
        try:
            training[section] = to_plain(getattr(params, section))
        except AttributeError:
            continue
    return {
        "metrics": result,
        "decision": decision.to_dict(),
        "bundle_config": bundle.config,
        "bundle_dir": str(paths.bundle_dir),
        "created_utc": created,
        "git_sha": git_sha(),
        "project": getattr(params, "project", "lm-pipeline"),
        "sources": sources,
        "raw_stats": raw_stats,
        "prepared_stats": prepared,
        "split_counts": {k: v for k, v in split_counts.items() if isinstance(v, (int, float))},
        "training": training,
        "confidence": params.evaluate.confidence,
        "bootstrap_resamples": params.evaluate.bootstrap_resamples,
    }


# ---------------------------------------------------------------------------------------------
# the stage


def write_outputs(
    out: Path,
    params,
    bundle,
    result: dict[str, Any],
    decision,
    champion_path: Path,
    champion: dict[str, Any] | None,
    y,
    pred,
) -> None:
    """metrics.json, gates.json, plots, the model card and the manifest into the (temporary) stage dir."""
    evaluate_params: EvaluateParams = params.evaluate
    serving, labels = result["serving_variant"], bundle.labels
    created = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    atomic_write_json(out / "metrics.json", result)
    atomic_write_json(
        out / "gates.json",
        {
            **decision.to_dict(),
            "created_utc": created,
            "serving_variant": serving,
            "champion_metrics_path": str(champion_path),
            "champion": champion,
        },
    )
    (out / "plots").mkdir()
    write_plots(out / "plots", y, pred, labels, result)
    blocks = build_card(card_context(params, bundle, result, decision, created))
    atomic_write_text(out / "model_card.md", render_markdown(blocks))
    atomic_write_text(out / "model_card.html", render_html(blocks, title="Model card"))
    write_manifest(
        out,
        "evaluate",
        evaluate_params,
        inputs={
            "bundle_manifest": bundle.manifest.get("params_sha256", ""),
            **{f"bundle/{k}": v for k, v in bundle.manifest["outputs"].items()},
        },
        extra={"gates_passed": decision.passed},
    )


def run(params, **_options) -> dict[str, Any]:
    evaluate_params: EvaluateParams = params.evaluate
    paths = params.paths
    # scoring sessions use every core; timing sessions (time_variant) pin evaluate_params.intra_op_threads
    bundle = load_bundle(paths.bundle_dir, intra_op_threads=0)
    labels, serving = bundle.labels, bundle.default_variant
    test = read_labelled_split(
        paths.prepared_dir,
        "test",
        labels=labels,
        kinds=("news",),
        max_rows=evaluate_params.max_test_rows,
        seed=params.seed,
    ).to_pandas()
    texts, y = test["text"].tolist(), test["label_idx"].to_numpy()
    logger.info("evaluate: %d test rows, variants %s, serving %s", len(texts), bundle.variants, serving)

    variants, preds, scored = score_variants(bundle, texts, y, labels, evaluate_params, params.seed)
    if evaluate_params.score_torch:
        preds["torch"] = predict_torch(Path(paths.compress_dir) / "model.pt", bundle, texts, evaluate_params.batch_size)
        variants["torch"] = {
            k: v for k, v in score(y, preds["torch"], labels, evaluate_params, params.seed).items() if k != "per_class"
        }
    if serving not in preds:
        raise DataError(f"serving variant {serving!r} could not be scored on CPU: {variants.get(serving)}")
    cuda = time_on_cuda(bundle, texts, serving, evaluate_params)

    result: dict[str, Any] = {
        **headline_metrics(serving, scored[serving], variants, len(texts)),
        "lm_val_bpb": lm_bits_per_byte(bundle, Path(paths.tokens_dir), evaluate_params.lm_windows),
        "variants": variants,
        "per_class": scored[serving]["per_class"],
        "slices": slice_scores(test, preds[serving], labels, evaluate_params, params.seed),
    }
    result.update(baseline_comparison(params, labels, texts, y, preds[serving], evaluate_params))
    served = {"accuracy": result["accuracy"], "pred": preds[serving]}
    result.update(student_comparison(params, bundle, texts, y, labels, served, serving, evaluate_params))
    if cuda:
        result["cuda"] = cuda
    pretrain_metrics = _optional_json(Path(paths.pretrain_reports_dir) / "metrics.json") or {}
    if "val/bpb" in pretrain_metrics:
        result["pretrain_val_bpb"] = pretrain_metrics["val/bpb"]
    champion_path = Path(paths.champion_metrics_path)
    champion = read_champion(champion_path)
    decision = decide(result, champion, evaluate_params.gates)
    result["gates_passed"] = decision.passed

    with atomic_dir(paths.evaluate_dir) as out:
        write_outputs(out, params, bundle, result, decision, champion_path, champion, y, preds[serving])
    banner = decision.summary()
    (logger.info if decision.passed else logger.warning)("=" * 20 + f" {banner} " + "=" * 20)
    return {
        "gates_passed": decision.passed,
        "verdict": banner,
        "accuracy": round(result["accuracy"], 4),
        "macro_f1": round(result["macro_f1"], 4),
        "gain_over_baseline": None
        if result.get("gain_over_baseline") is None
        else round(result["gain_over_baseline"], 4),
        "latency_p95_ms": round(result["latency_p95_ms"], 3),
        "size_mb": round(result["size_mb"], 3),
        "evaluate_dir": str(paths.evaluate_dir),
    }
