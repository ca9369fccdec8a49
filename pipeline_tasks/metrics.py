"""Classification metrics on integer label arrays, numpy only.

Shared by ``finetune`` (val / test scores, early stopping) and ``evaluate`` (ONNX variants,
gates, the model card). Pure functions: arrays in, numbers out; no torch, no sklearn (the
tests check every function against scikit-learn).

Conventions follow scikit-learn so numbers agree with what users compute themselves:

* the confusion matrix is ``cm[true, pred]``;
* precision / recall / F1 of a class with no predictions (or no support) is 0, not NaN
  (sklearn's ``zero_division=0``); macro-F1 averages over all ``num_classes`` classes,
  including classes absent from this sample;
* :func:`bootstrap_ci` is a percentile bootstrap over examples with a seeded generator, so the
  same inputs and seed always give the same interval; :func:`paired_bootstrap_diff` resamples
  the same rows for two models, so the interval of their difference is not inflated by the
  variance the two share (which rows are hard).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

MetricFn = Callable[[np.ndarray, np.ndarray], float]


def _as_labels(y_true: Any, y_pred: Any) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(y_true).astype(np.int64, copy=False).ravel()
    p = np.asarray(y_pred).astype(np.int64, copy=False).ravel()
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length: {t.size} vs {p.size}")
    return t, p


def _infer_num_classes(t: np.ndarray, p: np.ndarray, num_classes: int | None) -> int:
    if num_classes is not None:
        return int(num_classes)
    return int(max(t.max(initial=-1), p.max(initial=-1)) + 1)


def confusion_matrix(y_true: Any, y_pred: Any, num_classes: int | None = None) -> np.ndarray:
    """Counts ``cm[i, j]`` of examples with true class ``i`` predicted as ``j`` (int64)."""
    t, p = _as_labels(y_true, y_pred)
    k = _infer_num_classes(t, p, num_classes)
    if t.size and (min(t.min(), p.min()) < 0 or max(t.max(), p.max()) >= k):
        raise ValueError(f"labels must lie in [0, {k}); got range [{min(t.min(), p.min())}, {max(t.max(), p.max())}]")
    # one bincount over the flattened (true, pred) index is O(n) and exact
    return np.bincount(t * k + p, minlength=k * k).reshape(k, k).astype(np.int64)


def accuracy(y_true: Any, y_pred: Any) -> float:
    t, p = _as_labels(y_true, y_pred)
    return float((t == p).mean()) if t.size else 0.0


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def precision_recall_f1(
    y_true: Any, y_pred: Any, num_classes: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-class ``(precision, recall, f1, support)``, each of shape ``(num_classes,)``."""
    cm = confusion_matrix(y_true, y_pred, num_classes)
    return precision_recall_f1_from_confusion(cm)


def precision_recall_f1_from_confusion(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    cm = np.asarray(cm)
    tp = np.diag(cm).astype(np.float64)
    predicted = cm.sum(axis=0)
    support = cm.sum(axis=1)
    precision = _safe_div(tp, predicted)
    recall = _safe_div(tp, support)
    # F1 = 2TP / (2TP + FP + FN): equal to the harmonic mean, and 0 (not NaN) when both are 0
    f1 = _safe_div(2 * tp, predicted + support)
    return precision, recall, f1, support.astype(np.int64)


def macro_f1(y_true: Any, y_pred: Any, num_classes: int | None = None) -> float:
    """Unweighted mean of the per-class F1 over ``num_classes`` classes."""
    _, _, f1, _ = precision_recall_f1(y_true, y_pred, num_classes)
    return float(f1.mean()) if f1.size else 0.0


def classification_report(y_true: Any, y_pred: Any, labels: Sequence[str]) -> dict[str, Any]:
    """JSON-able summary: accuracy, macro P/R/F1, per-class P/R/F1/support, count.

    ``labels[i]`` names class ``i``; its length fixes the number of classes.
    """
    t, p = _as_labels(y_true, y_pred)
    cm = confusion_matrix(t, p, len(labels))
    precision, recall, f1, support = precision_recall_f1_from_confusion(cm)
    return {
        "n": int(t.size),
        "accuracy": accuracy(t, p),
        "macro_f1": float(f1.mean()) if f1.size else 0.0,
        "macro_precision": float(precision.mean()) if precision.size else 0.0,
        "macro_recall": float(recall.mean()) if recall.size else 0.0,
        "per_class": {
            label: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, label in enumerate(labels)
        },
    }


def _percentile_bootstrap(
    n: int, statistic: Callable[[np.ndarray], float], n_resamples: int, confidence: float, seed: int
) -> tuple[float, float]:
    """``(low, high)`` percentiles of ``statistic(row indices)`` over seeded resamples of ``n`` rows."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if n == 0:
        raise ValueError("a bootstrap needs at least one example")
    rng = np.random.default_rng(seed)
    scores = np.empty(n_resamples, dtype=np.float64)
    for i in range(n_resamples):
        scores[i] = statistic(rng.integers(0, n, size=n))
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(scores, [alpha, 1.0 - alpha])
    return float(low), float(high)


def bootstrap_ci(
    y_true: Any,
    y_pred: Any,
    metric: MetricFn = accuracy,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of ``metric(y_true, y_pred)``.

    Resamples examples with replacement ``n_resamples`` times using ``numpy.random.default_rng
    (seed)``; returns ``(low, high)`` at the given two-sided ``confidence``.
    """
    t, p = _as_labels(y_true, y_pred)
    return _percentile_bootstrap(t.size, lambda idx: metric(t[idx], p[idx]), n_resamples, confidence, seed)


def paired_bootstrap_diff(
    y_true: Any,
    y_pred_a: Any,
    y_pred_b: Any,
    metric: MetricFn = accuracy,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``(metric(a) - metric(b), low, high)``: the difference and its paired percentile bootstrap interval.

    Each resample draws one set of row indices and scores both models on it, as a paired test
    must: the difference of two independent intervals would be far too wide.
    """
    t, a = _as_labels(y_true, y_pred_a)
    _, b = _as_labels(y_true, y_pred_b)
    low, high = _percentile_bootstrap(
        t.size, lambda idx: metric(t[idx], a[idx]) - metric(t[idx], b[idx]), n_resamples, confidence, seed
    )
    return metric(t, a) - metric(t, b), low, high


def confusion_rows(y_true: Any, y_pred: Any, labels: Sequence[str]) -> list[tuple[str, str]]:
    """One ``(actual, predicted)`` label pair per example: the input of a DVC confusion plot."""
    t, p = _as_labels(y_true, y_pred)
    names = list(labels)
    return [(names[a], names[b]) for a, b in zip(t.tolist(), p.tolist())]
