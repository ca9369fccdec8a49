"""pipeline_tasks.metrics agrees with scikit-learn and its bootstrap is deterministic."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from pipeline_tasks import metrics


@pytest.fixture(params=[0, 1, 2])
def random_labels(request):
    rng = np.random.default_rng(request.param)
    k = 4
    y_true = rng.integers(0, k, size=500)
    # a noisy classifier: right 60% of the time, otherwise a random class
    y_pred = np.where(rng.random(500) < 0.6, y_true, rng.integers(0, k, size=500))
    return y_true, y_pred, k


def test_accuracy_matches_sklearn(random_labels):
    y_true, y_pred, _ = random_labels
    assert metrics.accuracy(y_true, y_pred) == pytest.approx(skm.accuracy_score(y_true, y_pred))


def test_macro_f1_matches_sklearn(random_labels):
    y_true, y_pred, k = random_labels
    expected = skm.f1_score(y_true, y_pred, average="macro", labels=list(range(k)), zero_division=0)
    assert metrics.macro_f1(y_true, y_pred, k) == pytest.approx(expected)


def test_precision_recall_f1_per_class_match_sklearn(random_labels):
    y_true, y_pred, k = random_labels
    p, r, f, s = metrics.precision_recall_f1(y_true, y_pred, k)
    ep, er, ef, es = skm.precision_recall_fscore_support(y_true, y_pred, labels=list(range(k)), zero_division=0)
    np.testing.assert_allclose(p, ep)
    np.testing.assert_allclose(r, er)
    np.testing.assert_allclose(f, ef)
    np.testing.assert_array_equal(s, es)


def test_confusion_matrix_matches_sklearn(random_labels):
    y_true, y_pred, k = random_labels
    np.testing.assert_array_equal(
        metrics.confusion_matrix(y_true, y_pred, k), skm.confusion_matrix(y_true, y_pred, labels=list(range(k)))
    )


def test_metrics_absent_class_scores_zero_like_sklearn():
    # class 2 is never predicted and class 3 never occurs: zero_division=0 semantics, no NaN
    y_true = np.array([0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 1, 1, 1, 0, 3])
    p, r, f, s = metrics.precision_recall_f1(y_true, y_pred, 4)
    ep, er, ef, es = skm.precision_recall_fscore_support(y_true, y_pred, labels=[0, 1, 2, 3], zero_division=0)
    np.testing.assert_allclose(p, ep)
    np.testing.assert_allclose(r, er)
    np.testing.assert_allclose(f, ef)
    assert not np.isnan(f).any()
    assert metrics.macro_f1(y_true, y_pred, 4) == pytest.approx(
        skm.f1_score(y_true, y_pred, average="macro", labels=[0, 1, 2, 3], zero_division=0)
    )


def test_confusion_matrix_rejects_out_of_range_label():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        metrics.confusion_matrix([0, 1, 3], [0, 1, 2], 3)


def test_metrics_reject_length_mismatch():
    with pytest.raises(ValueError, match="differ in length"):
        metrics.accuracy([0, 1], [0])


def test_classification_report_names_classes_and_matches_parts(random_labels):
    y_true, y_pred, k = random_labels
    labels = ["business", "scitech", "sports", "world"]
    report = metrics.classification_report(y_true, y_pred, labels)
    assert report["n"] == 500
    assert report["accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred))
    assert report["macro_f1"] == pytest.approx(metrics.macro_f1(y_true, y_pred, k))
    assert list(report["per_class"]) == labels
    ep, er, ef, es = skm.precision_recall_fscore_support(y_true, y_pred, labels=list(range(k)), zero_division=0)
    assert report["per_class"]["sports"]["recall"] == pytest.approx(er[2])
    assert report["per_class"]["world"]["support"] == es[3]


def test_bootstrap_ci_contains_point_estimate_and_is_deterministic(random_labels):
    y_true, y_pred, k = random_labels
    ci1 = metrics.bootstrap_ci(y_true, y_pred, metrics.accuracy, n_resamples=300, seed=7)
    ci2 = metrics.bootstrap_ci(y_true, y_pred, metrics.accuracy, n_resamples=300, seed=7)
    assert ci1 == ci2
    low, high = ci1
    assert low <= metrics.accuracy(y_true, y_pred) <= high
    assert 0.0 < high - low < 0.2


def test_bootstrap_ci_works_with_macro_f1_and_narrows_with_more_data():
    rng = np.random.default_rng(3)
    y_small = rng.integers(0, 4, 100)
    y_large = rng.integers(0, 4, 10_000)
    noisy = lambda y: np.where(rng.random(y.size) < 0.7, y, rng.integers(0, 4, y.size))  # noqa: E731
    f1 = lambda t, p: metrics.macro_f1(t, p, 4)  # noqa: E731
    small = metrics.bootstrap_ci(y_small, noisy(y_small), f1, n_resamples=200, seed=0)
    large = metrics.bootstrap_ci(y_large, noisy(y_large), f1, n_resamples=200, seed=0)
    assert large[1] - large[0] < small[1] - small[0]


def test_bootstrap_ci_seed_changes_interval(random_labels):
    y_true, y_pred, _ = random_labels
    assert metrics.bootstrap_ci(y_true, y_pred, n_resamples=200, seed=1) != metrics.bootstrap_ci(
        y_true, y_pred, n_resamples=200, seed=2
    )


def test_bootstrap_ci_rejects_bad_confidence():
    with pytest.raises(ValueError, match="confidence"):
        metrics.bootstrap_ci([0, 1], [0, 1], confidence=1.5)


def test_confusion_rows_maps_ids_to_names():
    rows = metrics.confusion_rows([0, 1, 1], [1, 1, 0], ["a", "b"])
    assert rows == [("a", "b"), ("b", "b"), ("b", "a")]


def test_paired_bootstrap_diff_is_narrower_than_unpaired_and_centred():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 4, 4000)
    # two models that share most of their errors (the hard rows): b is a with 2% more rows wrong
    a = np.where(rng.random(4000) < 0.85, y, (y + 1) % 4)
    b = np.where(rng.random(4000) < 0.02, (y + 2) % 4, a)
    diff, low, high = metrics.paired_bootstrap_diff(y, a, b, metrics.accuracy, n_resamples=400, seed=0)
    assert diff == pytest.approx(metrics.accuracy(y, a) - metrics.accuracy(y, b))
    assert low <= diff <= high and low > 0.0  # a is better, and the paired interval sees it
    a_low, a_high = metrics.bootstrap_ci(y, a, n_resamples=400, seed=0)
    b_low, b_high = metrics.bootstrap_ci(y, b, n_resamples=400, seed=0)
    assert high - low < 0.5 * ((a_high - a_low) + (b_high - b_low))  # pairing removes the shared variance
    assert metrics.paired_bootstrap_diff(y, a, b, n_resamples=50, seed=1) == metrics.paired_bootstrap_diff(
        y, a, b, n_resamples=50, seed=1
    )


def test_paired_bootstrap_diff_of_identical_predictions_is_zero():
    y = np.array([0, 1, 2, 3, 0, 1])
    assert metrics.paired_bootstrap_diff(y, y, y, n_resamples=20) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="confidence"):
        metrics.paired_bootstrap_diff(y, y, y, confidence=1.0)
