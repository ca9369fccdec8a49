"""Shared fixtures: the real corpora (skipped with a clear message when absent) and the repo root."""

from __future__ import annotations

import os
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
