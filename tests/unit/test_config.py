"""The strict params loader: typed, frozen, unknown keys and bad values named by their key."""

from __future__ import annotations

import dataclasses
from typing import Literal

import pytest

from pipeline_tasks.config import (
    ConfigError,
    Params,
    apply_override,
    build_dataclass,
    load_params,
    load_yaml,
    parse_params,
    to_plain,
)


@dataclasses.dataclass(frozen=True)
class Inner:
    depth: int = 2
    rate: float = 0.5


@dataclasses.dataclass(frozen=True)
class Outer:
    name: str
    mode: Literal["a", "b"] = "a"
    flag: bool = False
    tags: tuple[str, ...] = ()
    inner: Inner = Inner()
    limit: int | None = None


def test_build_dataclass_converts_nested_values():
    obj = build_dataclass(Outer, {"name": "x", "mode": "b", "tags": ["t1"], "inner": {"rate": 1}}, "sec")
    assert obj == Outer(name="x", mode="b", tags=("t1",), inner=Inner(depth=2, rate=1.0))
    assert isinstance(obj.inner.rate, float)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"name": "x", "colour": 1}, "sec.colour: unknown key"),
        ({"name": "x", "inner": {"depht": 3}}, "sec.inner.depht: unknown key"),
        ({"name": "x", "mode": "c"}, "sec.mode: expected one of"),
        ({"name": "x", "flag": "yes"}, "sec.flag: expected true/false"),
        ({"name": "x", "inner": {"depth": 1.5}}, "sec.inner.depth: expected an integer"),
        ({"name": "x", "inner": {"depth": True}}, "sec.inner.depth: expected an integer"),
        ({"name": 3}, "sec.name: expected a string"),
        ({}, "sec.name: required key is missing"),
        ({"name": "x", "limit": "many"}, "sec.limit"),
    ],
)
def test_build_dataclass_rejects_bad_input_naming_the_key(data, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("[", r"\[")):
        build_dataclass(Outer, data, "sec")


def test_params_are_frozen():
    params = parse_params({"seed": 1})
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.seed = 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.paths.prepared_dir = "elsewhere"


def test_parse_params_rejects_unknown_section():
    with pytest.raises(ConfigError, match="trainng: unknown section"):
        parse_params({"trainng": {}})


def test_parse_params_fills_paths_defaults():
    params = parse_params({})
    assert isinstance(params, Params)
    assert params.paths.prepared_dir == "data/prepared"
    assert params.seed == 1337


def test_apply_override_sets_nested_key():
    raw = {"paths": {"prepared_dir": "a"}}
    apply_override(raw, "paths.prepared_dir", "b")
    assert raw["paths"]["prepared_dir"] == "b"


def test_load_params_reads_repo_params_file(repo_root):
    params = load_params(repo_root / "params.yaml")
    assert params.paths.raw_wiki_dir
    plain = to_plain(params.paths)
    assert plain["prepared_dir"] == params.paths.prepared_dir


def test_load_params_missing_file_says_how_to_fix(tmp_path):
    with pytest.raises(ConfigError, match="--params FILE"):
        load_params(tmp_path / "nope.yaml")


def test_load_params_invalid_yaml_names_file(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("paths: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)


def test_load_params_extends_deep_merges_over_base(tmp_path):
    (tmp_path / "base.yaml").write_text("seed: 1\npaths:\n  prepared_dir: a\n  tokens_dir: t\n")
    (tmp_path / "gpu.yaml").write_text("extends: base.yaml\npaths:\n  prepared_dir: b\n")
    params = load_params(tmp_path / "gpu.yaml")
    assert (params.seed, params.paths.prepared_dir, params.paths.tokens_dir) == (1, "b", "t")


def test_load_params_extends_cycle_is_an_error(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_params(tmp_path / "a.yaml")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("3e-3", 0.003),
        ("1e5", 100000.0),
        ("1.0e-4", 0.0001),
        ("-2E+2", -200.0),
        (".5", 0.5),
        ("12", 12),
        ('"3e-3"', "3e-3"),
        ("1.2.3", "1.2.3"),
        ("e5", "e5"),
    ],
)
def test_load_yaml_reads_yaml12_floats(text, expected):
    value = load_yaml(text)
    assert value == expected and type(value) is type(expected)


def test_override_with_exponent_float_reaches_a_float_field(tmp_path):
    # `dvc exp run -S pretrain.lr=3e-3` writes 3e-3 into params.yaml: it must read as a number
    params_file = tmp_path / "params.yaml"
    params_file.write_text("pretrain:\n  lr: 3e-3\n", encoding="utf-8")
    params = load_params(params_file, overrides={"pretrain.min_lr": load_yaml("1e-5")})
    assert params.pretrain.lr == 0.003 and params.pretrain.min_lr == 1e-5
