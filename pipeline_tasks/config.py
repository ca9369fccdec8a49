"""Typed, frozen, strict configuration loaded once from ``params.yaml``.

Each stage family declares its ``*Params`` dataclasses (frozen) in its torch-free ``params.py``
(``pipeline_tasks/train/params.py`` ...); :data:`SECTIONS` maps each top-level key of
``params.yaml`` to one of them. :func:`load_params` converts the YAML
into those objects and rejects unknown keys and values of the wrong type with a message that
names the full key (``pretrain.lr: expected float, got 'fast'``).

The converter is hand-written (about 100 lines) rather than pydantic because the task image for
the GPU machine and the Airflow side must be able to parse params with only PyYAML, and because
the messages must name the dotted key exactly as written in ``params.yaml``.

The params modules import only the standard library and PyYAML, so loading params never imports
torch & co. (``tests/unit/test_layout.py`` checks it) and the Airflow image, which has no ML
library, validates the same file; the stage modules import what they need at the top.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ParamsLoader(yaml.SafeLoader):
    """SafeLoader that reads ``3e-3`` and ``1e5`` as floats (YAML 1.2), not strings.

    PyYAML follows YAML 1.1, whose float pattern needs a dot and a signed exponent; DVC writes
    params (``dvc exp run -S pretrain.lr=3e-3``) with a YAML 1.2 library, so without this the
    value a user typed as a number would be rejected as a string.
    """


ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """Parse params text (a file or a ``-S`` value) with :class:`ParamsLoader`."""
    return yaml.load(text, Loader=ParamsLoader)  # noqa: S506 - ParamsLoader is a SafeLoader


PARAMS_FILE_ENV = "LMPIPE_PARAMS"
DEFAULT_PARAMS_FILE = "params.yaml"


class ConfigError(ValueError):
    """params.yaml is missing, malformed, or has an unknown key / bad value."""


@dataclasses.dataclass(frozen=True)
class PathsParams:
    """Every data and report location, declared once (``dvc.yaml`` reads the same keys)."""

    raw_wiki_dir: str = "data/raw/wiki"
    raw_news_dir: str = "data/raw/news"
    prepared_dir: str = "data/prepared"
    prepare_reports_dir: str = "reports/prepare"
    validate_dir: str = "reports/validate"
    tokens_dir: str = "data/tokens"
    tokenize_reports_dir: str = "reports/tokenize"
    pretrain_dir: str = "models/pretrain"
    pretrain_reports_dir: str = "reports/pretrain"
    finetune_dir: str = "models/finetune"
    finetune_reports_dir: str = "reports/finetune"
    compress_dir: str = "models/compress"
    compress_reports_dir: str = "reports/compress"
    bundle_dir: str = "models/bundle"
    export_reports_dir: str = "reports/export"
    evaluate_dir: str = "reports/evaluate"
    monitor_dir: str = "reports/monitor"
    registry_dir: str = "registry"
    champion_metrics_path: str = "registry/production_metrics.json"  # kept current by register/promote
    register_reports_dir: str = "reports/register"
    downloads_dir: str = "data/downloads"


# Top-level section -> "module:Class". Resolved lazily; a module that does not exist yet is an
# error only if params.yaml has that section.
SECTIONS: dict[str, str] = {
    "paths": "pipeline_tasks.config:PathsParams",
    "ingest_wiki": "pipeline_tasks.ingest.params:IngestWikiParams",
    "ingest_news": "pipeline_tasks.ingest.params:IngestNewsParams",
    "prepare": "pipeline_tasks.dataset.params:PrepareParams",
    "validate": "pipeline_tasks.dataset.params:ValidateParams",
    "tokenize": "pipeline_tasks.dataset.params:TokenizeParams",
    "model": "pipeline_tasks.train.params:ModelParams",
    "pretrain": "pipeline_tasks.train.params:PretrainParams",
    "finetune": "pipeline_tasks.train.params:FinetuneParams",
    "compress": "pipeline_tasks.train.params:CompressParams",
    "export": "pipeline_tasks.ship.params:ExportParams",
    "evaluate": "pipeline_tasks.ship.params:EvaluateParams",
    "monitor": "pipeline_tasks.monitor.params:MonitorParams",
    "register": "pipeline_tasks.registry.params:RegisterParams",
    "orchestration": "pipeline_tasks.orchestration.settings:OrchestrationParams",
    "executor": "pipeline_tasks.executor:ExecutorParams",
}
SCALAR_SECTIONS: dict[str, type] = {"seed": int, "project": str}


class Params:
    """All sections of params.yaml, as attributes (``params.prepare.val_fraction``).

    Read-only: the sections are frozen dataclasses and attributes cannot be reassigned.
    """

    def __init__(self, sections: dict[str, Any], source: Path | None = None):
        object.__setattr__(self, "_sections", dict(sections))
        object.__setattr__(self, "source", source)

    def __getattr__(self, name: str) -> Any:
        sections = object.__getattribute__(self, "_sections")
        if name in sections:
            return sections[name]
        raise AttributeError(
            f"params has no section {name!r}; add it to params.yaml (known sections: {sorted(sections)})"
        )

    def __setattr__(self, name: str, value: Any) -> None:
        raise dataclasses.FrozenInstanceError(f"params are read-only (tried to set {name!r})")

    def section(self, name: str) -> Any:
        return getattr(self, name)

    def to_dict(self) -> dict[str, Any]:
        return {k: to_plain(v) for k, v in self._sections.items()}


def to_plain(value: Any) -> Any:
    """Dataclasses / tuples back to YAML-able dicts and lists (for manifests and hashing)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: to_plain(v) for k, v in value.items()}
    return value


