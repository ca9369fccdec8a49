"""Orchestration settings and the parse-time helpers the DAGs, the driver and the KFP compiler share.

Section ``orchestration`` of params.yaml (:class:`OrchestrationParams`): runner kind (``local`` |
``docker`` | ``kubernetes``), schedules, images, Kubernetes and Docker settings, the data root that
holds per-run workspaces, the shared DVC cache and shared state, notification connection ids,
timeouts and retries. :func:`load_orchestration_params` reads it through the one
:func:`pipeline_tasks.config.load_params` path (``extends:`` profiles, the YAML 1.2 float shim);
every params module is torch-free, so the Airflow image parses DAGs with PyYAML only.

The node driver that runs inside the containers is :mod:`pipeline_tasks.orchestration.driver`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import re
import shlex
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline_tasks.config import load_params

logger = logging.getLogger(__name__)

META_DIR = ".lmpipe"  # per-workspace bookkeeping (source, lineage)
# Left out when the source is not a git checkout (an image snapshot is already filtered by
# .dockerignore): paths relative to the source root, so that the outputs folder `registry/` is left
# out but the package `pipeline_tasks/registry/` is not ...
COPY_EXCLUDES = (
    ".git",
    ".venv",
    ".venv-airflow",
    "data",
    "models",
    "reports",
    "registry",
    "mlruns",
    ".dvc-remote",
    "bench/results",
    ".dvc/cache",
    ".dvc/tmp",
    "build",
    ".dvc/config.local",
    META_DIR,
)
# ... and folder names left out at any depth
COPY_EXCLUDES_ANYWHERE = ("__pycache__", ".pytest_cache", ".ruff_cache")
_VAR = re.compile(r"\$\{\s*([A-Za-z0-9_.]+)\s*\}")
MAX_INLINE_METRICS_BYTES = 8192  # bigger metrics files travel as their top-level scalars only


def _frozen_map(**items: Any) -> types.MappingProxyType:
    return types.MappingProxyType(dict(items))


@dataclasses.dataclass(frozen=True)
class NotifyParams:
    """Where run notifications go. Empty ids disable a channel; with none set they are only logged."""

    smtp_conn_id: str = ""
    email_to: tuple[str, ...] = ()
    http_conn_id: str = ""  # webhook (Slack/Teams/any JSON endpoint) through an Airflow HTTP connection
    webhook_endpoint: str = ""


@dataclasses.dataclass(frozen=True)
class ResourceParams:
    """Pod resources of one node class (Kubernetes quantities)."""

    cpu: str = "1"
    memory: str = "4Gi"
    cpu_limit: str | None = None
    memory_limit: str | None = None
    gpus: int = 0


@dataclasses.dataclass(frozen=True)
class TolerationParams:
    key: str
    operator: Literal["Exists", "Equal"] = "Exists"
    value: str = ""
    effect: str = "NoSchedule"


@dataclasses.dataclass(frozen=True)
class TrainJobParams:
    """Multi-node ``pretrain`` (``pretrain.nodes > 1``) as a Kubeflow Trainer v2 TrainJob.

    The kubernetes runner's and KFP's ``pretrain`` node is then a CPU launcher pod that submits the
    TrainJob, streams its logs and waits (see :mod:`pipeline_tasks.orchestration.trainjob`)."""

    runtime: str = "lmpipe-torch"  # deploy/trainer/runtimes/lmpipe-torch.yaml
    runtime_kind: Literal["TrainingRuntime", "ClusterTrainingRuntime"] = "TrainingRuntime"
    service_account: str = "lmpipe-trainjob-launcher"  # of the launcher pod: deploy/trainer/rbac.yaml
    queue: str = ""  # Kueue LocalQueue (label kueue.x-k8s.io/queue-name); "": not queued
    # per node; GPUs must equal pretrain.procs_per_node (one process per GPU)
    node_resources: ResourceParams = ResourceParams(cpu="8", memory="48Gi", memory_limit="48Gi", gpus=1)
    active_deadline_s: int = 0  # TrainJob activeDeadlineSeconds (0: the stage timeout)
    wait_timeout_s: int = 0  # how long the launcher waits for Complete/Failed (0: the stage timeout)
    startup_timeout_s: int = 1800  # submitted -> Running (image pulls, Kueue admission)
    poll_interval_s: int = 5


@dataclasses.dataclass(frozen=True)
class KubernetesParams:
    namespace: str = "lm-pipeline"
    service_account: str = ""
    kubernetes_conn_id: str = ""  # empty: in-cluster config
    data_pvc: str = "lm-pipeline-data"  # ReadWriteMany claim mounted at container_data_root
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    image_pull_secrets: tuple[str, ...] = ()
    cpu_resources: ResourceParams = ResourceParams(cpu="2", memory="8Gi", memory_limit="8Gi")
    gpu_resources: ResourceParams = ResourceParams(cpu="8", memory="48Gi", memory_limit="48Gi", gpus=1)
    gpu_node_selector: dict[str, str] = dataclasses.field(
        default_factory=lambda: _frozen_map(**{"nvidia.com/gpu.present": "true"})
    )
    gpu_tolerations: tuple[TolerationParams, ...] = (TolerationParams(key="nvidia.com/gpu"),)
    startup_timeout_s: int = 900  # image pulls of the CUDA image take minutes
    termination_grace_s: int = 120  # time for training to write a checkpoint on SIGTERM
    trainjob: TrainJobParams = TrainJobParams()


@dataclasses.dataclass(frozen=True)
class DockerParams:
    url: str = "unix://var/run/docker.sock"
    data_volume: str = "lm-pipeline-data"  # named volume (or host path) mounted at container_data_root
    network_mode: str = "lm-pipeline"  # the compose stack's network (reaches the MLflow server)
    shm_size_mb: int = 2048  # DataLoader workers share tensors through /dev/shm
    gpus: int = 1  # device_requests count for GPU stages (-1: all; 0: none, a CPU-only engine)
    auto_remove: Literal["success", "force", "never"] = "success"
    # the offline data mirror (host path or volume), mounted read-only at <container_data_root>/mirror;
    # "": the mirror is a folder on the data volume
    mirror_source: str = ""


@dataclasses.dataclass(frozen=True)
class OrchestrationParams:
    """Section ``orchestration`` of params.yaml (read by ``dags/`` and ``lmpipe kfp-compile``)."""

    runner: Literal["local", "docker", "kubernetes"] = "local"  # env LMPIPE_RUNNER wins
    retrain_schedule: str = "0 3 * * 1"  # cron; env LMPIPE_RETRAIN_CRON wins
    drift_schedule: str = "0 5 * * *"  # cron; env LMPIPE_DRIFT_CRON wins
    drift_window_days: int = 1  # the drift DAG compares the news of [logical date - N days, logical date)
    timezone: str = "UTC"
    start_date: str = "2025-01-01"  # static DAG start date
    task_python: str = ".venv/bin/python"  # local runner: task env interpreter (env LMPIPE_TASK_PYTHON wins)
    image: str = "lm-pipeline-tasks:0.1.0"
    gpu_image: str = "lm-pipeline-tasks-cuda:0.1.0"
    data_root: str = "~/.cache/lm-pipeline"  # local runner: workspaces/, dvc-cache/, state/ (env LMPIPE_DATA_ROOT)
    container_data_root: str = "/lmpipe"  # the same layout on the shared volume / PVC in containers
    dvc_remote: str = ""  # DVC remote name or URL to pull/push stage outputs ("": the shared cache only)
    # params that point at state shared by all runs (the registry); relative values are under <data root>/state
    state_overrides: dict[str, str] = dataclasses.field(
        default_factory=lambda: _frozen_map(
            **{"paths.registry_dir": "registry", "paths.champion_metrics_path": "registry/production_metrics.json"}
        )
    )
    retries: int = 1
    data_retries: int = 3  # data stages: exponential backoff from retry_delay_s to max_retry_delay_s
    training_retries: int = 2  # GPU stages: each retry resumes from the last checkpoint
    retry_delay_s: int = 60
    max_retry_delay_s: int = 1800
    data_stages: tuple[str, ...] = ("ingest_wiki", "ingest_news", "prepare", "validate", "tokenize")
    timeout_min: int = 60
    stage_timeout_min: dict[str, int] = dataclasses.field(
        default_factory=lambda: _frozen_map(pretrain=480, finetune=240, compress=240, export=90, evaluate=90)
    )
    # env vars copied from the Airflow environment into every container (e.g. the tracking server)
    pass_env: tuple[str, ...] = ("MLFLOW_TRACKING_URI", "LMPIPE_LOG_LEVEL", "RAY_ADDRESS")
    max_active_runs: int = 1  # per DAG; runs never share a workspace, so more is safe (GPU pool permitting)
    gpu_pool: str = "gpu"  # Airflow pool of the GPU stages ("" = none)
    promote_pool: str = "promote"  # one slot: promotions never race ("" = none)
    notify: NotifyParams = NotifyParams()
    docker: DockerParams = DockerParams()
    kubernetes: KubernetesParams = KubernetesParams()

    def __post_init__(self):
        if min(self.retries, self.data_retries, self.training_retries) < 0:
            raise ValueError("retries must be >= 0")
        if self.retry_delay_s <= 0 or self.max_retry_delay_s < self.retry_delay_s:
            raise ValueError("need 0 < retry_delay_s <= max_retry_delay_s")
        if self.timeout_min <= 0 or any(v <= 0 for v in self.stage_timeout_min.values()):
            raise ValueError("timeouts must be > 0 minutes")
        if self.drift_window_days < 1 or self.max_active_runs < 1:
            raise ValueError("drift_window_days and max_active_runs must be >= 1")
        for cron in (self.retrain_schedule, self.drift_schedule):
            if len(cron.split()) != 5:
                raise ValueError(f"schedule {cron!r}: expected a 5-field cron expression")
        dt.date.fromisoformat(self.start_date)


# ---------------------------------------------------------------------------------------------
# pure helpers shared by the DAGs, the driver and the KFP compiler


def load_orchestration_params(params_file: str | os.PathLike) -> OrchestrationParams:
    """The ``orchestration`` section through the one params loader (``extends:``, float shim)."""
    params = load_params(params_file)
    return getattr(params, "orchestration", None) or OrchestrationParams()


def _loader():
    return getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def read_dvc_stages(dvc_file: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """``dvc.yaml`` stages in file order (name -> raw definition); every stage needs a ``cmd``."""
    raw = yaml.load(Path(dvc_file).read_text(encoding="utf-8"), Loader=_loader()) or {}
    stages = raw.get("stages") or {}
    for name, stage in stages.items():
        if not isinstance(stage, Mapping) or not isinstance(stage.get("cmd"), str):
            raise ValueError(f"{dvc_file}: stage {name!r} has no single string cmd (foreach/matrix are not supported)")
    return dict(stages)


def dvc_cmd_argv(stage: Mapping[str, Any]) -> list[str]:
    """The ``cmd`` of a raw ``dvc.yaml`` stage as an argv list."""
    return shlex.split(stage["cmd"])


def interpolate(value: str, variables: Mapping[str, Any]) -> str:
    """DVC-style ``${paths.tokens_dir}`` substitution from a parsed params mapping."""

    def lookup(match: re.Match) -> str:
        node: Any = variables
        for part in match.group(1).split("."):
            if not isinstance(node, Mapping) or part not in node:
                raise KeyError(f"{value}: ${{{match.group(1)}}} is not defined in params")
            node = node[part]
        return str(node)

    return _VAR.sub(lookup, value)


def stage_paths(stage: Mapping[str, Any], variables: Mapping[str, Any], kind: str) -> list[str]:
    """Resolved paths of ``deps`` / ``outs`` / ``metrics`` / ``plots`` of one stage."""
    paths = []
    for entry in stage.get(kind) or ():
        path = next(iter(entry)) if isinstance(entry, Mapping) else entry
        paths.append(interpolate(str(path), variables))
    return paths


def workspace_name(run_id: str) -> str:
    """A filesystem-safe, unique name from an Airflow run id (``manual__2025-01-01T00:00:00+00:00``)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", run_id).strip("._") or "run"
    return f"{safe[:80]}-{hashlib.sha256(run_id.encode()).hexdigest()[:8]}"


