"""``lmpipe kfp-compile``: the dvc.yaml stages as a Kubeflow Pipelines (KFP v2) pipeline YAML.

One container component per ``dvc.yaml`` stage, same names, same order, same image and the same
command as the Airflow nodes: ``python -m pipeline_tasks.orchestration stage ... -- python -m
pipeline_tasks STAGE`` (the stage's own dvc.yaml ``cmd`` after ``--``). Wiring:

* ``prepare-workspace`` copies the project snapshot baked into the task image into its output
  artifact ``workspace`` (params overrides from the pipeline parameter ``params_overrides``, JSON);
* every stage takes the previous step's ``workspace`` artifact, copies it into its own output
  artifact and runs the stage there **directly** (``--direct``, not through ``dvc repro``): KFP's
  own execution cache plays DVC's part (a step whose inputs and command did not change is reused),
  and artifacts are the only thing that crosses between pods;
* GPU stages (:data:`pipeline_tasks.stages.GPU_STAGES`) use the CUDA image and request
  ``nvidia.com/gpu`` (``set_accelerator_type`` / ``set_accelerator_limit``) with the GPU resources
  of ``orchestration.kubernetes.gpu_resources``; the others request ``cpu_resources``;
* ``--mlflow-tracking-uri`` sets ``MLFLOW_TRACKING_URI`` on every step (``register`` needs a shared
  registry: a pod's local disk is gone after the step);
* ``--ray-address`` sets ``RAY_ADDRESS`` on the data steps (``orchestration.data_stages``) and pins
  ``executor.kind=ray`` in the run's params: their per-batch work runs on that Ray cluster
  (:mod:`pipeline_tasks.executor`, docs/RUN_ON_RAY.md);
* ``pretrain.nodes > 1``: ``pretrain`` is a Python component (:func:`pretrain`) that launches a
  Kubeflow Trainer TrainJob (:mod:`pipeline_tasks.orchestration.trainjob`). TrainJob pods cannot
  see a step's local artifacts, so the pipeline gets a KFP workspace (a per-run ReadWriteMany PVC at
  ``/kfp-workspace``): the launcher runs the stage in a folder there and copies the result into its
  output artifact. The component receives its pod settings as a ``dsl.TaskConfig`` (KFP backend
  2.15 or later): the volumes and env apply to the launcher too; the resources (set from
  ``orchestration.kubernetes.trainjob.node_resources``), node selector and tolerations go only to
  the TrainJob nodes. The run's ``pretrain.nodes`` / ``procs_per_node`` are pinned to the compiled
  values (``prepare-workspace -S``): the pipeline's shape is fixed when it is compiled.

Inputs: ``dvc.yaml`` and params.yaml (``--params``, ``-S key=value``): the ``orchestration``
section and ``pretrain.nodes``. Output: the pipeline YAML
(``--output``, default ``lm_pipeline.kfp.yaml``), uploadable with the KFP UI or
``kfp.Client().create_run_from_pipeline_package``. kfp is imported lazily (tasks env only).
"""

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from kfp import compiler, dsl

from pipeline_tasks.config import load_params
from pipeline_tasks.orchestration.settings import (
    OrchestrationParams,
    ResourceParams,
    driver_argv,
    node_argv,
    read_dvc_stages,
)
from pipeline_tasks.stages import GPU_STAGES

logger = logging.getLogger(__name__)

PIPELINE_NAME = "lm-pipeline"
KFP_DATA_ROOT = "/tmp/lmpipe"  # per-pod scratch for init's bookkeeping (no shared DVC cache in KFP)
TRAINJOB_STAGE = "pretrain"  # the stage that becomes a TrainJob launcher when pretrain.nodes > 1
# markers in the launcher's command, replaced in the pod (see pretrain(): its source is shipped alone)
SHARED_WORKSPACE, LAUNCHER_INPUT, LAUNCHER_SUMMARY = "{shared_workspace}", "{workspace_in}", "{summary_file}"


