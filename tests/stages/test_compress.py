"""Stage ``compress`` on the tiny real project: distillation, pruning, export of the student, the student gates.

The teacher is the tiny project's fine-tuned GPT (2 layers x 64, real AG News + HuffPost rows).
compress treats AG News as the labelled rows and the HuffPost rows of the train split as the
unlabelled news the teacher labels, which is the default run's shape in miniature.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline_tasks.errors import DataError

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared tiny project, with or without __init__.py
from _export_project import build_tiny_project  # noqa: E402

pytestmark = pytest.mark.slow

COMPRESS = {
    "enabled": True,
    "distill": {"epochs": 4, "batch_size": 32, "lr": 2.0e-3, "patience": 0, "unlabelled_rows": 1000},
    "prune": {"importance_batches": 4, "recovery_epochs": 1},
    "latency_runs": 20,
    "latency_warmup": 2,
}
EVALUATE = {
    "latency_runs": 30,
    "latency_warmup": 3,
    "throughput_runs": 3,
    "bootstrap_resamples": 100,
    "lm_windows": 2,
    "baseline": {"kind": "none"},
    # the tiny student's speed-up depends on the machine: the gates must apply, the thresholds are loose
    "gates": {"min_accuracy": 0.3, "min_macro_f1": 0.25, "max_int8_accuracy_drop": 0.05, "max_p95_latency_ms": 500.0}
    | {"min_gain_over_baseline": None, "max_student_drop": 0.5, "min_student_speedup": 0.1},
}


@pytest.fixture(scope="module")
def project(tmp_path_factory, corpora):
    return build_tiny_project(tmp_path_factory.getbasetemp() / "tiny_project", corpora, "gpt")


@pytest.fixture(scope="module")
def compressed(project, tmp_path_factory):
    """compress -> export -> evaluate on the student, in a directory of their own."""
    from pipeline_tasks.ship import compress, evaluate, export

    tmp = tmp_path_factory.mktemp("compressed")
    paths = {
        **project.raw["paths"],
        "compress_dir": str(tmp / "models/compress"),
        "compress_reports_dir": str(tmp / "reports/compress"),
        "bundle_dir": str(tmp / "models/bundle"),
        "export_reports_dir": str(tmp / "reports/export"),
        "evaluate_dir": str(tmp / "reports/evaluate"),
        "champion_metrics_path": str(tmp / "production_metrics.json"),
    }
    finetune = {**project.raw["finetune"], "dataset": {"train_sources": ["ag_news"], "test_sources": ["ag_news"]}}
    params = project.params(
        paths=paths,
        finetune=finetune,
        compress=COMPRESS,
        export={"parity_rows": 64, "calibration_rows": 32},
        evaluate=EVALUATE,
    )
    summary = compress.run(params)
    export.run(params)
    evaluated = evaluate.run(params)
    return params, tmp, summary, evaluated


def _metrics(tmp: Path) -> dict:
    return json.loads((tmp / "reports/compress/metrics.json").read_text())


def test_disabled_compress_passes_the_finetuned_checkpoint_through(project):
    assert (project.path("compress_dir") / "model.pt").read_bytes() == (
        project.path("finetune_dir") / "model.pt"
    ).read_bytes()
    assert (project.path("compress_reports_dir") / "table.csv").read_text().startswith("model,params")
    assert json.loads((project.path("compress_reports_dir") / "metrics.json").read_text()) == {
        "enabled": False,
        "shipped": "teacher",
    }


def test_distillation_loss_falls_and_the_student_agrees_with_its_teacher_more_than_alone(compressed):
    _, tmp, summary, _ = compressed
    metrics = _metrics(tmp)
    assert summary["shipped"] == metrics["shipped"] == "pruned"
    assert metrics["unlabelled_rows"] == 40  # the tiny train split's HuffPost rows, labelled by the teacher only
    curve = metrics["training"]["distilled"]["curve"]
    assert len(curve) == 4 and curve[-1]["train_loss"] < curve[0]["train_loss"]
    rows = {row["model"]: row for row in metrics["rows"]}
    assert list(rows) == ["teacher", "student_alone", "distilled", "pruned"]
    assert rows["distilled"]["val_agreement_with_teacher"] > rows["student_alone"]["val_agreement_with_teacher"]
    assert rows["teacher"]["val_agreement_with_teacher"] == 1.0
    assert rows["distilled"]["n_layer"] == 1 and rows["teacher"]["n_layer"] == 2  # half depth
    assert metrics["init"]["layer_map"] == [0]
    for row in rows.values():  # every model measured the same way, on the same rows
        assert 0.25 < row["test_accuracy_int8"] <= 1.0 and row["latency_p50_ms"] > 0 and row["int8_size_mb"] > 0
    table = (tmp / "reports/compress/table.md").read_text()
    assert table.startswith("| model |") and table.count("\n| ") == 4 and "student_alone" in table  # a row per model
    assert (tmp / "reports/compress/table.csv").read_text().splitlines()[0].startswith("model,params")


def test_pruned_student_is_physically_smaller_and_exports_with_parity(compressed):
    from pipeline_tasks.train.model import load_classifier

    _, tmp, _, _ = compressed
    student, meta = load_classifier(tmp / "models/compress/model.pt")
    config = student.backbone.config
    assert (config.n_layer, config.n_head, config.head_dim, config.mlp_hidden) == (1, 1, 32, 128)
    assert student.backbone.transformer.h[0].attn.c_attn.weight.shape == (96, 64)
    assert student.backbone.transformer.h[0].mlp.c_fc.weight.shape == (128, 64)
    assert meta["compression"]["shipped"] == "pruned" and meta["compression"]["teacher_params"] > sum(
        p.numel() for p in student.parameters()
    )
    parity = json.loads((tmp / "reports/export/parity.json").read_text())
    assert parity["passed"] and parity["classifier"]["fp32_max_abs_diff"] <= 1e-4
    bundle_config = json.loads((tmp / "models/bundle/config.json").read_text())
    assert bundle_config["model_config"]["mlp_dim"] == 128 and bundle_config["model_config"]["n_head"] == 1
    assert bundle_config["compression"]["teacher_onnx"] == "teacher_int8.onnx"


def test_evaluate_gates_the_served_student_against_its_teacher(compressed):
    _, tmp, _, evaluated = compressed
    metrics = json.loads((tmp / "reports/evaluate/metrics.json").read_text())
    assert metrics["compressed"] is True and evaluated["gates_passed"] is True
    student = metrics["student"]
    assert metrics["student_accuracy_drop"] == pytest.approx(student["teacher_accuracy"] - metrics["accuracy"])
    assert metrics["student_speedup"] == pytest.approx(
        student["teacher_latency_p50_ms"] / student["student_latency_p50_ms"]
    )
    gates = json.loads((tmp / "reports/evaluate/gates.json").read_text())["gates"]
    for name in ("max_student_drop", "min_student_speedup"):
        assert not gates[name]["skipped"] and gates[name]["passed"], gates[name]
    card = (tmp / "reports/evaluate/model_card.md").read_text()
    assert "## Student and its teacher" in card and "distilled+pruned" in card


def test_lmpipe_predict_serves_the_student(compressed):
    from pipeline_tasks.ship.bundle import load_bundle

    _, tmp, _, _ = compressed
    bundle_dir = tmp / "models/bundle"
    texts = ["Stocks rally as the central bank holds rates", "The striker scored twice in the final"]
    done = subprocess.run(
        [sys.executable, "-m", "pipeline_tasks", "predict", *texts, "--bundle", str(bundle_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    served = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [r["label"] for r in served] == [r["label"] for r in load_bundle(bundle_dir).predict(texts)]
    assert json.loads((bundle_dir / "config.json").read_text())["compression"]["shipped"] == "pruned"


def test_evaluate_refuses_a_teacher_that_is_not_the_one_compress_measured(compressed):
    from pipeline_tasks.ship import evaluate

    params, tmp, _, _ = compressed
    teacher = tmp / "models/compress/teacher_int8.onnx"
    original = teacher.read_bytes()
    try:
        teacher.write_bytes(original + b"\0")
        with pytest.raises(DataError, match="teacher of the served student"):
            evaluate.run(params)
    finally:
        teacher.write_bytes(original)
