"""Stage contract: what dvc.yaml declares is what each stage needs and makes.

The stages really run in the task image in tests/containers/test_stages_in_image.py (one workspace,
in order, as a node). What that cannot see is checked here:

For every stage, in dvc.yaml order, a fresh temp workspace receives **only** what the stage
declares: its ``params.yaml`` (the tiny profile) and its data ``deps`` (copied from the workspaces
of the stages that produced them), so an undeclared input fails the run. The stage command
(``python -m pipeline_tasks STAGE``, from the installed package) runs in a subprocess whose
environment holds only PATH, HOME, LMPIPE_DATA_MIRROR and the telemetry switches. It must exit 0
and produce every declared ``outs`` / ``metrics`` / ``plots`` path.

Code deps: every ``pipeline_tasks`` file the stage runs must be a declared dep, so that DVC re-runs
the stage when code it runs changes. "Runs" is the import closure of the stage's module, recorded
by an import hook that sees which module imports which: what loading params.yaml or the CLI import
for every command does not hide a module the stage itself imports. The foundation modules every
command imports and the families' ``__init__.py`` are exempt; the ``*Params`` module of every
section in the stage's ``params:`` is required as well (its defaults and checks shape the run).
A fast test checks the closure at import time, the slow one at run time (function-local imports
included), and a third shows that dropping a dep is reported.
"""

from __future__ import annotations

import copy
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline_tasks.config import SECTIONS
from pipeline_tasks.orchestration.settings import stage_paths
from pipeline_tasks.stages import STAGES
from tests.dags.conftest import tiny_overrides
from tests.tiny import write_tiny_params

REPO = Path(__file__).resolve().parents[2]
# Imported by every command through the CLI; changing them is a change of the framework.
FOUNDATION = {f"pipeline_tasks/{name}.py" for name in ("__init__", "__main__", "cli", "config", "errors", "stages")}
# builtins.__import__ receives the importer's globals: record an edge importer -> imported for every
# pipeline_tasks import (``from pipeline_tasks.x import y`` adds x.y when y is a module), then walk them.
IMPORT_GRAPH = """
import builtins, importlib.util, sys
from pathlib import Path

edges = {}
_import = builtins.__import__


def _recording_import(name, globals=None, locals=None, fromlist=(), level=0):
    module = _import(name, globals, locals, fromlist, level)
    importer = (globals or {}).get("__name__", "")
    target = importlib.util.resolve_name("." * level + name, globals.get("__package__")) if level else name
    if importer.startswith("pipeline_tasks") and target.startswith("pipeline_tasks"):
        found = edges.setdefault(importer, set())
        found.add(target)
        found.update(f"{target}.{item}" for item in fromlist or () if f"{target}.{item}" in sys.modules)
    return module


builtins.__import__ = _recording_import


def code_files(root):
    seen, todo = set(), [root]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(edges.get(name, ()))
    package_dir = Path(sys.modules["pipeline_tasks"].__file__).parent
    files = (getattr(sys.modules.get(name), "__file__", None) for name in seen)
    return sorted("pipeline_tasks/" + Path(f).relative_to(package_dir).as_posix() for f in files if f)
"""
# Runs the stage like `python -m pipeline_tasks STAGE` and writes the files of its module's closure.
RUNNER = (
    IMPORT_GRAPH
    + """
import json, runpy
from pipeline_tasks.stages import STAGES
try:
    runpy.run_module("pipeline_tasks", run_name="__main__", alter_sys=True)
finally:
    with open(".imported.json", "w") as fh:
        json.dump(code_files("pipeline_tasks." + STAGES[sys.argv[1]]), fh)
"""
)
# Loads params.yaml as the CLI does, then imports every stage module: {stage: files of its closure}.
IMPORT_PROBE = (
    IMPORT_GRAPH
    + """
import importlib, json
from pipeline_tasks.config import load_params
from pipeline_tasks.stages import STAGES
load_params("params.yaml")
for module in STAGES.values():
    importlib.import_module("pipeline_tasks." + module)
print(json.dumps({stage: code_files("pipeline_tasks." + module) for stage, module in STAGES.items()}))
"""
)


