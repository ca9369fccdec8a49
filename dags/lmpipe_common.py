"""Shared wiring of the lm-pipeline DAGs: settings, node factory per runner, notifier, Assets.

Not a DAG file (listed in ``.airflowignore``); Airflow puts the DAGs folder (the bundle) on
``sys.path``, so the DAG files import it by name. Its only parse-time I/O is one read of the
settings: section ``orchestration`` of ``$LMPIPE_REPO/params.yaml``
(:class:`pipeline_tasks.orchestration.settings.OrchestrationParams`, through the one params
loader), and ``pretrain.nodes`` of the same file. The stage list is
:data:`pipeline_tasks.stages.STAGES` (the DAG-integrity test checks it against ``dvc.yaml``); each
node's driver checks at run time that the stage command equals the ``cmd`` in the workspace's
``dvc.yaml``.

``LMPIPE_ORCHESTRATION_PARAMS`` may name another params file for these settings (and for
``pretrain.nodes``, which shapes the kubernetes runner's ``pretrain`` node: more than 1 makes it a
CPU pod that launches a Kubeflow Trainer TrainJob, see :func:`stage_node`).
``LMPIPE_REPO`` defaults to the folder above ``dags/`` (a checkout); the Airflow image sets it to
the project snapshot copied next to the DAGs. Environment variables override three settings:
``LMPIPE_RUNNER`` (else ``orchestration.runner``), ``LMPIPE_RETRAIN_CRON`` and
``LMPIPE_DRIFT_CRON`` (``none`` turns a schedule off). Airflow Variables are not read at parse
time (each read would be a metadata-database query every time the file is parsed).

Every node runs ``python -m pipeline_tasks.orchestration ...`` in the task environment: the task
image (docker / kubernetes) or the task virtualenv (local, ``$LMPIPE_TASK_PYTHON``), so Airflow
never imports the ML stack. Stage nodes end with the stage's own ``dvc.yaml`` command.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import os
import shlex
from pathlib import Path
from typing import Any

import pendulum
from airflow.sdk import Asset, BaseNotifier

from pipeline_tasks.orchestration.settings import (
    OrchestrationParams,
    driver_argv,
    load_params,
    node_argv,
    parse_summary,
    stage_retries,
    stage_timeout_min,
    workspace_name,
)
from pipeline_tasks.stages import GPU_STAGES, stage_command

log = logging.getLogger(__name__)

REPO = Path(os.environ.get("LMPIPE_REPO") or Path(__file__).resolve().parents[1])
# one parse of the params file (the settings module's loader: ``extends:`` profiles, validation)
_PROJECT_PARAMS = load_params(os.environ.get("LMPIPE_ORCHESTRATION_PARAMS") or REPO / "params.yaml")
PARAMS: OrchestrationParams = getattr(_PROJECT_PARAMS, "orchestration", None) or OrchestrationParams()
PRETRAIN_NODES: int = getattr(getattr(_PROJECT_PARAMS, "pretrain", None), "nodes", 1)
TRAINJOB_LAUNCHER_ENV = {"LMPIPE_PRETRAIN_LAUNCHER": "trainjob"}  # pipeline_tasks.topology.LAUNCHER_ENV


def _setting(env: str, default: str) -> str:
    """An environment variable over the params value (per deployment, without editing params)."""
    return os.environ.get(env) or default


RUNNER = _setting("LMPIPE_RUNNER", PARAMS.runner)
if RUNNER not in ("local", "docker", "kubernetes"):
    raise ValueError(f"lmpipe runner {RUNNER!r}: expected local, docker or kubernetes")


def _cron(env: str, default: str) -> str | None:
    """A cron expression, or None for "none"/"off" (no time schedule: e.g. staging, or tests)."""
    value = _setting(env, default).strip()
    return None if value.lower() in ("none", "off", "") else value


RETRAIN_CRON = _cron("LMPIPE_RETRAIN_CRON", PARAMS.retrain_schedule)
DRIFT_CRON = _cron("LMPIPE_DRIFT_CRON", PARAMS.drift_schedule)
START_DATE = pendulum.parse(PARAMS.start_date, tz=PARAMS.timezone)
TASK_PYTHON = os.environ.get("LMPIPE_TASK_PYTHON") or str(REPO / PARAMS.task_python)
DATA_ROOT = (
    (os.environ.get("LMPIPE_DATA_ROOT") or str(Path(PARAMS.data_root).expanduser()))
    if RUNNER == "local"
    else PARAMS.container_data_root
)
SOURCE = str(REPO) if RUNNER == "local" else "/opt/lm-pipeline"  # the image's project snapshot

# Data-aware scheduling: monitor -> retraining, evaluation passed -> promotion.
DRIFT_ASSET = Asset(name="lmpipe_drift_detected", uri="lmpipe://monitor/drift_detected")
EVALUATION_PASSED_ASSET = Asset(name="lmpipe_evaluation_passed", uri="lmpipe://evaluate/passed")

FILTERS = {"lmpipe_ws": workspace_name}
TELEMETRY_OFF = {
    "DVC_NO_ANALYTICS": "1",
    "DO_NOT_TRACK": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
}


def workspace_template(dag_id: str) -> str:
    """The run's workspace (Jinja): one folder per run id, so two runs never write the same path."""
    return f"{DATA_ROOT}/workspaces/{dag_id}/{{{{ run_id | lmpipe_ws }}}}"


