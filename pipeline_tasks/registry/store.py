"""MLflow 3 helpers: the tracking / registry connection, the torch-free pyfunc model, registry lookups.

Used by ``register`` (log + register a challenger), ``promote`` / ``rollback`` (aliases) and
``predict --model models:/NAME@alias`` (serving from the registry). Imports mlflow at module
level, so ``predict`` imports this module only for a registry reference.

Where the registry lives:

* embedded default: ``sqlite:///<paths.registry_dir>/mlflow.db`` for runs and the registry, and
  ``<paths.registry_dir>/artifacts`` for artifacts. No server; the schema is created on first use;
* ``MLFLOW_TRACKING_URI`` (and optionally ``MLFLOW_REGISTRY_URI``) switch to a tracking server,
  which then decides where artifacts go (``--artifacts-destination``).

The registered flavour is ``mlflow.pyfunc`` with :class:`BundleModel` ("models from code": MLflow
stores a three-line script that builds the model, no pickle of a Python object). The ONNX bundle
is the model's ``bundle`` artifact and the ``pipeline_tasks`` modules it imports
(:func:`code_modules`, with their family packages) travel as ``code_paths``, so
``mlflow.pyfunc.load_model("models:/NAME@production")`` needs only mlflow, onnxruntime,
tokenizers, numpy and pandas: no torch, no checkout of this repository.
"""

from __future__ import annotations

import ast
import logging
import os
import re
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

import mlflow
import mlflow.pyfunc
import pandas as pd
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

from pipeline_tasks.artifacts import sha256_file
from pipeline_tasks.config import DEFAULT_PARAMS_FILE, PARAMS_FILE_ENV, PathsParams, load_params
from pipeline_tasks.errors import PipelineError
from pipeline_tasks.ship.bundle import BundleError, load_bundle, verify_bundle

logger = logging.getLogger(__name__)

REGISTRY_DB = "mlflow.db"
ARTIFACTS_DIR = "artifacts"
CACHE_DIR = "cache"
MODEL_ARTIFACT = "model"  # name of the logged model inside the run
BUNDLE_ARTIFACT = "bundle"  # key of the ONNX bundle in the pyfunc model's artifacts
PACKAGE = "pipeline_tasks"
CODE_ROOTS = ("pipeline_tasks.registry.store", "pipeline_tasks.ship.bundle")  # the served model imports these
MODEL_CODE = '''"""lm-pipeline pyfunc model (models from code): built by pipeline_tasks.registry.store.BundleModel."""
import mlflow
from pipeline_tasks.registry.store import BundleModel

mlflow.models.set_model(BundleModel())
'''
SERVING_REQUIREMENTS = ("onnxruntime-gpu", "tokenizers", "numpy", "pandas", "mlflow", "onnx")


class RegistryError(PipelineError):
    """The registry cannot be reached, or a model / version / alias is missing or not eligible."""


# ---------------------------------------------------------------------------------------------
# connection


def tracking_uri(registry_dir: str | os.PathLike) -> str:
    """``$MLFLOW_TRACKING_URI`` or the embedded SQLite store under ``registry_dir``."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path(registry_dir).resolve() / REGISTRY_DB}"


def is_embedded(uri: str) -> bool:
    """True for a store on this machine's disk (SQLite / file), where a file lock is meaningful."""
    return uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri


def connect(registry_dir: str | os.PathLike):
    """Point mlflow at the registry and return ``(MlflowClient, tracking uri)``."""
    uri = tracking_uri(registry_dir)
    if is_embedded(uri):
        Path(registry_dir).mkdir(parents=True, exist_ok=True)
    registry_uri = os.environ.get("MLFLOW_REGISTRY_URI") or uri
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per file floods logs
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(registry_uri)
    return MlflowClient(tracking_uri=uri, registry_uri=registry_uri), uri


