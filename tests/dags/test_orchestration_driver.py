"""The node driver (``python -m pipeline_tasks.orchestration``) on a tiny DVC project: workspace
creation from a checkout with uncommitted files, reuse on retry, params overrides, the stage run
through real DVC with a shared cache (a second workspace restores from the run cache), the
Kubeflow mode (``--direct --copy-from``) and lineage. Runs in the tasks env; no Airflow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline_tasks.orchestration.settings import (
    OrchestrationParams,
    load_orchestration_params,
    node_argv,
    parse_summary,
    stage_retries,
    workspace_name,
)

HELLO = """import json, os, pathlib, yaml
params = yaml.safe_load(open("params.yaml"))["prepare"]
out = pathlib.Path("out"); out.mkdir(exist_ok=True)
(out / "greeting.txt").write_text("hello " * params["min_chars"])
pathlib.Path("metrics.json").write_text(json.dumps({"chars": 6 * params["min_chars"], "passed": True}))
print("some log line")
print(json.dumps({"stage": "hello", "chars": 6 * params["min_chars"]}))
"""


def _run(*args: str, workspace: Path, env: dict | None = None) -> tuple[int, dict, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline_tasks.orchestration", "--workspace", str(workspace), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )
    lines = proc.stdout.strip().splitlines()
    return proc.returncode, json.loads(lines[-1]) if lines else {}, proc.stderr


@pytest.fixture()
def project(tmp_path) -> Path:
    """A git checkout with a committed DVC stage plus an uncommitted (untracked) file and an ignored one."""
    src = tmp_path / "src"
    (src / ".dvc").mkdir(parents=True)
    (src / ".dvc" / "config").write_text("")
    (src / ".gitignore").write_text("/data/\n/out/\n/metrics.json\n")
    (src / "hello.py").write_text(HELLO)
    (src / "params.yaml").write_text(yaml.safe_dump({"project": "demo", "seed": 1, "prepare": {"min_chars": 3}}))
    (src / "dvc.yaml").write_text(
        yaml.safe_dump(
            {
                "stages": {
                    "hello": {
                        "cmd": "python hello.py",
                        "deps": ["hello.py"],
                        "params": ["prepare.min_chars"],
                        "outs": ["out"],
                        "metrics": [{"metrics.json": {"cache": False}}],
                    }
                }
            },
            sort_keys=False,
        )
    )
    git = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t"]
    subprocess.run(["git", "init", "-q"], cwd=src, check=True)
    subprocess.run([*git, "add", "-A"], cwd=src, check=True)
    subprocess.run([*git, "commit", "-qm", "init"], cwd=src, check=True)
    (src / "NOTES.md").write_text("uncommitted, not ignored\n")
    (src / "data").mkdir()
    (src / "data" / "big.bin").write_bytes(b"ignored")
    return src


def test_init_copies_tracked_and_untracked_files_and_points_dvc_at_the_shared_cache(project, tmp_path):
    root = tmp_path / "root"
    ws = root / "workspaces" / "dag" / workspace_name("manual__2025-01-01T00:00:00+00:00")
    code, summary, err = _run(
        "init",
        "--source",
        str(project),
        "-S",
        "prepare.min_chars=5",
        workspace=ws,
        env={"LMPIPE_OVERRIDES_JSON": json.dumps({"seed": 7})},
    )
    assert code == 0, err
    assert (ws / "NOTES.md").is_file() and (ws / "hello.py").is_file()
    assert not (ws / "data").exists() and not (ws / ".git").exists()
    config = (ws / ".dvc" / "config.local").read_text()
    assert "no_scm = true" in config and f"dir = {root / 'dvc-cache'}" in config
    params = yaml.safe_load((ws / "params.yaml").read_text())
    assert params["prepare"]["min_chars"] == 5 and params["seed"] == 7
    assert summary["git_dirty"] is True and len(summary["git_sha"]) == 40
    assert summary["overrides"]["prepare.min_chars"] == 5


def test_init_from_an_image_snapshot_keeps_packages_named_like_output_folders(project, tmp_path):
    """A snapshot without git (the task image's /opt/lm-pipeline): the outputs folder ``registry/``
    is left out, the package ``pipeline_tasks/registry/`` is not (a container run found this)."""
    snapshot = tmp_path / "snapshot"
    subprocess.run(["cp", "-r", str(project), str(snapshot)], check=True)
    subprocess.run(["rm", "-rf", str(snapshot / ".git")], check=True)
    for rel in ("pkg/registry/store.py", "pkg/data/schema.py", "registry/mlflow.db", "pkg/__pycache__/x.pyc"):
        (snapshot / rel).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / rel).write_text("x")
    ws = tmp_path / "root" / "workspaces" / "dag" / "run"
    code, _, err = _run("init", "--source", str(snapshot), workspace=ws)
    assert code == 0, err
    assert (ws / "pkg/registry/store.py").is_file() and (ws / "pkg/data/schema.py").is_file()
    assert not (ws / "registry").exists() and not (ws / "data").exists() and not (ws / "pkg/__pycache__").exists()


def test_init_reuses_an_existing_workspace_on_retry(project, tmp_path):
    ws = tmp_path / "root" / "workspaces" / "dag" / "run"
    assert _run("init", "--source", str(project), workspace=ws)[0] == 0
    (ws / "checkpoint.pt").write_text("keep me")
    code, summary, _ = _run("init", "--source", str(project), workspace=ws)
    assert code == 0 and summary["reused"] is True
    assert (ws / "checkpoint.pt").read_text() == "keep me"


def test_init_rejects_an_unknown_override_key(project, tmp_path):
    ws = tmp_path / "root" / "workspaces" / "dag" / "run"
    code, _, err = _run("init", "--source", str(project), "-S", "prepare.no_such_key=1", workspace=ws)
    assert code != 0 and "prepare.no_such_key" in err
    assert not ws.exists()  # never a half-made workspace


def test_stage_runs_through_dvc_and_a_second_workspace_restores_from_the_shared_cache(project, tmp_path):
    root = tmp_path / "root"
    first, second = (root / "workspaces" / "dag" / name for name in ("a", "b"))
    for ws in (first, second):
        assert _run("init", "--source", str(project), workspace=ws)[0] == 0
    code, summary, err = _run("stage", "--", "python", "hello.py", workspace=first)
    assert code == 0, err
    assert summary["ran"] and not summary["cached"]
    assert summary["result"] == {"stage": "hello", "chars": 18}  # the stage's last JSON line
    assert summary["metrics"] == {"metrics.json": {"chars": 18, "passed": True}}
    assert summary["outs"] == ["out"] and (first / "out" / "greeting.txt").is_file()
    assert "hello" in yaml.safe_load((first / "dvc.lock").read_text())["stages"]

    code, summary, err = _run("stage", "--", "python", "hello.py", workspace=second)
    assert code == 0, err
    assert summary["cached"] and not summary["ran"]  # DVC run cache in the shared cache dir
    assert (second / "out" / "greeting.txt").read_text() == (first / "out" / "greeting.txt").read_text()

    lineage_code, lineage, _ = _run("lineage", "--dag-id", "dag", "--run-id", "a", workspace=first)
    assert lineage_code == 0
    assert lineage["stages"]["hello"] and lineage["dvc_lock_sha256"]
    assert json.loads((first / "lineage.json").read_text()) == lineage


def test_published_lock_is_the_reference_of_a_new_workspace(project, tmp_path):
    root = tmp_path / "root"
    trained, monitor = root / "workspaces" / "train" / "r1", root / "workspaces" / "watch" / "r2"
    assert _run("init", "--source", str(project), workspace=trained)[0] == 0
    assert _run("stage", "--", "python", "hello.py", workspace=trained)[0] == 0
    code, lineage, err = _run("lineage", "--dag-id", "train", "--run-id", "r1", "--publish", workspace=trained)
    assert code == 0, err
    published = root / "state" / "references" / "train.dvc.lock"
    assert lineage["published"] == str(published) and published.read_bytes() == (trained / "dvc.lock").read_bytes()
    code, summary, err = _run("init", "--source", str(project), "--reference-lock", str(published), workspace=monitor)
    assert code == 0, err
    assert summary["reference_lock"]["checkout_returncode"] == 0
    # the reference's outputs come out of the shared cache; nothing was re-run
    assert (monitor / "out" / "greeting.txt").read_text() == (trained / "out" / "greeting.txt").read_text()
    missing = root / "state" / "references" / "nothing.dvc.lock"
    code, summary, _ = _run(
        "init",
        "--source",
        str(project),
        "--reference-lock",
        str(missing),
        workspace=root / "workspaces" / "watch" / "r3",
    )
    assert code == 0 and summary["reference_lock"] is None


def test_stage_refuses_a_command_that_no_dvc_stage_has(project, tmp_path):
    ws = tmp_path / "root" / "workspaces" / "dag" / "run"
    assert _run("init", "--source", str(project), workspace=ws)[0] == 0
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline_tasks.orchestration",
            "--workspace",
            str(ws),
            "stage",
            "--",
            "python",
            "-m",
            "pipeline_tasks",
            "nope",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert "no stage has cmd 'python -m pipeline_tasks nope'" in proc.stderr and "hello" in proc.stderr


def test_stage_direct_mode_copies_the_previous_workspace_artifact(project, tmp_path):
    upstream = tmp_path / "kfp" / "init" / "workspace"
    code, _, err = _run(
        "init",
        "--source",
        str(project),
        "--data-root",
        str(tmp_path / "scratch"),
        "--overrides-json",
        '{"prepare.min_chars": 2}',
        workspace=upstream,
    )
    assert code == 0, err
    out = tmp_path / "kfp" / "hello" / "workspace"
    code, summary, err = _run(
        "stage", "--direct", "--copy-from", str(upstream), "--", "python", "hello.py", workspace=out
    )
    assert code == 0, err
    assert summary["result"] == {"stage": "hello", "chars": 12}
    assert (out / "out" / "greeting.txt").is_file() and not (upstream / "out").exists()
    assert not (out / "dvc.lock").exists()  # no DVC in this mode: Kubeflow caches the step


def test_stage_exit_code_of_a_failing_stage_is_passed_through(project, tmp_path):
    ws = tmp_path / "root" / "workspaces" / "dag" / "run"
    assert _run("init", "--source", str(project), workspace=ws)[0] == 0
    (ws / "hello.py").write_text("import sys; sys.exit(3)\n")
    code, summary, _ = _run("stage", "--", "python", "hello.py", workspace=ws)
    # the stage's own code (3: data validation failed), not dvc repro's 255: the task log and the
    # Airflow task say what failed
    assert code == 3 and summary["returncode"] == 3


def test_workspace_name_is_filesystem_safe_and_unique():
    a, b = workspace_name("manual__2025-01-01T00:00:00+00:00"), workspace_name("manual__2025-01-01T00_00_00_00_00")
    assert a != b and "/" not in a and ":" not in a and "+" not in a


def test_node_argv_ends_with_the_dvc_command():
    assert node_argv("python -m pipeline_tasks prepare", "--with-upstream") == [
        "python",
        "-m",
        "pipeline_tasks.orchestration",
        "stage",
        "--with-upstream",
        "--",
        "python",
        "-m",
        "pipeline_tasks",
        "prepare",
    ]


def test_parse_summary_takes_the_last_json_line():
    assert parse_summary('log\n{"a": 1}\nnoise {\n') == {"a": 1}
    assert parse_summary(b'{"x": 2}') == {"x": 2}
    assert parse_summary({"y": 3}) == {"y": 3}


def test_retry_policy_depends_on_the_stage_kind():
    params = OrchestrationParams()
    assert stage_retries("ingest_news", params, frozenset({"pretrain"}))["retry_exponential_backoff"] is True
    assert stage_retries("pretrain", params, frozenset({"pretrain"}))["retries"] == params.training_retries
    assert stage_retries("evaluate", params, frozenset({"pretrain"}))["retries"] == params.retries


def test_orchestration_section_of_params_yaml_loads(repo_root):
    params = load_orchestration_params(repo_root / "params.yaml")
    assert params.runner in ("local", "docker", "kubernetes")
    assert params.kubernetes.gpu_resources.gpus >= 1


def test_single_stream_keeps_every_log_line_before_the_summary(project, tmp_path):
    """Container nodes (LMPIPE_SINGLE_STREAM): logs and the stage's output share stdout, so the
    engine cannot record a log line after the summary the DockerOperator takes as XCom."""
    ws = tmp_path / "root" / "workspaces" / "dag" / "run"
    assert _run("init", "--source", str(project), workspace=ws)[0] == 0
    env = {"LMPIPE_SINGLE_STREAM": "true"}
    code, summary, err = _run("stage", "--", "python", "hello.py", workspace=ws, env=env)
    assert code == 0 and summary["stage"] == "hello"
    assert err == ""
