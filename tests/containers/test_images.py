"""The built images: offline-built, non-root, tini as PID 1, no compilers or pip caches, the git sha
and the pins recorded in a label and in the image, and what each image is for runs in it."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.containers.conftest import REPO, docker_run

pytestmark = [pytest.mark.containers]


def _pins(*files: str) -> list[str]:
    lines = []
    for name in files:
        for line in (REPO / name).read_text().splitlines():
            line = line.split("#")[0].strip()
            if line and not line.startswith("-"):
                lines.append(line)
    return lines


def _inspect(docker: str, image: str) -> dict:
    proc = subprocess.run([docker, "image", "inspect", image], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)[0]


@pytest.mark.parametrize(
    ("kind", "requirements", "user"),
    [
        ("tasks", ("requirements/tasks.txt",), "1000:1000"),
        ("airflow", ("requirements/orchestration.txt", "docker/airflow-extra.txt"), "50000:0"),
    ],
)
def test_image_is_non_root_with_tini_and_records_sha_and_pins(docker, images, kind, requirements, user):
    image = images[kind]
    config = _inspect(docker, image)["Config"]
    assert config["User"] == user and config["Entrypoint"] == ["tini", "--"]
    labels = config["Labels"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert labels["org.opencontainers.image.revision"].startswith(head)
    pins = [p for p in _pins(*requirements) if not p.startswith("pytest")]
    assert labels["io.lm-pipeline.pins"].split() == _pins(*requirements)
    probe = docker_run(
        docker,
        image,
        "sh",
        "-c",
        "id -u; cat /proc/1/cmdline | tr '\\0' ' '; echo; "
        "command -v gcc cc g++ make || echo no-compiler; "
        "ls -A /root/.cache $HOME/.cache 2>/dev/null | wc -l; "
        "cat /opt/lm-pipeline/.lmpipe/image_source.json; cat /opt/lm-pipeline/.lmpipe/pip-freeze.txt",
        user=None,
    )
    assert probe.returncode == 0, probe.stderr
    lines = probe.stdout.splitlines()
    assert lines[0] == user.split(":")[0]
    assert lines[1].split()[0].endswith("tini")  # PID 1
    assert lines[2] == "no-compiler" and lines[3] == "0"
    assert json.loads(lines[4])["git_sha"] == labels["org.opencontainers.image.revision"]
    frozen = {line.split("==")[0].lower().replace("_", "-"): line for line in lines[5:] if "==" in line}
    for pin in pins:
        name, version = re.split(r"==", pin)
        installed = frozen.get(name.lower().replace("_", "-"), "==").split("==")[1]
        assert installed.split("+")[0] == version, f"{pin}: installed {installed or 'nothing'}"  # +cpu: local tag


def test_task_image_runs_the_ml_stack_offline(docker, images):
    proc = docker_run(
        docker,
        images["tasks"],
        "python",
        "-c",
        "import torch, onnxruntime, great_expectations, evidently, mlflow, dvc, kfp; "
        "import pipeline_tasks.cli; print(torch.__version__, torch.cuda.is_available())",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["2.13.0+cpu", "False"]


def test_airflow_image_parses_every_dag_without_errors(docker, images):
    probe_dir = Path(__file__).resolve().parents[1] / "dags"
    proc = docker_run(
        docker,
        images["airflow"],
        "python",
        "/probe/airflow_probe.py",
        "dagbag",
        "/opt/airflow/dags",
        volumes={str(probe_dir): "/probe:ro"},
        env={"AIRFLOW__CORE__UNIT_TEST_MODE": "True", "AIRFLOW_HOME": "/tmp/airflow"},
        user=None,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not result["import_errors"], result["import_errors"]
    assert {"lm_retraining", "lm_promote", "lm_drift_monitor"} <= set(result["dags"])
