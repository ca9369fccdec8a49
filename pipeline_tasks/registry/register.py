"""Stage ``register``: log the run to MLflow and register a challenger, only if its gates passed.

Inputs: ``evaluate_dir/{gates.json, metrics.json, model_card.md, model_card.html}``, the bundle
(``bundle_dir``, verified), ``validate_dir/summary.json``, ``monitor_dir/reference_stats.json``
(drift reference statistics, when present) and ``dvc.lock`` (data lineage, when present).

What it does (registry: :mod:`pipeline_tasks.registry.store`; embedded SQLite under
``paths.registry_dir`` unless ``MLFLOW_TRACKING_URI`` is set):

1. always logs an MLflow run in experiment ``register.experiment``: params (the model, training,
   export and gate settings), the evaluate metrics, the bundle manifest (the whole bundle for a
   rejected model; a registered one carries it in the model), model card, gates, validation
   summary and drift reference statistics as artifacts, and lineage tags (git sha, ``dvc.lock``
   output hashes, gate verdicts, bundle manifest sha256);
2. gates passed: logs the torch-free pyfunc model (:class:`pipeline_tasks.registry.store.BundleModel`),
   registers a new version of ``register.model_name`` with the same lineage tags plus the gate
   metrics (``lmpipe.metrics``, read back by ``promote`` for the champion/challenger re-check) and
   points the ``challenger`` alias at it. The same bundle (same manifest sha256) is never
   registered twice: a re-run re-uses its version;
3. gates failed: tags the run ``lmpipe.status=rejected`` and registers nothing. This is a decision,
   not an error: exit 0 with a ``REJECTED`` log line.

Output: ``register_reports_dir/registration.json`` (``status``: ``registered`` /
``already_registered`` / ``rejected``, run id, version, gates) and ``manifest.json``. The registry
itself (``registry_dir``) is state that must survive re-runs, so it is not a DVC output.

Params: section ``register`` (:class:`pipeline_tasks.registry.params.RegisterParams`). Command:
``lmpipe register``. Promotion to production is a separate, deliberate step: ``lmpipe promote``
(:mod:`pipeline_tasks.registry.promote`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import mlflow
import yaml

from pipeline_tasks.artifacts import atomic_write_json, git_sha, read_json, sha256_bytes, sha256_file, write_manifest
from pipeline_tasks.config import to_plain
from pipeline_tasks.errors import DataError
from pipeline_tasks.registry import store
from pipeline_tasks.registry.params import RegisterParams
from pipeline_tasks.ship.bundle import verify_bundle

logger = logging.getLogger(__name__)

STAGE = "register"
TAG_PREFIX = "lmpipe."
PARAM_SECTIONS = ("model", "tokenize", "pretrain", "finetune", "export", "evaluate", "register")


# ---------------------------------------------------------------------------------------------
# pure helpers


def dvc_lock_hashes(lock: dict[str, Any] | None) -> dict[str, str]:
    """``{path: md5}`` of every stage output recorded in a parsed ``dvc.lock``."""
    hashes: dict[str, str] = {}
    for stage in ((lock or {}).get("stages") or {}).values():
        for out in stage.get("outs") or []:
            if isinstance(out, dict) and out.get("path") and (out.get("md5") or out.get("hash")):
                hashes[str(out["path"])] = str(out.get("md5") or out.get("hash"))
    return dict(sorted(hashes.items()))


def gate_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The flat numeric metrics at the top level of ``metrics.json`` (the gate inputs)."""
    return {
        k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v
    }


