"""``lmpipe predict`` from an exported bundle alone, in a clean subprocess where torch cannot be imported."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared tiny project, with or without __init__.py
from _export_project import build_tiny_project, export_bundle  # noqa: E402

pytestmark = pytest.mark.slow

# torch is made unimportable before anything else runs: predict must live on onnxruntime alone
NO_TORCH = "import sys; sys.modules['torch'] = None; from pipeline_tasks.cli import main; sys.exit(main(sys.argv[1:]))"


@pytest.fixture(scope="module")
def project(tmp_path_factory, corpora):
    project = build_tiny_project(tmp_path_factory.getbasetemp() / "tiny_project", corpora, "gpt")
    export_bundle(project)
    return project


def _predict(args, cwd):
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(cwd), "LANG": "C.UTF-8", "PYTHONNOUSERSITE": "1"}
    return subprocess.run(
        [sys.executable, "-c", NO_TORCH, "predict", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def _lines(stdout):
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def test_predict_modules_do_not_import_torch():
    code = (
        "import sys, pipeline_tasks.serve.predict, pipeline_tasks.ship.bundle, pipeline_tasks.cli; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_predict_cli_runs_without_torch_from_bundle_path_only(project, tmp_path):
    from pipeline_tasks.ship.bundle import load_bundle

    texts = [
        "Fed raises interest rates again as inflation persists",
        "Striker scores twice as champions win the cup final",
    ]
    result = _predict([*texts, "--bundle", project.path("bundle_dir")], tmp_path)  # no params.yaml in cwd
    assert result.returncode == 0, result.stderr
    rows = _lines(result.stdout)
    bundle = load_bundle(project.path("bundle_dir"))
    expected = bundle.predict(texts)  # int8_dynamic, the default variant
    assert [r["text"] for r in rows] == texts
    for row, exp in zip(rows, expected):
        assert row["label"] in bundle.labels and row["label"] == exp["label"]
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        assert row["probabilities"] == pytest.approx(exp["probabilities"], abs=1e-5)


def test_predict_reads_jsonl_and_plain_lines_with_variant(project, tmp_path):
    news = tmp_path / "news.jsonl"
    news.write_text(
        "\n".join(
            [
                json.dumps({"id": "a1", "text": "Oil prices climb as supply tightens"}),
                json.dumps(
                    {"title": "New smartphone chip unveiled", "description": "The processor doubles battery life."}
                ),
                "",
                "Plain headline: rebels and government sign ceasefire",
            ]
        )
        + "\n",
        encoding="utf-8",
    )
    result = _predict(["--file", news, "--bundle", project.path("bundle_dir"), "--variant", "fp32"], tmp_path)
    assert result.returncode == 0, result.stderr
    rows = _lines(result.stdout)
    assert [r["line"] for r in rows] == [1, 2, 4]
    assert rows[0]["id"] == "a1"
    assert rows[1]["text"] == "New smartphone chip unveiled\nThe processor doubles battery life."
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-4 for r in rows)


def test_predict_uses_bundle_dir_from_params_file(project, tmp_path):
    (tmp_path / "params.yaml").write_text(f"paths:\n  bundle_dir: {project.path('bundle_dir')}\n")
    result = _predict(["Markets slide on trade fears"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(_lines(result.stdout)) == 1


def test_predict_refuses_tampered_bundle(project, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(project.path("bundle_dir"), bundle)
    model = bundle / "model_int8_dynamic.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    result = _predict(["anything", "--bundle", bundle], tmp_path)
    assert result.returncode == 1
    assert "model_int8_dynamic.onnx: sha256" in result.stderr and result.stdout == ""


def test_predict_names_bad_json_line(project, tmp_path):
    news = tmp_path / "news.jsonl"
    news.write_text('{"text": "fine"}\n{"text": broken\n', encoding="utf-8")
    result = _predict(["--file", news, "--bundle", project.path("bundle_dir")], tmp_path)
    assert result.returncode == 1
    assert f"{news}:2: invalid JSON" in result.stderr


def test_bundle_predict_proba_is_a_distribution(project):
    from pipeline_tasks.ship.bundle import load_bundle

    bundle = load_bundle(project.path("bundle_dir"))
    probs = bundle.predict_proba(["", "a", "Stocks " * 500], "int8_dynamic")  # empty, tiny, truncated
    assert probs.shape == (3, len(bundle.labels))
    assert np.allclose(probs.sum(1), 1.0, atol=1e-5)
