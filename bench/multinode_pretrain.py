"""Pretraining throughput by topology: 1 process, P processes on one node, N nodes x P processes.

Real ``pretrain`` runs (the stage itself, real token shards) on copies of one workspace, side by side
in one invocation, each with the same global batch (``tokens_per_step``):

* ``1x1``: in-process; ``1xP``: ``pretrain.procs_per_node: P`` (local ``torchrun --standalone``);
* ``NxP`` with N > 1, ``--nodes-as containers``: ``lmpipe trainjob --backend container``, the Kubeflow
  Trainer SDK's container backend (one task-image container per node; CPU, P = 1; needs Docker
  and ``make images``);
* ``NxP`` with N > 1, ``--nodes-as processes``: N node processes on loopback, each the TrainJob's
  node command under the ``PET_*`` topology Trainer injects. On a GPU box each node gets its own
  ``CUDA_VISIBLE_DEVICES`` slice of P GPUs, so ``1x1 1x8 2x4`` measures 1 -> 8 GPUs and 2 "nodes"
  unchanged (carry a workspace with ``params.yaml`` and ``data/tokens``; no dvc needed).

Per topology: tokens/s (the stage's steady-state ``train/tokens_per_s``), the speed-up over 1x1,
wall seconds of the whole stage (start-up included) and the train-loss difference to 1x1 at the
last step. ``--threads`` sets intra-op threads per process: CPU comparisons give every topology the
same cores (1x1 with 2 threads vs 1x2 / 2x1 with 1 each on a 2-core machine).

    python bench/multinode_pretrain.py                              # default sources, 1x1 1x2 2x1 (containers)
    python bench/multinode_pretrain.py --workspace WS --topologies 1x1 1x2 2x1
    python bench/multinode_pretrain.py --workspace WS --device cuda --nodes-as processes --topologies 1x1 1x8 2x4

Prints a table, writes ``bench/results/multinode_pretrain_<device>.json``.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _topology(text: str) -> tuple[int, int]:
    nodes, procs = text.lower().split("x")
    return int(nodes), int(procs)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepare(source: Path, dst: Path, overrides: dict, nodes: int, procs: int, threads: int) -> Path:
    raw = yaml.safe_load((source / "params.yaml").read_text())
    for dotted, value in overrides.items():
        section, key = dotted.split(".", 1)
        raw[section][key] = value
    raw["pretrain"].update(nodes=nodes, procs_per_node=procs, num_threads=threads)
    dst.mkdir(parents=True)
    (dst / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    tokens = raw["paths"]["tokens_dir"]
    shutil.copytree(source / tokens, dst / tokens)
    return dst


def docker_answers() -> bool:
    docker = shutil.which("docker")
    return bool(docker) and subprocess.run([docker, "info"], capture_output=True, timeout=60).returncode == 0


def default_workspace(root: Path) -> Path:
    """No --workspace: the default sources through ingest -> tokenize (BPE 512, ~1 min) in ``root``."""
    workspace = root / "source"
    workspace.mkdir(parents=True)
    shutil.copy2(ROOT / "params.yaml", workspace / "params.yaml")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for stage in ("ingest_wiki", "ingest_news", "prepare", "tokenize"):
        subprocess.run(
            [sys.executable, "-m", "pipeline_tasks", stage, "-S", "tokenize.vocab_size=512"],
            cwd=workspace,
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return workspace


def run_topology(workspace: Path, nodes: int, procs: int, nodes_as: str, home: Path) -> float:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(home),
    }
    started = time.perf_counter()
    if nodes == 1:
        commands = [([sys.executable, "-m", "pipeline_tasks", "pretrain"], env)]
    elif nodes_as == "containers":
        commands = [([sys.executable, "-m", "pipeline_tasks", "trainjob", "--backend", "container"], env)]
    else:
        from pipeline_tasks.config import load_params
        from pipeline_tasks.orchestration.trainjob import build_trainjob, orchestration_of

        params = load_params(workspace / "params.yaml")
        body = build_trainjob(params, orchestration_of(params), workspace=str(workspace))
        command = body["spec"]["trainer"]["command"][2:]  # without tini
        port = str(_free_port())
        commands = []
        for rank in range(nodes):
            node_env = {
                **env,
                "PET_NNODES": str(nodes),
                "PET_NODE_RANK": str(rank),
                "PET_MASTER_ADDR": "127.0.0.1",
                "PET_MASTER_PORT": port,
            }
            if os.environ.get("BENCH_DEVICE") == "cuda":
                node_env["CUDA_VISIBLE_DEVICES"] = ",".join(str(rank * procs + i) for i in range(procs))
            commands.append((command, node_env))
    procs_running = [
        subprocess.Popen(cmd, cwd=workspace, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for cmd, e in commands
    ]
    outputs = [p.communicate()[0] for p in procs_running]
    for p, out in zip(procs_running, outputs):
        if p.returncode:
            raise SystemExit(f"{workspace.name} failed ({p.returncode}):\n{out[-4000:]}")
    return time.perf_counter() - started


def last_loss(workspace: Path) -> float:
    with (workspace / "reports/pretrain/loss.csv").open() as f:
        return float(list(csv.DictReader(f))[-1]["train_loss"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--workspace",
        type=Path,
        default=None,
        help="folder with params.yaml and the token shards (default: made from the default sources)",
    )
    parser.add_argument("--topologies", nargs="+", default=["1x1", "1x2", "2x1"])
    parser.add_argument("--nodes-as", choices=("containers", "processes"), default="containers")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="per process (0: cores / processes on the machine)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--tokens-per-step", type=int, default=2048)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more params overrides")
    args = parser.parse_args()
    os.environ["BENCH_DEVICE"] = args.device
    overrides = {
        "pretrain.max_steps": args.steps,
        "pretrain.micro_batch_size": args.micro_batch,
        "pretrain.tokens_per_step": args.tokens_per_step,
        "pretrain.device": args.device,
        "pretrain.dtype": "float32" if args.device == "cpu" else "auto",
        "pretrain.eval_interval": args.steps,
        "pretrain.checkpoint_interval": args.steps,
        "pretrain.log_interval": max(args.steps // 4, 1),
        **{k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)},
    }
    cores = os.cpu_count() or 1
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-multinode-") as tmp:
        source = args.workspace or default_workspace(Path(tmp))
        for text in args.topologies:
            nodes, procs = _topology(text)
            if nodes > 1 and args.nodes_as == "containers" and not docker_answers():
                print(f"{text}: skipped, no Docker engine answers (`docker info`); --nodes-as processes needs none")
                continue
            threads = args.threads or max(cores // (nodes * procs), 1)
            workspace = prepare(source, Path(tmp) / text, overrides, nodes, procs, threads)
            wall = run_topology(workspace, nodes, procs, args.nodes_as, Path(tmp) / "home")
            metrics = json.loads((workspace / "reports/pretrain/metrics.json").read_text())
            rows.append(
                {
                    "topology": f"{nodes} node(s) x {procs}" + (f" ({args.nodes_as})" if nodes > 1 else ""),
                    "world_size": metrics["world_size"],
                    "threads_per_process": threads,
                    "tokens_per_s": metrics["train/tokens_per_s"],
                    "stage_wall_s": round(wall, 1),
                    "last_train_loss": last_loss(workspace),
                }
            )
    base = rows[0]
    print(
        f"{'topology':34} {'world':>5} {'thr':>3} {'tokens/s':>10} {'speed-up':>8} {'wall s':>7} {'|dloss| last':>12}"
    )
    for row in rows:
        row["speedup"] = round(row["tokens_per_s"] / base["tokens_per_s"], 3)
        row["last_loss_diff"] = abs(row["last_train_loss"] - base["last_train_loss"])
        print(
            f"{row['topology']:34} {row['world_size']:>5} {row['threads_per_process']:>3} "
            f"{row['tokens_per_s']:>10,.0f} {row['speedup']:>8.2f} {row['stage_wall_s']:>7.1f} "
            f"{row['last_loss_diff']:>12.2e}"
        )
    out = ROOT / "bench" / "results" / f"multinode_pretrain_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "machine": {"cpus": cores, "platform": platform.platform()},
                "overrides": overrides,
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
