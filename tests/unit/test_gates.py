"""Table test for the pure gate policy ``pipeline_tasks.ship.gates.decide``: every branch."""

from __future__ import annotations

import dataclasses
import json

import pytest

from pipeline_tasks.ship.gates import GateThresholds, decide

THRESHOLDS = GateThresholds(
    min_accuracy=0.80,
    min_macro_f1=0.78,
    max_int8_accuracy_drop=0.01,
    max_p95_latency_ms=20.0,
    max_size_mb=50.0,
    max_regression=0.005,
    min_gain_over_baseline=0.0,
    max_student_drop=0.01,
    min_student_speedup=2.0,
)
GOOD = {
    "accuracy": 0.90,
    "macro_f1": 0.89,
    "int8_accuracy_drop": 0.002,
    "latency_p95_ms": 5.0,
    "size_mb": 3.0,
    "gain_over_baseline": 0.012,
}
CHAMPION = {"accuracy": 0.88, "macro_f1": 0.87}
# a compressed student served in place of its teacher (compress.enabled): the student gates apply
STUDENT = {**GOOD, "compressed": True, "student_accuracy_drop": 0.004, "student_speedup": 2.6}


def _with(**changes):
    return {**GOOD, **changes}


CASES = [
    # id, metrics, champion, thresholds, expected overall, gates expected to fail
    ("all_pass_with_champion", GOOD, CHAMPION, THRESHOLDS, True, set()),
    ("all_pass_no_champion", GOOD, None, THRESHOLDS, True, set()),
    ("accuracy_below_floor", _with(accuracy=0.79), None, THRESHOLDS, False, {"min_accuracy"}),
    ("accuracy_equal_floor_passes", _with(accuracy=0.80), None, THRESHOLDS, True, set()),
    ("macro_f1_below_floor", _with(macro_f1=0.5), None, THRESHOLDS, False, {"min_macro_f1"}),
    ("int8_drop_too_big", _with(int8_accuracy_drop=0.02), None, THRESHOLDS, False, {"max_int8_accuracy_drop"}),
    ("latency_too_slow", _with(latency_p95_ms=25.0), None, THRESHOLDS, False, {"max_p95_latency_ms"}),
    ("model_too_big", _with(size_mb=51.0), None, THRESHOLDS, False, {"max_size_mb"}),
    (
        "regression_vs_champion",
        _with(accuracy=0.87, macro_f1=0.86),
        {"accuracy": 0.90, "macro_f1": 0.89},
        THRESHOLDS,
        False,
        {"no_regression_accuracy", "no_regression_macro_f1"},
    ),
    (
        "regression_within_tolerance",
        _with(accuracy=0.896),
        {"accuracy": 0.90, "macro_f1": 0.89},
        THRESHOLDS,
        True,
        set(),
    ),
    (
        "champion_missing_one_metric_skips_that_gate",
        GOOD,
        {"accuracy": 0.99},
        THRESHOLDS,
        False,
        {"no_regression_accuracy"},
    ),
    (
        "missing_metric_fails",
        {k: v for k, v in GOOD.items() if k != "latency_p95_ms"},
        None,
        THRESHOLDS,
        False,
        {"max_p95_latency_ms"},
    ),
    ("nan_metric_fails", _with(size_mb=float("nan")), None, THRESHOLDS, False, {"max_size_mb"}),
    (
        "disabled_gates_pass",
        _with(accuracy=0.1, macro_f1=0.1),
        {"accuracy": 0.99, "macro_f1": 0.99},
        GateThresholds(max_int8_accuracy_drop=0.01, max_p95_latency_ms=20.0, max_size_mb=50.0),
        True,
        set(),
    ),
    # the baseline gate: the served model against the n-gram baseline on the same test rows
    ("baseline_beaten_passes", _with(gain_over_baseline=0.004), None, THRESHOLDS, True, set()),
    ("baseline_tie_passes", _with(gain_over_baseline=0.0), None, THRESHOLDS, True, set()),
    (
        "worse_than_baseline_fails",
        _with(gain_over_baseline=-0.003),
        None,
        THRESHOLDS,
        False,
        {"min_gain_over_baseline"},
    ),
    (
        "margin_over_baseline_not_reached_fails",
        _with(gain_over_baseline=0.004),
        None,
        dataclasses.replace(THRESHOLDS, min_gain_over_baseline=0.01),
        False,
        {"min_gain_over_baseline"},
    ),
    (
        "missing_baseline_fails",
        {k: v for k, v in GOOD.items() if k != "gain_over_baseline"},
        CHAMPION,
        THRESHOLDS,
        False,
        {"min_gain_over_baseline"},
    ),
    (
        "missing_baseline_with_gate_disabled_passes",
        {k: v for k, v in GOOD.items() if k != "gain_over_baseline"},
        None,
        dataclasses.replace(THRESHOLDS, min_gain_over_baseline=None),
        True,
        set(),
    ),
    # the student gates: a student of compress against its teacher, same rows, timed side by side
    ("student_close_and_fast_passes", STUDENT, None, THRESHOLDS, True, set()),
    ("student_drop_at_limit_passes", {**STUDENT, "student_accuracy_drop": 0.01}, None, THRESHOLDS, True, set()),
    (
        "student_drops_too_much_fails",
        {**STUDENT, "student_accuracy_drop": 0.015},
        None,
        THRESHOLDS,
        False,
        {"max_student_drop"},
    ),
    (
        "student_not_fast_enough_fails",
        {**STUDENT, "student_speedup": 1.7},
        None,
        THRESHOLDS,
        False,
        {"min_student_speedup"},
    ),
    (
        "student_better_than_teacher_passes",
        {**STUDENT, "student_accuracy_drop": -0.002},
        None,
        THRESHOLDS,
        True,
        set(),
    ),
    (
        "student_without_numbers_fails",
        {k: v for k, v in STUDENT.items() if not k.startswith("student_")},
        None,
        THRESHOLDS,
        False,
        {"max_student_drop", "min_student_speedup"},
    ),
    # not a student (compress.enabled false): nothing to compare, the student gates are skipped
    ("no_student_skips_student_gates", _with(student_speedup=0.5), None, THRESHOLDS, True, set()),
    (
        "student_gates_disabled_pass",
        {**STUDENT, "student_speedup": 1.1, "student_accuracy_drop": 0.2},
        None,
        dataclasses.replace(THRESHOLDS, max_student_drop=None, min_student_speedup=None),
        True,
        set(),
    ),
    (
        "several_failures",
        _with(accuracy=0.5, size_mb=500.0),
        CHAMPION,
        THRESHOLDS,
        False,
        {"min_accuracy", "max_size_mb", "no_regression_accuracy"},
    ),
]


