"""Real runs of the DAGs with the ``local`` runner on the tiny profile: every stage of dvc.yaml
executes through DVC in the task env, in a per-run workspace sharing one DVC cache.

1. ``dag.test()``: retraining (gates relaxed: the promotion path runs) -> drift monitor (same data
   root: the training reference comes from the shared cache) -> promotion without approval.
2. A real scheduler (api-server + scheduler + dag-processor, SQLite + LocalExecutor on 127.0.0.1):
   two retraining runs on different logical dates triggered over the REST API at once, one whose
   gates pass and one whose gates fail (its register is skipped, the run still succeeds).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from tests.dags.conftest import (
    RELAXED_GATES,
    REPO,
    STRICT_GATES,
    airflow_env,
    dvc_stage_names,
    probe,
    tiny_overrides,
)

pytestmark = [pytest.mark.slow, pytest.mark.airflow]


def _workspace(summary: dict) -> Path:
    return Path(summary["workspace"])


def _assert_promotion_path(states: dict, gates_pass: bool) -> None:
    assert states["check_gates"] == "success"
    expected = "success" if gates_pass else "skipped"
    assert states["emit_evaluation_passed"] == expected
    assert states["register"] == expected


def _assert_lineage(workspace: Path, stages: list[str], run_id: str, gates_pass: bool) -> dict:
    """lineage.json names every stage that ran: all of them, but register when the gates failed."""
    lineage = json.loads((workspace / "lineage.json").read_text())
    assert lineage["run_id"] == run_id
    assert lineage["dvc_lock_sha256"] and lineage["source"]["tree_sha256"]
    ran = {s for s in stages if gates_pass or s != "register"}
    assert set(yaml.safe_load((workspace / "dvc.lock").read_text())["stages"]) == ran
    assert set(lineage["stages"]) == ran
    return lineage


def test_dags_run_end_to_end_with_dag_test(airflow_db, tmp_path, mirror_env):
    stages = dvc_stage_names()
    data = tmp_path / "data"
    env = airflow_env(airflow_db, data)
    conf = {"params_overrides": tiny_overrides(**RELAXED_GATES)}
    run = probe(
        env,
        "dag-test",
        str(REPO / "dags"),
        "lm_retraining",
        "2025-02-03T03:00:00+00:00",
        json.dumps(conf),
        timeout=1800,
    )
    assert run["state"] == "success", run["states"]
    states = run["states"]
    assert all(states[s] == "success" for s in ["prepare_workspace", *stages, "record_lineage"]), states
    _assert_promotion_path(states, gates_pass=True)

    xcoms = run["xcoms"]
    workspace = _workspace(xcoms["prepare_workspace"])
    assert workspace.parent == data / "workspaces" / "lm_retraining"
    for stage in stages:  # XCom: paths and small JSON only; the data is in the workspace
        summary = xcoms[stage]
        assert summary["stage"] == stage and summary["returncode"] == 0 and summary["ran"]
        assert len(json.dumps(summary)) < 64_000
        assert all((workspace / out).exists() for out in summary["outs"]), summary["outs"]
    lineage = _assert_lineage(workspace, stages, run["run_id"], gates_pass=True)
    assert xcoms["record_lineage"]["dvc_lock_sha256"] == lineage["dvc_lock_sha256"]
    # the persistent checkpoints live in the run's workspace (resume on retry)
    assert any((workspace / "models" / "pretrain" / "checkpoints").iterdir())

    drift_conf = {
        "params_overrides": conf["params_overrides"],
        "window_start": "2012-01-01",
        "window_end": "2030-01-01",
    }
    drift = probe(
        env,
        "dag-test",
        str(REPO / "dags"),
        "lm_drift_monitor",
        "2025-02-04T05:00:00+00:00",
        json.dumps(drift_conf),
        timeout=1800,
    )
    assert drift["state"] == "success", drift["states"]
    summary = json.loads((_workspace(drift["xcoms"]["monitor"]) / "reports/monitor/drift_summary.json").read_text())
    assert drift["states"]["emit_drift_event"] == ("success" if summary["drift_detected"] else "skipped")
    # the training reference is the retraining run's published dvc.lock, checked out of the shared
    # cache: only the monitor stage itself ran
    monitor = drift["xcoms"]["monitor"]
    assert monitor["ran"] and monitor["with_upstream"] is False
    source = json.loads((_workspace(monitor) / ".lmpipe" / "source.json").read_text())
    assert source["reference_lock"]["path"].endswith("state/references/lm_retraining.dvc.lock")
    drift_params = yaml.safe_load((_workspace(drift["xcoms"]["monitor"]) / "params.yaml").read_text())
    assert drift_params["monitor"]["window_start"] == "2012-01-01"

    # promote re-checks the gates with params.yaml's thresholds: the 4-step model is refused ...
    refused = probe(
        env,
        "dag-test",
        str(REPO / "dags"),
        "lm_promote",
        "2025-02-05T00:00:00+00:00",
        json.dumps({"require_approval": False, "reason": "dag test"}),
        timeout=900,
    )
    assert refused["state"] == "failed" and refused["states"]["promote"] == "failed", refused["states"]
    # ... and promoted under the thresholds it was evaluated with
    promote = probe(
        env,
        "dag-test",
        str(REPO / "dags"),
        "lm_promote",
        "2025-02-06T00:00:00+00:00",
        json.dumps({"require_approval": False, "reason": "dag test", "params_overrides": RELAXED_GATES}),
        timeout=900,
    )
    assert promote["state"] == "success", promote["states"]
    assert promote["states"]["promote"] == "success"
    assert promote["states"]["approve"] == "skipped"
    assert promote["states"]["rollback"] == "skipped"
    result = promote["xcoms"]["promote"]["result"]
    assert result["status"] in ("promoted", "noop"), result


def test_retraining_two_concurrent_runs_through_a_real_scheduler(airflow_stack, mirror_env):
    client, data = airflow_stack
    stages = dvc_stage_names()
    client.wait_for_dag("lm_retraining")
    runs = {
        "ci_pass": ("2025-03-03T03:00:00+00:00", tiny_overrides(**RELAXED_GATES)),
        "ci_fail": ("2025-03-10T03:00:00+00:00", tiny_overrides(**STRICT_GATES, seed=7)),
    }
    started = time.monotonic()
    for run_id, (logical_date, overrides) in runs.items():
        client.trigger("lm_retraining", run_id, logical_date, {"params_overrides": overrides})
    states = client.wait_for_runs("lm_retraining", list(runs), timeout=1500)
    elapsed = time.monotonic() - started
    for run_id, state in states.items():
        assert state == "success", client.failure_report("lm_retraining", run_id)
    print(f"\nreal scheduler: 2 concurrent lm_retraining runs ({len(stages)} stages each) in {elapsed:.0f} s")

    workspaces = {}
    for run_id in runs:
        task_states = client.task_states("lm_retraining", run_id)
        _assert_promotion_path(task_states, gates_pass=run_id == "ci_pass")
        assert task_states["record_lineage"] == "success"
        summary = client.xcom("lm_retraining", run_id, "prepare_workspace")
        workspaces[run_id] = _workspace(summary if isinstance(summary, dict) else json.loads(summary))
        _assert_lineage(workspaces[run_id], stages, run_id, gates_pass=run_id == "ci_pass")
    # data-aware scheduling: the passed evaluation's Asset event starts lm_promote
    deadline = time.monotonic() + 120
    promote_runs: list = []
    while not promote_runs and time.monotonic() < deadline:
        promote_runs = [
            r for r in client.get("/api/v2/dags/lm_promote/dagRuns")["dag_runs"] if r["run_type"] == "asset_triggered"
        ]
        time.sleep(2)
    assert len(promote_runs) == 1, "lm_promote was not triggered by the evaluation-passed Asset event"
    assert workspaces["ci_pass"] != workspaces["ci_fail"]
    assert all(w.parent == data / "workspaces" / "lm_retraining" for w in workspaces.values())
    # each run's outputs are its own (different seeds -> different token shards / models)
    metas = {r: (w / "data" / "tokens" / "meta.json").read_bytes() for r, w in workspaces.items()}
    assert all(metas.values())
    locks = {r: yaml.safe_load((w / "dvc.lock").read_text())["stages"] for r, w in workspaces.items()}
    assert locks["ci_pass"] != locks["ci_fail"]