def lineage_tags(
    gates: dict[str, Any], metrics: dict[str, Any], bundle_sha: str, data_hashes: dict[str, str], sha: str | None
) -> dict[str, str]:
    """Tags put on both the run and the model version."""
    tags = {
        f"{TAG_PREFIX}git_sha": sha or "unknown",
        f"{TAG_PREFIX}bundle_manifest_sha256": bundle_sha,
        f"{TAG_PREFIX}gates_passed": "true" if gates.get("passed") else "false",
        f"{TAG_PREFIX}gates_summary": str(gates.get("summary", ""))[:4000],
        f"{TAG_PREFIX}metrics": json.dumps(gate_metrics(metrics), sort_keys=True),
        f"{TAG_PREFIX}data_hashes": _bounded_json(data_hashes),
    }
    for name, gate in (gates.get("gates") or {}).items():
        verdict = "skipped" if gate.get("skipped") else "pass" if gate.get("passed") else "fail"
        tags[f"{TAG_PREFIX}gate.{name}"] = verdict
    return tags


def _bounded_json(obj: dict[str, str], limit: int = 5000) -> str:
    """JSON that fits an MLflow tag; a larger mapping is summarised by its hash (the full mapping is
    logged as the run artifact ``lineage/data_hashes.json``)."""
    text = json.dumps(obj, sort_keys=True)
    if len(text) <= limit:
        return text
    return json.dumps(
        {"sha256": sha256_bytes(text.encode()), "entries": len(obj), "artifact": "lineage/data_hashes.json"}
    )