def _component(name: str, image: str, argv_for, from_workspace: bool = True):
    """A KFP container component named ``name``: args from ``argv_for(input, workspace_out_path)``,
    where the input is the previous step's workspace artifact (or the params overrides string)."""
    if from_workspace:

        def component(workspace_in: dsl.Input[dsl.Artifact], workspace: dsl.Output[dsl.Artifact]):
            return dsl.ContainerSpec(
                image=image, command=["tini", "--"], args=argv_for(workspace_in.path, workspace.path)
            )
    else:

        def component(params_overrides: str, workspace: dsl.Output[dsl.Artifact]):
            return dsl.ContainerSpec(
                image=image, command=["tini", "--"], args=argv_for(params_overrides, workspace.path)
            )

    component.__name__ = component.__qualname__ = name
    return dsl.container_component(component)


# the step declares its output artifact in KFP's executor output file (see driver.write_kfp_executor_output)
EXECUTOR_INPUT = ["--kfp-executor-input", dsl.PIPELINE_TASK_EXECUTOR_INPUT_PLACEHOLDER]


def stage_args(dvc_cmd: str, workspace_in: Any, workspace_out: Any, driver_options: list = EXECUTOR_INPUT) -> list:
    """Args of one stage step: the driver, then the stage's dvc.yaml command after ``--``."""
    prefix = ["python", "-m", "pipeline_tasks.orchestration", "--workspace", workspace_out, *driver_options]
    argv = node_argv(dvc_cmd, "--direct", "--copy-from", "WORKSPACE_IN")
    return [*prefix, *[workspace_in if a == "WORKSPACE_IN" else a for a in argv[3:]]]


def launcher_args(dvc_cmd: str) -> list[str]:
    """The TrainJob launcher's driver command (the same as :func:`stage_args`), with markers for the
    paths only the pod knows; KFP's executor declares the output artifact, the driver the summary."""
    return stage_args(dvc_cmd, LAUNCHER_INPUT, SHARED_WORKSPACE, ["--xcom-file", LAUNCHER_SUMMARY])


