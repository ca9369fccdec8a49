"""Every dvc.yaml stage of the tiny profile runs in the task image, in order, as a node runs it:
uid 1000, ``--network none``, a read-only root filesystem (scratch on tmpfs), and only the workspace
volume (plus the read-only offline mirror). Outputs and ``dvc.lock`` match the local run of the same
profile (``tiny_repro``): the same hashes for every stage whose outputs are deterministic.

This replaces the subprocess imitation of the container contract; what stays of that one
(tests/stages/test_container_contract.py) is the code-deps check, which a container cannot see."""

from __future__ import annotations

import fnmatch
import json
import re
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.containers.conftest import REPO, docker_run, give_to_node_user, hand_back
from tests.tiny import copy_project, write_tiny_params

pytestmark = [pytest.mark.containers, pytest.mark.slow]

WORKSPACE = "/lmpipe/workspace"
MIRROR = "/lmpipe/mirror"
# DVC hashes whole output folders, and those hold provenance (creation time, interpreter version, git
# sha, mirror path) and wall-clock measurements (seconds, tokens/s, latency) that differ between any
# two runs, local or not. The data and the models must not: every other file is compared, JSON with
# those keys dropped, checkpoints tensor by tensor (torch's zip records the temp file's name).
# The model card is rendered from metrics.json (compared) plus the latencies and the generation time.
PROVENANCE_FILES = (
    "manifest.json",
    "*.sha256",
    "*.html",
    "*.png",
    "events.out.tfevents.*",
    "latency.csv",
    "model_card.md",
)
# ``grid``: the n-gram baseline's per-C val scores come from lbfgs stopped at its tolerance, warm-started
# from the previous C; the last fit of the chain can stop one row apart between two hosts. The chosen
# C, the baseline's test scores and the gain over it are still compared.
VOLATILE_KEY = re.compile(
    r"created|utc|time|seconds|_s$|per_s|latency|throughput|git_sha|python|platform|^file$|run_id"
    r"|manifest_sha256|_uri$|^grid$"
)


def _normalized(value):
    if isinstance(value, dict):
        return {k: _normalized(v) for k, v in value.items() if not VOLATILE_KEY.search(k)}
    if isinstance(value, list):
        return [_normalized(v) for v in value]
    if isinstance(value, float):  # summation order of the BLAS build: the last bits of a distance
        return float(f"{value:.9g}")
    return value


def same_content(a: Path, b: Path) -> bool:
    if a.suffix == ".pt":
        ta, tb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
        return ta.keys() == tb.keys() and all(torch.equal(ta["model"][k], tb["model"][k]) for k in ta["model"])
    if a.suffix == ".json":
        return _normalized(json.loads(a.read_text())) == _normalized(json.loads(b.read_text()))
    return a.read_bytes() == b.read_bytes()


def compare_outputs(local: Path, in_image: Path, outs: list[str]) -> tuple[list[str], list[str]]:
    """(files that differ, files compared) under ``outs`` of two workspaces; provenance files skipped."""
    differing, compared = [], []
    for out in outs:
        root = local / out
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            rel = path.relative_to(local).as_posix()
            if any(fnmatch.fnmatch(path.name, pattern) for pattern in PROVENANCE_FILES):
                continue
            compared.append(rel)
            if not (in_image / rel).is_file() or not same_content(path, in_image / rel):
                differing.append(rel)
    return differing, compared


def test_every_stage_runs_in_the_task_image_like_the_local_run(docker, images, tiny_repro, corpora, tmp_path):
    local_project, _, _ = tiny_repro
    workspace = copy_project(REPO, tmp_path / "workspace")
    write_tiny_params(workspace / "params.yaml", workspace / "params.yaml")
    give_to_node_user(workspace)
    stages = list(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])
    seconds = {}
    for stage in stages:
        started = time.monotonic()
        proc = docker_run(
            docker,
            images["tasks"],
            "dvc",
            "repro",
            "--single-item",
            stage,
            volumes={str(workspace): WORKSPACE, str(corpora): f"{MIRROR}:ro"},
            env={"LMPIPE_DATA_MIRROR": MIRROR},
            workdir=WORKSPACE,
        )
        seconds[stage] = time.monotonic() - started
        assert proc.returncode == 0, f"{stage} failed in the container:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    print("\nstage seconds in the task image:", {s: round(t, 1) for s, t in seconds.items()})

    local = yaml.safe_load((local_project / "dvc.lock").read_text())["stages"]
    in_image = yaml.safe_load((workspace / "dvc.lock").read_text())["stages"]
    assert set(in_image) == set(local) == set(stages)
    for stage in stages:
        assert in_image[stage].get("params") == local[stage].get("params"), stage
        # the code it ran is this tree's (data deps are earlier stages' outputs, compared below)
        code = [d for d in local[stage].get("deps", []) if d["path"].startswith("pipeline_tasks/")]
        assert code == [d for d in in_image[stage].get("deps", []) if d["path"].startswith("pipeline_tasks/")], stage
        outs = [out["path"] for out in local[stage].get("outs", [])]
        assert outs == [out["path"] for out in in_image[stage].get("outs", [])]
        differing, compared = compare_outputs(local_project, workspace, outs)
        assert compared or stage == "register", f"{stage}: nothing compared"
        assert differing == [], f"{stage}: these outputs differ from the local run: {differing}"
    hand_back(docker, images["tasks"], workspace)
