"""``lmpipe summary``: one line per stage from the reports, 'not run' where a report is missing."""

from __future__ import annotations

import json

from pipeline_tasks import summary
from pipeline_tasks.config import load_params


def _params(tmp_path):
    (tmp_path / "params.yaml").write_text(
        "paths:\n  prepare_reports_dir: r/prepare\n  evaluate_dir: r/evaluate\n  register_reports_dir: r/register\n",
        encoding="utf-8",
    )
    return load_params(tmp_path / "params.yaml")


def _write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")


def test_summary_lines_from_reports_and_missing_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = _params(tmp_path)
    _write(
        tmp_path / "r/prepare/stats.json",
        {
            "docs": {"in": 45450, "out": 43908},
            "splits": {"train": {"docs": 10}, "val": {"docs": 2}, "test": {"docs": 3}},
        },
    )
    _write(
        tmp_path / "r/evaluate/gates.json",
        {
            "summary": "GATES FAILED (1 of 5)",
            "gates": {"min_accuracy": {"passed": False}, "max_size_mb": {"passed": True}},
        },
    )
    _write(
        tmp_path / "r/evaluate/metrics.json",
        {
            "serving_variant": "int8_dynamic",
            "accuracy": 0.5,
            "n_test": 4,
            "slices": {"source": {"ag": {"accuracy": 0.25}, "tiny": {"n": 2}}},
            "baseline_accuracy": 0.75,
            "gain_over_baseline": -0.25,
            "gain_over_baseline_ci_low": -0.5,
            "gain_over_baseline_ci_high": 0.0,
        },
    )
    (tmp_path / "r/register").mkdir(parents=True)
    (tmp_path / "r/register/registration.json").write_text("{not json", encoding="utf-8")
    lines = dict(summary.rows(params))
    assert lines["prepare"] == "45,450 -> 43,908 docs (train/val/test 10/2/3)"
    assert lines["gates"] == "GATES FAILED (1 of 5) - failed: min_accuracy"
    assert "accuracy 0.5000" in lines["evaluate"] and "(ag 0.2500)" in lines["evaluate"]
    assert lines["evaluate"].endswith("n-gram baseline 0.7500, gap -25.00 points [-50.00, +0.00]")
    assert lines["pretrain"].startswith("not run (") and "metrics.json missing" in lines["pretrain"]
    assert "unreadable" in lines["register"]
    assert [stage for stage, _ in summary.rows(params)][0] == "prepare"


def test_summary_cli_prints_json(tmp_path, monkeypatch, capsys):
    from pipeline_tasks.cli import main

    monkeypatch.chdir(tmp_path)
    _params(tmp_path)
    assert main(["summary", "--params", str(tmp_path / "params.yaml"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"prepare", "validate", "register"} and out["validate"].startswith("not run")


def test_summary_compress_line_disabled_and_student(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = _params(tmp_path)
    report = tmp_path / "reports/compress/metrics.json"
    _write(report, {"enabled": False, "shipped": "teacher"})
    assert dict(summary.rows(params))["compress"].startswith("disabled: the fine-tuned model is exported")
    rows = [
        {"model": "teacher", "params": 7_510_000, "test_accuracy_int8": 0.9048, "speedup_vs_teacher": 1.0},
        {"model": "pruned", "params": 5_150_000, "test_accuracy_int8": 0.9030, "speedup_vs_teacher": 2.88},
    ]
    _write(report, {"enabled": True, "shipped": "pruned", "rows": rows, "seconds": 612.0})
    _write(
        tmp_path / "r/evaluate/metrics.json",
        {"accuracy": 0.9, "compressed": True, "student_accuracy_drop": 0.0021, "student_speedup": 2.5},
    )
    lines = dict(summary.rows(params))
    assert lines["compress"] == (
        "pruned student 5.15 M params: int8 test accuracy 0.9030 vs teacher 0.9048, 2.88x faster (612 s)"
    )
    assert lines["evaluate"].endswith("; student vs teacher -0.21 points, 2.50x faster")
