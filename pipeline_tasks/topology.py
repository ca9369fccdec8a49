"""How ``pretrain`` runs for ``pretrain.nodes`` x ``pretrain.procs_per_node`` processes.

* ``1 x 1``: in this process.
* more, already under a launcher (``torchrun`` sets ``WORLD_SIZE``; so do the nodes of a Kubeflow
  Trainer TrainJob, whose torchrun reads the ``PET_*`` topology Trainer injects): this process is one
  rank and joins the process group.
* more, under the kubernetes runner or KFP (env ``LMPIPE_PRETRAIN_LAUNCHER=trainjob``, set by the
  Airflow node and the KFP component) with ``nodes > 1``: this process is the launcher; it submits a
  TrainJob of ``nodes`` pods on the shared workspace volume and waits for it
  (:mod:`pipeline_tasks.orchestration.trainjob`).
* more, anywhere else (``dvc repro`` on a laptop, the docker runner): ``torchrun --standalone`` with
  ``nodes x procs_per_node`` local processes. The world size is what shapes the trajectory (it is in
  the run fingerprint), so these checkpoints and the cluster's are interchangeable.

Core (torch-free): ``pretrain`` and the launcher in :mod:`pipeline_tasks.orchestration.trainjob`
both use it, and it reaches the launcher by module name, as the CLI reaches the stages.
"""

from __future__ import annotations

import importlib
import logging
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Literal

from pipeline_tasks.errors import PipelineError

logger = logging.getLogger(__name__)

LAUNCHER_ENV = "LMPIPE_PRETRAIN_LAUNCHER"

Mode = Literal["in_process", "rank", "torchrun", "trainjob"]


def world_size(cfg) -> int:
    return cfg.nodes * cfg.procs_per_node


def launch_mode(cfg, env: Mapping[str, str] = os.environ) -> Mode:
    """Which of the four ways above this ``pretrain`` invocation takes."""
    if "WORLD_SIZE" in env:  # torchrun (or a TrainJob node's torchrun) started us
        return "rank"
    if world_size(cfg) == 1:
        return "in_process"
    if cfg.nodes > 1 and env.get(LAUNCHER_ENV) == "trainjob":
        return "trainjob"
    return "torchrun"


def torchrun_command(cfg, stage_argv: Sequence[str], python: str = sys.executable) -> list[str]:
    """``torchrun --standalone`` running this stage with the configured world size on this machine."""
    return [
        python,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={world_size(cfg)}",
        "--max-restarts=0",  # a failed rank fails the stage; the retry resumes from the checkpoint
        "-m",
        "pipeline_tasks",
        "pretrain",
        *stage_argv,
    ]


def run_torchrun(cfg, stage_argv: Sequence[str]) -> None:
    """Run the stage under local torchrun; rank 0 writes the outputs as in a single process."""
    command = torchrun_command(cfg, stage_argv)
    logger.info(
        "pretrain: %d x %d processes under torchrun on this machine: %s",
        cfg.nodes,
        cfg.procs_per_node,
        " ".join(command),
    )
    result = subprocess.run(command, check=False)
    if result.returncode:
        # torchrun reports every failed worker as 1; the workers' own errors are in the log above
        raise PipelineError(f"pretrain under torchrun failed with exit code {result.returncode}")


def run_trainjob(params, stage_argv: Sequence[str]) -> None:
    """This process is the launcher: submit the TrainJob of this workspace and wait for it."""
    importlib.import_module("pipeline_tasks.orchestration.trainjob").launch_stage(params, stage_argv)