def node_argv(dvc_cmd: str | list[str], *flags: str) -> list[str]:
    """Container args of the node running one dvc.yaml stage: the driver, then the stage's own cmd."""
    cmd = shlex.split(dvc_cmd) if isinstance(dvc_cmd, str) else list(dvc_cmd)
    return ["python", "-m", "pipeline_tasks.orchestration", "stage", *flags, "--", *cmd]


def driver_argv(command: str, *args: str) -> list[str]:
    return ["python", "-m", "pipeline_tasks.orchestration", command, *args]


def stage_retries(stage: str, params: OrchestrationParams, gpu_stages: frozenset[str]) -> dict[str, Any]:
    """Retry policy of a stage: exponential backoff for data stages, resume-from-checkpoint retries for GPU ones."""
    if stage in params.data_stages:
        return {
            "retries": params.data_retries,
            "retry_exponential_backoff": True,
            "retry_delay": params.retry_delay_s,
            "max_retry_delay": params.max_retry_delay_s,
        }
    if stage in gpu_stages:
        return {
            "retries": params.training_retries,
            "retry_exponential_backoff": False,
            "retry_delay": params.retry_delay_s,
            "max_retry_delay": None,
        }
    return {
        "retries": params.retries,
        "retry_exponential_backoff": False,
        "retry_delay": params.retry_delay_s,
        "max_retry_delay": None,
    }


def stage_timeout_min(stage: str, params: OrchestrationParams) -> int:
    return int(params.stage_timeout_min.get(stage, params.timeout_min))


def parse_summary(output: Any) -> Any:
    """The JSON summary a node printed last (dict), from a str / bytes / already-parsed XCom."""
    if isinstance(output, bytes):
        output = output.decode("utf-8", "replace")
    if isinstance(output, str):
        for line in reversed(output.strip().splitlines()):
            line = line.strip()
            if line.startswith("{"):
                try:
                    return json.loads(line)
                except json.JSONDecodeError:
                    continue
        return {"output": output[-2000:]}
    return output


def failed_gate_names(gates: Mapping[str, Any]) -> list[str]:
    """Names of the failed gates in a ``gates.json`` document, in the order ``evaluate`` wrote them.

    ``gates`` maps each gate name to its result (``GateDecision.to_dict``); a list of results, each
    with its ``name``, is read too.
    """
    entries = gates.get("gates") or {}
    if isinstance(entries, Mapping):
        entries = [{"name": name, **result} for name, result in entries.items() if isinstance(result, Mapping)]
    return [str(entry.get("name")) for entry in entries if isinstance(entry, Mapping) and not entry.get("passed")]
