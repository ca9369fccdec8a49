"""The multi-node pretrain TrainJob and the runtime we ship, checked offline against Kubeflow Trainer v2.3.0.

The TrainJob is the body the kubeflow SDK itself would POST (``build_trainjob`` drives its Kubernetes
backend with a recording API object); the schemas are the v2.3.0 CRDs' (tests/data/trainer-v2.3.0), made
strict like ``kubectl --validate=strict``: the API server would silently drop a misspelt field instead.
CEL rules and Trainer's webhook (reserved ``PET_*`` env, runtime existence) are not in the schema, so the
env and name rules are asserted directly.
"""

from __future__ import annotations

import copy
import gzip
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from pipeline_tasks.config import ConfigError, load_params
from pipeline_tasks.orchestration import trainjob
from pipeline_tasks.orchestration.settings import stage_timeout_min

pytest.importorskip("kubeflow.trainer", reason="the kubeflow SDK (0.5.0) lives in the tasks env (.venv)")

REPO = Path(__file__).resolve().parents[2]
SCHEMAS = REPO / "tests" / "data" / "trainer-v2.3.0"
DEPLOY = REPO / "deploy" / "trainer"
WORKSPACE = "/lmpipe/workspaces/lm_pipeline/manual__2025-06-01T00:00:00+00:00"
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")

