"""Multi-node pretrain on one machine, for real: ``lmpipe trainjob --backend container`` submits a
2-node TrainJob through the Kubeflow Trainer SDK's container backend (one task-image container per
node on the job's own bridge network, torchrun's static rendezvous on node 0). The SDK's backend is
what runs here, not a stand-in: it is the same launcher code path as on a cluster, minus JobSet,
whose whole-job restarts the launcher plays itself.

Checked against two local references in the same workspace layout: one process, and two processes
of ``torchrun --standalone`` (``pretrain.procs_per_node: 2`` on this machine):

* 2 nodes x 1 process trains the same trajectory as 1 process: every logged train loss within
  ``LOSS_TOLERANCE`` (measured: at most 1e-6, the rounding of loss.csv), and weights identical to
  the 2-process run's (same world size, same all-reduce, same bits);
* a node killed mid-run (``docker kill``) fails the job, the launcher restarts every node, pretrain
  resumes from the newest checkpoint and the final weights equal the uninterrupted run's exactly.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from pipeline_tasks.orchestration.trainjob import job_name

pytestmark = [pytest.mark.containers, pytest.mark.slow]

# fp32 and one thread per process: the comparison is about the topology, not about kernels
RUN = {
    "max_steps": 1000,
    "tokens_per_step": 512,  # 4 micro-batches of 4 x 32 tokens in 1 process, 2 per rank in 2
    "checkpoint_interval": 50,
    "eval_interval": 250,
    "log_interval": 250,
    "keep_last": 2,
    "dtype": "float32",
    "num_threads": 1,
}
LOSS_TOLERANCE = 1e-4  # absolute, per logged step; measured max 1e-6 (loss.csv keeps 6 decimals)
KILL_AFTER_STEP = 300


def _workspace(tiny_project: Path, dst: Path, **pretrain) -> Path:
    dst.mkdir(parents=True)
    raw = yaml.safe_load((tiny_project / "params.yaml").read_text())
    raw["pretrain"].update({**RUN, **pretrain})
    (dst / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    shutil.copytree(tiny_project / raw["paths"]["tokens_dir"], dst / raw["paths"]["tokens_dir"])
    return dst


def _lmpipe(workspace: Path, *args: str, home: Path | None = None, **popen) -> subprocess.Popen:
    env = {**os.environ, "LMPIPE_LOG_LEVEL": "INFO"}
    if home is not None:  # the SDK's container backend keeps its per-job folders under $HOME
        env["HOME"] = str(home)
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline_tasks", *args],
        cwd=workspace,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


def _finish(proc: subprocess.Popen, timeout: float = 900) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-6000:]
    return out


def _losses(workspace: Path) -> dict[int, float]:
    with (workspace / "reports/pretrain/loss.csv").open() as f:
        return {int(row["step"]): float(row["train_loss"]) for row in csv.DictReader(f)}


def _weights(workspace: Path) -> dict[str, torch.Tensor]:
    return torch.load(workspace / "models/pretrain/model.pt", weights_only=True)["model"]


def _metrics(workspace: Path) -> dict:
    return yaml.safe_load((workspace / "reports/pretrain/metrics.json").read_text())


@pytest.fixture(scope="module")
def references(tiny_repro, tmp_path_factory) -> dict[str, Path]:
    """1 process and 2 local processes (torchrun --standalone), on the host."""
    project, _, _ = tiny_repro
    root = tmp_path_factory.mktemp("multinode-ref")
    one = _workspace(project, root / "one")
    two = _workspace(project, root / "two", procs_per_node=2)
    _finish(_lmpipe(one, "pretrain"))
    out = _finish(_lmpipe(two, "pretrain"))
    assert "under torchrun on this machine" in out
    assert _metrics(two)["world_size"] == 2
    return {"one": one, "two": two}


def test_two_nodes_through_the_trainer_sdk_train_what_one_process_trains(
    docker, images, tiny_repro, references, tmp_path
):
    project, _, _ = tiny_repro
    workspace = _workspace(project, tmp_path / "ws", nodes=2)
    out = _finish(_lmpipe(workspace, "trainjob", "--backend", "container", home=tmp_path / "home"))

    assert "submitted TrainJob" in out and "complete" in out
    assert "Master node is reachable" in out  # node 1 waited for node 0's rendezvous port and joined
    assert out.count("wrote models/pretrain/model.pt") == 1  # rank 0 alone writes the outputs
    assert _metrics(workspace)["world_size"] == 2
    assert not (tmp_path / "home/.kubeflow/trainer/containers" / job_name(workspace)).exists()

    one, two = _losses(references["one"]), _losses(workspace)
    assert one.keys() == two.keys() and len(one) == RUN["max_steps"]
    worst = max(abs(one[step] - two[step]) for step in one)
    assert worst <= LOSS_TOLERANCE, f"2 nodes drift from 1 process by {worst} (tolerance {LOSS_TOLERANCE})"
    local, nodes = _weights(references["two"]), _weights(workspace)
    assert all(torch.equal(local[k], nodes[k]) for k in local), "2 nodes != 2 local processes"


def test_a_killed_node_restarts_the_job_which_resumes_to_the_same_model(
    docker, images, tiny_repro, references, tmp_path
):
    project, _, _ = tiny_repro
    workspace = _workspace(project, tmp_path / "ws", nodes=2)
    home = tmp_path / "home"
    name = job_name(workspace)
    launcher = _lmpipe(workspace, "trainjob", "--backend", "container", home=home)
    checkpoints = home / ".kubeflow/trainer/containers" / name / "models/pretrain/checkpoints"
    deadline = time.monotonic() + 300
    while not any(int(p.stem.split("_")[1]) >= KILL_AFTER_STEP for p in checkpoints.glob("run-*/step_*.pt")):
        assert launcher.poll() is None, f"the job ended before the kill:\n{launcher.communicate()[0][-4000:]}"
        assert time.monotonic() < deadline, "no checkpoint past the kill step in 300 s"
        time.sleep(0.05)
    killed = subprocess.run([docker, "kill", f"{name}-node-1"], capture_output=True, text=True, timeout=60)
    assert killed.returncode == 0, killed.stderr
    out = _finish(launcher)

    assert "restarting every node (1 of" in out
    assert "resumed from" in out
    step = int(out.split("resumed from")[1].split("(step ")[1].split(")")[0])
    assert KILL_AFTER_STEP <= step < RUN["max_steps"]
    assert _losses(workspace) == _losses(references["two"])
    uninterrupted, resumed = _weights(references["two"]), _weights(workspace)
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)