def node_env(dag_id: str, **extra: str) -> dict[str, str]:
    env = {
        **TELEMETRY_OFF,
        "LMPIPE_WORKSPACE": workspace_template(dag_id),
        "LMPIPE_SOURCE": SOURCE,
        "LMPIPE_DATA_ROOT": DATA_ROOT,
        "LMPIPE_DAG_ID": dag_id,
        "LMPIPE_RUN_ID": "{{ run_id }}",
        **extra,
    }
    if RUNNER != "local":  # containers see only what is passed; local nodes inherit Airflow's env
        env.setdefault("LMPIPE_DATA_MIRROR", f"{PARAMS.container_data_root}/mirror")
        env.update({name: os.environ[name] for name in PARAMS.pass_env if os.environ.get(name)})
    if RUNNER == "docker":
        env["LMPIPE_SINGLE_STREAM"] = "true"  # the XCom is the last log line: keep the summary last
    if RUNNER == "kubernetes":
        env["LMPIPE_XCOM_FILE"] = "/airflow/xcom/return.json"  # read by the KubernetesPodOperator sidecar
    return env


def _env_ref(arg: str) -> str | None:
    return arg[1:] if arg.startswith("$") and arg[1:].isidentifier() else None


def local_command(argv: list[str]) -> str:
    """The shell command of a local node: the task interpreter instead of ``python``; ``$NAME``
    arguments expand from the (templated) env, so user input is never spliced into the script."""
    parts = [TASK_PYTHON, *argv[1:]] if argv[:1] == ["python"] else argv
    return " ".join(f'"${{{_env_ref(a)}}}"' if _env_ref(a) else shlex.quote(a) for a in parts)


def container_args(argv: list[str], env: dict[str, str]) -> list[str]:
    """Container args: ``$NAME`` arguments become that env entry's template (no shell in containers)."""
    return [env[_env_ref(a)] if _env_ref(a) else a for a in argv]


def make_node(task_id: str, argv: list[str], env: dict[str, str], *, gpu: bool = False, **kwargs: Any):
    """One containerized node (or a task-env subprocess for ``local``) running ``argv``."""
    if RUNNER == "local":
        return _local_node(task_id, argv, env, **kwargs)
    builder = _docker_node if RUNNER == "docker" else _kubernetes_node
    return builder(task_id, container_args(argv, env), env, gpu=gpu, **kwargs)


def _local_node(task_id: str, argv: list[str], env: dict[str, str], **kwargs: Any):
    # imported per runner: the Airflow image of one runner need not ship the other providers
    from airflow.providers.standard.operators.bash import BashOperator

    return BashOperator(
        task_id=task_id,
        bash_command=local_command(argv),
        env=env,
        append_env=True,
        output_processor=parse_summary,
        **kwargs,
    )


@functools.cache  # one class for every docker node of the parse
def _summary_docker_operator():
    from airflow.providers.docker.operators.docker import DockerOperator

    class LmpipeDockerOperator(DockerOperator):
        """A DockerOperator whose XCom is the node's summary as a dict (its last log line, parsed),
        as the local runner's ``output_processor`` and the Kubernetes runner's return.json give it."""

        def execute(self, context: Any) -> Any:
            return parse_summary(super().execute(context))

    return LmpipeDockerOperator


def _docker_node(task_id: str, argv: list[str], env: dict[str, str], *, gpu: bool, **kwargs: Any):
    from docker.types import DeviceRequest, Mount

    d = PARAMS.docker

    def mount(source: str, target: str, read_only: bool = False) -> Mount:
        return Mount(
            target=target, source=source, type="bind" if source.startswith("/") else "volume", read_only=read_only
        )

    mounts = [mount(d.data_volume, PARAMS.container_data_root)]
    if d.mirror_source:
        mounts.append(mount(d.mirror_source, f"{PARAMS.container_data_root}/mirror", read_only=True))
    return _summary_docker_operator()(
        task_id=task_id,
        image=PARAMS.gpu_image if gpu else PARAMS.image,
        command=argv,
        environment=env,
        docker_url=d.url,
        network_mode=d.network_mode,
        mounts=mounts,
        # which run and node a container belongs to, for `docker ps -a --filter label=...`
        labels={"io.lm-pipeline.dag": env["LMPIPE_DAG_ID"], "io.lm-pipeline.node": task_id},
        mount_tmp_dir=False,
        auto_remove=d.auto_remove,
        shm_size=d.shm_size_mb * 2**20,
        xcom_all=False,
        tty=False,
        device_requests=[DeviceRequest(count=d.gpus, capabilities=[["gpu"]])] if gpu and d.gpus else None,
        **kwargs,
    )


