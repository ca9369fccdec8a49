"""Container contract: each dvc.yaml stage runs like a container node would run it.

For every stage, in dvc.yaml order, a fresh temp workspace receives **only** what the stage
declares: its ``params.yaml`` (the tiny profile) and its data ``deps`` (copied from the workspaces
of the stages that produced them). The stage command (``python -m pipeline_tasks STAGE``, from the
installed package as in the task image) runs in a subprocess whose environment holds only PATH,
HOME, LMPIPE_DATA_MIRROR and the telemetry switches. It must exit 0 and produce every declared
``outs`` / ``metrics`` / ``plots`` path, and every ``pipeline_tasks`` module it imported beyond
what loading params.yaml imports (each section's ``*Params`` module) must be a declared code dep (or
a foundation module every stage uses), so DVC re-runs the stage when code it runs changes. Stages not in dvc.yaml yet are simply not there.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline_tasks.orchestration.settings import stage_paths
from tests.dags.conftest import tiny_overrides
from tests.tiny import write_tiny_params

REPO = Path(__file__).resolve().parents[2]
# Imported by every command through the CLI; changing them is a change of the framework.
FOUNDATION = {"__init__", "__main__", "cli", "config", "errors", "stages"}
# Runs the stage like `python -m pipeline_tasks STAGE` and records the pipeline_tasks modules it imported,
# minus those that loading params.yaml imports anyway (every section's *Params class lives in its module).
RUNNER = """
import json, runpy, sys
from pipeline_tasks.config import load_params
load_params()
baseline = {m for m in sys.modules if m.startswith("pipeline_tasks")}
try:
    runpy.run_module("pipeline_tasks", run_name="__main__", alter_sys=True)
finally:
    mods = sorted(m for m, mod in sys.modules.items()
                  if m.startswith("pipeline_tasks") and m not in baseline and getattr(mod, "__file__", None))
    open(".imported.json", "w").write(json.dumps({m: sys.modules[m].__file__ for m in mods}))
"""


def _clean_env(corpora: Path, home: Path) -> dict[str, str]:
    return {"PATH": f"{Path(sys.executable).parent}{os.pathsep}/usr/local/bin:/usr/bin:/bin", "HOME": str(home),
            "LMPIPE_DATA_MIRROR": str(corpora), "DVC_NO_ANALYTICS": "1", "DO_NOT_TRACK": "1",
            "GX_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dst, dirs_exist_ok=True)
    else:
        shutil.copy2(src, dst)


def _producer(dep: str, produced: dict[str, Path]) -> Path | None:
    """The workspace holding ``dep``: an earlier stage's out equal to it, above it or below it."""
    for out, workspace in produced.items():
        if dep == out or dep.startswith(out.rstrip("/") + "/") or out.startswith(dep.rstrip("/") + "/"):
            return workspace
    return None


@pytest.mark.slow
def test_every_stage_runs_from_only_its_declared_inputs_in_a_clean_env(tmp_path, corpora):
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    params_file = write_tiny_params(REPO / "params.yaml", tmp_path / "params.yaml", tiny_overrides())
    variables = yaml.safe_load(params_file.read_text())
    state = tmp_path / "state"  # shared state (registry) lives outside the workspaces, as in a real run
    produced: dict[str, Path] = {}
    problems: list[str] = []
    for name, stage in stages.items():
        workspace = tmp_path / "ws" / name
        workspace.mkdir(parents=True)
        shutil.copy2(params_file, workspace / "params.yaml")
        for dep in stage_paths(stage, variables, "deps"):
            if dep.startswith("pipeline_tasks/"):
                assert (REPO / dep).is_file(), f"{name}: declared code dep {dep} does not exist"
                continue  # code comes from the installed package, as in the task image
            source = _producer(dep, produced)
            if source is not None and (source / dep).exists():
                _copy(source / dep, workspace / dep)
            elif (REPO / dep).exists():
                _copy(REPO / dep, workspace / dep)
            else:
                pytest.fail(f"{name}: dep {dep} is neither produced by an earlier stage nor in the repo")
        raw = yaml.safe_load((workspace / "params.yaml").read_text())
        raw.setdefault("paths", {})["registry_dir"] = str(state / "registry")
        if "evaluate" in raw:
            raw["evaluate"]["champion_metrics_path"] = str(state / "registry" / "production_metrics.json")
        (workspace / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))

        cmd = shlex.split(stage["cmd"])
        assert cmd[:3] == ["python", "-m", "pipeline_tasks"], f"{name}: cmd {stage['cmd']!r}"
        proc = subprocess.run([sys.executable, "-c", RUNNER, *cmd[3:]], cwd=workspace, capture_output=True,
                              text=True, timeout=1800, env=_clean_env(corpora, tmp_path / "home"))
        assert proc.returncode == 0, f"{name} failed in a clean env:\n{proc.stderr[-4000:]}"
        assert json.loads(proc.stdout.strip().splitlines()[-1]) is not None  # the JSON summary line

        for kind in ("outs", "metrics", "plots"):
            for out in stage_paths(stage, variables, kind):
                assert (workspace / out).exists(), f"{name}: declared {kind[:-1]} {out} was not produced"
                produced[out] = workspace
        imported = json.loads((workspace / ".imported.json").read_text())
        declared = {Path(d).stem for d in stage_paths(stage, variables, "deps") if d.startswith("pipeline_tasks/")}
        undeclared = sorted(m.split(".")[-1] for m, f in imported.items()
                            if m != "pipeline_tasks" and m.split(".")[-1] not in FOUNDATION | declared
                            and f.endswith(".py") and Path(f).parent.name == "pipeline_tasks")
        if undeclared:
            problems.append(f"{name} imports pipeline_tasks.{{{', '.join(undeclared)}}} but dvc.yaml does not "
                            "list them as deps (DVC would not re-run it when they change)")
    assert not problems, "\n".join(problems)
