"""
### lm_drift_monitor: daily drift check of the news feed against the training reference

**When**: the cron in env `LMPIPE_DRIFT_CRON` (default `orchestration.drift_schedule`, daily;
`none` turns it off: trigger by hand).

**What**, in a workspace of its own per run (like `lm_retraining`):

1. `prepare_workspace` writes the run's batch window into the workspace's params.yaml:
   `monitor.window_start` = logical date - `orchestration.drift_window_days`, `monitor.window_end` =
   logical date (end exclusive); run conf `window_start` / `window_end` / `params_overrides` win.
   The workspace starts from the **training reference**: the `dvc.lock` that the last accepted
   `lm_retraining` run published; its outputs (prepared data, exported model) are checked out of the
   shared DVC cache, nothing upstream is re-run.
2. `ingest_news` ingests the news feed (retries with exponential backoff), then `monitor` runs
   `dvc repro --single-item monitor`, comparing the window's batch with the reference (evidently).
   Before any retraining was accepted, the monitor builds its upstream itself (`dvc repro monitor`).
3. `check_drift` reads `drift_summary.json` (`drift_detected`); with drift, `emit_drift_event` updates
   the `lmpipe_drift_detected` Asset, which **triggers `lm_retraining`**; without, it is skipped.
4. `record_lineage` records what was compared.

Stages missing from `dvc.yaml` are left out when the DAG is parsed (no `monitor` stage: the DAG only
prepares a workspace and records lineage).
"""

from __future__ import annotations

import datetime as dt
import json
import logging

from airflow.sdk import DAG, CronTriggerTimetable, Param, chain, get_current_context, task
from lmpipe_common import (
    DRIFT_ASSET,
    DRIFT_CRON,
    FILTERS,
    PARAMS,
    START_DATE,
    default_args,
    init_node,
    lineage_node,
    metrics_file,
    reference_lock,
    run_notifier,
    stage_node,
)

log = logging.getLogger(__name__)
DAG_ID = "lm_drift_monitor"
MONITOR_STAGE = "monitor"
BATCH_STAGES = ("ingest_news",)  # refreshed before the monitor: today's batch


def drift_overrides(logical_date, params: dict) -> str:
    """The run's params overrides as JSON: the batch window from the logical date, then conf."""
    end = (logical_date or dt.datetime.now(dt.UTC)).date()
    window = {
        "monitor.window_start": params.get("window_start") or str(end - dt.timedelta(days=PARAMS.drift_window_days)),
        "monitor.window_end": params.get("window_end") or str(end),
    }
    return json.dumps({**window, **(params.get("params_overrides") or {})})


with DAG(
    dag_id=DAG_ID,
    description="Daily drift report of the news feed; drift triggers lm_retraining",
    schedule=CronTriggerTimetable(DRIFT_CRON, timezone=PARAMS.timezone) if DRIFT_CRON else None,
    start_date=START_DATE,
    catchup=False,
    max_active_runs=PARAMS.max_active_runs,
    default_args=default_args(),
    tags=["lm-pipeline", "monitoring", "drift"],
    doc_md=__doc__,
    params={
        "window_start": Param(None, type=["null", "string"], description="ISO date; default logical date - N days"),
        "window_end": Param(None, type=["null", "string"], description="ISO date (exclusive); default logical date"),
        "params_overrides": Param({}, type="object", description="dotted params.yaml keys for this run"),
    },
    user_defined_filters=FILTERS,
    user_defined_macros={"drift_overrides": drift_overrides},
    on_failure_callback=run_notifier("failure"),
) as dag:
    workspace = init_node(
        DAG_ID,
        "{{ drift_overrides(dag_run.logical_date, params) }}",
        LMPIPE_REFERENCE_LOCK=reference_lock("lm_retraining"),
    )
    nodes = [stage_node(DAG_ID, name) for name in BATCH_STAGES]
    lineage = lineage_node(DAG_ID, trigger_rule="none_failed")
    monitor = stage_node(DAG_ID, MONITOR_STAGE, "--upstream-if-missing")
    chain(workspace, *nodes, monitor)

    @task.short_circuit(ignore_downstream_trigger_rules=False)
    def check_drift(monitor_summary) -> bool:
        path, summary = metrics_file(monitor_summary, "drift_summary.json")
        if not isinstance(summary, dict) or "drift_detected" not in summary:
            raise ValueError(f"monitor wrote no drift decision (drift_summary.json at {path})")
        log.info("drift_detected=%s (%s)", summary["drift_detected"], path)
        return bool(summary["drift_detected"])

    @task(outlets=[DRIFT_ASSET])
    def emit_drift_event(monitor_summary) -> dict:
        """Update the drift Asset: the retraining DAG is scheduled on it."""
        context = get_current_context()
        path, _ = metrics_file(monitor_summary, "drift_summary.json")
        result = (monitor_summary or {}).get("result") or {} if isinstance(monitor_summary, dict) else {}
        extra = {"dag_id": DAG_ID, "run_id": context["run_id"], "drift_summary": path, "fired": result.get("fired")}
        context["outlet_events"][DRIFT_ASSET].extra = extra
        return extra

    emitted = emit_drift_event(monitor.output)
    chain(check_drift(monitor.output), emitted, lineage)
    chain(monitor, lineage)
