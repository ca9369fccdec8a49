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
  registry: a pod's local disk is gone after the step).

Inputs: ``dvc.yaml`` and the ``orchestration`` section of params.yaml. Output: the pipeline YAML
(``--output``, default ``lm_pipeline.kfp.yaml``), uploadable with the KFP UI or
``kfp.Client().create_run_from_pipeline_package``. kfp is imported lazily (tasks env only).
"""

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from kfp import compiler, dsl

from pipeline_tasks.config import find_params_file
from pipeline_tasks.orchestration.settings import (
    OrchestrationParams,
    driver_argv,
    load_orchestration_params,
    node_argv,
    read_dvc_stages,
)
from pipeline_tasks.stages import GPU_STAGES

logger = logging.getLogger(__name__)

PIPELINE_NAME = "lm-pipeline"
KFP_DATA_ROOT = "/tmp/lmpipe"  # per-pod scratch for init's bookkeeping (no shared DVC cache in KFP)


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


def stage_args(dvc_cmd: str, workspace_in: Any, workspace_out: Any) -> list:
    """Args of one stage step: the driver, then the stage's dvc.yaml command after ``--``."""
    prefix = ["python", "-m", "pipeline_tasks.orchestration", "--workspace", workspace_out, *EXECUTOR_INPUT]
    argv = node_argv(dvc_cmd, "--direct", "--copy-from", "WORKSPACE_IN")
    return [*prefix, *[workspace_in if a == "WORKSPACE_IN" else a for a in argv[3:]]]


def build_pipeline(
    dvc_file: Path,
    orch: OrchestrationParams,
    image: str | None = None,
    gpu_image: str | None = None,
    mlflow_tracking_uri: str = "",
):
    """The ``@dsl.pipeline`` function for the stages of ``dvc_file``."""
    stages = read_dvc_stages(dvc_file)
    cpu_image, cuda_image = image or orch.image, gpu_image or image or orch.gpu_image

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
        ]

    init = _component("prepare_workspace", cpu_image, init_args, from_workspace=False)
    components = {}
    for name, stage in stages.items():

        def args(workspace_in, workspace_out, _cmd=stage["cmd"]):
            return stage_args(_cmd, workspace_in, workspace_out)

        components[name] = _component(name, cuda_image if name in GPU_STAGES else cpu_image, args)

    @dsl.pipeline(name=PIPELINE_NAME, description="Retrain, evaluate and register the LM: one step per dvc.yaml stage")
    def pipeline(params_overrides: str = "{}"):
        previous = init(params_overrides=params_overrides)
        _configure(previous, orch, gpu=False, mlflow_tracking_uri=mlflow_tracking_uri)
        for name, component in components.items():
            task = component(workspace_in=previous.outputs["workspace"])
            task.set_display_name(name)
            _configure(task, orch, gpu=name in GPU_STAGES, mlflow_tracking_uri=mlflow_tracking_uri)
            previous = task

    return pipeline


def _configure(task, orch: OrchestrationParams, gpu: bool, mlflow_tracking_uri: str) -> None:
    res = orch.kubernetes.gpu_resources if gpu else orch.kubernetes.cpu_resources
    task.set_cpu_request(res.cpu).set_memory_request(res.memory)
    if res.cpu_limit:
        task.set_cpu_limit(res.cpu_limit)
    if res.memory_limit:
        task.set_memory_limit(res.memory_limit)
    if gpu and res.gpus:
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
    return {"output": str(output), "stages": stages, "gpu_stages": [s for s in stages if s in GPU_STAGES]}


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


def cli_kfp_compile(args: argparse.Namespace) -> int:
    orch = load_orchestration_params(find_params_file(args.params))
    summary = compile_pipeline(
        Path(args.output),
        Path(args.dvc_file),
        orch,
        image=args.image,
        gpu_image=args.gpu_image,
        mlflow_tracking_uri=args.mlflow_tracking_uri,
    )
    print(json.dumps(summary, sort_keys=True))
    return 0
