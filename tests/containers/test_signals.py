"""Signals through the container: ``docker stop`` (SIGTERM to tini, forwarded to the stage) on a
pretrain container writes a checkpoint and exits within the grace period; the re-run node resumes
from it and the loss trajectory and final weights equal an uninterrupted run's, bit for bit (the
SIGKILL/SIGTERM resume tests of tests/stages/test_pretrain.py, now through tini and the engine)."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.containers.conftest import docker_run, give_to_node_user, hand_back

pytestmark = [pytest.mark.containers, pytest.mark.slow]

WORKSPACE = "/lmpipe/workspace"
GRACE_S = 60
RESUME = {"max_steps": 240, "checkpoint_interval": 10, "eval_interval": 20, "log_interval": 10, "keep_last": 3}


def _workspace(tiny_project: Path, dst: Path) -> Path:
    """The tiny run's params and token shards: all that pretrain reads."""
    dst.mkdir(parents=True)
    raw = yaml.safe_load((tiny_project / "params.yaml").read_text())
    raw["pretrain"].update(RESUME)
    raw["model"]["dropout"] = 0.1  # resuming must also restore the RNG of the dropout masks
    (dst / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    shutil.copytree(tiny_project / raw["paths"]["tokens_dir"], dst / raw["paths"]["tokens_dir"])
    give_to_node_user(dst)
    return dst


def _pretrain(docker: str, image: str, workspace: Path, name: str | None = None, detach: bool = False):
    return docker_run(
        docker,
        image,
        "python",
        "-m",
        "pipeline_tasks",
        "pretrain",
        "--params",
        "params.yaml",
        volumes={str(workspace): WORKSPACE},
        workdir=WORKSPACE,
        name=name,
        detach=detach,
    )


def test_docker_stop_checkpoints_and_the_rerun_resumes_exactly(docker, images, tiny_repro, tmp_path):
    project, _, _ = tiny_repro
    straight = _workspace(project, tmp_path / "straight")
    done = _pretrain(docker, images["tasks"], straight)
    assert done.returncode == 0, done.stderr[-3000:]

    stopped = _workspace(project, tmp_path / "stopped")
    name = f"lmpipe-sigterm-{tmp_path.name}"[:60]
    started = _pretrain(docker, images["tasks"], stopped, name=name, detach=True)
    assert started.returncode == 0, started.stderr
    try:
        marker = "models/pretrain/checkpoints/run-*/step_0000020.pt.sha256"  # sidecar: checkpoint complete
        deadline = time.monotonic() + 300
        while not list(stopped.glob(marker)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list(stopped.glob(marker)), "no checkpoint before the deadline"
        t0 = time.monotonic()
        subprocess.run(
            [docker, "stop", "-t", str(GRACE_S), name], check=True, capture_output=True, timeout=GRACE_S + 30
        )
        stop_s = time.monotonic() - t0
        state = subprocess.run(
            [docker, "inspect", name, "--format", "{{.State.ExitCode}} {{.State.OOMKilled}}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        logs = subprocess.run([docker, "logs", name], capture_output=True, text=True).stderr
    finally:
        subprocess.run([docker, "rm", "-f", name], capture_output=True)
    print(f"\ndocker stop -> exit in {stop_s:.1f} s (grace {GRACE_S} s)")
    assert stop_s < GRACE_S - 5, "the stage did not exit on SIGTERM: docker had to SIGKILL it"
    assert state == ["1", "false"], (state, logs[-2000:])  # a stage error (1), not SIGKILL (137)
    assert "stopped by signal 15" in logs and "re-run the same command to resume" in logs, logs[-3000:]
    checkpoints = sorted(stopped.glob("models/pretrain/checkpoints/run-*/step_*.pt"))
    stopped_at = max(int(p.stem.split("_")[1]) for p in checkpoints)
    assert 20 <= stopped_at < RESUME["max_steps"]
    assert not (stopped / "models/pretrain/model.pt").exists()

    resumed = _pretrain(docker, images["tasks"], stopped)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    straight_loss = (straight / "reports/pretrain/loss.csv").read_text().splitlines()
    assert len(straight_loss) > RESUME["max_steps"] / RESUME["log_interval"]
    assert (stopped / "reports/pretrain/loss.csv").read_text().splitlines() == straight_loss
    wa = torch.load(straight / "models/pretrain/model.pt", weights_only=True)["model"]
    wb = torch.load(stopped / "models/pretrain/model.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # bit-identical weights
    hand_back(docker, images["tasks"], tmp_path)
