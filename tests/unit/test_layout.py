"""The package layout: one import direction between stage families, no cycle, light params.

Rule (docs/ARCHITECTURE.md): core <- ingest <- dataset <- train <- ship <- {monitor, registry} <- serve;
``orchestration`` imports only core; ``dags/`` imports only ``pipeline_tasks.orchestration.settings``
and ``pipeline_tasks.stages``. Every import counts, function-local ones included. The CLI reaches
the families only by name (``importlib``, :mod:`pipeline_tasks.stages`), which is not an edge.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from pipeline_tasks.stages import STAGES, stage_command

REPO = Path(__file__).resolve().parents[2]
PACKAGE = "pipeline_tasks"

RANK = {"core": 0, "ingest": 1, "dataset": 2, "train": 3, "ship": 4, "monitor": 5, "registry": 5, "serve": 6}
ONLY_CORE = {"orchestration"}
FAMILIES = (set(RANK) | ONLY_CORE) - {"core"}
DAG_IMPORTS = {"pipeline_tasks.orchestration.settings", "pipeline_tasks.stages"}
HEAVY = (
    "torch",
    "pandas",
    "pyarrow",
    "numpy",
    "great_expectations",
    "onnx",
    "onnxruntime",
    "mlflow",
    "evidently",
    "tokenizers",
    "sklearn",
)


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def family(module: str) -> str:
    """``pipeline_tasks.ship.bundle`` (or the package ``pipeline_tasks.ship``) -> ``ship``; else ``core``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in FAMILIES else "core"


def imported_modules(tree: ast.AST, known: set[str]) -> set[str]:
    """Package modules an AST imports (``from pkg.fam import mod`` resolves to the module)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            names = [n if n in known else node.module for n in names]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] == PACKAGE)
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    files = sorted((root / PACKAGE).rglob("*.py"))
    known = {module_name(f, root) for f in files}
    return {module_name(f, root): imported_modules(ast.parse(f.read_text(encoding="utf-8")), known) for f in files}


def backward_edges(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for source, targets in sorted(graph.items()):
        src = family(source)
        for target in sorted(targets):
            dst = family(target)
            if dst == src:
                continue
            if src in ONLY_CORE or dst in ONLY_CORE:
                allowed = dst == "core"
            else:
                allowed = RANK[dst] < RANK[src]
            if not allowed:
                problems.append(f"{source} ({src}) imports {target} ({dst})")
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_every_folder_is_a_family_of_the_rule():
    folders = {p.parent.name for p in (REPO / PACKAGE).glob("*/__init__.py")}
    assert folders == FAMILIES, f"folders without a place in the import rule: {folders ^ FAMILIES}"


def test_imports_go_one_way_between_families():
    assert backward_edges(import_graph(REPO)) == []


def test_package_has_no_import_cycle():
    assert cycles(import_graph(REPO)) == []


def test_rule_catches_an_added_backward_import(tmp_path):
    """A dataset module importing the serving bundle (ship) is reported, and so is the cycle it closes."""
    for rel, body in {
        "pipeline_tasks/__init__.py": "",
        "pipeline_tasks/errors.py": "",
        "pipeline_tasks/dataset/__init__.py": "",
        "pipeline_tasks/dataset/prepare.py": "from pipeline_tasks.errors import DataError\n",
        "pipeline_tasks/ship/__init__.py": "",
        "pipeline_tasks/ship/bundle.py": "from pipeline_tasks.dataset import prepare\n",
        "pipeline_tasks/train/__init__.py": "",
        "pipeline_tasks/train/model.py": "",
        "pipeline_tasks/orchestration/__init__.py": "",
        "pipeline_tasks/orchestration/settings.py": "def f():\n    from pipeline_tasks.train import model\n",
    }.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(body)
    assert backward_edges(import_graph(tmp_path)) == [
        "pipeline_tasks.orchestration.settings (orchestration) imports pipeline_tasks.train.model (train)"
    ]
    assert cycles(import_graph(tmp_path)) == []

    (tmp_path / "pipeline_tasks/dataset/prepare.py").write_text(
        textwrap.dedent("""\
        def shortcut():
            from pipeline_tasks.ship.bundle import load_bundle
        """)
    )
    graph = import_graph(tmp_path)
    assert "pipeline_tasks.dataset.prepare (dataset) imports pipeline_tasks.ship.bundle (ship)" in backward_edges(graph)
    assert cycles(graph) == [
        ["pipeline_tasks.dataset.prepare", "pipeline_tasks.ship.bundle", "pipeline_tasks.dataset.prepare"]
    ]


def test_dag_files_import_only_the_settings_and_the_stage_list():
    for path in sorted((REPO / "dags").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        ours = {m for m in imported_modules(tree, set()) if m.startswith(PACKAGE)}
        assert ours <= DAG_IMPORTS, f"{path.name} imports {sorted(ours - DAG_IMPORTS)}"


def test_loading_params_imports_no_ml_library():
    code = (
        "import sys, pipeline_tasks.config as c; c.load_params('params.yaml'); "
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stderr


@pytest.mark.parametrize("params_file", ["params.yaml", "params.gpu.yaml"])
def test_params_profiles_load(params_file):
    from pipeline_tasks.config import load_params

    assert load_params(REPO / params_file).orchestration.runner in ("local", "docker", "kubernetes")


def test_stage_list_is_the_dvc_stage_graph_in_order():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    assert list(dvc) == list(STAGES)
    assert {name: stage["cmd"].split() for name, stage in dvc.items()} == {n: stage_command(n) for n in STAGES}


def test_each_stage_module_carries_the_stage_name():
    for name, module in STAGES.items():
        assert module.split(".")[-1] == name
        assert (REPO / PACKAGE / (module.replace(".", "/") + ".py")).is_file()
