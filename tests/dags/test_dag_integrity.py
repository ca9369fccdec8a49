"""DAG integrity: DagBag without import errors, DAG hygiene, light imports, stage wiring from dvc.yaml
and the command of every node for each runner (local / docker / kubernetes). Airflow-side checks
run in ``.venv-airflow`` subprocesses (see conftest)."""

from __future__ import annotations

import shlex

import pytest
import yaml

from pipeline_tasks.stages import GPU_STAGES
from tests.dags.conftest import REPO, airflow_env, dvc_stage_names, probe

DAG_IDS = ("lm_retraining", "lm_drift_monitor", "lm_promote")
DRIVER = ["python", "-m", "pipeline_tasks.orchestration"]


def _dvc_cmds() -> dict[str, list[str]]:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    return {name: shlex.split(stage["cmd"]) for name, stage in stages.items()}


@pytest.fixture(scope="module")
def bags(airflow_db, tmp_path_factory):
    """DagBag reports of the DAG folder under each runner."""
    data = tmp_path_factory.mktemp("data")
    return {
        runner: probe(airflow_env(airflow_db, data, LMPIPE_RUNNER=runner), "dagbag", str(REPO / "dags"))
        for runner in ("local", "docker", "kubernetes")
    }


@pytest.mark.airflow
@pytest.mark.parametrize("runner", ["local", "docker", "kubernetes"])
def test_dagbag_imports_every_dag_without_errors(bags, runner):
    report = bags[runner]
    assert report["import_errors"] == {}
    assert sorted(report["dags"]) == sorted(DAG_IDS)


@pytest.mark.airflow
@pytest.mark.parametrize("dag_id", DAG_IDS)
def test_dag_has_tags_retries_static_start_and_no_catchup(bags, dag_id):
    dag = bags["local"]["dags"][dag_id]
    assert dag["tags"] and "lm-pipeline" in dag["tags"]
    assert dag["default_retries"] is not None and dag["default_retries"] >= 1
    assert dag["start_date"].startswith("2025-01-01")
    assert dag["catchup"] is False
    assert dag["max_active_runs"] == 1
    assert dag["doc_md"] and dag["has_failure_callback"]


@pytest.mark.airflow
@pytest.mark.parametrize("path", sorted(p.name for p in (REPO / "dags").glob("*.py")))
def test_dag_file_import_is_light_and_fast(airflow_db, tmp_path, path):
    report = probe(airflow_env(airflow_db, tmp_path), "import-cost", str(REPO / "dags" / path))
    assert report["heavy"] == [], f"{path} imports {report['heavy']} at parse time"
    assert report["seconds"] < 0.5, f"{path} took {report['seconds']:.2f} s to import (after airflow.sdk)"


@pytest.mark.airflow
def test_retraining_stage_tasks_equal_dvc_stages_in_order(bags):
    dag = bags["local"]["dags"]["lm_retraining"]
    stages = dvc_stage_names()
    assert stages, "dvc.yaml has no stages"
    ordered = [t for t in dag["task_order"] if t in dag["tasks"] and t in stages]
    assert ordered == stages
    assert [t for t in dag["tasks"] if t in stages] == stages
    # a linear chain: each stage runs after the previous one (one DVC lock per workspace)
    for previous, stage in zip(["prepare_workspace", *stages], stages):
        assert previous in dag["tasks"][stage]["upstream"]


@pytest.mark.airflow
def test_local_node_command_is_the_dvc_stage_command_in_the_task_env(bags):
    import sys

    tasks = bags["local"]["dags"]["lm_retraining"]["tasks"]
    for stage, cmd in _dvc_cmds().items():
        argv = shlex.split(tasks[stage]["bash_command"])
        assert argv[0] == sys.executable  # the task env's interpreter, never Airflow's
        assert argv[1:] == [*DRIVER[1:], "stage", "--", *cmd]
        assert argv[argv.index("--") + 1 :] == cmd
        env = tasks[stage]["env"]
        assert "{{ run_id | lmpipe_ws }}" in env["LMPIPE_WORKSPACE"]


@pytest.mark.airflow
@pytest.mark.parametrize("runner", ["docker", "kubernetes"])
def test_container_node_args_end_with_the_dvc_stage_command(bags, runner):
    tasks = bags[runner]["dags"]["lm_retraining"]["tasks"]
    key = "command" if runner == "docker" else "arguments"
    for stage, cmd in _dvc_cmds().items():
        assert tasks[stage][key] == [*DRIVER, "stage", "--", *cmd]
        assert tasks[stage]["image"].startswith(
            "lm-pipeline-tasks-cuda:" if stage in GPU_STAGES else "lm-pipeline-tasks:"
        )
    assert tasks["prepare_workspace"][key] == [*DRIVER, "init"]


