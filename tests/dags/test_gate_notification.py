"""The gate-rejection notification of ``lm_retraining`` names the gates the model failed.

``gates.json`` is written here the way ``evaluate`` writes it (:func:`pipeline_tasks.ship.gates.decide`
and ``GateDecision.to_dict``, which stores ``gates`` as a mapping name -> result), for a model that
fails two gates. The pure helper is checked in the tasks env; the DAG's own ``check_gates`` callable
runs in ``.venv-airflow`` on a summary that points at that file.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from pipeline_tasks.orchestration.settings import failed_gate_names
from pipeline_tasks.ship.gates import GateThresholds, decide
from tests.dags.conftest import REPO, airflow_env

GATES_PATH = "reports/evaluate/gates.json"
THRESHOLDS = GateThresholds(min_accuracy=0.9, min_macro_f1=0.1, max_size_mb=1.0, max_regression=0.01)
# accuracy below its floor and a model too big: two of the gates fail, the others pass or are skipped
REJECTED_METRICS = {"accuracy": 0.41, "macro_f1": 0.33, "size_mb": 7.5}

# Runs check_gates' python callable as the task runner would: inside a task context (the notifier
# reads the run id from it); the notification is logged because no connection is configured.
CHECK_GATES = """
import json, logging, sys
from pathlib import Path
from airflow.dag_processing.dagbag import BundleDagBag
from airflow.sdk.execution_time.context import set_current_context

folder, summary = sys.argv[1], json.loads(sys.argv[2])
bag = BundleDagBag(dag_folder=folder, bundle_path=Path(folder))
assert not bag.import_errors, bag.import_errors
dag = bag.dags["lm_retraining"]
messages = []

class Keep(logging.Handler):
    def emit(self, record):
        messages.append(record.getMessage())

logging.getLogger().addHandler(Keep())
logging.getLogger().setLevel(logging.INFO)
with set_current_context({"dag": dag, "run_id": "manual__gate_notification"}):
    passed = dag.get_task("check_gates").python_callable(summary)
print(json.dumps({"passed": passed, "messages": messages}))
"""


def write_rejected_gates(workspace: Path) -> Path:
    decision = decide(REJECTED_METRICS, None, THRESHOLDS)
    assert not decision.passed
    path = workspace / GATES_PATH
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({**decision.to_dict(), "serving_variant": "fp32"}), encoding="utf-8")
    return path


def test_failed_gate_names_lists_the_gates_a_rejected_model_failed(tmp_path):
    gates = json.loads(write_rejected_gates(tmp_path).read_text(encoding="utf-8"))
    assert failed_gate_names(gates) == ["min_accuracy", "max_size_mb"]


def test_failed_gate_names_is_empty_for_a_passing_model():
    gates = decide({"accuracy": 0.95, "macro_f1": 0.9, "size_mb": 0.5}, None, THRESHOLDS).to_dict()
    assert failed_gate_names(json.loads(json.dumps(gates))) == []


@pytest.mark.airflow
def test_check_gates_notification_names_the_failed_gates(airflow_db, tmp_path):
    workspace = tmp_path / "workspace"
    gates = json.loads(write_rejected_gates(workspace).read_text(encoding="utf-8"))
    summary = {"stage": "evaluate", "workspace": str(workspace), "metrics": {GATES_PATH: gates}}
    proc = subprocess.run(
        [str(REPO / ".venv-airflow" / "bin" / "python"), "-c", CHECK_GATES, str(REPO / "dags"), json.dumps(summary)],
        env=airflow_env(airflow_db, tmp_path / "data"),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["passed"] is False
    notices = [m for m in report["messages"] if "gate-rejection" in m]
    assert len(notices) == 1, report["messages"]
    assert "failed gates: min_accuracy, max_size_mb;" in notices[0]
