"""Airflow-side probes for tests/dags, run with the orchestration interpreter (.venv-airflow).

The test suite runs in the tasks env (no Airflow); each probe runs here in a fresh process and
prints one JSON document on its last stdout line.

    python tests/dags/airflow_probe.py dagbag DAGS_FOLDER
    python tests/dags/airflow_probe.py import-cost DAG_FILE
    python tests/dags/airflow_probe.py dag-test DAGS_FOLDER DAG_ID LOGICAL_DATE CONF_JSON
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

HEAVY = (
    "torch",
    "pandas",
    "numpy",
    "great_expectations",
    "evidently",
    "onnxruntime",
    "onnx",
    "mlflow",
    "pyarrow",
    "tokenizers",
    "sklearn",
)


def _task_report(task) -> dict:
    report = {
        "task_id": task.task_id,
        "operator": type(task).__name__,
        "retries": task.retries,
        "upstream": sorted(task.upstream_task_ids),
        "pool": task.pool,
        "trigger_rule": getattr(task.trigger_rule, "value", str(task.trigger_rule)),
        "retry_exponential_backoff": bool(task.retry_exponential_backoff),
        "execution_timeout_s": task.execution_timeout.total_seconds() if task.execution_timeout else None,
    }
    for attr in (
        "bash_command",
        "env",
        "arguments",
        "env_vars",
        "command",
        "environment",
        "image",
        "node_selector",
        "device_requests",
        "auto_remove",
        "namespace",
    ):
        if hasattr(task, attr):
            value = getattr(task, attr)
            if attr == "device_requests" and value:
                value = [{"count": d.get("Count"), "capabilities": d.get("Capabilities")} for d in value]
            report[attr] = value if isinstance(value, (str, int, float, bool, list, dict, type(None))) else repr(value)
    if getattr(task, "container_resources", None) is not None:
        report["resources"] = {"requests": task.container_resources.requests, "limits": task.container_resources.limits}
    if getattr(task, "tolerations", None):
        report["tolerations"] = [{"key": t.key, "operator": t.operator, "effect": t.effect} for t in task.tolerations]
    return report


def _bag(folder: str):
    # BundleDagBag puts the DAGs folder on sys.path, as the dag processor and the task runner do
    from airflow.dag_processing.dagbag import BundleDagBag

    return BundleDagBag(dag_folder=folder, bundle_path=Path(folder))


def dagbag(folder: str) -> dict:
    bag = _bag(folder)
    dags = {}
    for dag_id, dag in bag.dags.items():
        dags[dag_id] = {
            "tags": sorted(dag.tags),
            "catchup": dag.catchup,
            "max_active_runs": dag.max_active_runs,
            "start_date": dag.start_date.isoformat() if dag.start_date else None,
            "schedule": type(dag.timetable).__name__,
            "timetable": repr(getattr(dag.timetable, "description", None)),
            "doc_md": bool(dag.doc_md),
            "default_retries": dag.default_args.get("retries"),
            "task_order": [t.task_id for t in dag.topological_sort()] if hasattr(dag, "topological_sort") else None,
            "tasks": {t.task_id: _task_report(t) for t in dag.tasks},
            "has_success_callback": bool(dag.on_success_callback),
            "has_failure_callback": bool(dag.on_failure_callback),
        }
    return {"import_errors": bag.import_errors, "dags": dags}


def import_cost(path: str) -> dict:
    import importlib.util

    import airflow.sdk  # noqa: F401  (the Airflow import itself is not the DAG file's cost)

    sys.path.append(str(Path(path).parent))  # what the bundle loader does for the DAGs folder
    before = set(sys.modules)
    started = time.perf_counter()
    spec = importlib.util.spec_from_file_location("probe_dag_module", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    seconds = time.perf_counter() - started
    loaded = sorted({m.split(".")[0] for m in set(sys.modules) - before})
    return {"seconds": seconds, "heavy": [m for m in HEAVY if m in sys.modules], "new_top_modules": loaded}


def dag_test(folder: str, dag_id: str, logical_date: str, conf: str) -> dict:
    import pendulum

    bag = _bag(folder)
    assert not bag.import_errors, bag.import_errors
    dag = bag.dags[dag_id]
    started = time.perf_counter()
    run = dag.test(logical_date=pendulum.parse(logical_date), run_conf=json.loads(conf))
    seconds = time.perf_counter() - started
    states = {ti.task_id: str(ti.state) for ti in run.get_task_instances()}
    xcoms = {}
    for ti in run.get_task_instances():
        try:
            xcoms[ti.task_id] = ti.xcom_pull(task_ids=ti.task_id)
        except Exception as exc:  # xcom_pull outside a task context differs across versions
            xcoms[ti.task_id] = f"<unavailable: {exc}>"
    return {"state": str(run.state), "run_id": run.run_id, "seconds": seconds, "states": states, "xcoms": xcoms}


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    result = {"dagbag": dagbag, "import-cost": import_cost, "dag-test": dag_test}[command](*args)
    sys.stdout.flush()
    print(json.dumps(result, default=str))