@pytest.mark.airflow
def test_kubernetes_gpu_stages_request_a_gpu_on_gpu_nodes(bags):
    tasks = bags["kubernetes"]["dags"]["lm_retraining"]["tasks"]
    for stage in _dvc_cmds():
        node = tasks[stage]
        if stage in GPU_STAGES:
            assert node["resources"]["limits"]["nvidia.com/gpu"] == "1"
            assert node["node_selector"] == {"nvidia.com/gpu.present": "true"}
            assert node["tolerations"][0]["key"] == "nvidia.com/gpu"
            assert node["pool"] == "gpu"
        else:
            assert "nvidia.com/gpu" not in node["resources"]["requests"]
            assert node["resources"]["requests"]["cpu"] and node["resources"]["requests"]["memory"]
            assert not node["node_selector"]
        assert "{{ run_id | lmpipe_ws }}" in node["env_vars"]["LMPIPE_WORKSPACE"]
        assert node["env_vars"]["LMPIPE_XCOM_FILE"] == "/airflow/xcom/return.json"  # read by the XCom sidecar


@pytest.mark.airflow
def test_docker_gpu_stages_get_device_requests(bags):
    tasks = bags["docker"]["dags"]["lm_retraining"]["tasks"]
    for stage in _dvc_cmds():
        requests = tasks[stage]["device_requests"]
        if stage in GPU_STAGES:
            assert requests == [{"count": 1, "capabilities": [["gpu"]]}]
        else:
            assert not requests
        assert tasks[stage]["auto_remove"] == "success"


@pytest.mark.airflow
def test_retries_backoff_and_timeouts_follow_the_stage_kind(bags):
    tasks = bags["local"]["dags"]["lm_retraining"]["tasks"]
    for stage in _dvc_cmds():
        node = tasks[stage]
        assert node["execution_timeout_s"] and node["execution_timeout_s"] > 0
        if stage in ("ingest_wiki", "ingest_news", "prepare", "validate", "tokenize"):
            assert node["retry_exponential_backoff"] and node["retries"] == 3
        if stage in GPU_STAGES:
            assert node["retries"] == 2 and not node["retry_exponential_backoff"]


@pytest.mark.airflow
def test_gate_check_sits_between_evaluate_and_register(bags):
    tasks = bags["local"]["dags"]["lm_retraining"]["tasks"]
    assert tasks["check_gates"]["upstream"] == ["evaluate"]
    assert tasks["check_gates"]["operator"] == "_ShortCircuitDecoratedOperator"
    assert "check_gates" in tasks["register"]["upstream"]
    assert tasks["emit_evaluation_passed"]["upstream"] == ["register"]
    assert tasks["record_lineage"]["trigger_rule"] == "none_failed"
    assert set(dvc_stage_names()) <= set(tasks["record_lineage"]["upstream"])  # waits for every stage


@pytest.mark.airflow
def test_retraining_runs_on_cron_or_drift_asset(bags):
    dag = bags["local"]["dags"]["lm_retraining"]
    assert dag["schedule"] == "AssetOrTimeSchedule"
    assert bags["local"]["dags"]["lm_promote"]["schedule"] == "AssetTriggeredTimetable"
    assert bags["local"]["dags"]["lm_drift_monitor"]["schedule"] == "CronTriggerTimetable"


@pytest.mark.airflow
def test_promote_dag_wires_approval_and_promote_commands(bags):
    tasks = bags["local"]["dags"]["lm_promote"]["tasks"]
    assert tasks["approve"]["operator"] == "ApprovalOperator"
    # user input (version, reason) reaches the command through the env, never spliced into the script
    assert tasks["promote_version"]["bash_command"].endswith(
        '-- python -m pipeline_tasks promote --version "${LMPIPE_VERSION}" --reason "${LMPIPE_REASON}"'
    )
    rollback = tasks["rollback"]["bash_command"]
    assert "-- python -m pipeline_tasks rollback" in rollback
    assert {tasks[t]["pool"] for t in ("promote", "promote_version", "rollback")} == {"promote"}
    docker = bags["docker"]["dags"]["lm_promote"]["tasks"]["promote_version"]["command"]
    # no shell in containers: the version is the rendered template itself
    assert "{% set request = ti.xcom_pull(task_ids='resolve_request') %}{{ request.version or '' }}" in docker


@pytest.mark.airflow
def test_drift_dag_starts_from_the_training_reference_and_emits_the_asset(bags):
    tasks = bags["local"]["dags"]["lm_drift_monitor"]["tasks"]
    assert "stage --upstream-if-missing --" in tasks["monitor"]["bash_command"]
    # the training reference: the dvc.lock an accepted retraining run published
    assert tasks["prepare_workspace"]["env"]["LMPIPE_REFERENCE_LOCK"].endswith(
        "/state/references/lm_retraining.dvc.lock"
    )
    retraining = bags["local"]["dags"]["lm_retraining"]["tasks"]["record_lineage"]
    # published only when the gates passed: the template reads check_gates' decision
    assert "ti.xcom_pull(task_ids='check_gates')" in retraining["env"]["LMPIPE_PUBLISH"]
    assert tasks["check_drift"]["upstream"] == ["monitor"]
    assert "check_drift" in tasks["emit_drift_event"]["upstream"]
    assert "drift_overrides(dag_run.logical_date, params)" in tasks["prepare_workspace"]["env"]["LMPIPE_OVERRIDES_JSON"]
