"""Stage ``register`` against a real embedded MLflow (SQLite + local artifacts) and a real bundle.

Gate failed -> a rejected run and nothing registered; gate passed -> a challenger version with
lineage tags; the registered pyfunc model predicts in a clean interpreter that has neither torch
nor this repository installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from _registry_project import PASSING, bundles, registry_params, write_evaluation

from pipeline_tasks.config import ConfigError, parse_params
from pipeline_tasks.registry.promote import change_production
from pipeline_tasks.registry.register import dvc_lock_hashes, gate_metrics, lineage_tags
from pipeline_tasks.registry.store import RegistryError

MODEL = "lm-pipeline-news-classifier"


# ---------------------------------------------------------------------------------------------
# pure helpers (fast)


def test_dvc_lock_hashes_collects_every_stage_output():
    import yaml

    lock = yaml.safe_load("""
schema: '2.0'
stages:
  prepare:
    cmd: python -m pipeline_tasks prepare
    deps:
    - path: data/raw/news
      md5: aaa.dir
    outs:
    - path: data/prepared/train.parquet
      md5: 111
      size: 10
    - path: data/prepared/val.parquet
      hash: md5
      md5: 222
  export:
    outs:
    - path: models/bundle
      md5: 333.dir
""")
    assert dvc_lock_hashes(lock) == {
        "data/prepared/train.parquet": "111",
        "data/prepared/val.parquet": "222",
        "models/bundle": "333.dir",
    }
    assert dvc_lock_hashes(None) == {} and dvc_lock_hashes({"stages": {}}) == {}


def test_lineage_tags_record_every_gate_verdict_and_metrics():
    gates = {
        "passed": False,
        "summary": "GATES FAILED: x",
        "gates": {
            "min_accuracy": {"passed": False, "skipped": False},
            "max_size_mb": {"passed": True, "skipped": True},
            "min_macro_f1": {"passed": True, "skipped": False},
        },
    }
    tags = lineage_tags(gates, {"accuracy": 0.4, "flag": True, "variants": {}}, "abc", {"p": "1"}, "deadbeef")
    assert tags["lmpipe.gates_passed"] == "false" and tags["lmpipe.git_sha"] == "deadbeef"
    assert tags["lmpipe.gate.min_accuracy"] == "fail" and tags["lmpipe.gate.max_size_mb"] == "skipped"
    assert tags["lmpipe.gate.min_macro_f1"] == "pass"
    assert json.loads(tags["lmpipe.metrics"]) == {"accuracy": 0.4}  # numbers only, no bools / nested
    assert gate_metrics({"a": 1, "b": float("nan"), "c": "x"}) == {"a": 1.0}
    many = {f"data/file_{i:04d}.parquet": "0123456789abcdef0123456789abcdef" for i in range(400)}
    summary = json.loads(lineage_tags(gates, {}, "abc", many, None)["lmpipe.data_hashes"])
    assert summary["entries"] == 400 and len(summary["sha256"]) == 64  # too long for a tag: hashed, not cut


@pytest.mark.parametrize(
    "section, match",
    [
        ({"model_name": "bad name"}, "model_name"),
        ({"challenger_alias": "production"}, "must differ"),
        ({"history_tag_entries": 0}, "history_tag_entries"),
    ],
)
def test_register_params_reject_bad_values(section, match):
    with pytest.raises(ConfigError, match=match):
        parse_params({"register": section})


# ---------------------------------------------------------------------------------------------
# against a real embedded registry


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory, corpora):
    return bundles(tmp_path_factory.getbasetemp(), corpora, ("a",))["a"]


@pytest.fixture(autouse=True)
def embedded_store(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)


def _client(params):
    from pipeline_tasks.registry.store import connect

    return connect(params.paths.registry_dir)[0]


@pytest.mark.slow
def test_register_gate_failed_records_rejected_run_and_registers_nothing(bundle_dir, tmp_path):
    from pipeline_tasks.registry import register

    params = registry_params(tmp_path, bundle_dir)
    gates = write_evaluation(tmp_path / "evaluate", {**PASSING, "accuracy": 0.31})
    assert gates["passed"] is False
    result = register.run(params)
    assert result["status"] == "rejected" and result["version"] is None
    registration = json.loads((tmp_path / "reports/register/registration.json").read_text())
    assert registration["status"] == "rejected" and registration["gates"]["min_accuracy"]["passed"] is False
    client = _client(params)
    assert client.search_registered_models() == []  # nothing registered, no alias to promote
    with pytest.raises(RegistryError, match="not registered"):
        change_production(params, "promote")
    run = client.get_run(result["run_id"])  # ...but the rejected run is on record
    assert run.data.tags["lmpipe.status"] == "rejected" and run.data.tags["lmpipe.gate.min_accuracy"] == "fail"
    assert run.data.metrics["accuracy"] == pytest.approx(0.31)
    assert "evaluate" in {a.path for a in client.list_artifacts(result["run_id"])}


@pytest.mark.slow
def test_register_passed_sets_challenger_with_lineage_once(bundle_dir, tmp_path):
    from pipeline_tasks.artifacts import sha256_file
    from pipeline_tasks.registry import register

    params = registry_params(tmp_path, bundle_dir)
    write_evaluation(tmp_path / "evaluate", PASSING)
    (tmp_path / "validate").mkdir()
    (tmp_path / "validate/summary.json").write_text(json.dumps({"success": True}))
    result = register.run(params)
    assert result["status"] == "registered" and result["version"] == "1"
    client = _client(params)
    version = client.get_model_version_by_alias(MODEL, "challenger")
    assert str(version.version) == "1"
    tags = version.tags
    assert tags["lmpipe.bundle_manifest_sha256"] == sha256_file(bundle_dir / "manifest.json")
    assert tags["lmpipe.gates_passed"] == "true" and json.loads(tags["lmpipe.metrics"])["accuracy"] == 0.80
    assert tags["lmpipe.git_sha"] and tags["lmpipe.run_id"] == result["run_id"]
    artifacts = {a.path for a in client.list_artifacts(result["run_id"])}
    assert {"bundle", "evaluate", "validate", "lineage"} <= artifacts
    run = client.get_run(result["run_id"])
    assert run.data.params["register.model_name"] == MODEL and run.data.tags["lmpipe.status"] == "registered"
    # the same bundle again (dvc repro -f): no duplicate version
    again = register.run(params)
    assert again["status"] == "already_registered" and again["version"] == "1"
    assert [str(v.version) for v in client.search_model_versions(f"name = '{MODEL}'")] == ["1"]


def _clean_site(tmp: Path) -> Path:
    """site-packages of this venv without torch and without the editable lm-pipeline install."""
    import sysconfig

    site = Path(sysconfig.get_paths()["purelib"])
    farm = tmp / "site"
    farm.mkdir()
    for entry in site.iterdir():
        name = entry.name.lower()
        if name.startswith(("torch", "functorch", "__editable__", "lm_pipeline")) or name.endswith(".pth"):
            continue
        (farm / entry.name).symlink_to(entry)
    return farm


@pytest.mark.slow
def test_registered_model_predicts_in_clean_subprocess_without_torch(bundle_dir, tmp_path):
    from pipeline_tasks.registry import register
    from pipeline_tasks.ship.bundle import load_bundle

    params = registry_params(tmp_path, bundle_dir)
    write_evaluation(tmp_path / "evaluate", PASSING)
    register.run(params)
    texts = ["Oil prices jump as supply fears grow", "Striker scores twice in the cup final"]
    code = (
        "import json, sys\n"
        "import pandas as pd, mlflow.pyfunc\n"
        f"model = mlflow.pyfunc.load_model('models:/{MODEL}@challenger')\n"
        f"out = model.predict(pd.DataFrame({{'text': {texts!r}}}))\n"
        "import pipeline_tasks\n"
        "try:\n    import torch; importable = True\nexcept ImportError:\n    importable = False\n"
        "print(json.dumps({'rows': out.to_dict(orient='records'), 'torch_importable': importable,\n"
        "                  'torch_loaded': 'torch' in sys.modules, 'package': pipeline_tasks.__file__}))\n"
    )
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "LANG": "C.UTF-8",
        "PYTHONPATH": str(_clean_site(tmp_path)),
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "1",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'registry/mlflow.db'}",
    }
    # -S: no site-packages of the venv at all, only the torch-less copy on PYTHONPATH
    proc = subprocess.run(
        [sys.executable, "-S", "-c", code],
        env=env,
        cwd=tempfile.mkdtemp(dir=tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["torch_importable"] is False and out["torch_loaded"] is False
    assert str(tmp_path / "registry" / "artifacts") in out["package"]  # the code logged with the model
    bundle = load_bundle(bundle_dir)
    probs = bundle.predict_proba(texts)
    for row, p in zip(out["rows"], probs):
        assert row["label"] == bundle.labels[int(p.argmax())]
        assert [row[f"p_{label}"] for label in bundle.labels] == pytest.approx(p.tolist(), abs=1e-6)