def _kubernetes_node(task_id: str, argv: list[str], env: dict[str, str], *, gpu: bool, **kwargs: Any):
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from kubernetes.client import models as k8s

    k = PARAMS.kubernetes
    res = k.gpu_resources if gpu else k.cpu_resources
    requests = {"cpu": res.cpu, "memory": res.memory}
    limits = {key: v for key, v in (("cpu", res.cpu_limit), ("memory", res.memory_limit)) if v}
    if res.gpus:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(res.gpus)
    kwargs.setdefault("service_account_name", k.service_account or None)
    return KubernetesPodOperator(
        task_id=task_id,
        name=f"lmpipe-{task_id.replace('_', '-')}",
        namespace=k.namespace,
        image=PARAMS.gpu_image if gpu else PARAMS.image,
        arguments=argv,
        env_vars=env,
        container_resources=k8s.V1ResourceRequirements(requests=requests, limits=limits or None),
        volumes=[
            k8s.V1Volume(
                name="lmpipe-data",
                persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(claim_name=k.data_pvc),
            )
        ],
        volume_mounts=[k8s.V1VolumeMount(name="lmpipe-data", mount_path=PARAMS.container_data_root)],
        node_selector=dict(k.gpu_node_selector) if gpu else None,
        tolerations=[
            k8s.V1Toleration(key=t.key, operator=t.operator, value=t.value or None, effect=t.effect)
            for t in k.gpu_tolerations
        ]
        if gpu
        else None,
        security_context=k8s.V1PodSecurityContext(run_as_non_root=True, run_as_user=1000, fs_group=1000),
        image_pull_policy=k.image_pull_policy,
        image_pull_secrets=[k8s.V1LocalObjectReference(name=s) for s in k.image_pull_secrets] or None,
        kubernetes_conn_id=k.kubernetes_conn_id or None,
        in_cluster=not k.kubernetes_conn_id,
        startup_timeout_seconds=k.startup_timeout_s,
        termination_grace_period=k.termination_grace_s,
        do_xcom_push=True,
        get_logs=True,
        on_finish_action="delete_succeeded_pod",
        **kwargs,
    )


def launches_trainjob(stage: str) -> bool:
    """Whether this stage's node is a TrainJob launcher: multi-node ``pretrain`` on Kubernetes.

    Decided at parse time from the params file; ``pretrain.nodes`` in a run's ``params_overrides``
    does not reshape the node. The local and docker runners run torchrun inside their one node."""
    return stage == "pretrain" and RUNNER == "kubernetes" and PRETRAIN_NODES > 1


def stage_node(dag_id: str, stage: str, *flags: str, env: dict[str, str] | None = None, **kwargs: Any):
    """The node of one dvc.yaml stage: its retries, timeout, pool and (GPU stages) accelerator.

    A TrainJob launcher (:func:`launches_trainjob`) runs the same command in a CPU pod under the
    service account allowed to create TrainJobs; the GPUs belong to the TrainJob's nodes. It keeps
    the training retries: a retry re-attaches to (or resubmits) the job named after the workspace."""
    policy = stage_retries(stage, PARAMS, GPU_STAGES)
    launcher = launches_trainjob(stage)
    gpu = stage in GPU_STAGES and not launcher
    if gpu and PARAMS.gpu_pool:
        kwargs.setdefault("pool", PARAMS.gpu_pool)
    if launcher:
        kwargs.setdefault("service_account_name", PARAMS.kubernetes.trainjob.service_account or None)
        env = {**TRAINJOB_LAUNCHER_ENV, **(env or {})}
    return make_node(
        stage,
        node_argv(stage_command(stage), *flags),
        node_env(dag_id, LMPIPE_FORCE="{{ params.force | default(false) | string | lower }}", **(env or {})),
        gpu=gpu,
        retries=policy["retries"],
        retry_exponential_backoff=policy["retry_exponential_backoff"],
        retry_delay=dt.timedelta(seconds=policy["retry_delay"]),
        max_retry_delay=dt.timedelta(seconds=policy["max_retry_delay"]) if policy["max_retry_delay"] else None,
        execution_timeout=dt.timedelta(minutes=stage_timeout_min(stage, PARAMS)),
        **kwargs,
    )


