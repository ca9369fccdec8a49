"""
### lm_promote: move the production alias (or roll it back), with gate check and optional human approval

**When**: triggered by hand (params below) or by the `lmpipe_evaluation_passed` Asset that
`lm_retraining` emits after a model passed its gates and was registered as challenger.

**Params**: `version` (`challenger` = the current `@challenger` alias, or a registry version number),
`rollback` (restore the previous production model instead), `require_approval` (wait for a human in
the Airflow UI: Airflow 3 human-in-the-loop `ApprovalOperator`; needs a running triggerer), `reason`
(kept in the promotion history), `params_overrides` (e.g. the `evaluate.gates` thresholds that
`promote` re-checks).

**Flow**: `resolve_request` (params, or the version carried by the Asset event) -> `check_gates` (a
registration whose gates failed is **skipped** with a gate-rejection notification; `promote` re-checks
the gates and the champion/challenger regression on the registry tags and refuses otherwise) ->
`approve` (optional) -> `prepare_workspace` -> `promote` / `promote_version` / `rollback`
(`python -m pipeline_tasks promote|rollback` in the task image or env; pool `promote`, one slot, so
promotions never race) -> `notify_result`.
"""

from __future__ import annotations

import datetime as dt
import logging

from airflow.providers.standard.operators.hitl import ApprovalOperator
from airflow.sdk import DAG, Param, chain, get_current_context, task
from lmpipe_common import (
    EVALUATION_PASSED_ASSET,
    FILTERS,
    PARAMS,
    START_DATE,
    LmpipeNotifier,
    default_args,
    init_node,
    make_node,
    node_env,
    run_notifier,
)

from pipeline_tasks.orchestration.settings import driver_argv

log = logging.getLogger(__name__)
DAG_ID = "lm_promote"
ACTIONS = {
    "promote": ["python", "-m", "pipeline_tasks", "promote", "--reason", "$LMPIPE_REASON"],
    "promote_version": [
        "python",
        "-m",
        "pipeline_tasks",
        "promote",
        "--version",
        "$LMPIPE_VERSION",
        "--reason",
        "$LMPIPE_REASON",
    ],
    "rollback": ["python", "-m", "pipeline_tasks", "rollback", "--reason", "$LMPIPE_REASON"],
}
# Jinja prefix that binds the resolved request once, so the templates below read as plain text
REQUEST = "{% set request = ti.xcom_pull(task_ids='resolve_request') %}"

with DAG(
    dag_id=DAG_ID,
    description="Promote a challenger that passed its gates (or roll back), optionally after human approval",
    schedule=[EVALUATION_PASSED_ASSET],
    start_date=START_DATE,
    catchup=False,
    max_active_runs=PARAMS.max_active_runs,
    default_args=default_args(),
    tags=["lm-pipeline", "registry", "promotion"],
    doc_md=__doc__,
    params={
        "version": Param("challenger", type="string", description="'challenger' or a registry version number"),
        "rollback": Param(False, type="boolean", description="restore the previous production model"),
        "require_approval": Param(True, type="boolean", description="wait for a human in the Airflow UI"),
        "reason": Param("", type="string", description="kept in the promotion history"),
        "params_overrides": Param({}, type="object", description="dotted params.yaml keys (e.g. evaluate.gates.*)"),
    },
    user_defined_filters=FILTERS,
    on_success_callback=run_notifier("success"),
    on_failure_callback=run_notifier("failure"),
) as dag:

    @task
    def resolve_request() -> dict:
        """What to do: from the params, or the registration carried by the triggering Asset event."""
        context = get_current_context()
        params = context["params"]
        request = {
            "action": "rollback" if params["rollback"] else "promote",
            "version": None,
            "registration": None,
            "trigger": "manual",
        }
        for events in (context.get("triggering_asset_events") or {}).values():
            for event in events:
                registration = (event.extra or {}).get("registration")
                if registration:
                    request.update(
                        registration=registration,
                        trigger="asset",
                        version=str(registration.get("version") or "") or None,
                    )
        version = str(params["version"]).strip()
        if request["version"] is None and version not in ("", "challenger"):
            if not version.isdigit():
                raise ValueError(f"version must be 'challenger' or a number, got {version!r}")
            request["version"] = version
        log.info("request: %s", request)
        return request

    @task.short_circuit
    def check_gates(request: dict) -> bool:
        """Refuse early a registration whose recorded gates failed (promote re-checks the registry)."""
        registration = request.get("registration") or {}
        if (
            request["action"] == "promote"
            and registration
            and (registration.get("gates_passed") is False or registration.get("status") == "rejected")
        ):
            LmpipeNotifier(
                "gate-rejection", f"[lm-pipeline] {DAG_ID}: version not promotable", f"registration: {registration}"
            ).notify(get_current_context())
            return False
        return True

    @task.branch
    def needs_approval() -> str:
        return "approve" if get_current_context()["params"]["require_approval"] else "prepare_workspace"

    approve = ApprovalOperator(
        task_id="approve",
        subject=REQUEST + "lm-pipeline: {{ request.action }} version {{ request.version or 'challenger' }}?",
        body=REQUEST + "Run `{{ run_id }}` asks to **{{ request.action }}** "
        "(version: {{ request.version or '@challenger' }}).\n\n"
        "Registration: `{{ request.registration }}`",
        ignore_downstream_trigger_rules=True,
        response_timeout=dt.timedelta(days=3),
        execution_timeout=None,
    )
    workspace = init_node(DAG_ID)
    workspace.trigger_rule = "none_failed_min_one_success"

    @task.branch
    def choose_action(request: dict) -> str:
        if request["action"] == "rollback":
            return "rollback"
        return "promote_version" if request["version"] else "promote"

    env = node_env(
        DAG_ID,
        LMPIPE_VERSION=REQUEST + "{{ request.version or '' }}",
        LMPIPE_REASON="{{ params.reason or ('airflow ' ~ dag.dag_id ~ ' ' ~ run_id) }}",
        LMPIPE_ACTOR="airflow:{{ dag.dag_id }}/{{ run_id }}",
    )
    actions = [
        make_node(
            name,
            driver_argv("exec", "--", *argv),
            env,
            retries=0,
            pool=PARAMS.promote_pool or "default_pool",
            execution_timeout=dt.timedelta(minutes=15),
        )
        for name, argv in ACTIONS.items()
    ]

    @task(trigger_rule="none_failed_min_one_success")
    def notify_result() -> dict:
        context = get_current_context()
        results = {a: context["ti"].xcom_pull(task_ids=a) for a in ACTIONS}
        result = next((r for r in results.values() if r), {})
        LmpipeNotifier(
            "promotion",
            f"[lm-pipeline] {DAG_ID}: {(result.get('result') or {}).get('status', 'done')}",
            str(result.get("result")),
        ).notify(context)
        return result

    request = resolve_request()
    approval_branch = needs_approval()
    chain(request, check_gates(request), approval_branch, [approve, workspace])
    chain(approve, workspace, choose_action(request), actions, notify_result())
