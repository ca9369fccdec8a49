"""The node driver that every Airflow / Kubeflow node runs inside the task environment.

``python -m pipeline_tasks.orchestration COMMAND`` runs inside the task environment
(the task image, or ``.venv`` for the local runner) and never imports airflow:

* ``init``: create the run's workspace ``$LMPIPE_WORKSPACE``: a copy of the project (git's
  tracked + untracked-not-ignored files of a checkout, or the snapshot baked into the image) with
  ``.dvc/config.local`` pointing at the shared DVC cache (``core.no_scm``: the copy is no git
  repo), shared state (the model registry) redirected to ``<data root>/state`` and the run's
  params overrides (``$LMPIPE_OVERRIDES_JSON``) written into the copy's ``params.yaml``, which is
  what DVC tracks (the same as ``dvc exp run -S``). Re-running ``init`` on an existing workspace
  keeps it (a retried run keeps finished outputs and training checkpoints).
* ``stage -- python -m pipeline_tasks STAGE``: the stage's ``dvc.yaml`` command, run through
  ``dvc repro --single-item STAGE`` (``--with-upstream``: ``dvc repro STAGE``) in the workspace,
  so an up-to-date stage is skipped or restored from the shared cache. The command must equal the
  stage's ``cmd`` in the workspace's ``dvc.yaml``: a DAG built from another revision fails loudly.
* ``exec -- COMMAND...``: another ``lmpipe`` command (``promote``, ``rollback``) in the workspace.
* ``lineage``: ``lineage.json`` in the workspace (git sha, dirty flag, ``dvc.lock`` sha256 and the
  output hashes of every stage, params sha256); ``--publish`` also makes this run's ``dvc.lock``
  the reference (``<data root>/state/references/<dag id>.dvc.lock``) that ``init
  --reference-lock`` starts later workspaces from (the drift monitor's training reference).

Each command prints one JSON summary as its last stdout line (the XCom of the Airflow node;
``--xcom-file`` also writes it where the KubernetesPodOperator sidecar reads it). Exit status is
the stage's (1 error, 2 config, 3 validation failed).

Its settings (section ``orchestration``) and the helpers shared with the DAGs are in
:mod:`pipeline_tasks.orchestration.settings`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from pipeline_tasks.artifacts import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    read_json,
    sha256_bytes,
    sha256_file,
)
from pipeline_tasks.cli import configure_logging, parse_overrides
from pipeline_tasks.config import apply_override, load_yaml, parse_params
from pipeline_tasks.orchestration.settings import (
    COPY_EXCLUDES,
    COPY_EXCLUDES_ANYWHERE,
    MAX_INLINE_METRICS_BYTES,
    META_DIR,
    dvc_cmd_argv,
    load_orchestration_params,
    parse_summary,
    read_dvc_stages,
    stage_paths,
)

logger = logging.getLogger(__name__)
DVC_STAGE_EXIT = re.compile(r"failed to run: .*, exited with (-?\d+)")


def _git(source: Path, *args: str) -> str | None:
    if not (source / ".git").exists() or shutil.which("git") is None:
        return None
    proc = subprocess.run(["git", *args], cwd=source, capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 else None


def _source_files(source: Path) -> list[str]:
    listed = _git(source, "ls-files", "-co", "--exclude-standard", "-z")
    if listed is not None:
        return sorted(f for f in listed.split("\0") if f and (source / f).is_file())
    files = []
    for path in sorted(source.rglob("*")):
        rel = path.relative_to(source).as_posix()
        if (
            path.is_file()
            and ".egg-info/" not in rel
            and not any(rel == ex or rel.startswith(ex + "/") for ex in COPY_EXCLUDES)
            and not any(f"/{name}/" in f"/{rel}" for name in COPY_EXCLUDES_ANYWHERE)
        ):
            files.append(rel)
    return files


def init_workspace(
    workspace: Path,
    source: Path,
    data_root: Path,
    overrides: Mapping[str, Any],
    state_overrides: Mapping[str, str],
    dvc_remote: str = "",
    reference_lock: Path | None = None,
) -> dict[str, Any]:
    """Create (or reuse) a run workspace; returns its source record.

    ``reference_lock``: a ``dvc.lock`` published by another DAG's run (the last accepted
    retraining); its outputs are checked out of the shared cache into the new workspace, so a stage
    can run against exactly that run's data and model without re-running anything upstream.
    """
    record_path = workspace / META_DIR / "source.json"
    if record_path.is_file():
        logger.info("workspace %s exists: reusing it (outputs and checkpoints kept)", workspace)
        return {**read_json(record_path), "reused": True}
    files = _source_files(source)
    if "dvc.yaml" not in files or "params.yaml" not in files:
        raise FileNotFoundError(f"{source}: no dvc.yaml / params.yaml: set LMPIPE_SOURCE to the project root")
    staging = workspace.with_name(f".{workspace.name}.init")
    shutil.rmtree(staging, ignore_errors=True)
    tree_sha256 = _copy_tree(source, staging, files)
    _write_dvc_config(staging, data_root / "dvc-cache", dvc_remote)
    applied = _write_run_params(staging, data_root, state_overrides, overrides)
    record = {
        "workspace": str(workspace),
        "source": str(source),
        "files": len(files),
        "tree_sha256": tree_sha256,
        "overrides": applied,
        **_source_revision(source),
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    if reference_lock is not None:
        record["reference_lock"] = _checkout_reference(staging, reference_lock)
    atomic_write_json(staging / META_DIR / "source.json", record)
    workspace.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, workspace)  # a half-copied workspace is never visible
    logger.info(
        "workspace %s: %d files from %s (git %s%s)",
        workspace,
        len(files),
        source,
        record["git_sha"] or "?",
        ", dirty" if record["git_dirty"] else "",
    )
    return {**record, "reused": False}


def _copy_tree(source: Path, staging: Path, files: list[str]) -> str:
    """Copy ``files`` from ``source`` into ``staging``; returns the sha256 of the copied tree."""
    tree = hashlib.sha256()
    for rel in files:
        target = staging / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / rel, target)
        tree.update(f"{rel}\0{sha256_file(target)}\n".encode())
    return tree.hexdigest()


def _write_dvc_config(staging: Path, cache_dir: Path, dvc_remote: str) -> None:
    # The copy is no git repo; all runs share one content-addressed cache (and its run cache).
    cache_dir.mkdir(parents=True, exist_ok=True)
    local_config = ["[core]", "    no_scm = true", "    analytics = false", "[cache]", f"    dir = {cache_dir}"]
    if dvc_remote:
        name = dvc_remote
        if "/" in dvc_remote or ":" in dvc_remote:  # a URL or path, not the name of a configured remote
            name = "lmpipe"
            local_config += [f"['remote \"{name}\"']", f"    url = {dvc_remote}"]
        local_config[1:1] = [f"    remote = {name}"]
    atomic_write_text(staging / ".dvc" / "config.local", "\n".join(local_config) + "\n")


def _write_run_params(
    staging: Path, data_root: Path, state_overrides: Mapping[str, str], overrides: Mapping[str, Any]
) -> dict[str, Any]:
    """Shared state paths, then the run's overrides, into the copy's params.yaml (what DVC tracks)."""
    raw = load_yaml((staging / "params.yaml").read_text(encoding="utf-8"))
    applied: dict[str, Any] = {}
    for key, value in state_overrides.items():
        path = Path(value) if os.path.isabs(value) else data_root / "state" / value
        path.parent.mkdir(parents=True, exist_ok=True)
        applied[key] = str(path)
    applied.update(overrides)
    for key, value in applied.items():
        if key.split(".")[0] in raw or key in ("seed", "project"):
            apply_override(raw, key, value)
        else:
            logger.warning("override %s ignored: params.yaml has no section %r", key, key.split(".")[0])
    parse_params(raw, staging / "params.yaml")  # a bad override fails here, naming the key
    atomic_write_text(staging / "params.yaml", yaml.safe_dump(raw, sort_keys=False, allow_unicode=True))
    return applied


def _source_revision(source: Path) -> dict[str, Any]:
    """``git_sha`` / ``git_dirty`` of a checkout, or the sha baked into the task image."""
    sha = _git(source, "rev-parse", "HEAD")
    status = _git(source, "status", "--porcelain")
    baked = source / META_DIR / "image_source.json"  # written into the task image at build time
    return {
        "git_sha": sha.strip() if sha else (read_json(baked).get("git_sha") if baked.is_file() else None),
        "git_dirty": bool(status.strip()) if status is not None else None,
    }


def _checkout_reference(staging: Path, reference_lock: Path) -> dict[str, Any] | None:
    """Check the outputs of a published ``dvc.lock`` out of the shared cache into ``staging``."""
    if not reference_lock.is_file():
        logger.warning("no reference %s yet: stages will build their upstream themselves", reference_lock)
        return None
    shutil.copy2(reference_lock, staging / "dvc.lock")
    code, _ = _stream([sys.executable, "-m", "dvc", "checkout", "--allow-missing"], staging)
    return {"path": str(reference_lock), "sha256": sha256_file(reference_lock), "checkout_returncode": code}


def _task_env() -> dict[str, str]:
    """The DVC-run cmd ``python`` must be this interpreter (the task env), whatever PATH says."""
    env = dict(os.environ)
    env.pop("LMPIPE_PARAMS", None)  # stages read the workspace's params.yaml: the file DVC tracks
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("DVC_NO_ANALYTICS", "1")
    return env


def _stream(argv: list[str], cwd: Path) -> tuple[int, list[str]]:
    """Run ``argv``, echo its output to stderr (the task log) and keep the lines."""
    logger.info("$ %s", shlex.join(argv))
    proc = subprocess.Popen(
        argv, cwd=cwd, env=_task_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stderr.write(line)
        lines.append(line.rstrip("\n"))
    return proc.wait(), lines


def _small_json(path: Path) -> Any:
    try:
        if path.stat().st_size <= MAX_INLINE_METRICS_BYTES:
            return json.loads(path.read_text(encoding="utf-8"))
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return (
        {k: v for k, v in data.items() if isinstance(v, (str, int, float, bool, type(None)))}
        if isinstance(data, dict)
        else None
    )


def run_stage_node(
    workspace: Path,
    cmd: list[str],
    with_upstream: bool = False,
    force: bool = False,
    direct: bool = False,
    copy_from: Path | None = None,
    upstream_if_missing: bool = False,
) -> tuple[int, dict]:
    """``dvc repro`` the stage whose dvc.yaml cmd is ``cmd``; returns (exit code, summary).

    ``copy_from`` first copies a previous node's workspace (Kubeflow passes the workspace as an
    artifact); ``direct`` runs ``cmd`` itself instead of through DVC (Kubeflow caches steps itself);
    ``upstream_if_missing`` reproduces the upstream stages too when an input is missing.
    """
    if copy_from is not None and not (workspace / "dvc.yaml").is_file():
        shutil.copytree(copy_from, workspace, symlinks=True, dirs_exist_ok=True)
    stages = read_dvc_stages(workspace / "dvc.yaml")
    name = next((n for n, s in stages.items() if dvc_cmd_argv(s) == cmd), None)
    if name is None:
        raise ValueError(
            f"{workspace / 'dvc.yaml'}: no stage has cmd {shlex.join(cmd)!r} "
            f"(stages: {', '.join(stages)}); the DAG was built from another dvc.yaml"
        )
    variables = load_yaml((workspace / "params.yaml").read_text(encoding="utf-8"))
    if upstream_if_missing and not with_upstream:
        missing = [d for d in stage_paths(stages[name], variables, "deps") if not (workspace / d).exists()]
        if missing:
            logger.info("%s: inputs %s missing: dvc repro with upstream", name, missing)
            with_upstream = True
    local_config = workspace / ".dvc" / "config.local"
    remote = local_config.is_file() and "remote =" in local_config.read_text(encoding="utf-8")
    argv = [
        sys.executable,
        "-m",
        "dvc",
        "repro",
        *([] if with_upstream else ["--single-item"]),
        *(["--force"] if force else []),
        *(["--pull"] if remote else []),
        name,
    ]
    started = time.perf_counter()
    code, lines = _stream(cmd if direct else argv, workspace)
    if direct:
        lines.insert(0, f"Running stage '{name}' (direct)")
    if code == 0 and remote and not direct:
        code, _ = _stream(
            [sys.executable, "-m", "dvc", "push", *(["--with-deps"] if with_upstream else []), name], workspace
        )
    ran = any(line.startswith(f"Running stage '{name}'") for line in lines)
    if code != 0 and not direct:
        # dvc exits 255 whatever the stage did: report the stage's own code (2 config, 3 data, ...)
        stage_code = next((int(m.group(1)) for line in reversed(lines) if (m := DVC_STAGE_EXIT.search(line))), None)
        if stage_code:
            logger.error("%s: the stage exited with %d (dvc repro: %d)", name, stage_code, code)
            code = stage_code
    summary = {
        "stage": name,
        "workspace": str(workspace),
        "returncode": code,
        "ran": ran,
        "cached": any(f"'{name}' is cached" in line or f"'{name}' didn't change" in line for line in lines),
        "duration_s": round(time.perf_counter() - started, 2),
        "with_upstream": with_upstream,
        "result": parse_summary("\n".join(lines)) if ran else None,
        "outs": stage_paths(stages[name], variables, "outs"),
        "metrics": {p: _small_json(workspace / p) for p in stage_paths(stages[name], variables, "metrics")},
    }
    if summary["result"] is not None and "output" in summary["result"]:
        summary["result"] = None  # the stage printed no JSON summary line
    return code, summary


def run_exec_node(workspace: Path, cmd: list[str]) -> tuple[int, dict]:
    code, lines = _stream(cmd, workspace)
    result = parse_summary("\n".join(lines))
    return code, {
        "command": shlex.join(cmd),
        "workspace": str(workspace),
        "returncode": code,
        "result": None if "output" in result else result,
        "tail": lines[-5:],
    }


def record_lineage(workspace: Path, dag_id: str, run_id: str, publish_dir: Path | None = None) -> dict[str, Any]:
    """Write ``lineage.json`` (what produced this run's outputs) into the workspace and return it.

    ``publish_dir``: also publish ``<dag_id>.dvc.lock`` + ``<dag_id>.lineage.json`` there (the
    reference that later runs of other DAGs start from, see :func:`init_workspace`).
    """

    lock_path = workspace / "dvc.lock"
    lock = yaml.safe_load(lock_path.read_text(encoding="utf-8")) if lock_path.is_file() else {}
    stages = {}
    for name, entry in ((lock or {}).get("stages") or {}).items():
        stages[name] = {o["path"]: o.get("md5") for o in entry.get("outs") or () if "path" in o}
    source_path = workspace / META_DIR / "source.json"
    lineage = {
        "dag_id": dag_id,
        "run_id": run_id,
        "workspace": str(workspace),
        "source": read_json(source_path) if source_path.is_file() else None,
        "dvc_lock_sha256": sha256_file(lock_path) if lock_path.is_file() else None,
        "params_sha256": sha256_bytes((workspace / "params.yaml").read_bytes()),
        "stages": stages,
        "recorded": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    if publish_dir is not None and lock_path.is_file():
        atomic_write_bytes(publish_dir / f"{dag_id}.dvc.lock", lock_path.read_bytes())
        lineage["published"] = str(publish_dir / f"{dag_id}.dvc.lock")
        atomic_write_json(publish_dir / f"{dag_id}.lineage.json", lineage)
    atomic_write_json(workspace / "lineage.json", lineage)
    return lineage


def _emit(summary: dict[str, Any], xcom_file: str | None) -> None:
    text = json.dumps(summary, sort_keys=True, default=str)
    if xcom_file:
        Path(xcom_file).parent.mkdir(parents=True, exist_ok=True)
        Path(xcom_file).write_text(text, encoding="utf-8")
    sys.stderr.flush()
    print(text, flush=True)  # last stdout line: the node's XCom


def write_kfp_executor_output(executor_input: str, summary: dict[str, Any]) -> None:
    """Declare the step's output artifacts in KFP's executor output file, with the summary's scalars
    as their metadata (shown per artifact in the KFP UI). A cluster's launcher also finds artifacts a
    container wrote without it; ``kfp.local`` does not, so every container step writes it."""
    spec = json.loads(executor_input)
    outputs = spec.get("outputs") or {}
    metadata = {k: v for k, v in summary.items() if isinstance(v, (str, int, float, bool)) and v is not None}
    artifacts = {
        name: {
            "artifacts": [
                {"name": a.get("name", ""), "uri": a["uri"], "metadata": metadata} for a in entry["artifacts"]
            ]
        }
        for name, entry in (outputs.get("artifacts") or {}).items()
    }
    output_file = outputs.get("outputFile")
    if output_file:
        Path(output_file).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(output_file), {"artifacts": artifacts})


def _workspace(args: argparse.Namespace) -> Path:
    value = args.workspace or os.environ.get("LMPIPE_WORKSPACE")
    if not value:
        raise SystemExit("no workspace: pass --workspace or set LMPIPE_WORKSPACE")
    return Path(value).expanduser().resolve()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline_tasks.orchestration", description=__doc__.split("\n")[0])
    parser.add_argument("--workspace", default=None, help="run workspace (default: $LMPIPE_WORKSPACE)")
    parser.add_argument(
        "--xcom-file",
        default=os.environ.get("LMPIPE_XCOM_FILE"),
        help="also write the summary here (/airflow/xcom/return.json on Kubernetes)",
    )
    parser.add_argument(
        "--kfp-executor-input",
        default=None,
        help="KFP's executor input (the {{$}} placeholder): declare the output artifacts when the step succeeds",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init", help="create the run workspace")
    init.add_argument("--source", default=os.environ.get("LMPIPE_SOURCE", "."), help="project root to copy")
    init.add_argument(
        "--data-root",
        default=os.environ.get("LMPIPE_DATA_ROOT"),
        help="holds dvc-cache/ and state/ (default: the workspace's grandparent's parent)",
    )
    init.add_argument(
        "--params", default=None, help="params file with the orchestration section (default: the source's)"
    )
    init.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    init.add_argument(
        "--reference-lock",
        type=Path,
        default=os.environ.get("LMPIPE_REFERENCE_LOCK") or None,
        help="start from the outputs of this published dvc.lock (if it exists)",
    )
    init.add_argument(
        "--overrides-json",
        default=os.environ.get("LMPIPE_OVERRIDES_JSON") or "{}",
        help="JSON object of dotted params keys (default: $LMPIPE_OVERRIDES_JSON)",
    )
    stage = sub.add_parser("stage", help="dvc repro one stage, given its dvc.yaml cmd after --")
    stage.add_argument("--with-upstream", action="store_true", help="dvc repro STAGE (its upstream too)")
    stage.add_argument("--force", action="store_true", default=os.environ.get("LMPIPE_FORCE", "").lower() == "true")
    stage.add_argument(
        "--upstream-if-missing",
        action="store_true",
        help="dvc repro with upstream when an input of the stage is missing",
    )
    stage.add_argument("--direct", action="store_true", help="run the cmd itself, not through dvc repro")
    stage.add_argument("--copy-from", type=Path, default=None, help="start from a copy of this workspace")
    stage.add_argument("cmd", nargs=argparse.REMAINDER)
    run = sub.add_parser("exec", help="run an lmpipe command (given after --) in the workspace")
    run.add_argument("cmd", nargs=argparse.REMAINDER)
    lineage = sub.add_parser("lineage", help="write lineage.json")
    lineage.add_argument("--dag-id", default=os.environ.get("LMPIPE_DAG_ID", ""))
    lineage.add_argument("--run-id", default=os.environ.get("LMPIPE_RUN_ID", ""))
    lineage.add_argument(
        "--publish",
        default=os.environ.get("LMPIPE_PUBLISH", "").lower() == "true",
        action="store_true",
        help="publish dvc.lock as the reference under <data root>/state/references",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if os.environ.get("LMPIPE_SINGLE_STREAM", "").lower() == "true":
        # The engine records a container's stdout and stderr as they arrive from two pipes, so a log
        # line can land after the summary; one pipe keeps the summary last (the DockerOperator's XCom).
        sys.stderr.flush()
        os.dup2(sys.stdout.fileno(), sys.stderr.fileno())
    configure_logging(os.environ.get("LMPIPE_LOG_LEVEL", "INFO"))
    workspace = _workspace(args)
    code = 0
    if args.command == "init":
        source = Path(args.source).expanduser().resolve()
        orch = load_orchestration_params(args.params or source / "params.yaml")
        data_root = Path(args.data_root).expanduser().resolve() if args.data_root else workspace.parents[2]
        overrides = json.loads(args.overrides_json or "{}")
        if not isinstance(overrides, dict):
            raise SystemExit("params overrides (LMPIPE_OVERRIDES_JSON) must be a JSON object of dotted params keys")
        overrides.update(parse_overrides(args.overrides))
        summary = init_workspace(
            workspace, source, data_root, overrides, orch.state_overrides, orch.dvc_remote, args.reference_lock
        )
    elif args.command in ("stage", "exec"):
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        if not cmd:
            raise SystemExit(f"{args.command}: give the command after --")
        if args.command == "stage":
            code, summary = run_stage_node(
                workspace, cmd, args.with_upstream, args.force, args.direct, args.copy_from, args.upstream_if_missing
            )
        else:
            code, summary = run_exec_node(workspace, cmd)
    else:
        data_root = Path(os.environ.get("LMPIPE_DATA_ROOT") or workspace.parents[2])
        summary = record_lineage(
            workspace, args.dag_id, args.run_id, data_root / "state" / "references" if args.publish else None
        )
    _emit(summary, args.xcom_file)
    if args.kfp_executor_input and code == 0:
        write_kfp_executor_output(args.kfp_executor_input, summary)
    return code


if __name__ == "__main__":
    sys.exit(main())