def ensure_experiment(client, name: str, registry_dir: str | os.PathLike, uri: str) -> str:
    """Experiment id of ``name``; created with a local artifact root for the embedded store."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = (Path(registry_dir).resolve() / ARTIFACTS_DIR).as_uri() if is_embedded(uri) else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException:  # created by a concurrent run in between
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


# ---------------------------------------------------------------------------------------------
# the pyfunc model


class BundleModel(mlflow.pyfunc.PythonModel):
    """Classify news with the ONNX bundle: ``DataFrame{"text"}`` -> label, confidence, p_<label>.

    Runs with onnxruntime + tokenizers through :mod:`pipeline_tasks.ship.bundle`; the serving variant is
    the bundle's default (``model_config={"variant": ...}`` overrides it at log or load time).
    """

    def load_context(self, context) -> None:
        config = dict(context.model_config or {})
        self.bundle = load_bundle(context.artifacts[BUNDLE_ARTIFACT], intra_op_threads=int(config.get("threads", 0)))
        self.variant = config.get("variant") or self.bundle.default_variant

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        texts = _input_texts(model_input)
        probs = self.bundle.predict_proba(texts, self.variant)
        labels = self.bundle.labels
        frame = pd.DataFrame(probs, columns=[f"p_{label}" for label in labels])
        frame.insert(0, "confidence", probs.max(axis=1) if len(texts) else [])
        frame.insert(0, "label", [labels[i] for i in probs.argmax(axis=1)] if len(texts) else [])
        return frame


def _input_texts(model_input) -> list[str]:
    if isinstance(model_input, pd.DataFrame):
        if "text" in model_input.columns:
            values = model_input["text"]
        elif model_input.shape[1] == 1:
            values = model_input.iloc[:, 0]
        else:
            raise ValueError(f"expected a 'text' column, got columns {list(model_input.columns)}")
    elif isinstance(model_input, (list, tuple, pd.Series)):
        values = list(model_input)
    elif isinstance(model_input, dict) and "text" in model_input:
        values = model_input["text"]
    else:
        raise ValueError(f"expected a DataFrame with a 'text' column or a list of strings, got {type(model_input)}")
    texts = ["" if v is None else str(v) for v in values]
    return texts


def code_modules(roots: tuple[str, ...] = CODE_ROOTS) -> list[str]:
    """Files of the ``pipeline_tasks`` modules the served model imports, relative to the package.

    The closure of ``roots`` over imports, with the ``__init__.py`` of every package on the way
    (``["__init__.py", ..., "ship/__init__.py", "ship/bundle.py"]``). Found by parsing the sources
    (function-local imports included), so a new dependency of ``bundle.py`` travels with the model
    without anyone updating a list.
    """
    package_dir = Path(__file__).resolve().parents[1]
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        module = todo.pop()
        path = _module_file(package_dir, module)
        if path is None or path in seen:
            continue
        seen.add(path)
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # importing a module runs its packages first
        for node in ast.walk(ast.parse((package_dir / path).read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == PACKAGE:
                # `from pipeline_tasks.monitor import drift` names a module where others name an attribute
                todo += [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                todo += [alias.name for alias in node.names if alias.name.split(".")[0] == PACKAGE]
    return sorted(seen)


def _module_file(package_dir: Path, module: str) -> str | None:
    """``ship/bundle.py`` or ``ship/__init__.py`` for a dotted name under ``pipeline_tasks``; None if not a module."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    inner = parts[1:]
    candidates = [f"{'/'.join(inner)}.py"] if inner else []
    candidates.append("/".join([*inner, "__init__.py"]))
    return next((c for c in candidates if (package_dir / c).is_file()), None)


def _code_package(tmp: Path) -> Path:
    """A copy of the pipeline_tasks modules the model needs, as an importable package."""
    source = Path(__file__).resolve().parents[1]
    package = tmp / PACKAGE
    for name in code_modules():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / name, package / name)
    return package


def _requirements() -> list[str]:
    reqs = []
    for name in SERVING_REQUIREMENTS:
        try:
            reqs.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return reqs


def log_bundle_model(bundle_dir: str | os.PathLike, example_texts: list[str] | None = None):
    """Log the bundle as a pyfunc model in the active run; returns mlflow's ``ModelInfo``."""
    bundle = load_bundle(bundle_dir)  # verify before anything is logged
    example = pd.DataFrame({"text": example_texts or ["Stocks rally as the central bank holds rates"]})
    with tempfile.TemporaryDirectory(prefix="lmpipe-model-") as tmp:
        tmp_path = Path(tmp)
        code_file = tmp_path / "lm_pipeline_model.py"
        code_file.write_text(MODEL_CODE, encoding="utf-8")
        package = _code_package(tmp_path)
        probs = bundle.predict_proba(example["text"].tolist())
        output = pd.DataFrame(probs, columns=[f"p_{label}" for label in bundle.labels])
        output.insert(0, "confidence", probs.max(axis=1))
        output.insert(0, "label", [bundle.labels[i] for i in probs.argmax(axis=1)])
        return mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT,
            python_model=str(code_file),
            artifacts={BUNDLE_ARTIFACT: str(Path(bundle_dir).resolve())},
            code_paths=[str(package)],
            signature=infer_signature(example, output),
            input_example=example,
            pip_requirements=_requirements(),
            metadata={"bundle_manifest_sha256": _manifest_sha(bundle_dir), "labels": bundle.labels},
        )


