"""
### lm_retraining: retrain, evaluate and register the news LM, one container per DVC stage

**When**: on the cron in env `LMPIPE_RETRAIN_CRON` (default `orchestration.retrain_schedule`
in params.yaml, weekly; `none` turns it off) **or** when the drift monitor emits the
`lmpipe_drift_detected` Asset.

**What**: one task per `dvc.yaml` stage, same names, same order (`pipeline_tasks.stages.STAGES`, which
a test holds equal to `dvc.yaml`; nothing is read at parse time but the settings). Each task runs the stage's own command
(`python -m pipeline_tasks STAGE`) through `dvc repro --single-item STAGE` in the task image
(runner `docker` / `kubernetes`) or the task virtualenv (`local`), so an up-to-date stage is restored
from the shared DVC cache instead of recomputed.

* `prepare_workspace` copies the project at this revision into a workspace of its own for this run
  (`<data root>/workspaces/lm_retraining/<run id>`): two runs never write the same path. Run conf
  `params_overrides` (`{"pretrain.max_steps": 10}`) is written into that copy's params.yaml;
  `force: true` re-runs every stage.
* GPU stages (`pretrain`, `finetune`, `compress`) use the `gpu` pool and request a GPU; a retry resumes from the
  last checkpoint kept in the run's workspace. Data stages retry with exponential backoff.
* `check_gates` reads `gates.json` from `evaluate`: a rejected model **skips** `register` and
  `emit_evaluation_passed` (shown as skipped, not failed) and sends a gate-rejection notification.
* `emit_evaluation_passed` updates the `lmpipe_evaluation_passed` Asset, which triggers `lm_promote`.
* `record_lineage` writes `lineage.json` (git sha, `dvc.lock` sha256, output hashes) into the
  workspace and XCom, whatever the gate decided; for an accepted model it also publishes the run's
  `dvc.lock` as the reference that `lm_drift_monitor` compares new batches against.

XCom carries only paths and small JSON (each node's summary line); data stays in the workspace and
the DVC cache / remote. Failure and success notifications: params `orchestration.notify`.
"""

from __future__ import annotations

import logging

from airflow.sdk import DAG, AssetOrTimeSchedule, CronTriggerTimetable, Param, chain, get_current_context, task
from lmpipe_common import (
    DRIFT_ASSET,
    EVALUATION_PASSED_ASSET,
    FILTERS,
    PARAMS,
    RETRAIN_CRON,
    START_DATE,
    LmpipeNotifier,
    default_args,
    init_node,
    lineage_node,
    metrics_file,
    run_notifier,
    stage_node,
)

from pipeline_tasks.orchestration.settings import failed_gate_names
from pipeline_tasks.stages import STAGES

log = logging.getLogger(__name__)
DAG_ID = "lm_retraining"
GATE_STAGE, PROMOTION_STAGE = "evaluate", "register"

with DAG(
    dag_id=DAG_ID,
    description="Retrain, evaluate and register the LM: one containerized node per dvc.yaml stage",
    schedule=AssetOrTimeSchedule(
        timetable=CronTriggerTimetable(RETRAIN_CRON, timezone=PARAMS.timezone), assets=[DRIFT_ASSET]
    )
    if RETRAIN_CRON
    else [DRIFT_ASSET],
    start_date=START_DATE,
    catchup=False,
    max_active_runs=PARAMS.max_active_runs,
    default_args=default_args(),
    tags=["lm-pipeline", "training", "dvc"],
    doc_md=__doc__,
    params={
        "force": Param(False, type="boolean", description="re-run every stage (dvc repro --force)"),
        "params_overrides": Param({}, type="object", description="dotted params.yaml keys for this run"),
    },
    user_defined_filters=FILTERS,
    on_success_callback=run_notifier("success"),
    on_failure_callback=run_notifier("failure"),
) as dag:
    workspace = init_node(DAG_ID)
    stages = {name: stage_node(DAG_ID, name) for name in STAGES}
    chain(workspace, *stages.values())
    # an accepted model's dvc.lock becomes the drift monitor's reference
    accepted = "{{ 'true' if ti.xcom_pull(task_ids='check_gates') else 'false' }}"
    lineage = lineage_node(DAG_ID, trigger_rule="none_failed", env={"LMPIPE_PUBLISH": accepted})
    # after every stage, not only the last: a gate rejection skips register at once while a stage
    # before it may still run in this workspace
    chain([workspace, *stages.values()], lineage)

    @task.short_circuit(ignore_downstream_trigger_rules=False)
    def check_gates(evaluate_summary) -> bool:
        """True when every evaluation gate passed; otherwise the promotion path is skipped."""
        path, gates = metrics_file(evaluate_summary, "gates.json")
        if not isinstance(gates, dict) or "passed" not in gates:
            raise ValueError(f"evaluate recorded no gate decision (gates.json at {path}): cannot promote")
        failed = failed_gate_names(gates)
        log.info("gates %s (%s): failed %s", "PASSED" if gates["passed"] else "FAILED", path, failed)
        if not gates["passed"]:
            LmpipeNotifier(
                "gate-rejection",
                f"[lm-pipeline] {DAG_ID}: model rejected by its gates",
                f"failed gates: {', '.join(map(str, failed))}; decision: {path}",
            ).notify(get_current_context())
        return bool(gates["passed"])

    @task(outlets=[EVALUATION_PASSED_ASSET])
    def emit_evaluation_passed(register_summary=None) -> dict:
        """Announce a model that passed its gates (and was registered): lm_promote listens."""
        context = get_current_context()
        registration = register_summary.get("result") if isinstance(register_summary, dict) else None
        extra = {"dag_id": DAG_ID, "run_id": context["run_id"], "registration": registration}
        context["outlet_events"][EVALUATION_PASSED_ASSET].extra = extra
        return extra

    gates = check_gates(stages[GATE_STAGE].output)
    chain(gates, stages[PROMOTION_STAGE])
    chain(emit_evaluation_passed(stages[PROMOTION_STAGE].output), lineage)
