"""Fixtures for the container tests: a Docker engine that answers (else skip, with the reason), the
images built from this tree (``docker/build-images.sh``: a no-op on a warm layer cache, so the images
always run the code under test), and ``docker run`` as the nodes run: uid 1000, no network,
read-only root filesystem, only the volumes a node gets."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.dags.conftest import airflow_python  # noqa: F401  (the orchestration env, for the DAG runs)

REPO = Path(__file__).resolve().parents[2]
TASK_IMAGE = "lm-pipeline-tasks:0.1.0"
AIRFLOW_IMAGE = "lm-pipeline-airflow:0.1.0"
NODE_USER = "1000:1000"


def docker_cli() -> str | None:
    return shutil.which("docker")


@pytest.fixture(scope="session")
def docker() -> str:
    exe = docker_cli()
    if exe is None:
        pytest.skip("no docker CLI on PATH: the container tests need a Docker engine (see README, 'Containers')")
    info = subprocess.run([exe, "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True, timeout=60)
    if info.returncode != 0:
        pytest.skip(f"no Docker engine answers (`docker info`: {info.stderr.strip()[-200:]})")
    return exe


@pytest.fixture(scope="session")
def images(docker) -> dict[str, str]:
    """The task and Airflow images of this tree (built or refreshed from the layer cache)."""
    proc = subprocess.run(
        [str(REPO / "docker" / "build-images.sh"), "tasks", "airflow"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert proc.returncode == 0, f"make images failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return {"tasks": TASK_IMAGE, "airflow": AIRFLOW_IMAGE}


def give_to_node_user(path: Path) -> None:
    """Node containers run as uid 1000: the host folders they write must be theirs."""
    if os.geteuid() == 0:
        for root, dirs, files in os.walk(path):
            for name in [*dirs, *files]:
                os.lchown(os.path.join(root, name), 1000, 1000)
        os.chown(path, 1000, 1000)
    else:
        subprocess.run(["chmod", "-R", "a+rwX", str(path)], check=True)


def docker_run(
    docker: str,
    image: str,
    *args: str,
    volumes: dict[str, str] | None = None,
    env: dict[str, str] | None = None,
    workdir: str | None = None,
    read_only: bool = True,
    name: str | None = None,
    detach: bool = False,
    user: str | None = NODE_USER,
    timeout: float = 1800,
) -> subprocess.CompletedProcess:
    """``docker run`` as a pipeline node: uid 1000 (``user=None``: the image's own user), ``--network
    none``, read-only root (scratch on tmpfs)."""
    cmd = [docker, "run", "--network", "none"]
    if user:
        cmd += ["--user", user]
    if not detach:
        cmd.append("--rm")
    if read_only:
        # /tmp and /var/tmp (DVC's site cache) are scratch; HOME points into /tmp for tools' dotfiles
        cmd += ["--read-only", "--tmpfs", "/tmp:rw,exec,size=2g", "--tmpfs", "/var/tmp:rw,size=256m", "-e", "HOME=/tmp"]
    for host, target in (volumes or {}).items():
        cmd += ["-v", f"{host}:{target}"]
    for key, value in (env or {}).items():
        cmd += ["-e", f"{key}={value}"]
    if workdir:
        cmd += ["-w", workdir]
    if name:
        cmd += ["--name", name]
    if detach:
        cmd.append("-d")
    cmd += [image, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def hand_back(docker: str, image: str, path: Path) -> None:
    """Files the nodes wrote belong to uid 1000: make them writable for whoever cleans ``path`` up."""
    docker_run(docker, image, "chmod", "-R", "a+rwX", "/handback", volumes={str(path): "/handback"}, timeout=300)
