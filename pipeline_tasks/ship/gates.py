"""Model quality gates: a pure decision from metrics, the production (champion) metrics and thresholds.

:func:`decide` is the whole policy. It takes the challenger's flat metrics (the top level of
``evaluate_dir/metrics.json``), the production model's metrics in the same layout (or ``None``
when nothing is in production yet) and :class:`GateThresholds`, and returns a
:class:`GateDecision` listing every gate with its value, threshold, verdict and reason. It never
raises on a bad model: a failed gate is a recorded decision, written to ``gates.json`` by the
``evaluate`` stage and read by ``register``/``promote``, which refuse a model that did not pass.

Gates (a threshold of ``None`` disables its gate; the decision records it as skipped):

* ``min_accuracy`` / ``min_macro_f1`` — absolute floors on the served variant's test scores;
* ``max_int8_accuracy_drop`` — fp32 accuracy minus int8-dynamic accuracy (quantization damage);
* ``max_p95_latency_ms`` — batch-1 p95 latency of the served variant on CPU;
* ``max_size_mb`` — the served variant's model file on disk;
* ``min_gain_over_baseline`` — served accuracy minus the n-gram baseline's accuracy on the same
  test rows (:mod:`pipeline_tasks.ship.baseline`); 0.0 means "not worse than the baseline". No
  baseline in the metrics (``evaluate.baseline.kind: none``) fails it, like any missing metric;
* ``max_student_drop`` / ``min_student_speedup`` — for a student of ``compress``: its teacher's
  accuracy (int8, same test rows) minus the served student's, and the teacher's batch-1 CPU p50
  latency over the student's, measured side by side. When the served model is not a student
  (``compressed`` is not true in the metrics: ``compress.enabled: false``) both are skipped
  with that reason; a student without these numbers fails them;
* ``no_regression_accuracy`` / ``no_regression_macro_f1`` — champion/challenger: the challenger
  may be at most ``max_regression`` below the production model. With no production model
  these gates pass with the reason "no production model" and the absolute gates decide.

A metric that the gate needs but that is missing (``None`` or absent) fails that gate: a gate
that cannot be evaluated must not let a model through.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

# metric key in metrics.json -> (gate name, threshold attribute, direction)
ABSOLUTE_GATES: tuple[tuple[str, str, str], ...] = (
    ("min_accuracy", "accuracy", "min"),
    ("min_macro_f1", "macro_f1", "min"),
    ("max_int8_accuracy_drop", "int8_accuracy_drop", "max"),
    ("max_p95_latency_ms", "latency_p95_ms", "max"),
    ("max_size_mb", "size_mb", "max"),
    ("min_gain_over_baseline", "gain_over_baseline", "min"),
    ("max_student_drop", "student_accuracy_drop", "max"),
    ("min_student_speedup", "student_speedup", "min"),
)
STUDENT_GATES: frozenset[str] = frozenset({"max_student_drop", "min_student_speedup"})
REGRESSION_METRICS: tuple[str, ...] = ("accuracy", "macro_f1")


@dataclasses.dataclass(frozen=True)
class GateThresholds:
    """Limits for :func:`decide`; ``None`` switches a gate off."""

    min_accuracy: float | None = None
    min_macro_f1: float | None = None
    max_int8_accuracy_drop: float | None = None
    max_p95_latency_ms: float | None = None
    max_size_mb: float | None = None
    max_regression: float | None = None  # allowed drop vs the production model, absolute (0.01 = 1 point)
    min_gain_over_baseline: float | None = None  # served accuracy - n-gram baseline accuracy, absolute
    max_student_drop: float | None = None  # teacher accuracy - student accuracy, absolute (compress only)
    min_student_speedup: float | None = None  # teacher p50 latency / student p50 latency (compress only)


@dataclasses.dataclass(frozen=True)
class GateResult:
    name: str
    metric: str
    value: float | None
    threshold: float | None
    passed: bool
    why: str
    skipped: bool = False


@dataclasses.dataclass(frozen=True)
class GateDecision:
    passed: bool
    gates: tuple[GateResult, ...]
    champion_present: bool

    @property
    def failed(self) -> tuple[GateResult, ...]:
        return tuple(g for g in self.gates if not g.passed)

    def summary(self) -> str:
        """One line for logs and banners: ``GATES PASSED`` or ``GATES FAILED: why; why``."""
        if self.passed:
            return f"GATES PASSED ({sum(not g.skipped for g in self.gates)} checked)"
        return "GATES FAILED: " + "; ".join(g.why for g in self.failed)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "champion_present": self.champion_present,
            "summary": self.summary(),
            "gates": {g.name: dataclasses.asdict(g) for g in self.gates},
        }


def _number(metrics: Mapping[str, Any] | None, key: str) -> float | None:
    if metrics is None:
        return None
    value = metrics.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value)


def _absolute_gate(name: str, metric: str, direction: str, value: float | None, threshold: float | None) -> GateResult:
    if threshold is None:
        return GateResult(name, metric, value, None, True, f"{name}: disabled (threshold null)", skipped=True)
    if value is None:
        why = f"{metric} missing from metrics, cannot check {name}"
        if metric == "gain_over_baseline":
            why += " (no n-gram baseline: evaluate.baseline.kind is none?)"
        return GateResult(name, metric, None, threshold, False, why)
    ok = value >= threshold if direction == "min" else value <= threshold
    sign = {("min", True): ">=", ("min", False): "<", ("max", True): "<=", ("max", False): ">"}[(direction, ok)]
    bound = "min" if direction == "min" else "max"
    return GateResult(
        name,
        metric,
        value,
        threshold,
        ok,
        f"{metric} {value:.4g} {sign} {bound} {threshold:.4g}" + ("" if ok else " (FAIL)"),
    )


def _regression_gate(
    metric: str, value: float | None, champion: Mapping[str, Any] | None, tolerance: float | None
) -> GateResult:
    name = f"no_regression_{metric}"
    if tolerance is None:
        return GateResult(name, metric, value, None, True, f"{name}: disabled (max_regression null)", skipped=True)
    if champion is None:
        return GateResult(
            name, metric, value, None, True, f"{name}: no production model, absolute gates decide", skipped=True
        )
    best = _number(champion, metric)
    if best is None:
        return GateResult(
            name,
            metric,
            value,
            None,
            True,
            f"{name}: production metrics have no {metric}, absolute gates decide",
            skipped=True,
        )
    floor = best - tolerance
    if value is None:
        return GateResult(
            name, metric, None, floor, False, f"{metric} missing from metrics, cannot compare to production"
        )
    ok = value >= floor
    return GateResult(
        name,
        metric,
        value,
        floor,
        ok,
        f"{metric} {value:.4g} {'>=' if ok else '<'} production {best:.4g} - tolerance {tolerance:.4g}"
        + ("" if ok else " (FAIL: regression vs production)"),
    )


def decide(metrics: Mapping[str, Any], champion: Mapping[str, Any] | None, thresholds: GateThresholds) -> GateDecision:
    """Apply every gate; ``champion`` is the production model's metrics or ``None``."""
    gates = [
        _absolute_gate(name, metric, direction, _number(metrics, metric), getattr(thresholds, name))
        if name not in STUDENT_GATES or metrics.get("compressed") is True
        else GateResult(
            name,
            metric,
            None,
            getattr(thresholds, name),
            True,
            f"{name}: the served model is not a compressed student (compress.enabled false)",
            skipped=True,
        )
        for name, metric, direction in ABSOLUTE_GATES
    ]
    gates += [
        _regression_gate(metric, _number(metrics, metric), champion, thresholds.max_regression)
        for metric in REGRESSION_METRICS
    ]
    return GateDecision(passed=all(g.passed for g in gates), gates=tuple(gates), champion_present=champion is not None)
