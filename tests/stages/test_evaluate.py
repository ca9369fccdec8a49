"""Stage ``evaluate`` on the tiny real project: scores, slices, latency, gates, model card, verdict banner."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline_tasks.errors import DataError

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared tiny project, with or without __init__.py
from _export_project import build_tiny_project, export_bundle  # noqa: E402

pytestmark = pytest.mark.slow

FAST = {
    "latency_runs": 30,
    "latency_warmup": 3,
    "throughput_runs": 3,
    "bootstrap_resamples": 200,
    "slice_min_rows": 10,
    "lm_windows": 4,
}
LOOSE = {
    "min_accuracy": 0.3,
    "min_macro_f1": 0.25,
    "max_int8_accuracy_drop": 0.05,
    "max_p95_latency_ms": 500.0,
    "max_size_mb": 50.0,
    "max_regression": 0.01,
}

SOURCES = {
    "sources": [
        {
            "name": "huffpost",
            "format": "jsonl",
            "url": "https://example.org/News_Category_Dataset_v3.json",
            "sha256": "2ccd587afdd6cb7bcf2c1dfbd04199278c0405fbda4ac57bec170403a8f12073",
            "columns": {"title": "headline", "body": "short_description", "label": "category"},
        }
    ]
}


@pytest.fixture(scope="module")
def project(tmp_path_factory, corpora):
    project = build_tiny_project(tmp_path_factory.getbasetemp() / "tiny_project", corpora, "gpt")
    export_bundle(project)
    return project


def _params(project, tmp_path, gates=None, champion=None, baseline=None):
    champion_path = tmp_path / "production_metrics.json"
    paths = {
        **project.raw["paths"],
        "evaluate_dir": str(tmp_path / "evaluate"),
        "champion_metrics_path": str(champion_path),
    }
    if champion is not None:
        champion_path.write_text(json.dumps(champion))
    evaluate = {**FAST, "gates": {**LOOSE, **(gates or {})}, **({"baseline": baseline} if baseline else {})}
    return project.params(paths=paths, ingest_news=SOURCES, evaluate=evaluate)


@pytest.fixture(scope="module")
def evaluated(project, tmp_path_factory):
    from pipeline_tasks.ship import evaluate

    tmp = tmp_path_factory.mktemp("evaluate_pass")
    summary = evaluate.run(_params(project, tmp))
    return summary, tmp / "evaluate"


def test_evaluate_scores_every_variant_with_intervals_and_slices(evaluated):
    summary, out = evaluated
    metrics = json.loads((out / "metrics.json").read_text())
    assert summary["gates_passed"] is True and metrics["gates_passed"] is True
    assert metrics["serving_variant"] == "int8_dynamic"
    assert set(metrics["variants"]) == {"fp32", "int8_dynamic", "int8_static", "fp16", "torch"}
    for name, v in metrics["variants"].items():
        assert v["accuracy_ci_low"] <= v["accuracy"] <= v["accuracy_ci_high"], name
        assert 0.25 < v["accuracy"] <= 1.0, name  # 4 balanced classes: chance is 0.25
        if name != "torch":
            assert 0 < v["latency_p50_ms"] <= v["latency_p95_ms"] and v["throughput_rows_per_s"] > 0
            assert v["providers"] == "CPUExecutionProvider"
    # the ONNX fp32 graph and PyTorch make the same predictions; int8 is close
    assert metrics["variants"]["fp32"]["accuracy"] == pytest.approx(metrics["variants"]["torch"]["accuracy"], abs=0.004)
    assert abs(metrics["int8_accuracy_drop"]) <= 0.03
    assert set(metrics["slices"]["source"]) == {"ag_news", "huffpost"}
    time_kind = next(k for k in metrics["slices"] if k in ("month", "year"))
    assert sum(s["n"] for s in metrics["slices"][time_kind].values()) == metrics["slices"]["source"]["huffpost"]["n"]
    assert set(metrics["per_class"]) == {"world", "sports", "business", "scitech"}
    assert math.isfinite(metrics["lm_val_bpb"]) and 0 < metrics["lm_val_bpb"] < 8
    assert metrics["size_mb"] == pytest.approx(metrics["variants"]["int8_dynamic"]["size_mb"])


def test_evaluate_writes_gates_plots_and_model_card(evaluated):
    _, out = evaluated
    gates = json.loads((out / "gates.json").read_text())
    assert gates["passed"] is True and gates["champion"] is None
    assert {g["name"] for g in gates["gates"].values()} >= {"min_accuracy", "no_regression_accuracy"}
    for name in (
        "confusion.csv",
        "per_class.csv",
        "latency.csv",
        "slices.csv",
        "confusion.png",
        "per_class.png",
        "latency.png",
    ):
        assert (out / "plots" / name).stat().st_size > 0, name
    confusion = (out / "plots" / "confusion.csv").read_text().splitlines()
    assert (
        confusion[0] == "actual,predicted"
        and len(confusion) - 1 == json.loads((out / "metrics.json").read_text())["n_test"]
    )
    card = (out / "model_card.md").read_text()
    for section in (
        "## Intended use",
        "## Data",
        "## Metrics (test split)",
        "## Slices by source",
        "## Gates",
        "## Limitations",
        "GATES PASSED",
    ):
        assert section in card
    assert "| huffpost | news | https://example.org/News_Category_Dataset_v3.json | publisher copyright" in card
    html = (out / "model_card.html").read_text()
    assert html.startswith("<!doctype html>") and "<table>" in html and "GATES PASSED" in html


def test_evaluate_trains_the_ngram_baseline_on_finetunes_rows_and_reports_the_gap(project, evaluated):
    _, out = evaluated
    metrics = json.loads((out / "metrics.json").read_text())
    baseline = metrics["baseline"]
    finetune = json.loads((project.path("finetune_reports_dir") / "metrics.json").read_text())
    assert baseline["kind"] == "tfidf_lr" and baseline["n_train"] == finetune["train"]["rows"]
    assert baseline["n_val"] == finetune["val"]["n"] and baseline["n"] == metrics["n_test"]
    assert [row["C"] for row in baseline["grid"]] == [4.0, 8.0, 16.0, 32.0]
    assert baseline["selected"]["val_macro_f1"] == max(row["val_macro_f1"] for row in baseline["grid"])
    assert 0.25 < baseline["accuracy"] <= 1.0 and baseline["train_seconds"] > 0
    assert metrics["baseline_accuracy"] == baseline["accuracy"]
    assert metrics["gain_over_baseline"] == pytest.approx(metrics["accuracy"] - baseline["accuracy"])
    assert (
        metrics["gain_over_baseline_ci_low"] <= metrics["gain_over_baseline"] <= metrics["gain_over_baseline_ci_high"]
    )
    gate = json.loads((out / "gates.json").read_text())["gates"]["min_gain_over_baseline"]
    assert gate["skipped"] is True  # LOOSE leaves it off; the table test covers its verdicts
    card = (out / "model_card.md").read_text()
    assert "## Against the n-gram baseline" in card and "| n-gram baseline |" in card


def test_evaluate_baseline_gate_fails_a_model_below_it_and_without_a_baseline(project, evaluated, tmp_path):
    from pipeline_tasks.ship import evaluate

    gain = json.loads((evaluated[1] / "metrics.json").read_text())["gain_over_baseline"]
    above = evaluate.run(_params(project, tmp_path / "a", gates={"min_gain_over_baseline": gain + 0.05}))
    assert above["gates_passed"] is False
    failed = json.loads((tmp_path / "a/evaluate/gates.json").read_text())["gates"]["min_gain_over_baseline"]
    assert failed["passed"] is False and failed["value"] == pytest.approx(gain)

    summary = evaluate.run(
        _params(project, tmp_path / "b", gates={"min_gain_over_baseline": -1.0}, baseline={"kind": "none"})
    )
    metrics = json.loads((tmp_path / "b/evaluate/metrics.json").read_text())
    assert summary["gates_passed"] is False and "baseline" not in metrics and summary["gain_over_baseline"] is None
    why = json.loads((tmp_path / "b/evaluate/gates.json").read_text())["gates"]["min_gain_over_baseline"]["why"]
    assert "no n-gram baseline" in why


def test_evaluate_bootstrap_intervals_are_seeded():
    from pipeline_tasks.ship.evaluate import score
    from pipeline_tasks.ship.params import EvaluateParams

    rng = np.random.default_rng(1)
    y, pred = rng.integers(0, 4, 300), rng.integers(0, 4, 300)
    a = score(y, pred, ["a", "b", "c", "d"], EvaluateParams(bootstrap_resamples=100), seed=7)
    b = score(y, pred, ["a", "b", "c", "d"], EvaluateParams(bootstrap_resamples=100), seed=7)
    assert a == b and a["accuracy_ci_low"] < a["accuracy"] < a["accuracy_ci_high"]


def test_evaluate_regression_vs_champion_is_a_failed_gate(project, evaluated, tmp_path):
    from pipeline_tasks.ship import evaluate

    accuracy = json.loads((evaluated[1] / "metrics.json").read_text())["accuracy"]
    summary = evaluate.run(_params(project, tmp_path, champion={"accuracy": accuracy + 0.1, "macro_f1": 0.0}))
    assert summary["gates_passed"] is False
    gates = json.loads((tmp_path / "evaluate" / "gates.json").read_text())
    failed = {name for name, g in gates["gates"].items() if not g["passed"]}
    assert failed == {"no_regression_accuracy"}
    assert "regression vs production" in gates["summary"] and gates["champion_present"] is True


def test_evaluate_failed_gate_exits_zero_with_banner(project, tmp_path):
    """Through the real CLI: the stage succeeds, records passed=false and prints the verdict."""
    params = {
        "seed": 1337,
        "paths": {
            **project.raw["paths"],
            "evaluate_dir": str(tmp_path / "evaluate"),
            "champion_metrics_path": str(tmp_path / "none.json"),
        },
        "evaluate": {**FAST, "gates": {**LOOSE, "min_accuracy": 0.99}},
        "finetune": project.raw["finetune"],  # the n-gram baseline trains on finetune's rows
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "LMPIPE_PARAMS": str(tmp_path / "params.yaml")}
    result = subprocess.run(
        [sys.executable, "-m", "pipeline_tasks", "evaluate"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "GATES FAILED: accuracy" in result.stderr
    last = json.loads(result.stdout.strip().splitlines()[-1])
    assert last["gates_passed"] is False and last["verdict"].startswith("GATES FAILED")
    assert json.loads((tmp_path / "evaluate" / "gates.json").read_text())["passed"] is False


def test_evaluate_corrupt_champion_file_is_a_clear_error(tmp_path):
    from pipeline_tasks.ship.evaluate import read_champion

    assert read_champion(tmp_path / "absent.json") is None
    bad = tmp_path / "production_metrics.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="production_metrics.json: production metrics are not valid JSON"):
        read_champion(bad)