@pytest.mark.parametrize(
    "metrics,champion,thresholds,expected,failing", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_decide_reaches_every_gate_branch(metrics, champion, thresholds, expected, failing):
    decision = decide(metrics, champion, thresholds)
    assert decision.passed is expected
    assert {g.name for g in decision.failed} == failing
    assert decision.champion_present is (champion is not None)
    # every gate is reported, with a reason, whether it passed or not
    assert {g.name for g in decision.gates} == {
        "min_accuracy",
        "min_macro_f1",
        "max_int8_accuracy_drop",
        "max_p95_latency_ms",
        "max_size_mb",
        "no_regression_accuracy",
        "no_regression_macro_f1",
        "min_gain_over_baseline",
        "max_student_drop",
        "min_student_speedup",
    }
    assert all(g.why for g in decision.gates)


def test_baseline_gate_reason_names_the_baseline():
    decision = decide(_with(gain_over_baseline=-0.02), None, THRESHOLDS)
    gate = next(g for g in decision.gates if g.name == "min_gain_over_baseline")
    assert not gate.passed and gate.why.startswith("gain_over_baseline -0.02 < min 0")
    missing = decide({k: v for k, v in GOOD.items() if k != "gain_over_baseline"}, None, THRESHOLDS)
    assert "no n-gram baseline" in next(g.why for g in missing.gates if g.name == "min_gain_over_baseline")


def test_decide_without_champion_skips_regression_with_reason():
    decision = decide(GOOD, None, THRESHOLDS)
    regression = [g for g in decision.gates if g.name.startswith("no_regression")]
    assert all(g.skipped and g.passed and "no production model" in g.why for g in regression)


def test_decide_regression_threshold_is_champion_minus_tolerance():
    decision = decide(_with(accuracy=0.85), {"accuracy": 0.90, "macro_f1": 0.80}, THRESHOLDS)
    gate = next(g for g in decision.gates if g.name == "no_regression_accuracy")
    assert gate.threshold == pytest.approx(0.895)
    assert not gate.passed and "regression" in gate.why


def test_decision_summary_and_dict_are_json_and_name_failures():
    decision = decide(_with(latency_p95_ms=99.0), None, THRESHOLDS)
    assert decision.summary().startswith("GATES FAILED: latency_p95_ms 99")
    payload = json.loads(json.dumps(decision.to_dict()))
    assert payload["passed"] is False
    assert payload["gates"]["max_p95_latency_ms"]["threshold"] == 20.0
    assert decide(GOOD, None, THRESHOLDS).summary().startswith("GATES PASSED")


def test_student_gates_skip_with_reason_unless_the_model_is_a_student():
    teacher = decide(GOOD, None, THRESHOLDS)
    student_gates = [g for g in teacher.gates if g.name in ("max_student_drop", "min_student_speedup")]
    assert all(g.skipped and g.passed and "not a compressed student" in g.why for g in student_gates)
    student = decide({**STUDENT, "student_speedup": 1.5}, None, THRESHOLDS)
    gate = next(g for g in student.gates if g.name == "min_student_speedup")
    assert not gate.skipped and not gate.passed and gate.why.startswith("student_speedup 1.5 < min 2")
