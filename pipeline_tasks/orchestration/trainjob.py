"""Multi-node ``pretrain`` as a Kubeflow Trainer v2 ``TrainJob``: build, submit, follow, wait.

``pretrain.nodes > 1`` under the kubernetes runner (Airflow ``KubernetesPodOperator``) or KFP makes
the ``pretrain`` node a small CPU *launcher*: the same ``python -m pipeline_tasks pretrain``, with
``LMPIPE_PRETRAIN_LAUNCHER=trainjob`` in its environment (:mod:`pipeline_tasks.topology`).
The launcher

1. builds a TrainJob with the ``kubeflow`` SDK (``CustomTrainerContainer``): the task image,
   ``numNodes = pretrain.nodes``, ``resourcesPerNode`` from ``orchestration.kubernetes.trainjob``,
   the shared workspace volume through a runtime patch, and a node command that ``cd``s into the
   launcher's own workspace on that volume and runs ``torchrun --nproc-per-node=P -m pipeline_tasks
   pretrain``. Trainer injects the rest of torchrun's topology as ``PET_*`` variables;
2. submits it to the runtime we ship (``deploy/trainer/runtimes/lmpipe-torch.yaml``: JobSet
   ``failurePolicy.maxRestarts`` restarts every node after a failure and pretrain resumes from the
   newest checkpoint on the volume), or attaches to the job a previous try of this node submitted
   (the name is a hash of the workspace, so a retried launcher never starts a second job);
3. streams node 0's log, waits for ``Complete`` / ``Failed`` with the timeout from params (the SDK's
   default is 600 s), and exits with node 0's exit code; SIGTERM (the Airflow task or the KFP run
   cancelled) deletes the job, so nothing keeps running on the GPUs. Rank 0 wrote the outputs into
   the workspace; ``dvc repro`` in the launcher records them as usual.

``--backend container`` runs the same job on one machine through the SDK's container backend (one
Docker container per node on a per-job bridge network; used by the tests and for a local rehearsal).
That backend mounts only its own per-job folder, so the launcher copies the params, the token shards
and the checkpoints there and copies the outputs back; it has no JobSet, so the launcher restarts
the whole job itself, as often as the runtime's ``failurePolicy.maxRestarts`` says.

``lmpipe trainjob --dry-run`` prints the TrainJob it would submit. Pinned: ``kubeflow==0.5.0`` (its
``kubeflow-trainer-api`` 2.3.0 matches Trainer v2.3.0, whose CRD schema the tests validate against).
The offline build drives the SDK's Kubernetes backend with a recording API object, so the dry run and
the real submission produce the same body.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shlex
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from pipeline_tasks import topology
from pipeline_tasks.config import ConfigError, find_params_file, load_params
from pipeline_tasks.orchestration.settings import (
    OrchestrationParams,
    ResourceParams,
    stage_timeout_min,
)

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
RUNTIMES_DIR = REPO_ROOT / "deploy" / "trainer" / "runtimes"
NODE_STEP = "node"  # the runtime's replicated job and container name (Trainer's convention)
TASK_CONFIG_ENV = "LMPIPE_TRAINJOB_TASK_CONFIG"  # KFP: the launcher's TaskConfig (volumes, env, resources)
BACKEND_ENV = "LMPIPE_TRAINJOB_BACKEND"
TERMINAL = {"Complete", "Failed"}
# the SDK's container backend mounts its per-job folder here (kubeflow/trainer/backends/container)
CONTAINER_WORKDIR = "/workspace"
CONTAINER_USER = (1000, 1000)  # the task image's user: it must be able to write the copied workspace


TrainJobFailed = topology.DistributedRunFailed  # the job failed: the failing rank's exit code where known


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """Pod settings the KFP launcher received through ``dsl.TaskConfig`` passthroughs (k8s JSON)."""

    env: tuple[dict[str, Any], ...] = ()
    volumes: tuple[dict[str, Any], ...] = ()
    volume_mounts: tuple[dict[str, Any], ...] = ()
    resources: dict[str, Any] = dataclasses.field(default_factory=dict)
    node_selector: dict[str, str] = dataclasses.field(default_factory=dict)
    tolerations: tuple[dict[str, Any], ...] = ()

    @classmethod
    def from_json(cls, text: str) -> TaskConfig:
        raw = json.loads(text) if text else {}
        return cls(
            env=tuple(raw.get("env") or ()),
            volumes=tuple(raw.get("volumes") or ()),
            volume_mounts=tuple(raw.get("volumeMounts") or raw.get("volume_mounts") or ()),
            resources=dict(raw.get("resources") or {}),
            node_selector=dict(raw.get("nodeSelector") or raw.get("node_selector") or {}),
            tolerations=tuple(raw.get("tolerations") or ()),
        )


def orchestration_of(params) -> OrchestrationParams:
    """The params' orchestration section, or its defaults for a params file without one."""
    try:
        return params.orchestration
    except AttributeError:
        return OrchestrationParams()


