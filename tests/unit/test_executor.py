"""``pipeline_tasks.executor``: results in submission order whatever runs them; configuration errors."""

from __future__ import annotations

import sys

import pytest

from pipeline_tasks.config import ConfigError, parse_params
from pipeline_tasks.executor import ExecutorParams, ordered_map


@pytest.mark.parametrize("workers", [1, 2])
def test_local_results_come_back_in_order_with_a_bounded_window(workers):
    drawn = []

    def jobs():
        for i in range(40):
            drawn.append(i)
            yield (i, 2)

    results = []
    for value in ordered_map(pow, jobs(), params=ExecutorParams(), workers=workers, per_worker=2):
        results.append(value)
        # jobs are drawn lazily: never more than the window ahead of what was handed back
        assert len(drawn) - len(results) <= 2 * workers
    assert results == [i * i for i in range(40)]


def test_ray_without_the_package_is_a_configuration_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ConfigError, match="ray package is not installed"):
        list(ordered_map(pow, [(2, 2)], params=ExecutorParams(kind="ray"), workers=1))


def test_executor_params_are_checked():
    with pytest.raises(ConfigError, match="kind"):
        parse_params({"executor": {"kind": "spark"}})
    with pytest.raises(ConfigError, match="ray_object_store_mb"):
        parse_params({"executor": {"ray_object_store_mb": 10}})
    assert parse_params({"executor": {"kind": "ray", "ray_address": "auto"}}).executor.ray_address == "auto"
