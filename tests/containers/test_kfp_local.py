"""The Kubeflow pipeline that ``lmpipe kfp-compile`` writes, executed end to end by ``kfp.local`` with
its ``DockerRunner``: the same components and images as on a cluster, artifacts passed as KFP passes
them (each step's ``workspace`` artifact in the pipeline root), on the tiny profile, as uid 1000 with
no network. The registry is an MLflow SQLite store in the pipeline root (``--mlflow-tracking-uri``),
as a cluster would point every step at one tracking server."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time

import pytest

from tests.containers.conftest import NODE_USER, REPO, give_to_node_user, hand_back
from tests.dags.conftest import RELAXED_GATES, tiny_overrides

pytestmark = [pytest.mark.containers, pytest.mark.slow]


def test_compiled_pipeline_runs_with_kfp_local_docker_runner(docker, images, corpora, tmp_path):
    kfp_local = pytest.importorskip("kfp.local")
    from docker.types import Mount
    from kfp import components

    root = tmp_path / "kfp"
    pipeline_root = root / "pipeline_root"
    pipeline_root.mkdir(parents=True)
    registry = pipeline_root / "registry"
    registry.mkdir()
    package = root / "lm_pipeline.kfp.yaml"
    compiled = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline_tasks",
            "kfp-compile",
            "--output",
            str(package),
            "--image",
            images["tasks"],
            "--mlflow-tracking-uri",
            f"sqlite:///{registry}/mlflow.db",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    give_to_node_user(pipeline_root)

    kfp_local.init(
        runner=kfp_local.DockerRunner(
            network_mode="none",
            user=NODE_USER,
            # the image's LMPIPE_DATA_MIRROR; KFP mounts only the pipeline root itself
            mounts=[Mount(target="/lmpipe/mirror", source=str(corpora), type="bind", read_only=True)],
        ),
        pipeline_root=str(pipeline_root),
        workspace_root=str(root / "kfp-workspace"),
        raise_on_error=True,
    )
    pipeline = components.load_component_from_file(str(package))
    overrides = tiny_overrides(**RELAXED_GATES)
    started = time.monotonic()
    try:
        run = pipeline(params_overrides=json.dumps(overrides))
    finally:
        print(f"\nkfp.local (DockerRunner): the compiled pipeline ran in {time.monotonic() - started:.0f} s")
    outputs = run.outputs if hasattr(run, "outputs") else {}
    print("pipeline outputs:", outputs)

    # the last step's workspace artifact holds everything: the bundle, gates.json, the registration
    workspaces = sorted(pipeline_root.glob("lm-pipeline-*/register/workspace"), key=os.path.getmtime)
    assert workspaces, sorted(str(p.relative_to(pipeline_root)) for p in pipeline_root.glob("*/*"))
    workspace = workspaces[-1]
    assert (workspace / "models/bundle/manifest.json").is_file()
    gates = json.loads((workspace / "reports/evaluate/gates.json").read_text())
    assert gates["passed"] is True
    registration = json.loads((workspace / "reports/register/registration.json").read_text())
    assert registration.get("version"), registration
    with sqlite3.connect(registry / "mlflow.db") as db:
        versions = db.execute("select name, version from model_versions").fetchall()
    assert versions, "no model version in the pipeline root's MLflow registry"
    hand_back(docker, images["tasks"], root)