def _manifest_sha(bundle_dir: str | os.PathLike) -> str:
    return sha256_file(Path(bundle_dir) / "manifest.json")


# ---------------------------------------------------------------------------------------------
# lookups


def parse_model_uri(reference: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@alias`` -> (NAME, alias, None); ``models:/NAME/3`` -> (NAME, None, "3")."""
    if not reference.startswith("models:/"):
        raise RegistryError(f"{reference!r}: expected models:/NAME@alias or models:/NAME/VERSION")
    body = reference[len("models:/") :].strip("/")
    if "@" in body:
        name, alias = body.rsplit("@", 1)
        if name and alias:
            return name, alias, None
    elif "/" in body:
        name, version = body.rsplit("/", 1)
        if name and version.isdigit():
            return name, None, version
    raise RegistryError(f"{reference!r}: expected models:/NAME@alias or models:/NAME/VERSION")


def get_version(client, name: str, alias: str | None = None, version: str | int | None = None):
    """The ModelVersion for an alias or a number; :class:`RegistryError` when it does not exist."""
    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, str(version))
    except mlflow.exceptions.MlflowException as exc:
        what = f"alias @{alias}" if alias is not None else f"version {version}"
        raise RegistryError(
            f"model {name!r} has no {what} in the registry at {mlflow.get_tracking_uri()} ({exc.error_code})"
        ) from exc


def alias_version(client, name: str, alias: str) -> str | None:
    """The version number an alias points at, or None when the alias (or the model) is not set."""
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except mlflow.exceptions.MlflowException:
        return None


def default_registry_dir(params_file: str | os.PathLike | None = None) -> Path:
    """``paths.registry_dir`` of the params file (``--params`` / ``$LMPIPE_PARAMS`` / ``./params.yaml``)
    when there is one, else the default ``registry``."""
    candidate = Path(params_file or os.environ.get(PARAMS_FILE_ENV) or DEFAULT_PARAMS_FILE)
    paths = load_params(candidate).paths if candidate.is_file() else PathsParams()
    return Path(paths.registry_dir)


def resolve_model_bundle(
    reference: str, params_file: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None
) -> Path:
    """Download (once) the bundle of ``models:/NAME@alias`` and return its verified local directory.

    The cache is keyed by model version and the bundle's manifest hash
    (``<registry_dir>/cache/<name>/v<version>-<sha12>/bundle``); a cached copy is re-verified
    (sha256 of every file) on each use, a broken one is downloaded again.
    """
    registry_dir = default_registry_dir(params_file)
    client, uri = connect(registry_dir)
    name, alias, number = parse_model_uri(reference)
    version = get_version(client, name, alias, number)
    sha = (version.tags or {}).get("lmpipe.bundle_manifest_sha256", "unknown")[:12]
    root = Path(cache_dir or os.environ.get("LMPIPE_MODEL_CACHE") or registry_dir / CACHE_DIR)
    target = root / _safe_name(name) / f"v{version.version}-{sha}"
    bundle_dir = target / BUNDLE_ARTIFACT
    if bundle_dir.is_dir():
        try:
            verify_bundle(bundle_dir)
            logger.info("%s -> version %s (cached %s)", reference, version.version, bundle_dir)
            return bundle_dir
        except BundleError as exc:
            logger.warning("cached bundle %s is broken (%s); downloading again", bundle_dir, exc)
            shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{name}/{version.version}", dst_path=str(tmp), tracking_uri=uri
            )
        )
        found = local / "artifacts" / BUNDLE_ARTIFACT
        if not found.is_dir():
            raise RegistryError(
                f"{reference}: version {version.version} has no bundle artifact (not an lm-pipeline model?)"
            )
        verify_bundle(found)
        staged = tmp / "staged"
        staged.mkdir()
        shutil.move(str(found), str(staged / BUNDLE_ARTIFACT))
        if target.exists():  # a concurrent download won; keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(staged, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("%s -> version %s, bundle %s", reference, version.version, bundle_dir)
    return bundle_dir


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def display_uri(uri: str) -> str:
    """A tracking URI safe to log and store: credentials (``user:password@``) and query removed."""
    return re.sub(r"//[^/@]+@", "//***@", uri).split("?")[0]