# ---------------------------------------------------------------------------------------------
# Building the TrainJob
# ---------------------------------------------------------------------------------------------


def job_name(workspace: str | os.PathLike) -> str:
    """DNS-1035 name from the workspace path: a retried launcher finds the job its first try made.

    Short (JobSet derives pod and service names from it, each at most 63 characters)."""
    digest = hashlib.sha256(str(workspace).encode()).hexdigest()[:10]
    return f"pretrain-{digest}"


def node_command(workspace: str, procs_per_node: int, stage_argv: Sequence[str]) -> list[str]:
    """What every node runs: torchrun in the launcher's workspace on the shared volume.

    ``--nproc-per-node`` is explicit: on a node without GPUs Trainer's ``PET_NPROC_PER_NODE`` is the
    node's CPU count, and a flag wins over the variable. ``--max-restarts=0``: a failed node fails the
    job and JobSet restarts every node (a lone restarted agent could not rejoin its old peers)."""
    torchrun = [
        "torchrun",
        f"--nproc-per-node={procs_per_node}",
        "--max-restarts=0",
        "-m",
        "pipeline_tasks",
        "pretrain",
        *stage_argv,
    ]
    script = f"cd {shlex.quote(workspace)} && exec {shlex.join(torchrun)}"
    return ["tini", "--", "bash", "-c", script]  # tini: the command replaces the image's entrypoint


def resources_per_node(resources: ResourceParams, task_config: TaskConfig | None = None) -> dict[str, str]:
    """The SDK's ``resources_per_node``: quantities as strings (an int 8 would serialise as 8.0)."""
    if task_config is not None and task_config.resources:
        requests = {**task_config.resources.get("requests", {}), **task_config.resources.get("limits", {})}
        return {("gpu" if k == "nvidia.com/gpu" else k): str(v) for k, v in requests.items()}
    out = {"cpu": str(resources.cpu), "memory": str(resources.memory)}
    if resources.gpus:
        out["gpu"] = str(resources.gpus)
    return out


def _env(orch: OrchestrationParams, task_config: TaskConfig | None, environ=os.environ) -> dict[str, str]:
    env = {name: environ[name] for name in orch.pass_env if environ.get(name)}
    if task_config is not None:
        env.update({e["name"]: e["value"] for e in task_config.env if "value" in e})
    # Trainer reserves the PET_* names for the topology it injects; the launcher's own settings stay home
    for name in list(env):
        if name.startswith("PET_") or name in (topology.LAUNCHER_ENV, TASK_CONFIG_ENV, BACKEND_ENV):
            env.pop(name)
    return env


def _value_from_env(task_config: TaskConfig | None) -> list[dict[str, Any]]:
    return [dict(e) for e in task_config.env if "valueFrom" in e] if task_config is not None else []