def _resolve_class(spec: str) -> type:
    module_name, _, class_name = spec.partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def convert(tp: Any, value: Any, key: str) -> Any:
    """Convert ``value`` to type ``tp`` strictly; ``key`` is the dotted name used in errors."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert(arg, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        if len(errors) == 1:  # Optional[X]: X's own message is the useful one
            raise ConfigError(errors[0] + (" (or null)" if type(None) in args else ""))
        raise ConfigError(f"{key}: {value!r} matches none of {[_type_name(a) for a in args]}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: expected one of {list(args)}, got {value!r}")
        return value
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item_tp = args[0] if args else Any
        return tuple(convert(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        key_tp, val_tp = args if args else (Any, Any)
        return types.MappingProxyType(
            {convert(key_tp, k, f"{key}.{k}"): convert(val_tp, v, f"{key}.{k}") for k, v in value.items()}
        )
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def build_dataclass(cls: type, data: Any, key: str) -> Any:
    """Build frozen dataclass ``cls`` from a mapping; unknown keys and missing required keys fail."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{key}: expected a mapping of settings, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}: unknown key (known keys of {key!r}: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, field in fields.items():
        if name in data:
            kwargs[name] = convert(hints[name], data[name], f"{key}.{name}")
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key}.{name}: required key is missing")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:  # __post_init__ range checks raise ValueError
        raise ConfigError(f"{key}: {exc}") from exc


def find_params_file(path: str | os.PathLike | None = None) -> Path:
    candidate = Path(path or os.environ.get(PARAMS_FILE_ENV) or DEFAULT_PARAMS_FILE)
    if not candidate.is_file():
        raise ConfigError(
            f"params file {candidate} not found; run from the project root, or pass --params FILE "
            f"or set {PARAMS_FILE_ENV}"
        )
    return candidate


def parse_params(raw: Mapping[str, Any], source: Path | None = None) -> Params:
    """Validate a parsed params mapping into :class:`Params`."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source or 'params'}: top level must be a mapping of sections")
    sections: dict[str, Any] = {}
    for name, value in raw.items():
        if name in SCALAR_SECTIONS:
            sections[name] = convert(SCALAR_SECTIONS[name], value, name)
        elif name in SECTIONS:
            sections[name] = build_dataclass(_resolve_class(SECTIONS[name]), value, name)
        else:
            known = sorted([*SECTIONS, *SCALAR_SECTIONS])
            raise ConfigError(f"{name}: unknown section in {source or 'params'} (known: {', '.join(known)})")
    sections.setdefault("paths", PathsParams())
    sections.setdefault("seed", 1337)
    return Params(sections, source)


def load_params(path: str | os.PathLike | None = None, overrides: Mapping[str, Any] | None = None) -> Params:
    """Load, merge dotted ``overrides`` (``{"pretrain.max_steps": 5}``) and validate params."""
    params_path = find_params_file(path)
    raw = read_params_raw(params_path)
    for dotted, value in (overrides or {}).items():
        apply_override(raw, dotted, value)
    return parse_params(raw, params_path)


def read_params_raw(params_path: Path, _seen: tuple[Path, ...] = ()) -> dict:
    """Parse a params file; ``extends: base.yaml`` deep-merges it over its base (profiles)."""
    try:
        raw = load_yaml(params_path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{params_path}: not valid YAML: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"{params_path}: cannot read: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{params_path}: top level must be a mapping of sections")
    base_name = raw.pop("extends", None)
    if base_name is None:
        return raw
    base_path = (params_path.parent / str(base_name)).resolve()
    if base_path in _seen:
        raise ConfigError(f"{params_path}: extends {base_name} forms a cycle")
    return deep_merge(read_params_raw(base_path, (*_seen, base_path)), raw)


def deep_merge(base: dict, overlay: dict) -> dict:
    """Mappings merge key by key; any other value (lists included) in ``overlay`` replaces ``base``."""
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def apply_override(raw: dict, dotted: str, value: Any) -> None:
    """Set ``a.b.c = value`` inside nested dicts (``-S``-style overrides from the CLI)."""
    parts = dotted.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
    node[parts[-1]] = value
