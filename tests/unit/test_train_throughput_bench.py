"""bench/train_throughput.py: our pretrain step vs nanoGPT's unmodified model.py, on a tiny model.

nanoGPT's model.py is written from a local nanoGPT git repository ($LMPIPE_NANOGPT_GIT, default
../.mirror/karpathy+nanoGPT/repo next to the checkout); without one the comparison test is skipped.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline_tasks.train.model import ModelConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
NANOGPT_GIT = Path(os.environ.get("LMPIPE_NANOGPT_GIT") or REPO_ROOT.parent / ".mirror" / "karpathy+nanoGPT" / "repo")
TINY = ModelConfig(arch="gpt", n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=64, dropout=0.0, bias=False)


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location(
        "_bench_train_throughput", REPO_ROOT / "bench" / "train_throughput.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def nanogpt(bench, tmp_path_factory):
    if shutil.which("git") is None:
        pytest.skip("git is not installed: cannot read nanoGPT's model.py from the mirror")
    probe = subprocess.run(
        ["git", "--git-dir", str(NANOGPT_GIT), "cat-file", "-e", "HEAD:model.py"], capture_output=True
    )
    if not NANOGPT_GIT.exists() or probe.returncode != 0:
        pytest.skip(f"no nanoGPT git repository at {NANOGPT_GIT}: set LMPIPE_NANOGPT_GIT to a karpathy/nanoGPT clone")
    path = bench.export_nanogpt(NANOGPT_GIT, tmp_path_factory.mktemp("nanogpt") / "model.py")
    return bench.load_nanogpt(path)


def test_same_initial_loss_and_both_sides_timed(bench, nanogpt):
    assert len(nanogpt.source["commit"]) == 40 and len(nanogpt.sha256) == 64
    check = bench.check_same_model(nanogpt, TINY, 2, torch.device("cpu"))
    assert check["passed"], check
    assert check["abs_diff"] <= 1e-3 and check["params_ours"] == check["params_nanogpt"]

    row = bench.compare(TINY, 2, torch.device("cpu"), torch.float32, False, 1, 0, 1, nanogpt)
    assert row["ours"]["tokens_per_s"] > 0 and row["nanogpt"]["tokens_per_s"] > 0
    assert row["ratio_tokens_per_s_ours_over_nanogpt"] > 0
    assert len(row["ours"]["round_ms_per_step"]) == len(row["nanogpt"]["round_ms_per_step"]) == 1


def test_ours_only_without_nanogpt(bench, tmp_path):
    path, why = bench.resolve_nanogpt(str(tmp_path / "missing"))
    assert path is None and "not found" in why
    assert bench.resolve_nanogpt("none") == (None, "--nanogpt none")
    row = bench.compare(TINY, 2, torch.device("cpu"), torch.float32, False, 1, 0, 1, None)
    assert row["ours"]["tokens_per_s"] > 0 and "nanogpt" not in row