def trainjob_request(
    params,
    orch: OrchestrationParams,
    *,
    workspace: str,
    stage_argv: Sequence[str] = (),
    task_config: TaskConfig | None = None,
    environ=os.environ,
) -> tuple[Any, Any, list]:
    """``(runtime, trainer, options)`` for ``TrainerClient.train``: one request for dry run and submit."""
    from kubeflow.trainer import CustomTrainerContainer, Runtime, RuntimeKind, RuntimeTrainer, TrainerType
    from kubeflow.trainer.options import (
        ActiveDeadlineSeconds,
        ContainerPatch,
        JobSetSpecPatch,
        JobSetTemplatePatch,
        JobSpecPatch,
        JobTemplatePatch,
        Labels,
        Name,
        PodSpecPatch,
        PodTemplatePatch,
        ReplicatedJobPatch,
        RuntimePatch,
        TrainerCommand,
        TrainingRuntimeSpecPatch,
    )

    cfg, k8s, tj = params.pretrain, orch.kubernetes, orch.kubernetes.trainjob
    resources = resources_per_node(tj.node_resources, task_config)
    gpus = int(resources.get("gpu", 0))
    if gpus and gpus != cfg.procs_per_node:
        raise ConfigError(
            f"each TrainJob node requests {gpus} GPU(s) but pretrain.procs_per_node is {cfg.procs_per_node}: "
            "one process per GPU, set them equal (orchestration.kubernetes.trainjob.node_resources.gpus)"
        )
    image = orch.gpu_image if gpus else orch.image
    deadline = tj.active_deadline_s or 60 * stage_timeout_min("pretrain", orch)
    if task_config is not None and task_config.volumes:  # KFP: the volumes the backend gave the launcher
        volumes, mounts = list(task_config.volumes), list(task_config.volume_mounts)
    else:  # the data PVC at the same path as in the launcher pod: the workspace path is the same
        volumes = [{"name": "data", "persistentVolumeClaim": {"claimName": k8s.data_pvc}}]
        mounts = [{"name": "data", "mountPath": orch.container_data_root}]
    selector = dict(task_config.node_selector) if task_config and task_config.node_selector else {}
    tolerations = list(task_config.tolerations) if task_config and task_config.tolerations else []
    if gpus and not selector:
        selector = dict(k8s.gpu_node_selector)
    if gpus and not tolerations:
        tolerations = [dataclasses.asdict(t) for t in k8s.gpu_tolerations]
    pod = PodSpecPatch(
        service_account_name=k8s.service_account or None,
        volumes=volumes,
        # env from secrets / config maps (valueFrom) has no place in the trainer's name=value env
        containers=[ContainerPatch(name=NODE_STEP, volume_mounts=mounts, env=_value_from_env(task_config) or None)],
        node_selector=selector or None,
        tolerations=[{k: v for k, v in t.items() if v != ""} for t in tolerations] or None,
    )
    patch = RuntimePatch(
        training_runtime_spec=TrainingRuntimeSpecPatch(
            template=JobSetTemplatePatch(
                spec=JobSetSpecPatch(
                    replicated_jobs=[
                        ReplicatedJobPatch(
                            name=NODE_STEP,
                            template=JobTemplatePatch(spec=JobSpecPatch(template=PodTemplatePatch(spec=pod))),
                        )
                    ]
                )
            )
        )
    )
    options = [
        Name(job_name(workspace)),
        ActiveDeadlineSeconds(deadline),
        TrainerCommand(node_command(workspace, cfg.procs_per_node, stage_argv)),
        patch,
    ]
    if tj.queue:
        options.append(Labels({"kueue.x-k8s.io/queue-name": tj.queue}))
    runtime = Runtime(
        name=tj.runtime,
        kind=RuntimeKind.TRAINING_RUNTIME
        if tj.runtime_kind == "TrainingRuntime"
        else RuntimeKind.CLUSTER_TRAINING_RUNTIME,
        trainer=RuntimeTrainer(trainer_type=TrainerType.CUSTOM_TRAINER, framework="torch", image=image),
    )
    trainer = CustomTrainerContainer(
        image=image,
        num_nodes=cfg.nodes,
        resources_per_node=resources,
        env=_env(orch, task_config, environ) or None,
    )
    return runtime, trainer, options


class _RecordingCustomObjectsApi:
    """Stands in for the cluster's API in a dry run: keeps the body the SDK would POST."""

    def __init__(self):
        self.bodies: list[dict[str, Any]] = []

    def create_namespaced_custom_object(self, group, version, namespace, plural, body, **_kwargs):
        self.bodies.append(body)
        return body


