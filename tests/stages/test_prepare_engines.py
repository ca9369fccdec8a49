"""``prepare.engine``: the out-of-core DuckDB engine decides exactly as the in-memory pandas core (and
so does its per-document pass run as Ray tasks, ``executor.kind: ray``), and its memory is bounded by ``prepare.memory_budget_mb``, not by the corpus.

Peak memory is the child process's high-water mark (``ru_maxrss``), measured in a wrapper process
so that no other child of the test run counts. The stated margin: peak RSS <= the interpreter with
the stage's imports + the budget + MARGIN_MB (the budget covers our batches and DuckDB; the margin
covers allocator slack, Parquet writer buffers and the word-hash cache).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _prepare_data import project_params, write_raw
from _synthetic_raw import write_raw_news

from pipeline_tasks.dataset import prepare

REPO = Path(__file__).resolve().parents[2]
OUTPUTS = ("train.parquet", "val.parquet", "test.parquet", "dropped.parquet")
BUDGET_MB = 64
MARGIN_MB = 192

PEAK_OF_CHILD = """
import resource, subprocess, sys
code = subprocess.run(sys.argv[1:]).returncode
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024)
sys.exit(code)
"""


def _outputs(root: Path, engine: str, reports: str = "reports") -> dict[str, bytes]:
    files = {name: (root / engine / "prepared" / name).read_bytes() for name in OUTPUTS}
    files["stats.json"] = (root / engine / reports / "stats.json").read_bytes()
    return files


def test_engines_write_the_same_bytes_on_the_planted_rows(corpora, tmp_path):
    """Every drop reason (missing ids aside), fixed test rows winning, near duplicates across splits."""
    raw = write_raw(corpora, tmp_path)
    for engine in ("pandas", "duckdb"):
        prepare.run(project_params(tmp_path / engine, raw, prepare={"engine": engine}))
    pandas_out = _outputs(tmp_path, "pandas", "reports/prepare")
    duckdb_out = _outputs(tmp_path, "duckdb", "reports/prepare")
    stats = json.loads(pandas_out["stats.json"])
    assert all(stats["dropped"][r] for r in ("empty_text", "duplicate_id", "too_short", "exact_duplicate"))
    assert stats["dropped"]["near_duplicate"] >= 2
    assert pandas_out == duckdb_out


def test_engines_write_the_same_bytes_on_the_default_corpus(mirror_env, tmp_path):
    """The default run's data (real dumps and news): same kept documents, splits, drops and stats."""
    import shutil

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for command in (
        ["ingest_wiki"],
        ["ingest_news"],
        ["prepare", "-S", "prepare.engine=pandas", "-S", "paths.prepared_dir=pandas/prepared"]
        + ["-S", "paths.prepare_reports_dir=pandas/reports"],
        ["prepare", "-S", "prepare.engine=duckdb", "-S", "paths.prepared_dir=duckdb/prepared"]
        + ["-S", "paths.prepare_reports_dir=duckdb/reports"],
        # the per-document pass as Ray tasks on a Ray started for the stage (executor.ray_address null)
        ["prepare", "-S", "executor.kind=ray", "-S", "paths.prepared_dir=ray/prepared"]
        + ["-S", "paths.prepare_reports_dir=ray/reports"],
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "pipeline_tasks", *command],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    pandas_out, duckdb_out = _outputs(tmp_path, "pandas"), _outputs(tmp_path, "duckdb")
    assert json.loads(pandas_out["stats.json"])["docs"]["in"] > 40_000
    assert pandas_out == duckdb_out
    assert _outputs(tmp_path, "ray") == duckdb_out
    assert "starting a local Ray" in proc.stderr and "batches in flight" in proc.stderr, proc.stderr[-3000:]


def _peak_rss_mb(command: list[str], cwd: Path) -> int:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", PEAK_OF_CHILD, *command],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return int(proc.stdout.strip().splitlines()[-1])


def _prepare_command(workspace: Path, engine: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pipeline_tasks",
        "prepare",
        "--params",
        str(REPO / "params.yaml"),
        "-S",
        f"paths.raw_wiki_dir={workspace / 'wiki'}",
        "-S",
        f"paths.raw_news_dir={workspace / 'news'}",
        "-S",
        f"paths.prepared_dir={workspace / engine / 'prepared'}",
        "-S",
        f"paths.prepare_reports_dir={workspace / engine / 'reports'}",
        "-S",
        f"prepare.engine={engine}",
        "-S",
        f"prepare.memory_budget_mb={BUDGET_MB}",
    ]


