"""Shared fixtures: the real corpora (skipped with a clear message when absent) and the repo root."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
CORPORA = Path(os.environ.get("LMPIPE_DATA_MIRROR") or REPO_ROOT.parent / "shared" / "corpora")

# Tests never phone home.
for _name, _value in {
    "DVC_NO_ANALYTICS": "1",
    "DO_NOT_TRACK": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
}.items():
    os.environ.setdefault(_name, _value)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def corpora() -> Path:
    """The offline data mirror (../shared/corpora or $LMPIPE_DATA_MIRROR)."""
    if not CORPORA.is_dir():
        pytest.skip(f"real corpora not found at {CORPORA}: set LMPIPE_DATA_MIRROR to the shared corpora folder")
    return CORPORA


@pytest.fixture()
def mirror_env(corpora, monkeypatch) -> Path:
    monkeypatch.setenv("LMPIPE_DATA_MIRROR", str(corpora))
    return corpora


@pytest.fixture(scope="session")
def tiny_repro(corpora, tmp_path_factory) -> tuple[Path, dict[str, str], subprocess.CompletedProcess]:
    """One local `dvc repro` of the tiny profile in a clean copy of the project: the e2e checks read it,
    and the container tests compare their in-image run with it."""
    from tests.tiny import copy_project, write_tiny_params

    project = copy_project(REPO_ROOT, tmp_path_factory.mktemp("e2e") / "project")
    write_tiny_params(project / "params.yaml", project / "params.yaml")
    env = {
        **os.environ,
        "LMPIPE_DATA_MIRROR": str(corpora),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    dvc = Path(sys.executable).with_name("dvc")
    first = subprocess.run([str(dvc), "repro"], cwd=project, env=env, capture_output=True, text=True, timeout=1800)
    assert first.returncode == 0, f"dvc repro failed:\n{first.stdout[-6000:]}\n{first.stderr[-6000:]}"
    return project, env, first