def build_trainjob(params, orch: OrchestrationParams, **request: Any) -> dict[str, Any]:
    """The TrainJob body (a plain dict) that :func:`launch` submits, built offline by the SDK itself."""
    from kubeflow.trainer.backends.kubernetes.backend import KubernetesBackend

    backend = object.__new__(KubernetesBackend)  # no kube config and no cluster: only train() runs
    backend.namespace = orch.kubernetes.namespace
    backend.custom_api = _RecordingCustomObjectsApi()
    runtime, trainer, options = trainjob_request(params, orch, **request)
    backend.train(runtime=runtime, trainer=trainer, options=options)
    body = backend.custom_api.bodies[0]
    body.setdefault("metadata", {})["namespace"] = orch.kubernetes.namespace
    return json.loads(json.dumps(body))  # plain JSON types only (the SDK may leave enums/models inside)


# ---------------------------------------------------------------------------------------------
# Running it
# ---------------------------------------------------------------------------------------------


def runtime_max_restarts(runtime: str, runtimes_dir: Path = RUNTIMES_DIR) -> int:
    """``failurePolicy.maxRestarts`` of the runtime we ship: how often the job is restarted whole."""
    for path in sorted(runtimes_dir.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        if doc.get("metadata", {}).get("name") == runtime:
            return int(doc["spec"]["template"]["spec"].get("failurePolicy", {}).get("maxRestarts", 0))
    raise ConfigError(f"no TrainingRuntime named {runtime!r} in {runtimes_dir}")


def _client(backend: str, orch: OrchestrationParams):
    from kubeflow.trainer import TrainerClient

    if backend == "kubernetes":
        from kubeflow.trainer import KubernetesBackendConfig

        return TrainerClient(KubernetesBackendConfig(namespace=orch.kubernetes.namespace))
    from kubeflow.trainer import ContainerBackendConfig, TrainingRuntimeSource

    if not RUNTIMES_DIR.is_dir():
        raise ConfigError(f"the container backend needs the runtime YAML in {RUNTIMES_DIR} (a source checkout)")
    return TrainerClient(
        ContainerBackendConfig(
            pull_policy="Never",  # offline: the image must be built here (make images)
            auto_remove=False,  # the per-job folder holds the checkpoints between restarts
            container_runtime="docker",
            runtime_source=TrainingRuntimeSource(sources=[str(RUNTIMES_DIR)]),
        )
    )


def _status(client, name: str) -> str | None:
    try:
        return client.get_job(name).status
    except (RuntimeError, ValueError, LookupError):  # the SDK's "not found", whatever the backend
        return None


def _node_exit_code(client, name: str) -> int:
    """Exit code of node 0's container, where the backend lets us read it (else 1)."""
    with contextlib.suppress(Exception):
        backend = client.backend
        if hasattr(backend, "core_api"):  # Kubernetes
            step = next(s for s in client.get_job(name).steps if s.name == f"{NODE_STEP}-0")
            pod = backend.core_api.read_namespaced_pod(step.pod_name, backend.namespace)
            for status in pod.status.container_statuses or ():
                if status.name == NODE_STEP and status.state.terminated:
                    return int(status.state.terminated.exit_code) or 1
        else:  # Docker: the node containers are named <job>-node-<rank>
            import docker

            codes = []
            for container in docker.from_env().containers.list(all=True, filters={"name": f"{name}-{NODE_STEP}-"}):
                codes.append(int(container.attrs["State"]["ExitCode"]))
            return next((c for c in codes if c not in (0, 137, 143)), next((c for c in codes if c), 1))
    return 1


def _follow_logs(client, name: str, deadline: float, poll_s: int) -> str:
    """Print node 0's log until the job ends; re-attach after a restart (its pods are new)."""
    status = _status(client, name)
    while time.monotonic() < deadline and status not in TERMINAL:
        with contextlib.suppress(Exception):  # a pod that goes away mid-stream ends the stream
            for line in client.get_job_logs(name, follow=True):
                print(line.rstrip("\n"), flush=True)
        status = _status(client, name)
        if status not in TERMINAL:
            time.sleep(poll_s)
    return status or "Missing"


def run_trainjob(
    client,
    request: tuple[Any, Any, list],
    *,
    name: str,
    failure_file: Path,
    wait_timeout_s: int,
    startup_timeout_s: int,
    poll_s: int,
) -> None:
    """Submit (or attach to) the job, follow it, raise :class:`TrainJobFailed` unless it completes."""
    status = _status(client, name)
    if status in TERMINAL:  # a previous try's job: its checkpoints are on the volume, start again
        logger.info("TrainJob %s from a previous try is %s: deleting it and submitting again", name, status)
        client.delete_job(name)
        status = None
    if status is None:
        runtime, trainer, options = request
        client.train(runtime=runtime, trainer=trainer, options=options)
        logger.info("submitted TrainJob %s (%d nodes)", name, trainer.num_nodes)
    else:
        logger.info("attaching to TrainJob %s (%s), submitted by a previous try of this node", name, status)
    try:
        client.wait_for_job_status(
            name, status={"Running", *TERMINAL}, timeout=startup_timeout_s, polling_interval=min(poll_s, 2)
        )
        status = _follow_logs(client, name, time.monotonic() + wait_timeout_s, poll_s)
    except TimeoutError as exc:
        client.delete_job(name)
        raise TrainJobFailed(f"TrainJob {name} did not finish in time ({exc}); it was deleted", 124) from exc
    except BaseException:  # SIGTERM / Ctrl-C: the task was cancelled, the GPUs must be freed
        logger.warning("launcher stopped: deleting TrainJob %s", name)
        with contextlib.suppress(Exception):
            client.delete_job(name)
        raise
    if status != "Complete":
        if status not in TERMINAL:
            client.delete_job(name)
            raise TrainJobFailed(f"TrainJob {name} did not finish in {wait_timeout_s} s; it was deleted", 124)
        raise topology.failure_from_ranks(f"TrainJob {name} failed", failure_file, _node_exit_code(client, name))
    logger.info("TrainJob %s complete", name)


def _copy(source: Path, target: Path) -> None:
    if source.is_dir():
        shutil.copytree(source, target, dirs_exist_ok=True)
    elif source.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)


