"""Benchmark: what running a stage in the task image costs, per stage, against the local runner.

Two clean copies of the project with the tiny profile (tests/tiny.py). Each ``dvc.yaml`` stage runs,
in order, with ``dvc repro --single-item STAGE``: once in the local task env, once in the task image
as a node runs (``docker run --rm``, uid 1000, ``--network none``, read-only root filesystem, the
workspace and the read-only mirror mounted). The stages alternate local / container so both see the
same machine load. Reported per stage: wall seconds local, in the container, the overhead (seconds)
and the ratio; plus the images' sizes. Output: a table on stdout and ``bench/results/container_overhead.json``.

Needs a Docker engine and the images (``make images``).
Run: ``python bench/container_overhead.py [--image lm-pipeline-tasks:0.1.0]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.containers.conftest import docker_run, give_to_node_user, hand_back  # noqa: E402
from tests.tiny import copy_project, write_tiny_params  # noqa: E402

IMAGES = ("lm-pipeline-base:bookworm", "lm-pipeline-tasks:0.1.0", "lm-pipeline-airflow:0.1.0")


def image_sizes(docker: str) -> dict[str, float]:
    sizes = {}
    for image in IMAGES:
        proc = subprocess.run(
            [docker, "image", "inspect", image, "--format", "{{.Size}}"], capture_output=True, text=True
        )
        if proc.returncode == 0:
            sizes[image] = round(int(proc.stdout.strip()) / 1e9, 3)
    return sizes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="lm-pipeline-tasks:0.1.0")
    parser.add_argument("--output", default=str(REPO / "bench/results/container_overhead.json"))
    args = parser.parse_args()
    docker = shutil.which("docker")
    if not docker or subprocess.run([docker, "info"], capture_output=True).returncode != 0:
        # `make bench` runs every benchmark: on a machine without an engine this one has nothing to measure
        print("container_overhead: skipped, no Docker engine answers (README, 'Containers')", file=sys.stderr)
        return 0
    mirror = Path(os.environ.get("LMPIPE_DATA_MIRROR") or REPO.parent / "shared" / "corpora")
    import yaml

    stages = list(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])
    env = {
        **os.environ,
        "LMPIPE_DATA_MIRROR": str(mirror),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    dvc = str(Path(sys.executable).with_name("dvc"))
    rows = []
    with tempfile.TemporaryDirectory(prefix="lmpipe-bench-") as tmp:
        local = copy_project(REPO, Path(tmp) / "local")
        boxed = copy_project(REPO, Path(tmp) / "container")
        for project in (local, boxed):
            write_tiny_params(project / "params.yaml", project / "params.yaml")
        give_to_node_user(boxed)
        for stage in stages:
            t0 = time.perf_counter()
            subprocess.run([dvc, "repro", "--single-item", stage], cwd=local, env=env, check=True, capture_output=True)
            local_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            proc = docker_run(
                docker,
                args.image,
                "dvc",
                "repro",
                "--single-item",
                stage,
                volumes={str(boxed): "/lmpipe/workspace", str(mirror): "/lmpipe/mirror:ro"},
                env={"LMPIPE_DATA_MIRROR": "/lmpipe/mirror"},
                workdir="/lmpipe/workspace",
            )
            container_s = time.perf_counter() - t0
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            rows.append(
                {
                    "stage": stage,
                    "local_s": round(local_s, 2),
                    "container_s": round(container_s, 2),
                    "overhead_s": round(container_s - local_s, 2),
                    "ratio": round(container_s / local_s, 3),
                }
            )
        hand_back(docker, args.image, boxed)
    total_local = sum(r["local_s"] for r in rows)
    total_container = sum(r["container_s"] for r in rows)
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "image": args.image,
        "stages": rows,
        "total": {
            "local_s": round(total_local, 2),
            "container_s": round(total_container, 2),
            "ratio": round(total_container / total_local, 3),
        },
        "image_sizes_gb": image_sizes(docker),
    }
    print(f"{'stage':<12} {'local s':>8} {'container s':>12} {'overhead s':>11} {'ratio':>6}")
    for r in rows:
        print(
            f"{r['stage']:<12} {r['local_s']:>8.2f} {r['container_s']:>12.2f} {r['overhead_s']:>11.2f} {r['ratio']:>6.2f}"
        )
    print(
        f"{'total':<12} {total_local:>8.2f} {total_container:>12.2f} {total_container - total_local:>11.2f} {total_container / total_local:>6.2f}"
    )
    print("image sizes (GB):", result["image_sizes_gb"])
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