def pretrain(
    workspace_in: dsl.Input[dsl.Artifact],
    workspace: dsl.Output[dsl.Artifact],
    shared_root: str,
    run_id: str,
    command: list,
    task_config: dsl.TaskConfig,
):
    """KFP step of multi-node ``pretrain``: run the stage as a TrainJob launcher on the shared workspace.

    KFP ships only this function's source into the pod: it must import what it uses and may not
    call the module around it (the markers are :data:`SHARED_WORKSPACE` and friends)."""
    import json
    import os
    import shutil
    import subprocess
    import sys
    import tempfile

    config = {
        "env": task_config.env or [],
        "volumes": task_config.volumes or [],
        "volumeMounts": task_config.volume_mounts or [],
        "resources": task_config.resources or {},
        "nodeSelector": task_config.node_selector or {},
        "tolerations": task_config.tolerations or [],
    }
    if not config["volumes"] or not os.path.isdir(shared_root):
        print(
            f"pretrain: no shared workspace (TaskConfig volumes: {config['volumes'] or 'none'}; "
            f"{shared_root!r} is {'' if os.path.isdir(shared_root) else 'not '}a folder): multi-node pretrain "
            "needs a KFP backend that passes TaskConfig (2.15 or later) and the pipeline's workspace, "
            "which lmpipe kfp-compile adds when pretrain.nodes > 1",
            file=sys.stderr,
        )
        sys.exit(2)  # a configuration error, as the CLI reports one
    # one folder per run: the TrainJob is named after this path, so a retry of this step attaches to
    # the job its first try submitted, and another run never does
    shared = os.path.join(shared_root, "lmpipe", run_id, "pretrain")
    os.makedirs(os.path.dirname(shared), exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        summary_file = os.path.join(scratch, "summary.json")
        paths = {"{shared_workspace}": shared, "{workspace_in}": workspace_in.path, "{summary_file}": summary_file}
        env = dict(os.environ, LMPIPE_PRETRAIN_LAUNCHER="trainjob", LMPIPE_TRAINJOB_TASK_CONFIG=json.dumps(config))
        code = subprocess.run([paths.get(arg, arg) for arg in command], env=env, check=False).returncode
        if code:
            sys.exit(code)
        with open(summary_file, encoding="utf-8") as f:
            summary = json.load(f)
    workspace.metadata.update({k: v for k, v in summary.items() if isinstance(v, (str, int, float, bool))})
    shutil.copytree(shared, workspace.path, symlinks=True, dirs_exist_ok=True)


def _trainjob_launcher(image: str):
    """:func:`pretrain` as a component: it receives its task's pod settings as a ``dsl.TaskConfig``."""
    passthrough = dsl.TaskConfigPassthrough
    return dsl.component(
        pretrain,
        base_image=image,
        install_kfp_package=False,  # kfp is in the task image (requirements/tasks.txt)
        task_config_passthroughs=[
            dsl.TaskConfigField.RESOURCES,  # the TrainJob nodes' resourcesPerNode, not the launcher's
            passthrough(field=dsl.TaskConfigField.ENV, apply_to_task=True),
            passthrough(field=dsl.TaskConfigField.KUBERNETES_VOLUMES, apply_to_task=True),  # the workspace PVC
            dsl.TaskConfigField.KUBERNETES_NODE_SELECTOR,
            dsl.TaskConfigField.KUBERNETES_TOLERATIONS,
        ],
    )


def _shared_workspace(size: str, storage_class: str) -> dsl.PipelineConfig:
    """The per-run PVC the launcher and every TrainJob node mount (so ReadWriteMany)."""
    patch: dict[str, Any] = {"accessModes": ["ReadWriteMany"]}
    if storage_class:
        patch["storageClassName"] = storage_class
    return dsl.PipelineConfig(
        workspace=dsl.WorkspaceConfig(size=size, kubernetes=dsl.KubernetesWorkspaceConfig(pvcSpecPatch=patch))
    )


def build_pipeline(
    dvc_file: Path,
    orch: OrchestrationParams,
    image: str | None = None,
    gpu_image: str | None = None,
    mlflow_tracking_uri: str = "",
    pretrain_topology: tuple[int, int] = (1, 1),
    workspace_size: str = "100Gi",
    workspace_storage_class: str = "",
    ray_address: str = "",
):
    """The ``@dsl.pipeline`` function for the stages of ``dvc_file``.

    ``pretrain_topology``: ``(pretrain.nodes, pretrain.procs_per_node)``; more than one node makes
    ``pretrain`` a TrainJob launcher on a shared workspace of ``workspace_size``."""
    stages = read_dvc_stages(dvc_file)
    cpu_image, cuda_image = image or orch.image, gpu_image or image or orch.gpu_image
    nodes, procs_per_node = pretrain_topology
    trainjob = nodes > 1 and TRAINJOB_STAGE in stages
    # the run trains with the topology this pipeline was built for, whatever the image's params say
    pinned = ["-S", f"pretrain.nodes={nodes}", "-S", f"pretrain.procs_per_node={procs_per_node}"] if trainjob else []
    if ray_address:  # the cluster this pipeline was built for: a run does not fall back to local
        pinned += ["-S", "executor.kind=ray"]

    def init_args(params_overrides, workspace_out):
        return [
            *driver_argv("init")[:3],
            "--workspace",
            workspace_out,
            *EXECUTOR_INPUT,
            "init",
            "--source",
            "/opt/lm-pipeline",
            "--data-root",
            KFP_DATA_ROOT,
            "--overrides-json",
            params_overrides,
            *pinned,
        ]

    init = _component("prepare_workspace", cpu_image, init_args, from_workspace=False)
    components = {}
    for name, stage in stages.items():

        def args(workspace_in, workspace_out, _cmd=stage["cmd"]):
            return stage_args(_cmd, workspace_in, workspace_out)

        components[name] = _component(name, cuda_image if name in GPU_STAGES else cpu_image, args)
    if trainjob:
        components[TRAINJOB_STAGE] = _trainjob_launcher(cpu_image)

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description="Retrain, evaluate and register the LM: one step per dvc.yaml stage",
        pipeline_config=_shared_workspace(workspace_size, workspace_storage_class) if trainjob else None,
    )
    def pipeline(params_overrides: str = "{}"):
        previous = init(params_overrides=params_overrides)
        _configure(previous, orch, gpu=False, mlflow_tracking_uri=mlflow_tracking_uri)
        for name, component in components.items():
            if trainjob and name == TRAINJOB_STAGE:
                task = component(
                    workspace_in=previous.outputs["workspace"],
                    shared_root=dsl.WORKSPACE_PATH_PLACEHOLDER,
                    run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                    command=launcher_args(stages[name]["cmd"]),
                )
                # captured into the TaskConfig (RESOURCES is passed through): each TrainJob node's
                # resources; the launcher pod itself requests none
                resources = orch.kubernetes.trainjob.node_resources
            else:
                task = component(workspace_in=previous.outputs["workspace"])
                resources = None
            task.set_display_name(name)
            _configure(task, orch, name in GPU_STAGES, mlflow_tracking_uri, resources)
            if ray_address and name in orch.data_stages:
                task.set_env_variable("RAY_ADDRESS", ray_address)
            previous = task

    return pipeline


