"""``lmpipe kfp-compile``: the dvc.yaml stages compile into a KFP v2 pipeline YAML with the task
image, the stage commands, the workspace artifact chain and GPU requests on the training stages."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline_tasks.stages import GPU_STAGES

REPO = Path(__file__).resolve().parents[2]
pytest.importorskip("kfp", reason="kfp 2.17 lives in the tasks env (.venv)")


CPU_IMAGE, GPU_IMAGE = "registry.example/lm-tasks:1.2.3", "registry.example/lm-tasks-cuda:1.2.3"


def _compile(out: Path, *extra: str) -> tuple[dict, list[dict]]:
    """``lmpipe kfp-compile`` as a user runs it: (its JSON summary, the YAML documents it wrote)."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline_tasks",
            "kfp-compile",
            "--output",
            str(out),
            "--image",
            CPU_IMAGE,
            "--gpu-image",
            GPU_IMAGE,
            "--mlflow-tracking-uri",
            "http://mlflow:5000",
            *extra,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    return summary, list(yaml.safe_load_all(out.read_text()))


@pytest.fixture(scope="module")
def compiled_docs(tmp_path_factory):
    return _compile(tmp_path_factory.mktemp("kfp") / "pipeline.yaml")


@pytest.fixture(scope="module")
def compiled(compiled_docs):
    summary, docs = compiled_docs
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


def _platform(docs: list[dict]) -> dict:
    return next((d for d in docs[1:] if "platforms" in d), {}).get("platforms", {}).get("kubernetes", {})


def test_kfp_single_node_pretrain_is_a_plain_container_step_without_workspace(compiled_docs):
    _, docs = compiled_docs
    spec = docs[0]
    assert "taskConfigPassthroughs" not in spec["components"]["comp-pretrain"]
    assert _executor(spec, "pretrain")["command"] == ["tini", "--"]
    assert "pipelineConfig" not in _platform(docs)


RAY = "ray://lmpipe-ray-head-svc.lm-pipeline:10001"


def test_kfp_ray_address_reaches_the_data_steps_and_pins_the_ray_executor(tmp_path, compiled):
    _, spec = _compile(tmp_path / "ray.yaml", "--ray-address", RAY)
    _, default_spec = compiled
    data_stages = {"ingest_wiki", "ingest_news", "prepare", "validate", "tokenize"}
    for name in _stages():
        env = {e["name"]: e["value"] for e in _executor(spec[0], name)["env"]}
        assert env.get("RAY_ADDRESS") == (RAY if name in data_stages else None), name
        assert "RAY_ADDRESS" not in {e["name"] for e in _executor(default_spec, name)["env"]}
    init = _executor(spec[0], "prepare_workspace")["args"]
    assert init[init.index("executor.kind=ray") - 1] == "-S"
    assert not any("executor." in a for a in _executor(default_spec, "prepare_workspace")["args"])


# ---------------------------------------------------------------------------------------------
# pretrain.nodes > 1: the pretrain step launches a Kubeflow Trainer TrainJob


NODE_RESOURCES = "orchestration.kubernetes.trainjob.node_resources"


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    out = tmp_path_factory.mktemp("kfp2") / "pipeline.yaml"
    return _compile(out, "-S", "pretrain.nodes=2", "-S", f"{NODE_RESOURCES}.memory=40Gi")


def test_kfp_multi_node_pretrain_receives_its_task_config(two_nodes):
    _, docs = two_nodes
    component = docs[0]["components"]["comp-pretrain"]
    assert component["inputDefinitions"]["parameters"]["task_config"]["parameterType"] == "TASK_CONFIG"
    passthroughs = {p["field"]: p.get("applyToTask", False) for p in component["taskConfigPassthroughs"]}
    assert passthroughs == {
        "RESOURCES": False,  # the GPUs are the TrainJob nodes', not the launcher's
        "ENV": True,
        "KUBERNETES_VOLUMES": True,  # the launcher needs the shared workspace volume too
        "KUBERNETES_NODE_SELECTOR": False,
        "KUBERNETES_TOLERATIONS": False,
    }


def test_kfp_multi_node_pretrain_launches_the_stage_in_the_cpu_image(two_nodes):
    _, docs = two_nodes
    spec = docs[0]
    container = _executor(spec, "pretrain")
    assert container["image"] == CPU_IMAGE
    source = "\n".join(container["command"])
    assert "kfp.dsl.executor_main" in source and "pip install" not in source  # kfp is in the task image
    assert "LMPIPE_PRETRAIN_LAUNCHER" in source and "LMPIPE_TRAINJOB_TASK_CONFIG" in source
    task = spec["root"]["dag"]["tasks"]["pretrain"]
    params = task["inputs"]["parameters"]
    assert params["shared_root"]["runtimeValue"]["constant"] == "{{$.workspace_path}}"
    command = params["command"]["runtimeValue"]["constant"]
    assert command[:3] == ["python", "-m", "pipeline_tasks.orchestration"]
    assert command[command.index("--") + 1 :] == shlex.split(_stages()["pretrain"])
    assert "--direct" in command and "--copy-from" in command
    source_task = task["inputs"]["artifacts"]["workspace_in"]["taskOutputArtifact"]
    assert source_task == {"outputArtifactKey": "workspace", "producerTask": "tokenize"}


def test_kfp_multi_node_pretrain_forwards_the_node_resources_and_retries(two_nodes):
    from pipeline_tasks.orchestration.settings import load_orchestration_params

    _, docs = two_nodes
    spec = docs[0]
    node = load_orchestration_params(REPO / "params.yaml").kubernetes.trainjob.node_resources
    resources = _executor(spec, "pretrain")["resources"]
    # RESOURCES is passed through: these become each TrainJob node's resourcesPerNode
    assert resources["resourceCpuRequest"] == node.cpu and resources["resourceMemoryRequest"] == "40Gi"
    assert resources["accelerator"]["resourceCount"] == str(node.gpus)
    env = {e["name"]: e["value"] for e in _executor(spec, "pretrain")["env"]}
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert spec["root"]["dag"]["tasks"]["pretrain"]["retryPolicy"]["maxRetryCount"] >= 2


