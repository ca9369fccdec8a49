"""Fixtures for the DAG tests. The suite runs in the tasks env; everything Airflow runs in
``.venv-airflow`` subprocesses (probes, ``dag.test()``, a real api-server + scheduler +
dag-processor stack on 127.0.0.1), so one ``pytest tests`` covers both environments.
Skips with a clear message when ``.venv-airflow`` is missing (``make install-airflow``)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
AIRFLOW_PY = REPO / ".venv-airflow" / "bin" / "python"
PROBE = Path(__file__).with_name("airflow_probe.py")
TELEMETRY_OFF = {
    "DVC_NO_ANALYTICS": "1",
    "DO_NOT_TRACK": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
}

# Gates a 4-step model passes (so the promotion path runs) / fails (so it is skipped).
RELAXED_GATES = {
    "evaluate.gates.min_accuracy": 0.0,
    "evaluate.gates.min_macro_f1": 0.0,
    "evaluate.gates.max_int8_accuracy_drop": 1.0,
    "evaluate.gates.max_p95_latency_ms": 10000.0,
    "evaluate.gates.max_size_mb": 1000.0,
    "evaluate.gates.max_regression": None,
    "evaluate.gates.min_gain_over_baseline": None,  # a 4-step model does not beat TF-IDF + LR
}
STRICT_GATES = {"evaluate.gates.min_accuracy": 0.999}


def tiny_overrides(**extra: Any) -> dict[str, Any]:
    """The tiny profile (tests/tiny.py) as dotted overrides, plus ``extra``."""
    from tests.tiny import TINY_OVERRIDES

    return {**TINY_OVERRIDES, **extra}


def dvc_stage_names() -> list[str]:
    return list(yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8")).get("stages") or {})


@pytest.fixture(scope="session")
def airflow_python() -> Path:
    if not AIRFLOW_PY.is_file():
        pytest.skip(f"orchestration env missing ({AIRFLOW_PY}): run `make install-airflow`")
    check = subprocess.run(
        [str(AIRFLOW_PY), "-c", "import airflow.sdk, pipeline_tasks.orchestration.settings"],
        capture_output=True,
        text=True,
    )
    if check.returncode != 0:
        pytest.skip(
            f".venv-airflow cannot import airflow + pipeline_tasks (run `make install-airflow`, which "
            f"also does `pip install --no-deps -e .`): {check.stderr.strip()[-300:]}"
        )
    return AIRFLOW_PY


def airflow_env(home: Path, data_root: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "LMPIPE_"))}
    env.update(TELEMETRY_OFF)
    env.update(
        {
            "PATH": f"{AIRFLOW_PY.parent}{os.pathsep}{env.get('PATH', '')}",
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
            "LMPIPE_REPO": str(REPO),
            "LMPIPE_RUNNER": "local",
            "LMPIPE_TASK_PYTHON": sys.executable,
            "LMPIPE_DATA_ROOT": str(data_root),
            "LMPIPE_DATA_MIRROR": os.environ.get("LMPIPE_DATA_MIRROR") or str(REPO.parent / "shared" / "corpora"),
        }
    )
    env.update(extra)
    return env


def probe(env: dict[str, str], *args: str, timeout: float = 600) -> dict:
    proc = subprocess.run(
        [str(AIRFLOW_PY), str(PROBE), *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise AssertionError(
            f"probe {args[0]} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return json.loads(lines[-1])


@pytest.fixture(scope="session")
def airflow_db(airflow_python, tmp_path_factory) -> Path:
    """An AIRFLOW_HOME with a migrated SQLite metadata DB (for DagBag and dag.test())."""
    home = tmp_path_factory.mktemp("airflow_home")
    env = airflow_env(home, home / "data")
    proc = subprocess.run(
        [str(AIRFLOW_PY.parent / "airflow"), "db", "migrate"], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return home


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class AirflowClient:
    """Minimal /api/v2 client (token auth of the simple auth manager)."""

    def __init__(self, base: str, user: str, password: str):
        self.base = base
        body = self._call("POST", "/auth/token", {"username": user, "password": password}, auth=False)
        self.token = body["access_token"]

    def _call(self, method: str, path: str, body: Any = None, auth: bool = True) -> Any:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if auth:
            headers["Authorization"] = f"Bearer {self.token}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        with urllib.request.urlopen(request, timeout=30) as response:
            text = response.read().decode()
        return json.loads(text) if text else None

    def get(self, path: str) -> Any:
        return self._call("GET", path)

    def post(self, path: str, body: Any) -> Any:
        return self._call("POST", path, body)

    def patch(self, path: str, body: Any) -> Any:
        return self._call("PATCH", path, body)

    def wait_for_dag(self, dag_id: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.get(f"/api/v2/dags/{dag_id}")
                return
            except urllib.error.HTTPError as exc:
                if exc.code != 404 or time.monotonic() > deadline:
                    raise
            time.sleep(1)

    def trigger(self, dag_id: str, run_id: str, logical_date: str, conf: dict) -> None:
        self.post(f"/api/v2/dags/{dag_id}/dagRuns", {"dag_run_id": run_id, "logical_date": logical_date, "conf": conf})

    def run_path(self, dag_id: str, run_id: str) -> str:
        return f"/api/v2/dags/{dag_id}/dagRuns/{urllib.parse.quote(run_id, safe='')}"

    def wait_for_runs(self, dag_id: str, run_ids: list[str], timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            states = {r: self.get(self.run_path(dag_id, r))["state"] for r in run_ids}
            if all(s in ("success", "failed") for s in states.values()):
                return states
            time.sleep(3)
        return states

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str]:
        body = self.get(self.run_path(dag_id, run_id) + "/taskInstances?limit=100")
        return {ti["task_id"]: ti["state"] for ti in body["task_instances"]}

    def xcom(self, dag_id: str, run_id: str, task_id: str) -> Any:
        return self.get(self.run_path(dag_id, run_id) + f"/taskInstances/{task_id}/xcomEntries/return_value")["value"]

    def failure_report(self, dag_id: str, run_id: str) -> str:
        lines = [f"{dag_id}/{run_id}: {self.task_states(dag_id, run_id)}"]
        for task_id, state in self.task_states(dag_id, run_id).items():
            if state in ("failed", "up_for_retry"):
                try:
                    log = self.get(self.run_path(dag_id, run_id) + f"/taskInstances/{task_id}/logs/1?full_content=true")
                    lines.append(f"--- {task_id}\n" + "\n".join(str(e.get("event")) for e in log["content"][-40:]))
                except urllib.error.HTTPError as exc:
                    lines.append(f"--- {task_id}: no log ({exc.code})")
        return "\n".join(lines)


def _stop(procs: list[subprocess.Popen], grace: float = 15) -> None:
    """SIGTERM the components, then SIGKILL what is left of their process trees (see
    shared/research/airflow-real-run.md §5: task supervisors run in their own sessions)."""
    import psutil

    tree = []
    for proc in procs:
        try:
            tree += psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
    for child in tree:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


@contextlib.contextmanager
def running_airflow_stack(root: Path, orchestration: dict[str, Any] | None = None, **extra_env: str):
    """api-server + scheduler (--skip-serve-logs) + dag-processor, SQLite + LocalExecutor, 127.0.0.1 only.

    ``orchestration``: dotted overrides of params.yaml's ``orchestration`` section for these DAGs
    (``max_active_runs`` is 2 unless given: two concurrent runs). Yields (client, data root).
    """
    home = root / "home"
    home.mkdir(parents=True)
    port = free_port()
    password = secrets.token_hex(8)
    (home / "passwords.json").write_text(json.dumps({"admin": password}))
    extra = {
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(16),
        "AIRFLOW__API__SECRET_KEY": secrets.token_hex(16),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "passwords.json"),
    }
    params_file = root / "orchestration.yaml"
    raw = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    from pipeline_tasks.config import apply_override

    for dotted, value in {"max_active_runs": 2, **(orchestration or {})}.items():
        apply_override(raw["orchestration"], dotted, value)
    params_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    # no cron: an unpaused DAG would otherwise start its latest scheduled run (full-size params) at once
    env = airflow_env(
        home,
        root / "data",
        LMPIPE_ORCHESTRATION_PARAMS=str(params_file),
        LMPIPE_RETRAIN_CRON="none",
        LMPIPE_DRIFT_CRON="none",
        **{**extra, **extra_env},
    )
    airflow = str(AIRFLOW_PY.parent / "airflow")
    migrate = subprocess.run([airflow, "db", "migrate"], env=env, capture_output=True, text=True, timeout=300)
    assert migrate.returncode == 0, migrate.stderr[-3000:]
    for pool, slots in (("gpu", "1"), ("promote", "1")):
        subprocess.run(
            [airflow, "pools", "set", pool, slots, f"lm-pipeline {pool}"],
            env=env,
            check=True,
            capture_output=True,
            timeout=120,
        )
    procs = []
    for args in (["api-server"], ["scheduler", "--skip-serve-logs"], ["dag-processor"]):
        log = open(root / f"{args[0]}.log", "w")
        procs.append(
            subprocess.Popen(
                [airflow, *args],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=root,
            )
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(base + "/api/v2/monitor/health", timeout=5) as response:
                    health = json.loads(response.read())
                if all(
                    (health.get(c) or {}).get("status") == "healthy"
                    for c in ("metadatabase", "scheduler", "dag_processor")
                ):
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
                pass
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in root.glob("*.log"))
                raise AssertionError(f"Airflow stack not healthy:\n{logs}")
            time.sleep(1)
        yield AirflowClient(base, "admin", password), root / "data"
    finally:
        _stop(procs)


@pytest.fixture()
def airflow_stack(airflow_python, tmp_path):
    """The stack with the local runner (see :func:`running_airflow_stack`)."""
    pytest.importorskip("psutil", reason="psutil (an Airflow dependency) is needed to stop the stack cleanly")
    with running_airflow_stack(tmp_path / "af") as stack:
        yield stack