def _configure(
    task, orch: OrchestrationParams, gpu: bool, mlflow_tracking_uri: str, resources: ResourceParams | None = None
) -> None:
    """Resources, retries and env of one step (``resources``: instead of the cpu/gpu defaults)."""
    res = resources or (orch.kubernetes.gpu_resources if gpu else orch.kubernetes.cpu_resources)
    task.set_cpu_request(res.cpu).set_memory_request(res.memory)
    if res.cpu_limit:
        task.set_cpu_limit(res.cpu_limit)
    if res.memory_limit:
        task.set_memory_limit(res.memory_limit)
    if (gpu or resources) and res.gpus:
        task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(res.gpus)
    task.set_retry(orch.training_retries if gpu else orch.retries, backoff_duration=f"{orch.retry_delay_s}s")
    for name, value in (("DVC_NO_ANALYTICS", "1"), ("DO_NOT_TRACK", "1"), ("MLFLOW_TRACKING_URI", mlflow_tracking_uri)):
        if value:
            task.set_env_variable(name, value)


def compile_pipeline(output: Path, dvc_file: Path, orch: OrchestrationParams, **options: Any) -> dict[str, Any]:
    pipeline = build_pipeline(dvc_file, orch, **options)
    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline_func=pipeline, package_path=str(output))
    stages = list(read_dvc_stages(dvc_file))
    logger.info("compiled %d stages into %s", len(stages), output)
    nodes = options.get("pretrain_topology", (1, 1))[0]
    return {
        "output": str(output),
        "stages": stages,
        "gpu_stages": [s for s in stages if s in GPU_STAGES],
        "trainjob_stages": [TRAINJOB_STAGE] if nodes > 1 and TRAINJOB_STAGE in stages else [],
    }


def add_kfp_compile_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="lm_pipeline.kfp.yaml", help="pipeline YAML to write")
    parser.add_argument("--image", default=None, help="task image (default: orchestration.image)")
    parser.add_argument(
        "--gpu-image",
        default=None,
        help="image of the GPU stages (default: --image if given, else orchestration.gpu_image)",
    )
    parser.add_argument("--dvc-file", default="dvc.yaml", help="stage graph to compile")
    parser.add_argument("--mlflow-tracking-uri", default="", help="MLFLOW_TRACKING_URI of every step")
    parser.add_argument(
        "--ray-address",
        default="",
        help="run the data stages' per-batch work on this Ray cluster (RAY_ADDRESS of the data steps, "
        "executor.kind=ray), e.g. ray://lmpipe-ray-head-svc:10001",
    )
    parser.add_argument(
        "--workspace-size",
        default="100Gi",
        help="pretrain.nodes > 1: size of the run's shared workspace PVC (the workspace is copied there)",
    )
    parser.add_argument(
        "--workspace-storage-class",
        default="",
        help="pretrain.nodes > 1: storage class of that PVC; it must offer ReadWriteMany (default: KFP's)",
    )


def cli_kfp_compile(args: argparse.Namespace) -> int:
    from pipeline_tasks.cli import parse_overrides

    params = load_params(args.params, parse_overrides(args.overrides))
    orch = getattr(params, "orchestration", None) or OrchestrationParams()
    pretrain_params = getattr(params, "pretrain", None)
    topology = (pretrain_params.nodes, pretrain_params.procs_per_node) if pretrain_params else (1, 1)
    summary = compile_pipeline(
        Path(args.output),
        Path(args.dvc_file),
        orch,
        image=args.image,
        gpu_image=args.gpu_image,
        mlflow_tracking_uri=args.mlflow_tracking_uri,
        ray_address=args.ray_address,
        pretrain_topology=topology,
        workspace_size=args.workspace_size,
        workspace_storage_class=args.workspace_storage_class,
    )
    print(json.dumps(summary, sort_keys=True))
    return 0
