"""A stage stopped part way (SIGTERM from Airflow / Kubernetes, SIGKILL from the OOM killer) leaves
no hidden temporary folder beside its output: SIGTERM unwinds it, and the next start sweeps what a
SIGKILL left behind.

The stage is a real ``python -m pipeline_tasks ingest_wiki`` on a dump written here, large
enough that it is still cleaning pages when the signal arrives: the test waits for the stage's own
"reading" log line, which is written inside its temporary output folder's lifetime.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

PAGE = (
    "<page><title>Article {i}</title><ns>0</ns><id>{i}</id><revision><timestamp>2020-01-02T03:04:05Z"
    "</timestamp><text>'''Article {i}''' is about [[topic {i}|a topic]] and {{{{cite|x}}}} more.\n"
    "{body}</text></revision></page>\n"
)


def write_dump(path: Path, pages: int) -> Path:
    body = "== Section ==\nSome [[linked text]] with ''markup'' and a &lt;ref&gt;note&lt;/ref&gt; to clean. " * 30
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("<mediawiki>\n")
        for i in range(1, pages + 1):
            fh.write(PAGE.format(i=i, body=body))
        fh.write("</mediawiki>\n")
    return path


def write_params(tmp_path: Path, dump: Path, workers: int) -> Path:
    params = tmp_path / f"params-{dump.stem}.yaml"
    section = {"workers": workers, "bz2_decoder": "thread", "sources": [{"name": "big", "path": str(dump)}]}
    paths = {"raw_wiki_dir": str(tmp_path / "raw" / "wiki"), "downloads_dir": str(tmp_path / "downloads")}
    params.write_text(yaml.safe_dump({"paths": paths, "ingest_wiki": section}))
    return params


def start_stage(repo_root: Path, params: Path) -> subprocess.Popen:
    """Start ingest_wiki and return once it is reading the source (its temporary folder exists)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline_tasks", "ingest_wiki", "--params", str(params)],
        cwd=repo_root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a container's processes are
    )
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "big: reading" in line:
            return proc
    proc.wait()
    pytest.fail(f"the stage ended before it read the source: {''.join(seen)[-3000:]}")


def hidden_leftovers(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "raw").iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("target,workers", [("process", 1), ("process group", 2)])
def test_sigterm_removes_the_temporary_output_and_exits_nonzero(repo_root, tmp_path, target, workers):
    params = write_params(tmp_path, write_dump(tmp_path / "big.xml", pages=20_000), workers)
    proc = start_stage(repo_root, params)
    assert [p.name for p in (tmp_path / "raw").iterdir()][0].startswith(".wiki.")  # the stage is mid-way
    if target == "process":
        proc.send_signal(signal.SIGTERM)
    else:  # what `docker stop` / a Kubernetes pod deletion does through tini -g
        os.killpg(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "ingest_wiki stopped by SIGTERM" in stderr and "Traceback" not in stderr
    assert hidden_leftovers(tmp_path) == [] and not (tmp_path / "raw" / "wiki").exists()


def test_next_start_sweeps_the_temporary_output_a_killed_run_left(repo_root, tmp_path):
    big = write_params(tmp_path, write_dump(tmp_path / "big.xml", pages=20_000), workers=1)
    proc = start_stage(repo_root, big)
    proc.kill()  # SIGKILL cannot be handled: the temporary folder stays
    proc.communicate(timeout=120)
    (left,) = hidden_leftovers(tmp_path)
    assert left.startswith(".wiki.") and left.endswith(".tmp")
    # a stale folder is only swept once it is older than a minute: a younger one may belong to a
    # writer that has just created it and not yet locked it
    hour_ago = (tmp_path / "raw" / left).stat().st_mtime - 3600
    os.utime(tmp_path / "raw" / left, (hour_ago, hour_ago))

    small = write_params(tmp_path, write_dump(tmp_path / "small.xml", pages=3), workers=1)
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline_tasks", "ingest_wiki", "--params", str(small)],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"removed {tmp_path / 'raw' / left}" in proc.stderr  # the user is told what went
    assert hidden_leftovers(tmp_path) == [] and (tmp_path / "raw" / "wiki" / "big.parquet").exists()
