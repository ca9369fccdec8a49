"""``promote`` / ``rollback`` / ``predict --model`` against real MLflow: embedded SQLite and a server.

The server is a real ``mlflow server`` subprocess bound to 127.0.0.1 on a free port (never beyond
loopback), killed at the end. Versions come from three real exports registered by the real
``register`` stage; racing promotions are separate ``lmpipe`` processes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from _registry_project import GATES, PASSING, bundles, write_evaluation

from pipeline_tasks.config import parse_params
from pipeline_tasks.registry.promote import PromotionError, change_production, read_history

pytestmark = pytest.mark.slow

MODEL = "lm-pipeline-news-classifier"
MLFLOW = Path(sys.executable).with_name("mlflow")
NO_TORCH = "import sys; sys.modules['torch'] = None; from pipeline_tasks.cli import main; sys.exit(main(sys.argv[1:]))"


@pytest.fixture(scope="module")
def versions(tmp_path_factory, corpora):
    return bundles(tmp_path_factory.getbasetemp(), corpora, ("a", "b", "c"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real tracking server on loopback only; the whole process group is killed afterwards."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [
            str(MLFLOW),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{root / 'server.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=10)
                break
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue
        log.close()


@pytest.fixture(params=["sqlite", "server"])
def registry(request, tmp_path, monkeypatch):
    """A fresh project dir and the tracking URI to use (None = the embedded store under registry_dir)."""
    uri = request.getfixturevalue("mlflow_server") if request.param == "server" else None
    if uri:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        # a fresh registered model per test on the shared server
        name = f"{MODEL}-{request.node.name.split('[')[0][-20:]}-{int(time.time() * 1000) % 10**8}"
    else:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        name = MODEL
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.setenv("LMPIPE_ACTOR", "ci-bot")
    return {"root": tmp_path, "uri": uri, "name": name}


def _raw(registry, bundle_dir: Path) -> dict:
    root = registry["root"]
    return {
        "seed": 1,
        "paths": {
            "bundle_dir": str(bundle_dir),
            "evaluate_dir": str(root / "evaluate"),
            "registry_dir": str(root / "registry"),
            "register_reports_dir": str(root / "reports/register"),
            "validate_dir": str(root / "validate"),
            "monitor_dir": str(root / "monitor"),
            "champion_metrics_path": str(root / "registry/production_metrics.json"),
        },
        "register": {"model_name": registry["name"]},
        "evaluate": {"gates": GATES},
    }


def _register(registry, bundle_dir: Path, metrics: dict) -> dict:
    from pipeline_tasks.registry import register

    write_evaluation(registry["root"] / "evaluate", metrics)  # evaluated before any production existed
    return register.run(parse_params(_raw(registry, bundle_dir)))


def _params(registry, bundle_dir: Path):
    return parse_params(_raw(registry, bundle_dir))


def _production(registry, params):
    from pipeline_tasks.registry.store import alias_version, connect

    client, _ = connect(params.paths.registry_dir)
    return alias_version(client, registry["name"], "production"), alias_version(client, registry["name"], "challenger")


def test_promote_moves_alias_rollback_restores_and_regressions_are_refused(registry, versions):
    root = registry["root"]
    assert _register(registry, versions["a"], PASSING)["version"] == "1"
    params = _params(registry, versions["a"])
    first = change_production(params, "promote", reason="first model")
    assert first["status"] == "promoted" and first["from"] is None and first["to"] == "1"
    assert first["actor"] == "ci-bot" and first["reason"] == "first model"
    assert _production(registry, params) == ("1", None)  # the challenger became the champion
    champion = json.loads((root / "registry/production_metrics.json").read_text())
    assert champion["version"] == "1" and champion["accuracy"] == PASSING["accuracy"]

    assert _register(registry, versions["b"], {**PASSING, "accuracy": 0.83})["version"] == "2"
    second = change_production(params, "promote", reason="better")
    assert (second["from"], second["to"]) == ("1", "2")
    assert change_production(params, "promote")["status"] == "noop"  # no challenger left
    assert json.loads((root / "registry/production_metrics.json").read_text())["version"] == "2"

    back = change_production(params, "rollback", reason="bad canary")
    assert back["status"] == "rolled_back" and (back["from"], back["to"]) == ("2", "1")
    assert _production(registry, params)[0] == "1"
    assert json.loads((root / "registry/production_metrics.json").read_text())["version"] == "1"
    with pytest.raises(PromotionError, match="nothing to roll back"):
        change_production(params, "rollback")

    # v3 passed its gates when evaluated alone, but is 20 points below production: refused at promotion
    assert _register(registry, versions["c"], {**PASSING, "accuracy": 0.60})["version"] == "3"
    with pytest.raises(PromotionError, match="regression vs production"):
        change_production(params, "promote")
    assert _production(registry, params) == ("1", "3")

    history = read_history(root / "registry")
    assert [(h["action"], h["from"], h["to"]) for h in history] == [
        ("promote", None, "1"),
        ("promote", "1", "2"),
        ("rollback", "2", "1"),
    ]
    assert [h["seq"] for h in history] == [1, 2, 3] and all(h["actor"] == "ci-bot" and h["when"] for h in history)
    from pipeline_tasks.registry.store import connect

    client, _ = connect(root / "registry")
    tags = client.get_registered_model(registry["name"]).tags
    assert json.loads(tags["lmpipe.history"]) == history  # mirrored in the registry itself
    assert json.loads(tags["lmpipe.production_stack"]) == ["1"] and tags["lmpipe.production_seq"] == "3"
    assert client.get_model_version(registry["name"], "1").tags["lmpipe.rolled_back_by"] == "ci-bot"


# a racer imports everything, reports ready, then spins until the starting gun: the promotions
# themselves start within a millisecond of each other instead of seconds of import jitter apart
RACER = """
import os, sys, time
from pipeline_tasks.cli import main
import mlflow, pipeline_tasks.registry.promote, pipeline_tasks.registry.store, pipeline_tasks.registry.register
open(os.environ["RACE_READY"], "w").close()
while not os.path.exists(os.environ["RACE_GO"]):
    time.sleep(0.0005)
