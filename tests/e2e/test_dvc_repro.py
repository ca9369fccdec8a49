"""End to end: a copy of the project, the tiny profile, `dvc repro` through every stage.

Checks that the stage graph runs on real data with the real libraries, that the run ends with the
artifacts a user ships (ONNX bundle, metrics, gates, model card, registry record) and that a
second `dvc repro` has nothing to do.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.slow]


def _dvc(args, cwd, env):
    dvc = Path(sys.executable).with_name("dvc")
    return subprocess.run([str(dvc), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)


@pytest.fixture(scope="module")
def repro_project(tiny_repro):
    return tiny_repro


def test_repro_runs_every_stage_in_dvc_yaml(repro_project):
    project, _, first = repro_project
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert set(stages) == set(lock), f"stages without a lock entry: {set(stages) - set(lock)}"


def test_repro_writes_shippable_artifacts(repro_project):
    project, _, _ = repro_project
    params = yaml.safe_load((project / "params.yaml").read_text())
    paths = params["paths"]
    bundle = project / paths["bundle_dir"]
    assert (bundle / "manifest.json").is_file()
    assert any(p.name.endswith(".onnx") and "int8" in p.name for p in bundle.iterdir())
    evaluate_dir = project / paths["evaluate_dir"]
    gates = json.loads((evaluate_dir / "gates.json").read_text())
    assert "passed" in gates
    assert (evaluate_dir / "metrics.json").is_file() and (evaluate_dir / "model_card.md").is_file()


def test_second_repro_does_nothing(repro_project):
    project, env, _ = repro_project
    second = _dvc(["repro"], project, env)
    assert second.returncode == 0, second.stderr[-4000:]
    status = _dvc(["status"], project, env)
    assert "up to date" in (status.stdout + second.stdout).lower(), status.stdout


def test_metrics_show_prints_prepare_statistics(repro_project):
    project, env, _ = repro_project
    shown = _dvc(["metrics", "show", "--json"], project, env)
    assert shown.returncode == 0, shown.stderr
    stats = f"{yaml.safe_load((project / 'params.yaml').read_text())['paths']['prepare_reports_dir']}/stats.json"
    # {"": {"data": {path: {"data": metrics}}}}: "" is the workspace
    assert json.loads(shown.stdout)[""]["data"][stats]["data"] == json.loads((project / stats).read_text())
