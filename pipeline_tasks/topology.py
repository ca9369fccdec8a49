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

import contextlib
import importlib
import logging
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Literal

from pipeline_tasks.artifacts import atomic_write_json, read_json
from pipeline_tasks.config import ConfigError
from pipeline_tasks.errors import PipelineError

logger = logging.getLogger(__name__)

LAUNCHER_ENV = "LMPIPE_PRETRAIN_LAUNCHER"
# A failing rank leaves its stage exit code beside the checkpoints, on the volume every node shares:
# torchrun reports any failed worker as 1, and a multi-process run should exit 2 on a configuration
# error, as a single process does. Rank 0 clears it when a run (or a restarted job) starts.
RANK_FAILURE_NAME = ".rank_failure.json"


def rank_failure_file(params, workspace: Path = Path()) -> Path:
    return workspace / params.paths.pretrain_dir / RANK_FAILURE_NAME


class DistributedRunFailed(PipelineError):
    """A multi-process run failed; ``exit_code`` is the failing rank's stage exit code where known."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


@contextlib.contextmanager
def recording_rank_failure(failure_file: Path) -> Iterator[None]:
    """Around a rank's work: record how it failed. A rank's own error (configuration, data) wins
    over what its peers then see (a closed connection), whatever the order they arrive in."""
    try:
        yield
    except (PipelineError, ConfigError) as exc:
        code = 2 if isinstance(exc, ConfigError) else exc.exit_code
        _record(failure_file, {"exit_code": code, "message": str(exc)[:2000], "own_error": True})
        raise
    except Exception as exc:
        _record(failure_file, {"exit_code": 1, "message": f"{type(exc).__name__}: {exc}"[:2000], "own_error": False})
        raise


def _record(path: Path, failure: dict) -> None:
    with contextlib.suppress(OSError, ValueError):
        if path.is_file() and read_json(path).get("own_error") and not failure["own_error"]:
            return
        atomic_write_json(path, {**failure, "rank": int(os.environ.get("RANK", "0"))})


def clear_rank_failure(failure_file: Path) -> None:
    failure_file.unlink(missing_ok=True)


def failure_from_ranks(message: str, path: Path, default_code: int = 1) -> DistributedRunFailed:
    """The error to raise after a failed multi-process run: the failing rank's own code and message."""
    if not path.is_file():
        return DistributedRunFailed(message, default_code)
    failure = read_json(path)
    return DistributedRunFailed(
        f"{message}; rank {failure['rank']} failed (exit code {failure['exit_code']}): {failure['message']}",
        int(failure["exit_code"]),
    )


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


def run_torchrun(params, stage_argv: Sequence[str]) -> None:
    """Run the stage under local torchrun; rank 0 writes the outputs as in a single process."""
    cfg = params.pretrain
    command = torchrun_command(cfg, stage_argv)
    logger.info(
        "pretrain: %d x %d processes under torchrun on this machine: %s",
        cfg.nodes,
        cfg.procs_per_node,
        " ".join(command),
    )
    clear_rank_failure(rank_failure_file(params))
    result = subprocess.run(command, check=False)
    if result.returncode:
        raise failure_from_ranks(
            f"pretrain under torchrun failed (torchrun exit code {result.returncode})", rank_failure_file(params)
        )


def run_trainjob(params, stage_argv: Sequence[str]) -> None:
    """This process is the launcher: submit the TrainJob of this workspace and wait for it."""
    importlib.import_module("pipeline_tasks.orchestration.trainjob").launch_stage(params, stage_argv)