sys.exit(main(sys.argv[1:]))
"""


def _race(commands: list[list[str]], params_file: Path, registry) -> list[tuple[int, str, str]]:
    root = registry["root"]
    go = root / f"go-{time.monotonic_ns()}"
    procs = []
    for i, args in enumerate(commands):
        env = {**os.environ, "LMPIPE_ACTOR": "racer", "RACE_READY": str(go) + f".ready{i}", "RACE_GO": str(go)}
        if registry["uri"]:
            env["MLFLOW_TRACKING_URI"] = registry["uri"]
        else:
            env.pop("MLFLOW_TRACKING_URI", None)
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", RACER, *args, "--params", str(params_file)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
                cwd=root,
            )
        )
    deadline = time.monotonic() + 240
    while not all(Path(str(go) + f".ready{i}").exists() for i in range(len(commands))):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "racers did not start"
        time.sleep(0.05)
    go.touch()
    outputs = [p.communicate(timeout=300) for p in procs]
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]


def test_concurrent_promotions_exactly_one_wins(registry, versions):
    root = registry["root"]
    _register(registry, versions["a"], PASSING)
    params = _params(registry, versions["a"])
    change_production(params, "promote")
    _register(registry, versions["b"], {**PASSING, "accuracy": 0.82})
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump(_raw(registry, versions["a"])), encoding="utf-8")

    # three processes race to move production from 1 to 2 with a compare-and-set on "1"
    results = _race(
        [["promote", "--version", "2", "--expect-production", "1", "--reason", f"racer {i}"] for i in range(3)],
        params_file,
        registry,
    )
    winners = [json.loads(out.strip().splitlines()[-1]) for rc, out, _ in results if rc == 0]
    losers = [err for rc, _, err in results if rc != 0]
    assert len(winners) == 1 and winners[0]["status"] == "promoted", results
    assert len(losers) == 2 and all("conflict: expected production 1, found 2" in err for err in losers), results
    history = read_history(root / "registry")
    assert [(h["from"], h["to"]) for h in history] == [(None, "1"), ("1", "2")]
    assert history[-1]["reason"] == winners[0]["reason"] and history[-1]["actor"] == "racer"
    assert _production(registry, params)[0] == "2"

    # the same race without a CAS token on the default @challenger: one change, the rest no-ops
    _register(registry, versions["c"], {**PASSING, "accuracy": 0.85})
    statuses = sorted(
        json.loads(out.strip().splitlines()[-1])["status"]
        for _, out, _ in _race([["promote"], ["promote"]], params_file, registry)
    )
    assert statuses == ["noop", "promoted"]
    assert [(h["from"], h["to"]) for h in read_history(root / "registry")][-1] == ("2", "3")
    assert len(read_history(root / "registry")) == 3


def test_predict_serves_production_from_the_registry_without_torch(registry, versions):
    from pipeline_tasks.ship.bundle import load_bundle

    root = registry["root"]
    _register(registry, versions["b"], PASSING)  # b serves its fp32 variant
    change_production(_params(registry, versions["b"]), "promote")
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump(_raw(registry, versions["b"])), encoding="utf-8")
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(root),
        "LANG": "C.UTF-8",
        **({"MLFLOW_TRACKING_URI": registry["uri"]} if registry["uri"] else {}),
    }
    texts = ["Central bank raises interest rates", "New smartphone chip doubles battery life"]
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            NO_TORCH,
            "predict",
            *texts,
            "--model",
            f"models:/{registry['name']}@production",
            "--params",
            str(params_file),
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    expected = load_bundle(versions["b"]).predict(texts)
    assert [r["label"] for r in rows] == [e["label"] for e in expected]
    assert rows[0]["probabilities"] == pytest.approx(expected[0]["probabilities"], abs=1e-5)
    cached = list((root / "registry/cache").glob(f"{registry['name']}/v1-*/bundle/manifest.json"))
    assert len(cached) == 1  # downloaded once into the cache, verified on use