def test_kfp_multi_node_pipeline_has_a_shared_rwx_workspace(two_nodes):
    _, docs = two_nodes
    workspace = _platform(docs)["pipelineConfig"]["workspace"]
    assert workspace["size"]
    assert workspace["kubernetes"]["pvcSpecPatch"]["accessModes"] == ["ReadWriteMany"]


def test_kfp_multi_node_pipeline_pins_the_topology_and_keeps_the_other_stages(two_nodes):
    summary, docs = two_nodes
    spec = docs[0]
    init = _executor(spec, "prepare_workspace")["args"]
    # the run's params get the topology the pipeline was compiled for
    assert "pretrain.nodes=2" in init
    for name in _stages():
        if name != "pretrain":
            assert _executor(spec, name)["command"] == ["tini", "--"]
            assert "taskConfigPassthroughs" not in spec["components"][f"comp-{name.replace('_', '-')}"]
    assert _executor(spec, "finetune")["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert summary["trainjob_stages"] == ["pretrain"]


# The launcher step, run for real as its pod runs it (the compiled command: KFP's executor on the
# shipped source), on a tiny workspace whose "pretrain" stage records what it saw: it runs where
# TrainJob pods can see it (the shared workspace), with the launcher env and the TaskConfig, and its
# result becomes the step's output artifact.
RECORD_STAGE = """\
import json, os, pathlib, sys
pathlib.Path("seen.json").write_text(json.dumps({
    "cwd": os.getcwd(),
    "launcher": os.environ.get("LMPIPE_PRETRAIN_LAUNCHER"),
    "task_config": json.loads(os.environ.get("LMPIPE_TRAINJOB_TASK_CONFIG", "{}")),
}))
sys.exit(int(os.environ.get("RECORD_EXIT", "0")))
"""
TASK_CONFIG = {
    "env": [{"name": "MLFLOW_TRACKING_URI", "value": "http://mlflow:5000"}],
    "volumes": [{"name": "kfp-workspace", "persistentVolumeClaim": {"claimName": "run-1-workspace"}}],
    "volumeMounts": [{"name": "kfp-workspace", "mountPath": "/kfp-workspace"}],
    "resources": {"requests": {"cpu": "8"}, "limits": {"nvidia.com/gpu": "1"}},
    "nodeSelector": {"nvidia.com/gpu.present": "true"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
}


def _artifact(name: str, uri: Path) -> dict:
    return {"artifacts": [{"name": name, "type": {"schemaTitle": "system.Artifact"}, "uri": str(uri), "metadata": {}}]}


def _run_launcher(spec: dict, tmp_path: Path, task_config: dict, exit_code: int = 0):
    """(process, executor output) of the compiled pretrain step on a tiny workspace."""
    from pipeline_tasks.orchestration.kfp import launcher_args

    source = tmp_path / "in"
    source.mkdir()
    (source / "record.py").write_text(RECORD_STAGE)
    (source / "params.yaml").write_text("seed: 1\n")
    (source / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"pretrain": {"cmd": "python record.py"}}}))
    (tmp_path / "kfp-workspace").mkdir()  # the workspace PVC's mount
    executor_input = {
        "inputs": {
            "parameterValues": {
                "shared_root": str(tmp_path / "kfp-workspace"),
                "run_id": "run-1",
                "command": launcher_args("python record.py"),
                "task_config": task_config,
            },
            "artifacts": {"workspace_in": _artifact("workspace_in", source)},
        },
        "outputs": {
            "artifacts": {"workspace": _artifact("workspace", tmp_path / "out")},
            "outputFile": str(tmp_path / "executor_output.json"),
        },
    }
    container = _executor(spec, "pretrain")
    argv = [*container["command"], *container["args"]]
    argv[argv.index("{{$}}")] = json.dumps(executor_input)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",  # `python3` / `python`: the task env's
        "RECORD_EXIT": str(exit_code),
    }
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    output_file = tmp_path / "executor_output.json"
    return proc, json.loads(output_file.read_text()) if output_file.is_file() else None


def test_kfp_launcher_runs_the_stage_on_the_shared_workspace(two_nodes, tmp_path):
    proc, output = _run_launcher(two_nodes[1][0], tmp_path, TASK_CONFIG)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads((tmp_path / "out" / "seen.json").read_text())
    assert Path(seen["cwd"]).is_relative_to(tmp_path / "kfp-workspace")
    assert "run-1" in Path(seen["cwd"]).parts
    assert seen["launcher"] == "trainjob"
    assert seen["task_config"] == TASK_CONFIG
    assert (tmp_path / "out" / "dvc.yaml").is_file()
    metadata = output["artifacts"]["workspace"]["artifacts"][0]["metadata"]
    assert metadata["stage"] == "pretrain" and metadata["returncode"] == 0


def test_kfp_launcher_fails_with_the_stage_exit_code(two_nodes, tmp_path):
    proc, _ = _run_launcher(two_nodes[1][0], tmp_path, TASK_CONFIG, exit_code=4)
    assert proc.returncode == 4
    assert not (tmp_path / "out").exists()


def test_kfp_launcher_without_a_shared_volume_is_a_configuration_error(two_nodes, tmp_path):
    proc, _ = _run_launcher(two_nodes[1][0], tmp_path, {})
    assert proc.returncode == 2
    assert "TaskConfig" in proc.stderr and "Traceback" not in proc.stderr
