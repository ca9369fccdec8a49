"""Stage ``pretrain`` on real tiny token shards: learning, exact resume after SIGKILL, DDP with
two CPU processes, corrupt-checkpoint fallback and the non-finite-loss stop.

The shards come from the real tokenize stage run on WikiText-2 / AG News / Chinese Wikipedia
text (module fixture). Models are tiny (2 layers, width 32) so each run takes seconds.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _lm_data import write_params, write_prepared

from pipeline_tasks.config import load_params
from pipeline_tasks.errors import PipelineError

TINY_MODEL = {"arch": "gpt", "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32, "dropout": 0.0, "bias": False}
TINY_PRETRAIN = {
    "device": "cpu",
    "num_threads": 1,
    "deterministic": True,
    "max_steps": 20,
    "micro_batch_size": 4,
    "tokens_per_step": 256,
    "lr": 3e-3,
    "min_lr": 3e-4,
    "warmup_steps": 3,
    "eval_interval": 5,
    "eval_batches": 2,
    "checkpoint_interval": 5,
    "keep_last": 3,
    "log_interval": 5,
}
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tokens_dir(corpora, tmp_path_factory) -> Path:
    from pipeline_tasks.dataset import tokenize

    tmp = tmp_path_factory.mktemp("tokens")
    write_prepared(corpora, tmp / "data/prepared", n_wiki=12, n_news=200, n_zh=3)
    tokenize.run(load_params(write_params(tmp, tokenize={"vocab_size": 512})))
    return tmp / "data/tokens"


def make_params(tmp: Path, tokens_dir: Path, model=None, **pretrain) -> Path:
    path = write_params(tmp, model={**TINY_MODEL, **(model or {})}, pretrain={**TINY_PRETRAIN, **pretrain})
    text = path.read_text(encoding="utf-8").replace(str(tmp / "data/tokens"), str(tokens_dir))
    path.write_text(text, encoding="utf-8")
    return path


def read_loss_csv(reports_dir: Path) -> list[str]:
    return (reports_dir / "loss.csv").read_text(encoding="utf-8").splitlines()


def cli(params_path: Path, *extra: str, launcher: tuple[str, ...] = ()) -> list[str]:
    return [
        *launcher,
        *(() if launcher else (sys.executable,)),
        "-m",
        "pipeline_tasks",
        "pretrain",
        "--params",
        str(params_path),
        *extra,
    ]


def run_dir(params) -> Path:
    dirs = list((Path(params.paths.pretrain_dir) / "checkpoints").glob("run-*"))
    assert len(dirs) == 1, dirs
    return dirs[0]


@pytest.mark.parametrize("arch", ["gpt", "lstm"])
def test_pretrain_loss_falls_and_writes_outputs(arch, tokens_dir, tmp_path):
    from pipeline_tasks.train import pretrain
    from pipeline_tasks.train.model import ModelConfig, build_lm, load_lm

    params = load_params(make_params(tmp_path, tokens_dir, model={"arch": arch}, max_steps=30, eval_interval=10))
    result = pretrain.run(params)
    reports = Path(params.paths.pretrain_reports_dir)
    rows = [r.split(",") for r in read_loss_csv(reports)[1:]]
    assert [int(r[0]) for r in rows] == list(range(1, 31))
    val = [float(r[2]) for r in rows if r[2]]
    initial = float(rows[0][1])
    assert initial == pytest.approx(math.log(512), abs=0.25)
    assert len(val) == 3 and val[0] > val[1] > val[2] and val[-1] < initial - 0.3, (initial, val)

    metrics = json.loads((reports / "metrics.json").read_text())
    assert metrics["train/steps"] == 30 and metrics["val/loss"] == pytest.approx(min(val))
    assert metrics["val/bpb"] > 0 and metrics["train/tokens_per_s"] > 0 and result["val_loss"] > 0
    assert list((reports / "tb").glob("events.out.tfevents.*"))

    saved = torch.load(Path(params.paths.pretrain_dir) / "model.pt", weights_only=True)
    config = ModelConfig.from_dict(saved["model_config"])
    assert config.arch == arch and config.vocab_size == 512
    build_lm(config).load_state_dict(saved["model"])  # strict: every key present and shaped right
    assert saved["val"]["loss"] == pytest.approx(min(val)) and saved["special_tokens"]["eot"] == 0
    model, _ = load_lm(Path(params.paths.pretrain_dir) / "model.pt")
    assert model.config == config


RESUME_MODEL = {"dropout": 0.1}  # dropout on: resuming must also restore the RNG of the dropout masks
RESUME_PRETRAIN = {"max_steps": 60, "checkpoint_interval": 10}


@pytest.fixture(scope="module")
def straight_run(tokens_dir, tmp_path_factory) -> Path:
    """An uninterrupted subprocess run: the reference trajectory for the resume tests."""
    tmp = tmp_path_factory.mktemp("straight")
    params_path = make_params(tmp, tokens_dir, RESUME_MODEL, **RESUME_PRETRAIN)
    subprocess.run(
        cli(params_path), check=True, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, timeout=300
    )
    return tmp


def interrupt_after_checkpoint(params_path: Path, sig: signal.Signals, step: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cli(params_path), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    marker = f"models/pretrain/checkpoints/run-*/step_{step:07d}.pt.sha256"  # sidecar: checkpoint complete
    deadline = time.monotonic() + 120
    while not list(params_path.parent.glob(marker)) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(sig)
    return proc


def assert_same_trajectory(a: Path, b: Path) -> None:
    la, lb = read_loss_csv(a / "reports/pretrain"), read_loss_csv(b / "reports/pretrain")
    assert len(la) == 61 and la == lb  # every step's train/val loss and lr, to 6 decimals
    wa = torch.load(a / "models/pretrain/model.pt", weights_only=True)["model"]
    wb = torch.load(b / "models/pretrain/model.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # bit-identical weights


@pytest.mark.slow
def test_pretrain_resume_after_sigkill_is_bit_identical(straight_run, tokens_dir, tmp_path):
    params_path = make_params(tmp_path, tokens_dir, RESUME_MODEL, **RESUME_PRETRAIN)
    proc = interrupt_after_checkpoint(params_path, signal.SIGKILL, step=10)
    assert proc.wait(timeout=30) == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "models/pretrain/model.pt").exists()

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    resumed = subprocess.run(cli(params_path), env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    assert_same_trajectory(straight_run, tmp_path)


@pytest.mark.slow
def test_pretrain_sigterm_checkpoints_the_current_step_and_resumes_exactly(straight_run, tokens_dir, tmp_path):
    params_path = make_params(tmp_path, tokens_dir, RESUME_MODEL, **RESUME_PRETRAIN)
    proc = interrupt_after_checkpoint(params_path, signal.SIGTERM, step=10)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1, stderr[-3000:]
    assert "stopped by signal 15" in stderr and "re-run the same command to resume" in stderr
    params = load_params(params_path)
    stopped_at = max(int(p.stem.split("_")[1]) for p in run_dir(params).glob("step_*.pt"))
    assert 10 <= stopped_at < 60

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    resumed = subprocess.run(cli(params_path), env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"(step {stopped_at})" in resumed.stderr
    assert_same_trajectory(straight_run, tmp_path)


@pytest.mark.slow
def test_pretrain_ddp_two_cpu_processes_train_the_same_number_of_steps(tokens_dir, tmp_path):
    params_path = make_params(tmp_path, tokens_dir, max_steps=10, checkpoint_interval=5)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    proc = subprocess.run(cli(params_path, launcher=launcher), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world size 2, 1 micro-batch(es) of 4x32 per step" in proc.stderr  # 256 tokens = 2 ranks x 4 x 32

    params = load_params(params_path)
    rows = [r.split(",") for r in read_loss_csv(Path(params.paths.pretrain_reports_dir))[1:]]
    assert [int(r[0]) for r in rows] == list(range(1, 11))
    assert all(math.isfinite(float(r[1])) for r in rows)
    ckpt_dir = run_dir(params)
    assert sorted(p.name for p in ckpt_dir.glob("step_*.pt")) == ["step_0000005.pt", "step_0000010.pt"]
    assert not list(ckpt_dir.glob(".*"))  # no temp files left by a second writer
    state = torch.load(ckpt_dir / "step_0000010.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2  # rank 0 holds both ranks' RNG states
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])


def test_pretrain_falls_back_to_previous_checkpoint_when_newest_is_corrupt(tokens_dir, tmp_path, caplog):
    from pipeline_tasks.train import pretrain

    params = load_params(make_params(tmp_path, tokens_dir, max_steps=15))
    pretrain.run(params)
    first = torch.load(Path(params.paths.pretrain_dir) / "model.pt", weights_only=True)["model"]
    first_loss = read_loss_csv(Path(params.paths.pretrain_reports_dir))
    ckpt_dir = run_dir(params)
    newest = ckpt_dir / "step_0000015.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated, as by a full disk

    with caplog.at_level(logging.INFO, logger="pipeline_tasks"):
        pretrain.run(params)
    assert "step_0000015.pt: sha256" in caplog.text and "falling back" in caplog.text
    assert "step_0000010.pt (step 10)" in caplog.text  # resumed from the previous good one
    again = torch.load(Path(params.paths.pretrain_dir) / "model.pt", weights_only=True)["model"]
    assert all(torch.equal(first[k], again[k]) for k in first)  # the re-done steps are identical
    assert read_loss_csv(Path(params.paths.pretrain_reports_dir)) == first_loss
    assert sorted(p.name for p in ckpt_dir.glob("step_*.pt")) == [
        "step_0000005.pt",
        "step_0000010.pt",
        "step_0000015.pt",
    ]


def test_pretrain_non_finite_loss_stops_with_clear_error_and_keeps_last_checkpoint(tokens_dir, tmp_path):
    from pipeline_tasks.train import pretrain
    from pipeline_tasks.train.training import CheckpointManager

    # an absurd learning rate with no warm-up: step 1 is fine, its update overflows the weights
    params = load_params(
        make_params(tmp_path, tokens_dir, lr=1e30, min_lr=1e29, warmup_steps=0, checkpoint_interval=1, max_steps=10)
    )
    with pytest.raises(
        PipelineError,
        match=r"non-finite training loss .* at step 2; last good checkpoint .*"
        r"step_0000001\.pt is kept",
    ):
        pretrain.run(params)
    manager = CheckpointManager(run_dir(params))
    path, state = manager.load_latest()
    assert path.name == "step_0000001.pt" and state["train_state"]["step"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (Path(params.paths.pretrain_dir) / "model.pt").exists()


def test_pretrain_rejects_tokens_per_step_not_divisible(tokens_dir, tmp_path):
    from pipeline_tasks.config import ConfigError
    from pipeline_tasks.train import pretrain

    params = load_params(make_params(tmp_path, tokens_dir, tokens_per_step=300))
    with pytest.raises(ConfigError, match="tokens_per_step \\(300\\) must be a multiple of .* = 128"):
        pretrain.run(params)


def test_pretrain_changed_params_start_a_separate_run(tokens_dir, tmp_path):
    from pipeline_tasks.train import pretrain

    pretrain.run(load_params(make_params(tmp_path, tokens_dir, max_steps=5)))
    pretrain.run(load_params(make_params(tmp_path, tokens_dir, max_steps=5, lr=1e-3)))
    runs = list((tmp_path / "models/pretrain/checkpoints").glob("run-*"))
    assert len(runs) == 2  # the second run did not resume the first one's checkpoint


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _train_losses(params_path: Path) -> dict[int, float]:
    reports = Path(load_params(params_path).paths.pretrain_reports_dir)
    return {int(r.split(",")[0]): float(r.split(",")[1]) for r in read_loss_csv(reports)[1:]}


def test_trainjob_node_command_under_the_trainer_env_trains_what_one_process_trains(tokens_dir, tmp_path):
    """The command a TrainJob node runs, started twice as Trainer starts it (``PET_*`` topology,
    node 0 the rendezvous host), on loopback; dropout on, so its masks must not depend on the
    topology either. The same steps as one process, every train loss within 1e-4 (the topology
    changes only the float summation order of the gradient)."""
    from pipeline_tasks.orchestration.trainjob import build_trainjob, orchestration_of

    common = dict(max_steps=30, tokens_per_step=512, dtype="float32", checkpoint_interval=10)
    one = make_params(tmp_path / "one", tokens_dir, model={"dropout": 0.1}, **common)
    subprocess.run(cli(one), check=True, capture_output=True, timeout=300)
    two = make_params(tmp_path / "two", tokens_dir, model={"dropout": 0.1}, nodes=2, **common)
    params = load_params(two)
    body = build_trainjob(
        params, orchestration_of(params), workspace=str(two.parent), stage_argv=["--params", str(two)]
    )
    command = body["spec"]["trainer"]["command"]
    assert command[:2] == ["tini", "--"]  # PID 1 in the pod; not needed on the host
    port = str(_free_port())
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # torchrun of this venv
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "PET_NNODES": "2",
        "PET_NPROC_PER_NODE": "2",  # what Trainer injects on a CPU node with 2 cores: the command's flag wins
        "PET_MASTER_ADDR": "127.0.0.1",
        "PET_MASTER_PORT": port,
    }
    nodes = [
        subprocess.Popen(command[2:], env={**env, "PET_NODE_RANK": str(rank)}, stdout=subprocess.PIPE, text=True)
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    metrics = json.loads((Path(params.paths.pretrain_reports_dir) / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["train/steps"] == 30
    reference, distributed = _train_losses(one), _train_losses(two)
    assert reference.keys() == distributed.keys()
    assert max(abs(reference[s] - distributed[s]) for s in reference) <= 1e-4


def test_procs_per_node_runs_local_torchrun_from_the_plain_stage_command(tokens_dir, tmp_path):
    """``dvc repro`` and the docker runner call ``python -m pipeline_tasks pretrain``; the params
    alone make it a 2-process run, and the stage's summary comes from rank 0's outputs."""
    params_path = make_params(tmp_path, tokens_dir, max_steps=6, checkpoint_interval=3, procs_per_node=2)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cli(params_path), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 x 2 processes under torchrun on this machine" in proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["world_size"] == 2 and summary["steps"] == 6


def test_a_rank_configuration_error_exits_2_through_torchrun(tokens_dir, tmp_path):
    """torchrun reports any failed worker as 1; the stage still exits with the rank's own code."""
    # 128 tokens per step cannot be split into 2 ranks x 4 x 32: a configuration error inside each rank
    params_path = make_params(tmp_path, tokens_dir, tokens_per_step=128, procs_per_node=2)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    proc = subprocess.run(cli(params_path), env=env, capture_output=True, text=True, timeout=300, cwd=cwd)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "must be a multiple of micro_batch_size x block_size x world_size" in proc.stderr.splitlines()[-1]
    assert not any(cwd.iterdir()), "the rank failure record belongs beside the checkpoints, not in the cwd"