def flat_params(params, sections=PARAM_SECTIONS) -> dict[str, str]:
    """Dotted ``section.key`` params for ``mlflow.log_params`` (values cut to MLflow's limit)."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, sub in value.items():
                walk(f"{prefix}.{key}", sub)
        else:
            flat[prefix] = json.dumps(value, default=str)[:6000] if isinstance(value, (list, tuple)) else str(value)

    plain = params.to_dict()
    for section in sections:
        if section in plain:
            walk(section, to_plain(plain[section]))
    flat["seed"] = str(plain.get("seed"))
    return flat


# ---------------------------------------------------------------------------------------------
# the stage


def _read_required(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"{path} not found: {what}; run `lmpipe evaluate` first")
    try:
        data = read_json(path)
    except ValueError as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); re-run `lmpipe evaluate`") from exc
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object")
    return data


def _read_dvc_lock(path: Path = Path("dvc.lock")) -> dict[str, str]:
    if not path.is_file():
        return {}
    try:
        return dvc_lock_hashes(yaml.safe_load(path.read_text(encoding="utf-8")))
    except yaml.YAMLError as exc:
        logger.warning("%s is not valid YAML (%s); lineage has no data hashes", path, exc)
        return {}


def _find_version(client, name: str, bundle_sha: str):
    """An existing version of ``name`` registered from the same bundle, or None."""
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except mlflow.exceptions.MlflowException:
        return None
    for version in versions:
        if (version.tags or {}).get(f"{TAG_PREFIX}bundle_manifest_sha256") == bundle_sha:
            return version
    return None


def _log_artifacts(paths, data_hashes: dict[str, str], tags: dict[str, str], bundle_sha: str) -> None:
    """Lineage, the evaluate reports, validation summary, drift reference and bundle manifest of the active run."""
    evaluate_dir = Path(paths.evaluate_dir)
    mlflow.log_dict(
        {
            "dvc_lock_outputs": data_hashes,
            "git_sha": tags[TAG_PREFIX + "git_sha"],
            "bundle_manifest_sha256": bundle_sha,
        },
        "lineage/data_hashes.json",
    )
    for name in ("gates.json", "metrics.json", "model_card.md", "model_card.html"):
        if (evaluate_dir / name).is_file():
            mlflow.log_artifact(str(evaluate_dir / name), artifact_path="evaluate")
    for path, folder in (
        (Path(paths.validate_dir) / "summary.json", "validate"),
        (Path(paths.monitor_dir) / "reference_stats.json", "monitor"),
    ):
        if path.is_file():
            mlflow.log_artifact(str(path), artifact_path=folder)
        else:
            logger.warning("%s not found; not logged with the run", path)
    mlflow.log_artifact(str(Path(paths.bundle_dir) / "manifest.json"), artifact_path="bundle")


def _register_challenger(
    client, rp: RegisterParams, bundle_dir: Path, bundle_sha: str, tags: dict[str, str], run_id: str
) -> tuple[str, str]:
    """``(status, version)``: a new version of the bundle (or the one already registered from it) as challenger."""
    version = _find_version(client, rp.model_name, bundle_sha)
    status = "already_registered"
    if version is None:
        info = store.log_bundle_model(bundle_dir)
        version = mlflow.register_model(info.model_uri, rp.model_name, tags={**tags, f"{TAG_PREFIX}run_id": run_id})
        status = "registered"
    if store.alias_version(client, rp.model_name, rp.production_alias) != str(version.version):
        client.set_registered_model_alias(rp.model_name, rp.challenger_alias, version.version)
    return status, str(version.version)


def run(params, **_options) -> dict[str, Any]:
    rp: RegisterParams = params.register
    paths = params.paths
    evaluate_dir, bundle_dir = Path(paths.evaluate_dir), Path(paths.bundle_dir)
    gates = _read_required(evaluate_dir / "gates.json", "the gate verdict")
    metrics = _read_required(evaluate_dir / "metrics.json", "the evaluation metrics")
    verify_bundle(bundle_dir)
    bundle_sha = sha256_file(bundle_dir / "manifest.json")
    data_hashes = _read_dvc_lock()
    tags = lineage_tags(gates, metrics, bundle_sha, data_hashes, git_sha())
    passed = bool(gates.get("passed"))

    client, uri = store.connect(paths.registry_dir)
    experiment_id = store.ensure_experiment(client, rp.experiment, paths.registry_dir, uri)
    result: dict[str, Any] = {
        "model_name": rp.model_name,
        "tracking_uri": store.display_uri(uri),
        "gates_passed": passed,
        "gates_summary": gates.get("summary"),
        "bundle_manifest_sha256": bundle_sha,
    }
    with mlflow.start_run(
        experiment_id=experiment_id,
        run_name=f"{rp.model_name}-{tags[TAG_PREFIX + 'git_sha'][:8]}",
        tags={**tags, f"{TAG_PREFIX}status": "pending"},
    ) as active:
        run_id = active.info.run_id
        mlflow.log_params(flat_params(params))
        mlflow.log_metrics(gate_metrics(metrics))
        _log_artifacts(paths, data_hashes, tags, bundle_sha)
        if not passed:
            # the rejected model itself is kept with its run for forensics; a registered one
            # lives in the model's artifacts (logging it twice would double the storage)
            mlflow.log_artifacts(str(bundle_dir), artifact_path="bundle")
            mlflow.set_tag(f"{TAG_PREFIX}status", "rejected")
            result.update(status="rejected", run_id=run_id, version=None)
        else:
            status, version = _register_challenger(client, rp, bundle_dir, bundle_sha, tags, run_id)
            mlflow.set_tag(f"{TAG_PREFIX}status", status)
            mlflow.set_tag(f"{TAG_PREFIX}model_version", version)
            result.update(
                status=status,
                run_id=run_id,
                version=version,
                model_uri=f"models:/{rp.model_name}@{rp.challenger_alias}",
            )
    out_dir = Path(paths.register_reports_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "registration.json", {**result, "gates": gates.get("gates", {})})
    write_manifest(
        out_dir,
        STAGE,
        rp,
        inputs={"bundle_manifest": bundle_sha, "gates.json": sha256_file(evaluate_dir / "gates.json")},
    )
    if passed:
        logger.info(
            "REGISTERED %s version %s as @%s (%s)",
            rp.model_name,
            result["version"],
            rp.challenger_alias,
            result["status"],
        )
    else:
        logger.warning("REJECTED: %s; nothing registered (run %s keeps the record)", gates.get("summary"), run_id)
    return {k: result[k] for k in ("status", "model_name", "version", "run_id", "gates_passed")}