def _hand_to_node_user(root: Path) -> None:
    """The node containers run as the image's user; a root launcher (CI) must give the folder to it."""
    for path in [root, *root.rglob("*")]:
        if os.geteuid() == 0:
            os.chown(path, *CONTAINER_USER, follow_symlinks=False)
        elif not path.is_symlink():  # another user: open it to the node user, like a shared volume
            path.chmod(path.stat().st_mode | (0o777 if path.is_dir() else 0o666))


def container_node_main(argv: list[str]) -> None:
    """Body of a node under the SDK's container backend (its source is shipped into the container)."""
    import os
    import sys

    os.chdir("/workspace")
    from pipeline_tasks.cli import main

    sys.exit(main(["pretrain", *argv]))


def run_in_containers(
    params, orch: OrchestrationParams, stage_argv: Sequence[str], *, name: str, workspace: Path
) -> None:
    """The job on this machine: one container per node, restarted whole like JobSet would."""
    from kubeflow.trainer import CustomTrainer
    from kubeflow.trainer.options import Name

    cfg, tj = params.pretrain, orch.kubernetes.trainjob
    if cfg.procs_per_node != 1:
        raise ConfigError("the container backend runs one process per node: set pretrain.procs_per_node: 1")
    client = _client("container", orch)
    restarts = runtime_max_restarts(tj.runtime)
    trainer = CustomTrainer(
        func=container_node_main,
        func_args={"argv": list(stage_argv)},
        image=orch.image,
        num_nodes=cfg.nodes,
        env={**_env(orch, None), "OMP_NUM_THREADS": str(max(cfg.num_threads, 1))},
    )
    # what pretrain reads and writes; the rest of the workspace stays where it is
    inputs = [
        *{find_params_file(None).name, *_params_files(stage_argv)},
        params.paths.tokens_dir,
        params.paths.pretrain_dir,
    ]
    outputs = [params.paths.pretrain_dir, params.paths.pretrain_reports_dir]
    jobdir = Path.home() / ".kubeflow" / "trainer" / "containers" / name  # the backend mounts this folder
    try:
        for attempt in range(restarts + 1):
            for item in inputs:
                _copy(workspace / item, jobdir / item)
            _hand_to_node_user(jobdir)
            try:
                run_trainjob(
                    client,
                    (tj.runtime, trainer, [Name(name)]),
                    name=name,
                    failure_file=topology.rank_failure_file(params, jobdir),
                    wait_timeout_s=tj.wait_timeout_s or 60 * stage_timeout_min("pretrain", orch),
                    startup_timeout_s=tj.startup_timeout_s,
                    poll_s=tj.poll_interval_s,
                )
                return
            except TrainJobFailed as exc:
                if attempt == restarts or exc.exit_code == 124:
                    raise
                logger.warning("%s: restarting every node (%d of %d restarts)", exc, attempt + 1, restarts)
            finally:
                for item in outputs:  # the checkpoints too: they outlive a failed attempt, as on a volume
                    _copy(jobdir / item, workspace / item)
                with contextlib.suppress(Exception):
                    client.delete_job(name)
    finally:
        shutil.rmtree(jobdir, ignore_errors=True)


