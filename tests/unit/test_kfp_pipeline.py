"""``lmpipe kfp-compile``: the dvc.yaml stages compile into a KFP v2 pipeline YAML with the task
image, the stage commands, the workspace artifact chain and GPU requests on the training stages."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline_tasks.stages import GPU_STAGES

REPO = Path(__file__).resolve().parents[2]
pytest.importorskip("kfp", reason="kfp 2.17 lives in the tasks env (.venv)")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("kfp") / "pipeline.yaml"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline_tasks",
            "kfp-compile",
            "--output",
            str(out),
            "--image",
            "registry.example/lm-tasks:1.2.3",
            "--gpu-image",
            "registry.example/lm-tasks-cuda:1.2.3",
            "--mlflow-tracking-uri",
            "http://mlflow:5000",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    docs = list(yaml.safe_load_all(out.read_text()))
    return summary, docs[0]


def _stages() -> dict[str, str]:
    return {n: s["cmd"] for n, s in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].items()}


def _executor(spec: dict, name: str) -> dict:
    return spec["deploymentSpec"]["executors"][f"exec-{name.replace('_', '-')}"]["container"]


def test_kfp_compile_has_one_component_per_dvc_stage(compiled):
    summary, spec = compiled
    stages = _stages()
    assert summary["stages"] == list(stages)
    assert spec["sdkVersion"] == "kfp-2.17.0"
    expected = {f"comp-{n.replace('_', '-')}" for n in ["prepare_workspace", *stages]}
    assert set(spec["components"]) == expected
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == {n.replace("_", "-") for n in ["prepare_workspace", *stages]}


def test_kfp_steps_run_the_dvc_stage_command_in_the_task_image(compiled):
    _, spec = compiled
    for name, cmd in _stages().items():
        container = _executor(spec, name)
        args = container["args"]
        assert container["command"] == ["tini", "--"]
        assert args[:3] == ["python", "-m", "pipeline_tasks.orchestration"]
        assert args[args.index("--") + 1 :] == shlex.split(cmd)
        assert "--direct" in args and "--copy-from" in args
        expected = "registry.example/lm-tasks-cuda:1.2.3" if name in GPU_STAGES else "registry.example/lm-tasks:1.2.3"
        assert container["image"] == expected
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"


def test_kfp_stages_chain_through_the_workspace_artifact(compiled):
    _, spec = compiled
    tasks = spec["root"]["dag"]["tasks"]
    previous = "prepare-workspace"
    for name in _stages():
        task = tasks[name.replace("_", "-")]
        source = task["inputs"]["artifacts"]["workspace_in"]["taskOutputArtifact"]
        assert source == {"outputArtifactKey": "workspace", "producerTask": previous}
        previous = name.replace("_", "-")
    init = _executor(spec, "prepare_workspace")["args"]
    assert "init" in init and "/opt/lm-pipeline" in init


def test_kfp_gpu_stages_request_an_accelerator_and_cpu_stages_do_not(compiled):
    _, spec = compiled
    for name in _stages():
        resources = _executor(spec, name)["resources"]
        if name in GPU_STAGES:
            assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
            assert resources["accelerator"]["resourceCount"] == "1"
        else:
            assert "accelerator" not in resources
            assert resources["resourceCpuRequest"] and resources["resourceMemoryRequest"]


def test_kfp_training_steps_retry(compiled):
    _, spec = compiled
    tasks = spec["root"]["dag"]["tasks"]
    for name in _stages():
        policy = tasks[name.replace("_", "-")].get("retryPolicy", {})
        assert policy.get("maxRetryCount", 0) >= (2 if name in GPU_STAGES else 1)
