"""Training utilities used by pretrain (and finetune): schedule, optimizer groups, RNG capture,
checkpoint integrity and rotation, params validation, and the GPU params profile."""

from __future__ import annotations

import hashlib
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline_tasks.config import ConfigError, load_params
from pipeline_tasks.train.model import ModelConfig, build_lm
from pipeline_tasks.train.params import PretrainParams
from pipeline_tasks.train.pretrain import accumulation_steps
from pipeline_tasks.train.training import (
    CheckpointManager,
    capture_rng_state,
    configure_optimizer,
    cosine_lr,
    log_step,
    restore_rng_state,
)

REPO = Path(__file__).resolve().parents[2]


def test_cosine_lr_warms_up_linearly_then_decays_to_min_lr():
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert cosine_lr(0, **kw) == pytest.approx(0.1)
    assert cosine_lr(9, **kw) == pytest.approx(1.0)
    assert cosine_lr(60, **kw) == pytest.approx(0.55)  # half way: the mean of lr and min_lr
    assert cosine_lr(110, **kw) == pytest.approx(0.1) and cosine_lr(500, **kw) == pytest.approx(0.1)
    decay = [cosine_lr(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))


def test_optimizer_decays_only_matrices_and_counts_tied_weights_once():
    model = build_lm(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=100, bias=True))
    optimizer = configure_optimizer(model, 1e-3, 0.1, (0.9, 0.95), torch.device("cpu"))
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    n_optimized = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    assert n_optimized == sum(p.numel() for p in model.parameters())


def test_rng_state_roundtrips_through_a_weights_only_checkpoint(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.save({"rng": capture_rng_state()}, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_checkpoint_manager_keeps_last_k_with_sha256sum_sidecars(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (10, 20, 30, 40):
        manager.save({"step": step, "w": torch.full((4,), float(step))}, step)
    assert [s for s, _ in manager.checkpoints()] == [30, 40]
    path = manager.path_for(40)
    digest, name = (tmp_path / "step_0000040.pt.sha256").read_text().split()
    assert name == path.name and digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert len(list(tmp_path.glob("*.sha256"))) == 2  # rotated checkpoints take their sidecars along
    latest_path, state = manager.load_latest()
    assert latest_path == path and state["step"] == 40


def test_checkpoint_manager_skips_corrupt_and_unfinished_checkpoints(tmp_path, caplog):
    manager = CheckpointManager(tmp_path, keep_last=5)
    for step in (1, 2, 3):
        manager.save({"step": step}, step)
    newest = manager.path_for(3)
    newest.write_bytes(newest.read_bytes()[:-7])  # truncated
    (tmp_path / "step_0000002.pt.sha256").unlink()  # killed before the sidecar was written
    with caplog.at_level(logging.WARNING):
        path, state = manager.load_latest()
    assert state["step"] == 1 and path == manager.path_for(1)
    assert "truncated or corrupt" in caplog.text and "write was interrupted" in caplog.text
    manager.path_for(1).write_bytes(b"not a zip")
    with pytest.raises(ValueError):
        manager.load_file(manager.path_for(1))
    assert manager.load_latest() is None


def test_checkpoint_loading_refuses_pickled_objects(tmp_path):
    """weights_only=True: a checkpoint smuggling an arbitrary object is rejected, not executed."""
    manager = CheckpointManager(tmp_path)
    manager.save({"payload": Path("/etc/passwd")}, 1)  # any non-allow-listed class
    with pytest.raises(ValueError, match="cannot be loaded"):
        manager.load_file(manager.path_for(1))


def test_accumulation_steps_validates_the_token_budget():
    cfg = PretrainParams(micro_batch_size=4, tokens_per_step=1024)
    assert accumulation_steps(cfg, block_size=64, world_size=2) == 2
    with pytest.raises(ConfigError, match="multiple of micro_batch_size x block_size x world_size"):
        accumulation_steps(cfg, block_size=64, world_size=3)


@pytest.mark.parametrize("bad", [dict(min_lr=1.0, lr=0.1), dict(max_steps=0), dict(beta2=1.0), dict(keep_last=0)])
def test_pretrain_params_reject_bad_values(bad):
    with pytest.raises(ValueError):
        PretrainParams(**bad)


@pytest.mark.parametrize("name", ["params.yaml", "params.gpu.yaml"])
def test_params_profiles_load_with_the_strict_loader(name):
    params = load_params(REPO / name)
    config = ModelConfig.from_params(params.model, params.tokenize.vocab_size)
    accumulation_steps(params.pretrain, config.block_size, world_size=1)  # the budget divides evenly
    if name == "params.gpu.yaml":
        assert params.pretrain.device == "cuda" and params.pretrain.compile


def test_log_step_writes_one_line_with_eta(caplog):
    log = logging.getLogger("pipeline_tasks.test_log_step")
    with caplog.at_level(logging.INFO, logger=log.name):
        log_step(log, 10, 70, 5.123456, 3e-4, throughput="20 ms/step | 51,200 tok/s", seconds_per_step=2.0)
        log_step(log, 10, 20, 0.5, 1e-3, throughput="1428 ex/s", seconds_per_step=0.5, detail="epoch 2")
    assert caplog.messages == [
        "step 10/70 | loss 5.1235 | lr 3.00e-04 | 20 ms/step | 51,200 tok/s | eta 2m00s",
        "step 10/20 | epoch 2 | loss 0.5000 | lr 1.00e-03 | 1428 ex/s | eta 0m05s",
    ]