def params_modules(stage: dict) -> set[str]:
    """Files of the ``*Params`` classes of the sections the stage reads (``params: [model, prepare.salt]``)."""
    files = set()
    for entry in stage.get("params") or ():
        spec = SECTIONS.get(str(entry).split(".")[0]) if isinstance(entry, str) else None
        if spec:
            files.add(spec.partition(":")[0].replace(".", "/") + ".py")
    return files


def missing_code_deps(stage: dict, variables: dict, code_files: list[str]) -> list[str]:
    """Code the stage runs that its ``deps`` do not list (a declared folder covers the files under it)."""
    declared = [d.rstrip("/") for d in stage_paths(stage, variables, "deps") if d.startswith("pipeline_tasks/")]
    needed = {f for f in [*code_files, *params_modules(stage)] if f not in FOUNDATION and Path(f).name != "__init__.py"}
    return sorted(f for f in needed if not any(f == d or f.startswith(d + "/") for d in declared))


def _missing_report(name: str, missing: list[str]) -> str:
    return f"{name}: its dvc.yaml deps lack {', '.join(missing)} (code it runs: DVC would not re-run it on a change)"


def _dvc_stages() -> dict[str, dict]:
    return yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


def _params_variables() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def import_closures() -> dict[str, list[str]]:
    """{stage: pipeline_tasks files its module imports, transitively}, after loading params.yaml."""
    proc = subprocess.run(
        [sys.executable, "-c", IMPORT_PROBE],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_stage_declares_the_code_it_imports(import_closures):
    stages, variables = _dvc_stages(), _params_variables()
    assert set(stages) == set(STAGES)
    problems = [
        _missing_report(name, missing)
        for name, stage in stages.items()
        if (missing := missing_code_deps(stage, variables, import_closures[name]))
    ]
    assert not problems, "\n".join(problems)


def test_dropping_a_code_dep_the_stage_imports_is_reported(import_closures):
    stages, variables = _dvc_stages(), _params_variables()
    for name, stage in stages.items():
        module_file = f"pipeline_tasks/{STAGES[name].replace('.', '/')}.py"
        assert module_file in import_closures[name]  # the closure starts at the stage's own module
        imported = [
            d for d in stage_paths(stage, variables, "deps") if d in import_closures[name] and d not in FOUNDATION
        ]
        assert module_file in imported, f"{name}: dvc.yaml does not list its own module {module_file}"
        for dep in imported:
            without = copy.deepcopy(stage)
            without["deps"] = [d for d in stage["deps"] if stage_paths({"deps": [d]}, variables, "deps") != [dep]]
            assert dep in missing_code_deps(without, variables, import_closures[name]), (name, dep)


def _clean_env(corpora: Path, home: Path) -> dict[str, str]:
    return {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}/usr/local/bin:/usr/bin:/bin",
        "HOME": str(home),
        "LMPIPE_DATA_MIRROR": str(corpora),
        "DVC_NO_ANALYTICS": "1",
        "DO_NOT_TRACK": "1",
        "GX_ANALYTICS_ENABLED": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }


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
    stages = _dvc_stages()
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
                assert (REPO / dep).exists(), f"{name}: declared code dep {dep} does not exist"
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
        raw["paths"]["champion_metrics_path"] = str(state / "registry" / "production_metrics.json")
        (workspace / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))

        cmd = shlex.split(stage["cmd"])
        assert cmd[:3] == ["python", "-m", "pipeline_tasks"], f"{name}: cmd {stage['cmd']!r}"
        proc = subprocess.run(
            [sys.executable, "-c", RUNNER, *cmd[3:]],
            cwd=workspace,
            capture_output=True,
            text=True,
            timeout=1800,
            env=_clean_env(corpora, tmp_path / "home"),
        )
        assert proc.returncode == 0, f"{name} failed in a clean env:\n{proc.stderr[-4000:]}"
        assert json.loads(proc.stdout.strip().splitlines()[-1]) is not None  # the JSON summary line

        for kind in ("outs", "metrics", "plots"):
            for out in stage_paths(stage, variables, kind):
                assert (workspace / out).exists(), f"{name}: declared {kind[:-1]} {out} was not produced"
                produced[out] = workspace
        missing = missing_code_deps(stage, variables, json.loads((workspace / ".imported.json").read_text()))
        if missing:
            problems.append(_missing_report(name, missing))
    assert not problems, "\n".join(problems)