KFP_TASK_CONFIG = {
    "env": [
        {"name": "MLFLOW_TRACKING_URI", "value": "http://mlflow.lm-pipeline:5000"},
        {"name": "PET_NODE_RANK", "value": "3"},
        {"name": "LMPIPE_PRETRAIN_LAUNCHER", "value": "trainjob"},
        {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hub", "key": "token"}}},
    ],
    "volumes": [{"name": "kfp-workspace", "persistentVolumeClaim": {"claimName": "run-1234-kfp-workspace"}}],
    "volumeMounts": [{"name": "kfp-workspace", "mountPath": "/kfp-workspace"}],
    "resources": {
        "requests": {"cpu": "16", "memory": "96Gi", "nvidia.com/gpu": "2"},
        "limits": {"memory": "96Gi", "nvidia.com/gpu": "2"},
    },
    "nodeSelector": {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
}


def _strict(schema: dict) -> dict:
    """Reject unknown fields wherever the CRD lists the fields and does not keep unknown ones."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if (
                node.get("type") == "object"
                and "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


def _validator(kind: str) -> jsonschema.Draft202012Validator:
    schema = _strict(json.loads(gzip.decompress((SCHEMAS / f"{kind}.schema.json.gz").read_bytes())))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _errors(validator: jsonschema.Draft202012Validator, document: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message[:300]}" for e in validator.iter_errors(document)]


@pytest.fixture(scope="module")
def trainjob_schema() -> jsonschema.Draft202012Validator:
    return _validator("trainjob")


@pytest.fixture(scope="module")
def runtime_schema() -> jsonschema.Draft202012Validator:
    return _validator("trainingruntime")


def _params(**overrides):
    return load_params(REPO / "params.yaml", {"pretrain.nodes": 2, **overrides})


def _build(params, **request) -> dict:
    request.setdefault("workspace", WORKSPACE)
    request.setdefault("environ", {})
    return trainjob.build_trainjob(params, params.orchestration, **request)


def _node_pod_patch(body: dict) -> dict:
    (patch,) = body["spec"]["runtimePatches"]
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert node["name"] == "node"
    return node["template"]["spec"]["template"]["spec"]


def _runtime_documents() -> list[tuple[Path, dict]]:
    files = sorted((DEPLOY / "runtimes").glob("*.yaml"))
    assert files, f"no runtime YAML in {DEPLOY / 'runtimes'}"
    documents = []
    for path in files:
        docs = list(yaml.safe_load_all(path.read_text()))
        # the SDK's container backend reads each file as exactly one runtime
        assert len(docs) == 1, f"{path}: {len(docs)} YAML documents, the container backend needs one per file"
        documents.append((path, docs[0]))
    return documents


# --- the TrainJob body against the v2.3.0 schema ----------------------------------------------------


def test_trainjob_from_repo_params_validates_against_trainer_schema(trainjob_schema):
    params = _params()
    body = _build(params, stage_argv=["-S", "pretrain.nodes=2"])

    assert _errors(trainjob_schema, body) == []
    assert body["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and body["kind"] == "TrainJob"
    assert body["metadata"]["namespace"] == params.orchestration.kubernetes.namespace
    tj = params.orchestration.kubernetes.trainjob
    assert body["spec"]["runtimeRef"] == {"kind": tj.runtime_kind, "name": tj.runtime}
    pod = _node_pod_patch(body)
    assert pod["volumes"] == [
        {"name": "data", "persistentVolumeClaim": {"claimName": params.orchestration.kubernetes.data_pvc}}
    ]
    assert pod["containers"] == [
        {"name": "node", "volumeMounts": [{"name": "data", "mountPath": params.orchestration.container_data_root}]}
    ]


def test_trainjob_from_kfp_task_config_with_queue_validates_against_trainer_schema(trainjob_schema):
    params = _params(**{"pretrain.procs_per_node": 2, "orchestration.kubernetes.trainjob.queue": "lm-gpu-queue"})
    task_config = trainjob.TaskConfig.from_json(json.dumps(KFP_TASK_CONFIG))
    body = _build(params, task_config=task_config)

    assert _errors(trainjob_schema, body) == []
    assert body["metadata"]["labels"] == {"kueue.x-k8s.io/queue-name": "lm-gpu-queue"}
    pod = _node_pod_patch(body)
    assert pod["volumes"] == KFP_TASK_CONFIG["volumes"]
    assert pod["containers"][0]["volumeMounts"] == KFP_TASK_CONFIG["volumeMounts"]
    assert pod["nodeSelector"] == KFP_TASK_CONFIG["nodeSelector"]
    assert pod["tolerations"] == KFP_TASK_CONFIG["tolerations"]
    resources = body["spec"]["trainer"]["resourcesPerNode"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == "2"
    assert {"name": "MLFLOW_TRACKING_URI", "value": "http://mlflow.lm-pipeline:5000"} in body["spec"]["trainer"]["env"]
    # env from a secret cannot be a name=value pair: it reaches the node container through the patch
    secret_env = [e for e in KFP_TASK_CONFIG["env"] if "valueFrom" in e]
    assert secret_env and pod["containers"][0]["env"] == secret_env


@pytest.mark.parametrize(
    ("where", "misspelt"),
    [
        (("spec", "trainer"), "numNode"),
        (("spec", "runtimePatches", 0, "trainingRuntimeSpec", "template", "spec", "replicatedJobs", 0), "templates"),
    ],
    ids=["trainer", "runtime-patch"],
)
def test_trainer_schema_rejects_a_misspelt_field(trainjob_schema, where, misspelt):
    body = _build(_params())
    target = body
    for key in where:
        target = target[key]
    target[misspelt] = 2

    errors = _errors(trainjob_schema, body)

    assert errors and all(misspelt in error for error in errors), errors


# --- the runtime and RBAC we ship -------------------------------------------------------------------


def test_shipped_runtimes_validate_against_trainingruntime_schema(runtime_schema):
    for path, document in _runtime_documents():
        assert _errors(runtime_schema, document) == [], path
        assert document["apiVersion"] == "trainer.kubeflow.org/v1alpha1"


def test_default_trainjob_runtime_is_shipped_and_restarts_the_whole_job():
    from kubeflow.trainer.backends.container.runtime_loader import get_training_runtime_from_sources

    tj = load_params(REPO / "params.yaml").orchestration.kubernetes.trainjob
    shipped = {(doc["kind"], doc["metadata"]["name"]): doc for _, doc in _runtime_documents()}
    runtime = shipped[(tj.runtime_kind, tj.runtime)]
    (node,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    pod = node["template"]["spec"]["template"]["spec"]

    assert trainjob.runtime_max_restarts(tj.runtime) >= 1
    # a failed pod must fail its Job at once, so that JobSet restarts every node together
    assert node["template"]["spec"]["backoffLimit"] == 0 and pod["restartPolicy"] == "Never"
    assert pod["terminationGracePeriodSeconds"] >= 30  # torchrun gives its workers 30 s after SIGTERM
    # the container backend (lmpipe trainjob --backend container) finds it in the same folder
    loaded = get_training_runtime_from_sources(tj.runtime, [str(DEPLOY / "runtimes")])
    assert loaded.trainer.framework == "torch"
    assert loaded.trainer.image == pod["containers"][0]["image"]


def test_kustomization_deploys_runtime_and_launcher_rbac():
    orch = load_params(REPO / "params.yaml").orchestration
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    documents = [doc for item in kustomization["resources"] for doc in yaml.safe_load_all((DEPLOY / item).read_text())]
    by_kind = {doc["kind"]: doc for doc in documents}

    assert kustomization["namespace"] == orch.kubernetes.namespace
    assert by_kind["ServiceAccount"]["metadata"]["name"] == orch.kubernetes.trainjob.service_account
    assert by_kind["RoleBinding"]["subjects"] == [
        {"kind": "ServiceAccount", "name": orch.kubernetes.trainjob.service_account}
    ]
    rules = {
        (group, resource): set(rule["verbs"])
        for rule in by_kind["Role"]["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    assert {"create", "get", "list", "watch", "delete"} <= rules[("trainer.kubeflow.org", "trainjobs")]
    assert {"get", "list"} <= rules[("trainer.kubeflow.org", "trainingruntimes")]
    assert {"get", "list", "watch"} <= rules[("", "pods")]
    assert "get" in rules[("", "pods/log")]


# --- names, env, command ----------------------------------------------------------------------------


def test_job_name_is_short_dns1035_and_one_per_workspace():
    name = trainjob.job_name(WORKSPACE)

    assert DNS_1035.match(name) and len(name) <= 40, name
    assert trainjob.job_name(WORKSPACE) == name
    assert trainjob.job_name(WORKSPACE.replace("2025-06-01", "2025-06-02")) != name
    assert _build(_params())["metadata"]["name"] == name


def test_trainer_env_leaves_out_torchrun_topology_and_launcher_settings():
    launcher_only = {
        "PET_NNODES": "9",
        "PET_MASTER_ADDR": "10.0.0.1",
        "LMPIPE_PRETRAIN_LAUNCHER": "trainjob",
        "LMPIPE_TRAINJOB_TASK_CONFIG": "{}",
        "LMPIPE_TRAINJOB_BACKEND": "kubernetes",
    }
    environ = {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "LMPIPE_LOG_LEVEL": "DEBUG", **launcher_only}
    params = _params(
        **{
            "orchestration.pass_env": sorted(environ),
            "pretrain.procs_per_node": 2,  # KFP_TASK_CONFIG asks for 2 GPUs per node
            "orchestration.kubernetes.trainjob.node_resources.gpus": 2,
        }
    )
    task_config = trainjob.TaskConfig.from_json(json.dumps(KFP_TASK_CONFIG))

    for request in ({}, {"task_config": task_config}):
        body = _build(params, environ=environ, **request)
        names = {entry["name"] for entry in body["spec"]["trainer"].get("env", [])}

        assert "MLFLOW_TRACKING_URI" in names and "LMPIPE_LOG_LEVEL" in names
        assert not {n for n in names if n.startswith(("PET_", "LMPIPE_TRAINJOB_")) or n in launcher_only}, names


def test_node_command_pins_procs_per_node_and_runs_in_the_workspace():
    workspace = "/lmpipe/workspaces/lm pipeline/run 1"  # a path a shell would split
    body = _build(
        _params(**{"pretrain.procs_per_node": 4, "orchestration.kubernetes.trainjob.node_resources.gpus": 4}),
        workspace=workspace,
        stage_argv=["-S", "pretrain.nodes=2"],
    )
    command = body["spec"]["trainer"]["command"]
    script = shlex.split(command[-1])

    assert command[:2] == ["tini", "--"]  # PID 1 forwards SIGTERM to torchrun
    assert script[:3] == ["cd", workspace, "&&"]
    torchrun = script[script.index("torchrun") :]
    assert "--nproc-per-node=4" in torchrun and "--max-restarts=0" in torchrun
    assert torchrun[-5:] == ["-m", "pipeline_tasks", "pretrain", "-S", "pretrain.nodes=2"]


# --- topology, image, deadline ----------------------------------------------------------------------


@pytest.mark.parametrize("source", ["params", "kfp-task-config"])
def test_gpus_per_node_must_equal_procs_per_node(source):
    gpus = 1 if source == "kfp-task-config" else 2  # KFP_TASK_CONFIG asks for 2 GPUs per node
    params = _params(**{"pretrain.procs_per_node": 1, "orchestration.kubernetes.trainjob.node_resources.gpus": gpus})
    request = {"task_config": trainjob.TaskConfig.from_json(json.dumps(KFP_TASK_CONFIG))} if gpus == 1 else {}

    with pytest.raises(ConfigError, match="procs_per_node"):
        _build(params, **request)


@pytest.mark.parametrize("gpus", [0, 1])
def test_nodes_image_and_resources_follow_params(gpus):
    params = _params(**{"pretrain.nodes": 3, "orchestration.kubernetes.trainjob.node_resources.gpus": gpus})
    trainer = _build(params)["spec"]["trainer"]
    orch = params.orchestration

    assert trainer["numNodes"] == 3
    assert trainer["image"] == (orch.gpu_image if gpus else orch.image)
    assert ("nvidia.com/gpu" in trainer["resourcesPerNode"]["limits"]) == bool(gpus)


def test_active_deadline_defaults_to_the_stage_timeout():
    params = _params(**{"orchestration.stage_timeout_min.pretrain": 37})
    default = _build(params)["spec"]["activeDeadlineSeconds"]
    explicit = _build(_params(**{"orchestration.kubernetes.trainjob.active_deadline_s": 5400}))

    assert params.orchestration.kubernetes.trainjob.active_deadline_s == 0
    assert default == 60 * stage_timeout_min("pretrain", params.orchestration) == 60 * 37
    assert explicit["spec"]["activeDeadlineSeconds"] == 5400


# --- the CLI ----------------------------------------------------------------------------------------


def _lmpipe_trainjob(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    shutil.copy2(REPO / "params.yaml", tmp_path / "params.yaml")
    env = {k: v for k, v in os.environ.items() if k != "LMPIPE_PARAMS"}
    return subprocess.run(
        [sys.executable, "-m", "pipeline_tasks", "trainjob", "--dry-run", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_dry_run_prints_a_valid_trainjob(tmp_path, trainjob_schema):
    proc = _lmpipe_trainjob(tmp_path, "-S", "pretrain.nodes=2")

    assert proc.returncode == 0, proc.stderr[-3000:]
    body = yaml.safe_load(proc.stdout)
    assert _errors(trainjob_schema, body) == []
    assert body["spec"]["trainer"]["numNodes"] == 2
    assert shlex.split(body["spec"]["trainer"]["command"][-1])[:2] == ["cd", str(tmp_path)]
    assert body["metadata"]["name"] == trainjob.job_name(tmp_path)


def test_cli_dry_run_with_one_node_is_a_configuration_error(tmp_path):
    proc = _lmpipe_trainjob(tmp_path, "-S", "pretrain.nodes=1")

    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "pretrain.nodes" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == ""