def _params_files(stage_argv: Sequence[str]) -> list[str]:
    return [stage_argv[i + 1] for i, arg in enumerate(stage_argv[:-1]) if arg == "--params"]


def launch_stage(params, stage_argv: Sequence[str] = (), backend: str | None = None) -> None:
    """``pretrain`` as the launcher: run the TrainJob for this workspace (the current directory)."""
    workspace, orch = Path.cwd(), orchestration_of(params)
    backend = backend or os.environ.get(BACKEND_ENV, "kubernetes")
    name = job_name(workspace)
    if backend == "container":
        run_in_containers(params, orch, stage_argv, name=name, workspace=workspace)
        return
    task_config = TaskConfig.from_json(os.environ.get(TASK_CONFIG_ENV, ""))
    request = trainjob_request(params, orch, workspace=str(workspace), stage_argv=stage_argv, task_config=task_config)
    tj = orch.kubernetes.trainjob
    run_trainjob(
        _client("kubernetes", orch),
        request,
        name=name,
        failure_file=topology.rank_failure_file(params, workspace),
        wait_timeout_s=tj.wait_timeout_s or 60 * stage_timeout_min("pretrain", orch),
        startup_timeout_s=tj.startup_timeout_s,
        poll_s=tj.poll_interval_s,
    )


# ---------------------------------------------------------------------------------------------
# CLI: lmpipe trainjob
# ---------------------------------------------------------------------------------------------


def add_trainjob_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true", help="print the TrainJob YAML; submit nothing")
    parser.add_argument(
        "--backend",
        choices=("kubernetes", "container"),
        default=None,
        help=f"where the job runs (default: ${BACKEND_ENV} or kubernetes); container: Docker on this machine",
    )
    parser.add_argument("--workspace", default=None, help="workspace the nodes run in (default: the current folder)")


def cli_trainjob(args: argparse.Namespace) -> int:
    from pipeline_tasks.cli import parse_overrides

    params = load_params(args.params, parse_overrides(args.overrides))
    stage_argv = [*(("--params", args.params) if args.params else ()), *_overrides_argv(args.overrides)]
    if params.pretrain.nodes < 2:
        raise ConfigError(f"pretrain.nodes is {params.pretrain.nodes}: a TrainJob is for 2 or more nodes")
    if args.dry_run:
        body = build_trainjob(
            params,
            orchestration_of(params),
            workspace=args.workspace or str(Path.cwd()),
            stage_argv=stage_argv,
            task_config=TaskConfig.from_json(os.environ.get(TASK_CONFIG_ENV, "")),
        )
        sys.stdout.write(yaml.safe_dump(body, sort_keys=False))
        return 0
    with contextlib.chdir(args.workspace) if args.workspace else contextlib.nullcontext():
        launch_stage(params, stage_argv, backend=args.backend)
    return 0


def _overrides_argv(overrides: Sequence[str]) -> Iterator[str]:
    for override in overrides:
        yield from ("-S", override)