@pytest.fixture(scope="module")
def text_workspaces(tmp_path_factory) -> dict[int, Path]:
    """Synthetic raw news of ~40 MB and ~200 MB of text (the larger one is 3x the budget + margin)."""
    spaces = {}
    for text_mb in (40, 200):
        workspace = tmp_path_factory.mktemp(f"text{text_mb}")
        (workspace / "wiki").mkdir()
        write_raw_news(workspace / "news", text_mb)
        spaces[text_mb] = workspace
    return spaces


def test_duckdb_engine_peak_memory_is_bounded_by_the_budget_not_by_the_corpus(text_workspaces):
    imports = _peak_rss_mb(
        [sys.executable, "-c", "import pipeline_tasks.cli, pipeline_tasks.dataset.prepare_outofcore"],
        REPO,
    )
    small = _peak_rss_mb(_prepare_command(text_workspaces[40], "duckdb"), text_workspaces[40])
    large = _peak_rss_mb(_prepare_command(text_workspaces[200], "duckdb"), text_workspaces[200])
    report = f"imports {imports} MB, 40 MB of text {small} MB, 200 MB of text {large} MB (budget {BUDGET_MB})"
    print(report)
    assert large <= imports + BUDGET_MB + MARGIN_MB, report
    assert large <= 1.25 * small, report  # 5x the text: flat, not growing with the corpus


def test_pandas_engine_peak_memory_grows_with_the_corpus(text_workspaces):
    """The control: the same measurement sees the in-memory engine grow past the bound above."""
    imports = _peak_rss_mb([sys.executable, "-c", "import pipeline_tasks.cli, pipeline_tasks.dataset.prepare"], REPO)
    large = _peak_rss_mb(_prepare_command(text_workspaces[200], "pandas"), text_workspaces[200])
    assert large > imports + BUDGET_MB + MARGIN_MB, f"imports {imports} MB, pandas on 200 MB of text {large} MB"
    duck = text_workspaces[200] / "duckdb" / "prepared"
    if duck.is_dir():  # the other test ran first: the same decisions on this input too
        for name in OUTPUTS:
            assert (text_workspaces[200] / "pandas" / "prepared" / name).read_bytes() == (duck / name).read_bytes()


def _validate_command(workspace: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pipeline_tasks",
        "validate",
        "--params",
        str(REPO / "params.yaml"),
        "-S",
        f"paths.prepared_dir={workspace / 'duckdb' / 'prepared'}",
        "-S",
        f"paths.validate_dir={workspace / 'duckdb' / 'validate'}",
        "-S",
        f"validate.memory_budget_mb={BUDGET_MB}",
    ]


def test_validate_peak_memory_is_bounded_by_its_budget_not_by_the_corpus(text_workspaces):
    """validate on the prepared splits of 40 and 200 MB of text with a 64 MB budget: chunked
    great-expectations runs and DuckDB for uniqueness, under the same bound as prepare."""
    for workspace in text_workspaces.values():
        if not (workspace / "duckdb" / "prepared" / "train.parquet").is_file():
            _peak_rss_mb(_prepare_command(workspace, "duckdb"), workspace)
    imports = _peak_rss_mb(
        [sys.executable, "-c", "import duckdb, pipeline_tasks.cli, pipeline_tasks.dataset.validate"], REPO
    )
    small = _peak_rss_mb(_validate_command(text_workspaces[40]), text_workspaces[40])
    large = _peak_rss_mb(_validate_command(text_workspaces[200]), text_workspaces[200])
    report = f"imports {imports} MB, validate 40 MB of text {small} MB, 200 MB of text {large} MB (budget {BUDGET_MB})"
    print(report)
    summary = json.loads((text_workspaces[200] / "duckdb" / "validate" / "summary.json").read_text())
    assert summary["success"] and summary["suites"]["train"]["rows"] > 50_000, summary
    assert large <= imports + BUDGET_MB + MARGIN_MB, report
    assert large <= 1.25 * small, report