def init_node(dag_id: str, overrides_template: str = "{{ params.params_overrides | tojson }}", **env: str):
    """First node of a run: create (or reuse on retry) the run's workspace."""
    return make_node(
        "prepare_workspace",
        driver_argv("init"),
        node_env(dag_id, LMPIPE_OVERRIDES_JSON=overrides_template, **env),
        retries=2,
        retry_delay=dt.timedelta(seconds=30),
        execution_timeout=dt.timedelta(minutes=15),
    )


def lineage_node(dag_id: str, env: dict[str, str] | None = None, **kwargs: Any):
    """Last node: lineage.json (git sha, dvc.lock hash, output hashes) in the workspace + XCom."""
    return make_node(
        "record_lineage",
        driver_argv("lineage"),
        node_env(dag_id, **(env or {})),
        execution_timeout=dt.timedelta(minutes=10),
        **kwargs,
    )


def reference_lock(dag_id: str) -> str:
    """Where ``record_lineage --publish`` of ``dag_id`` puts its accepted run's dvc.lock."""
    return f"{DATA_ROOT}/state/references/{dag_id}.dvc.lock"


def default_args(**extra: Any) -> dict[str, Any]:
    return {
        "owner": "ml-platform",
        "retries": PARAMS.retries,
        "retry_delay": dt.timedelta(seconds=PARAMS.retry_delay_s),
        "execution_timeout": dt.timedelta(minutes=PARAMS.timeout_min),
        **extra,
    }


def metrics_file(summary: Any, name: str) -> tuple[str | None, Any]:
    """(path, content) of the metrics file ``name`` (e.g. gates.json) in a stage node's summary."""
    summary = parse_summary(summary) or {}
    for path, content in (summary.get("metrics") or {}).items():
        if Path(path).name == name:
            full = Path(summary.get("workspace", "")) / path
            if full.is_file():  # local runner / shared volume mounted here: read the file itself
                try:
                    return str(full), json.loads(full.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    pass
            return str(full), content  # containers: the copy the node put in its XCom
    return None, None


class LmpipeNotifier(BaseNotifier):
    """Run notifications by SMTP and/or a webhook (Airflow connections from params
    ``orchestration.notify``). Never fails the run: a missing or broken connection is logged.

    No Jinja template fields: DAG-level callbacks get a serialized DAG without a template
    environment in Airflow 3.3, so the text is built from the context in :meth:`notify`.
    """

    template_fields = ()

    def __init__(self, kind: str, subject: str = "", message: str = ""):
        super().__init__()
        self.kind, self.subject, self.message = kind, subject, message

    def render_template_fields(self, context: Any, jinja_env: Any = None) -> None:
        """Nothing to render (and no template environment on a serialized DAG)."""

    def _text(self, context: Any) -> tuple[str, str]:
        dag_run = context.get("dag_run")
        dag_id = getattr(dag_run, "dag_id", None) or getattr(context.get("dag"), "dag_id", "?")
        run_id = getattr(dag_run, "run_id", None) or context.get("run_id") or "?"
        subject = self.subject or f"[lm-pipeline] {dag_id} {self.kind}: {run_id}"
        message = self.message or f"workspace: {DATA_ROOT}/workspaces/{dag_id}/{workspace_name(run_id)}"
        return subject, message

    def notify(self, context: Any) -> None:
        cfg = PARAMS.notify
        subject, message = self._text(context)
        log.warning("[lm-pipeline %s] %s %s", self.kind, subject, message)
        if cfg.smtp_conn_id and cfg.email_to:
            try:
                from airflow.providers.smtp.notifications.smtp import SmtpNotifier

                SmtpNotifier(
                    to=list(cfg.email_to),
                    subject=subject,
                    html_content=f"<pre>{message}</pre>",
                    smtp_conn_id=cfg.smtp_conn_id,
                ).notify(context)
            except Exception:
                log.exception("SMTP notification via %r failed (run continues)", cfg.smtp_conn_id)
        if cfg.http_conn_id:
            try:
                from airflow.providers.http.notifications.http import HttpNotifier

                HttpNotifier(
                    http_conn_id=cfg.http_conn_id,
                    endpoint=cfg.webhook_endpoint or None,
                    json={"kind": self.kind, "subject": subject, "text": message},
                ).notify(context)
            except Exception:
                log.exception("webhook notification via %r failed (run continues)", cfg.http_conn_id)


def run_notifier(kind: str) -> LmpipeNotifier:
    return LmpipeNotifier(kind)
