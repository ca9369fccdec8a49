"""The shared CLI: help lists every stage, errors map to exit codes, overrides are typed."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline_tasks.cli import main, parse_overrides
from pipeline_tasks.config import ConfigError
from pipeline_tasks.stages import COMMANDS, STAGES


def test_help_lists_every_stage_and_command(repo_root):
    out = subprocess.run(
        [sys.executable, "-m", "pipeline_tasks", "--help"], cwd=repo_root, capture_output=True, text=True, check=True
    ).stdout
    for name in [*STAGES, *COMMANDS]:
        assert name in out


def test_parse_overrides_yaml_types():
    assert parse_overrides(["a.b=3", "c=lstm", "d=true", "e=0.5"]) == {"a.b": 3, "c": "lstm", "d": True, "e": 0.5}


def test_parse_overrides_rejects_missing_equals():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["pretrain.max_steps"])


def test_config_error_exits_2_with_key(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("paths:\n  prepared_dirr: x\n")
    assert main(["prepare", "--params", str(params)]) == 2
    assert "paths.prepared_dirr: unknown key" in capsys.readouterr().err


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
