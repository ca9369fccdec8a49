"""A tiny params profile for end-to-end tests: the default pipeline, shrunk to run in about a minute.

The same real data and code paths as `make run`; only sizes and step counts are smaller. Used by the
e2e `dvc repro` test and the Airflow DAG runs. Keys are dotted `params.yaml` paths.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

TINY_OVERRIDES: dict[str, Any] = {
    "tokenize.vocab_size": 512,
    "model.n_layer": 1,
    "model.n_head": 2,
    "model.n_embd": 32,
    "model.block_size": 32,
    "pretrain.max_steps": 4,
    "pretrain.micro_batch_size": 4,
    "pretrain.tokens_per_step": 128,
    "pretrain.warmup_steps": 1,
    "pretrain.eval_interval": 2,
    "pretrain.eval_batches": 1,
    "pretrain.checkpoint_interval": 2,
    "pretrain.log_interval": 1,
    "finetune.max_steps": 4,
    "finetune.epochs": 1,
    "finetune.max_train_rows": 256,
    "finetune.batch_size": 16,
    "finetune.max_len": 32,
    # a 4-step classifier trained on smoothed targets has near-tied logits, and int8 agreement on 32
    # rows becomes a coin flip: the tiny profile trains on hard targets without backbone dropout
    "finetune.label_smoothing": 0.0,
    "finetune.backbone_dropout": None,
    "export.calibration_rows": 32,
    "export.parity_rows": 32,
    "evaluate.bootstrap_resamples": 50,
    "evaluate.latency_runs": 10,
    "evaluate.latency_warmup": 2,
    "evaluate.throughput_runs": 2,
    "evaluate.lm_windows": 4,
    "evaluate.max_test_rows": 400,
    "monitor.sample_rows": 50,
    "monitor.reference_rows": 50,
    "monitor.timeline.start": None,
    "monitor.timeline.end": None,
}


def write_tiny_params(src: Path, dst: Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``dst`` = ``src`` params with :data:`TINY_OVERRIDES` (and ``extra``) applied."""
    from pipeline_tasks.config import apply_override, parse_params

    raw = yaml.safe_load(Path(src).read_text(encoding="utf-8"))
    for dotted, value in {**TINY_OVERRIDES, **(extra or {})}.items():
        if dotted.split(".")[0] in raw:
            apply_override(raw, dotted, value)
    parse_params(raw, Path(dst))  # fail here, not deep inside a stage, if an override is wrong
    Path(dst).write_text(yaml.safe_dump(raw, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return Path(dst)


def copy_project(repo_root: Path, dst: Path) -> Path:
    """Copy the tracked and untracked-but-not-ignored files (what a clean clone would hold) and commit them."""
    files = (
        subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=repo_root, capture_output=True, check=True
        )
        .stdout.decode()
        .split("\0")
    )
    for rel in filter(None, files):
        source = repo_root / rel
        if source.is_file():
            target = dst / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    env_git = ["git", "-c", "user.email=test@lm-pipeline.local", "-c", "user.name=test"]
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=dst, check=True)
    subprocess.run([*env_git, "add", "-A"], cwd=dst, check=True)
    subprocess.run([*env_git, "commit", "-q", "-m", "test copy"], cwd=dst, check=True)
    return dst
