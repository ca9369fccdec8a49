"""``pretrain.nodes > 1`` under the kubernetes runner: the ``pretrain`` node of ``lm_retraining``
becomes a CPU launcher pod that submits the Kubeflow Trainer TrainJob (service account with the
TrainJob RBAC, ``LMPIPE_PRETRAIN_LAUNCHER=trainjob``, no GPU); ``nodes: 1`` keeps the GPU pod, and
the other runners run torchrun in their own node. DAGs are parsed in ``.venv-airflow`` (see conftest)."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from pipeline_tasks.config import apply_override
from pipeline_tasks.orchestration.settings import load_orchestration_params
from tests.dags.conftest import AIRFLOW_PY, REPO, airflow_env

LAUNCHER_SA = "lmpipe-trainjob-launcher"

# The probe's task report plus what it leaves out: the pod's service account
PROBE = """
import json, sys
sys.path.insert(0, sys.argv[1])
import airflow_probe
bag = airflow_probe._bag(sys.argv[2])
assert not bag.import_errors, bag.import_errors
tasks = {}
for task in bag.dags["lm_retraining"].tasks:
    report = airflow_probe._task_report(task)
    report["service_account_name"] = getattr(task, "service_account_name", None)
    tasks[task.task_id] = report
print(json.dumps(tasks, default=str))
"""


def _retraining_tasks(airflow_db, tmp_path, runner: str, nodes: int) -> dict:
    """The task reports of lm_retraining parsed with ``runner`` and params ``pretrain.nodes: nodes``."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    apply_override(raw, "pretrain.nodes", nodes)
    params_file = tmp_path / f"params-{runner}-{nodes}.yaml"
    params_file.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    env = airflow_env(airflow_db, tmp_path / "data", LMPIPE_RUNNER=runner, LMPIPE_ORCHESTRATION_PARAMS=str(params_file))
    proc = subprocess.run(
        [str(AIRFLOW_PY), "-c", PROBE, str(REPO / "tests" / "dags"), str(REPO / "dags")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def orch():
    return load_orchestration_params(REPO / "params.yaml")


@pytest.fixture(scope="module")
def two_nodes(airflow_db, tmp_path_factory):
    return _retraining_tasks(airflow_db, tmp_path_factory.mktemp("k8s2"), "kubernetes", 2)


@pytest.mark.airflow
def test_kubernetes_pretrain_with_two_nodes_is_a_cpu_trainjob_launcher(two_nodes, orch):
    node = two_nodes["pretrain"]
    assert node["operator"] == "KubernetesPodOperator"
    assert node["service_account_name"] == orch.kubernetes.trainjob.service_account == LAUNCHER_SA
    assert node["env_vars"]["LMPIPE_PRETRAIN_LAUNCHER"] == "trainjob"
    cpu = orch.kubernetes.cpu_resources
    assert node["resources"]["requests"] == {"cpu": cpu.cpu, "memory": cpu.memory}
    assert "nvidia.com/gpu" not in (node["resources"]["limits"] or {})
    assert not node["node_selector"] and "tolerations" not in node
    assert node["pool"] != orch.gpu_pool
    assert node["image"] == orch.image
    # the same driver + dvc stage command: `python -m pipeline_tasks pretrain` launches the TrainJob
    assert node["arguments"][-4:] == ["python", "-m", "pipeline_tasks", "pretrain"]
    assert "{{ run_id | lmpipe_ws }}" in node["env_vars"]["LMPIPE_WORKSPACE"]
    # a retry re-attaches to (or resubmits) the TrainJob named after the workspace
    assert node["retries"] == orch.training_retries


@pytest.mark.airflow
def test_kubernetes_finetune_stays_a_gpu_pod_when_pretrain_has_two_nodes(two_nodes, orch):
    node = two_nodes["finetune"]
    assert node["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert node["node_selector"] == dict(orch.kubernetes.gpu_node_selector)
    assert node["pool"] == orch.gpu_pool
    assert "LMPIPE_PRETRAIN_LAUNCHER" not in node["env_vars"]
    assert node["service_account_name"] == (orch.kubernetes.service_account or None)


@pytest.mark.airflow
def test_kubernetes_pretrain_with_one_node_is_the_gpu_pod(airflow_db, tmp_path, orch):
    node = _retraining_tasks(airflow_db, tmp_path, "kubernetes", 1)["pretrain"]
    assert node["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert node["node_selector"] == dict(orch.kubernetes.gpu_node_selector)
    assert node["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert node["pool"] == orch.gpu_pool
    assert node["image"] == orch.gpu_image
    assert "LMPIPE_PRETRAIN_LAUNCHER" not in node["env_vars"]
    assert node["service_account_name"] == (orch.kubernetes.service_account or None)


@pytest.mark.airflow
def test_docker_pretrain_with_two_nodes_runs_torchrun_in_its_gpu_container(airflow_db, tmp_path, orch):
    node = _retraining_tasks(airflow_db, tmp_path, "docker", 2)["pretrain"]
    assert node["device_requests"] == [{"count": 1, "capabilities": [["gpu"]]}]
    assert node["image"] == orch.gpu_image
    assert "LMPIPE_PRETRAIN_LAUNCHER" not in node["environment"]


@pytest.mark.airflow
def test_ray_address_of_airflow_reaches_the_data_nodes(airflow_db, tmp_path, monkeypatch):
    """``executor.kind: ray`` on Airflow: the scheduler's RAY_ADDRESS (orchestration.pass_env) is set
    in every container node, so the prepare node attaches to that Ray cluster."""
    monkeypatch.setenv("RAY_ADDRESS", "ray://lmpipe-ray-head-svc.lm-pipeline:10001")
    tasks = _retraining_tasks(airflow_db, tmp_path, "kubernetes", 1)
    for stage in ("ingest_wiki", "ingest_news", "prepare", "validate", "tokenize"):
        assert tasks[stage]["env_vars"]["RAY_ADDRESS"] == "ray://lmpipe-ray-head-svc.lm-pipeline:10001", stage
