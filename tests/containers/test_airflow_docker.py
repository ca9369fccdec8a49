"""The DAGs with the ``docker`` runner through a real Airflow 3 scheduler (api-server + scheduler +
dag-processor on 127.0.0.1, SQLite + LocalExecutor): every node is a DockerOperator container of the
task image, on the tiny profile, with no network (the registry is MLflow's SQLite store on the shared
volume). Three ``lm_retraining`` runs at once, each in its own workspace: one passes its gates (so
``register`` runs and the evaluation-passed Asset fires), one fails them (``register`` skipped), one
has a stage that fails inside its container (the task fails with the stage's exit code and message,
and nothing half-written is left). Then ``lm_promote`` promotes the registered challenger, also in
containers. ``docker ps -a`` keeps one container per node (``auto_remove: never``), found by label.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.containers.conftest import give_to_node_user, hand_back
from tests.dags.conftest import (
    RELAXED_GATES,
    STRICT_GATES,
    dvc_stage_names,
    running_airflow_stack,
    tiny_overrides,
)

pytestmark = [pytest.mark.containers, pytest.mark.slow, pytest.mark.airflow]

CONTAINER_DATA_ROOT = "/lmpipe"
# a source whose checksum cannot match: ingest_news fails inside its container, at run time
BROKEN_NEWS = [
    {
        "name": "checksum_mismatch",
        "format": "csv",
        "mirror_path": "ag_news/mhjabreel_CharCnn_Keras/test.csv",
        "sha256": "0" * 64,
        "columns": {"label": 0, "title": 1, "body": 2},
        "lang": "en",
    }
]


def _host_path(data_root: Path, container_path: str) -> Path:
    return data_root / Path(container_path).relative_to(CONTAINER_DATA_ROOT)


def _containers(docker: str, dag_id: str) -> list[dict]:
    proc = subprocess.run(
        [docker, "ps", "-a", "--filter", f"label=io.lm-pipeline.dag={dag_id}", "--format", "{{json .}}"],
        capture_output=True,
        text=True,
        check=True,
    )
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def _summary(client, dag_id: str, run_id: str, task_id: str) -> dict:
    value = client.xcom(dag_id, run_id, task_id)
    assert isinstance(value, dict), f"{task_id}: the XCom is not the parsed summary: {str(value)[:300]}"
    return value


def _task_log(client, dag_id: str, run_id: str, task_id: str) -> str:
    body = client.get(client.run_path(dag_id, run_id) + f"/taskInstances/{task_id}/logs/1?full_content=true")
    return "\n".join(str(event.get("event")) for event in body["content"])


@pytest.fixture()
def docker_stack(airflow_python, docker, images, corpora, tmp_path):
    pytest.importorskip("psutil", reason="psutil (an Airflow dependency) is needed to stop the stack cleanly")
    root = tmp_path / "af"
    data_root = root / "data"
    data_root.mkdir(parents=True)
    give_to_node_user(data_root)
    orchestration = {
        "max_active_runs": 3,
        # one try per node: one container per node, and the broken run fails at once
        "retries": 0,
        "data_retries": 0,
        "training_retries": 0,
        "image": images["tasks"],
        "gpu_image": images["tasks"],  # no GPU here: the GPU stages run the CPU image, without a device request
        "docker.data_volume": str(data_root),
        "docker.mirror_source": str(corpora),
        "docker.network_mode": "none",
        "docker.gpus": 0,
        "docker.auto_remove": "never",
        "docker.url": "unix:///var/run/docker.sock",
    }
    with running_airflow_stack(root, orchestration, LMPIPE_RUNNER="docker") as (client, data):
        try:
            yield client, data
        finally:
            for dag_id in ("lm_retraining", "lm_promote"):
                ids = [c["ID"] for c in _containers(docker, dag_id)]
                if ids:
                    subprocess.run([docker, "rm", "-f", *ids], capture_output=True)
            hand_back(docker, images["tasks"], data_root)


def test_retraining_and_promotion_run_every_node_in_a_container(docker_stack, docker):
    client, data_root = docker_stack
    stages = dvc_stage_names()
    client.wait_for_dag("lm_retraining")
    runs = {
        "docker_pass": ("2025-04-07T03:00:00+00:00", tiny_overrides(**RELAXED_GATES)),
        "docker_fail": ("2025-04-14T03:00:00+00:00", tiny_overrides(**STRICT_GATES, seed=7)),
        "docker_broken": ("2025-04-21T03:00:00+00:00", tiny_overrides(**{"ingest_news.sources": BROKEN_NEWS})),
    }
    started = time.monotonic()
    for run_id, (logical_date, overrides) in runs.items():
        client.trigger("lm_retraining", run_id, logical_date, {"params_overrides": overrides})
    states = client.wait_for_runs("lm_retraining", list(runs), timeout=2400)
    elapsed = time.monotonic() - started
    print(f"\ndocker runner: 3 concurrent lm_retraining runs in {elapsed:.0f} s")
    assert states["docker_pass"] == "success", client.failure_report("lm_retraining", "docker_pass")
    assert states["docker_fail"] == "success", client.failure_report("lm_retraining", "docker_fail")
    assert states["docker_broken"] == "failed", client.failure_report("lm_retraining", "docker_broken")

    workspaces, executed = {}, set()
    for run_id, gates_pass in (("docker_pass", True), ("docker_fail", False)):
        task_states = client.task_states("lm_retraining", run_id)
        expected = {s: "success" for s in ["prepare_workspace", *stages, "record_lineage", "check_gates"]}
        expected["register"] = expected["emit_evaluation_passed"] = "success" if gates_pass else "skipped"
        assert {t: task_states.get(t) for t in expected} == expected, task_states
        workspace = _host_path(data_root, _summary(client, "lm_retraining", run_id, "prepare_workspace")["workspace"])
        workspaces[run_id] = workspace
        lock = yaml.safe_load((workspace / "dvc.lock").read_text())["stages"]
        assert set(lock) == {s for s in stages if gates_pass or s != "register"}
        for stage in stages:
            if gates_pass or stage != "register":
                summary = _summary(client, "lm_retraining", run_id, stage)
                # the two runs share the DVC cache: a stage whose inputs the other run already ran is
                # restored from DVC's run cache ("is cached"), which is the point of sharing it
                assert summary["returncode"] == 0 and (summary["ran"] or summary["cached"]), (stage, summary)
                if summary["ran"]:
                    executed.add(stage)
                assert all((workspace / out).exists() for out in summary["outs"]), (stage, summary["outs"])
    assert executed == set(stages), set(stages) - executed
    assert workspaces["docker_pass"] != workspaces["docker_fail"]
    assert all(w.parent == data_root / "workspaces" / "lm_retraining" for w in workspaces.values())
    gates = json.loads((workspaces["docker_pass"] / "reports/evaluate/gates.json").read_text())
    assert gates["passed"] is True
    # the node summaries reach the Python tasks as dicts (the last log line, parsed): the Asset event
    # carries the registered version to lm_promote
    announced = client.xcom("lm_retraining", "docker_pass", "emit_evaluation_passed")
    assert announced["registration"]["status"] == "registered" and announced["registration"]["version"]

    # one container per node that ran, each labelled with its node, all exited
    containers = _containers(docker, "lm_retraining")
    ran = [t for r in runs for t, s in client.task_states("lm_retraining", r).items() if s in ("success", "failed")]
    python_tasks = {"check_gates", "emit_evaluation_passed"}  # TaskFlow in Airflow itself, not nodes
    assert len(containers) == len([t for t in ran if t not in python_tasks]), (len(containers), ran)
    assert all(c["State"] == "exited" for c in containers)

    # the broken stage: its task failed with the stage's exit code and message; nothing half-written
    broken = client.task_states("lm_retraining", "docker_broken")
    assert broken["ingest_news"] == "failed" and broken["register"] in ("upstream_failed", "skipped")
    log = _task_log(client, "lm_retraining", "docker_broken", "ingest_news")
    assert "ingest_news failed: /lmpipe/mirror/ag_news" in log and "sha256 mismatch" in log, log[-3000:]
    assert "the stage exited with 1" in log and '"returncode": 1' in log, log[-3000:]
    exits = [c["Status"] for c in containers if "io.lm-pipeline.node=ingest_news" in c["Labels"]]
    assert sorted(status.split(")")[0] for status in exits) == ["Exited (0", "Exited (0", "Exited (1"], exits
    broken_ws = _host_path(
        data_root, _summary(client, "lm_retraining", "docker_broken", "prepare_workspace")["workspace"]
    )
    assert not (broken_ws / "data/raw/news").exists()
    assert not list(broken_ws.glob("data/raw/.*.tmp")) and not list(broken_ws.glob("data/raw/news*"))

    # the passed evaluation's Asset event starts lm_promote; promote the challenger by hand, in containers
    client.wait_for_dag("lm_promote")
    conf = {"require_approval": False, "reason": "docker runner test", "params_overrides": RELAXED_GATES}
    client.trigger("lm_promote", "docker_promote", "2025-04-22T00:00:00+00:00", conf)
    promote_state = client.wait_for_runs("lm_promote", ["docker_promote"], timeout=900)["docker_promote"]
    assert promote_state == "success", client.failure_report("lm_promote", "docker_promote")
    promote_states = client.task_states("lm_promote", "docker_promote")
    assert promote_states["promote"] == "success" and promote_states["rollback"] == "skipped"
    result = _summary(client, "lm_promote", "docker_promote", "promote")["result"]
    assert result["status"] == "promoted", result
    promote_nodes = {
        c["Labels"].split("io.lm-pipeline.node=")[1].split(",")[0] for c in _containers(docker, "lm_promote")
    }
    assert {"prepare_workspace", "promote"} <= promote_nodes
    asset_runs = [
        r for r in client.get("/api/v2/dags/lm_promote/dagRuns")["dag_runs"] if r["run_type"] == "asset_triggered"
    ]
    assert len(asset_runs) == 1, "the evaluation-passed Asset event did not start lm_promote"
