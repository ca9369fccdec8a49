"""Sample-size-aware drift thresholds: a permutation null for each distance signal.

A distance between two samples is never zero, even when both come from one distribution, and the
smaller the window the larger it gets: the Jensen-Shannon distance of the predicted-class shares of
30 rows drawn from the reference itself is often above the fixed threshold of 0.15. So a fixed
threshold that is quiet on 200-row windows raises false alarms on 30-row ones (measured:
``bench/monitor_false_alarms.py``, docs/RESULTS.md).

:func:`null_thresholds` pools the reference and the window, splits the pool at random
``permutations`` times into a pseudo-reference and a pseudo-window of the real sizes, and computes
each signal on every split: the permutation null of the signal *at these sample sizes*. A signal's
threshold for this window is the larger of its configured threshold (the smallest change that
matters) and the ``1 - alpha`` quantile of its null (the largest change sampling noise alone gives
often). On large windows the null quantile is far below the configured threshold and nothing
changes; on small ones it lifts the threshold above the noise.

Signals with a null: ``prediction`` and ``label`` (``category_method: jensenshannon``), ``embedding``
(``embedding_method: mmd``) and ``bpb``. ``descriptors`` needs none: its column tests are p-value
tests (K-S by default), which already account for the sample size. Every statistic here is computed
exactly as evidently computes the observed value (same Jensen-Shannon shares, same RBF kernel and
bandwidth, same unbiased MMD²), so the null and the value are on one scale; the unit tests check
that the observed split reproduces evidently's score.

Cost: one [N, N] kernel and one [N, N] x [N, permutations] product per window for the embedding
(N = reference + window sample), a few vectorised counts for the rest; ~0.1-0.3 s per window on
two cores at N = 2,000 and 400 permutations.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from scipy.spatial.distance import jensenshannon
from sklearn.metrics import pairwise_distances, pairwise_kernels

# evidently's MMDDriftMethod estimates the RBF bandwidth on at most this many rows per side
MMD_BANDWIDTH_ROWS = 1000


def window_masks(pool: int, window: int, permutations: int, rng) -> np.ndarray:
    """``[pool, permutations]`` float mask: each column marks a random ``window``-row subset of the pool."""
    picked = rng.random((permutations, pool)).argpartition(window - 1, axis=1)[:, :window]
    mask = np.zeros((pool, permutations), dtype=np.float64)
    mask[picked, np.arange(permutations)[:, None]] = 1.0
    return mask


def category_js_null(reference, current, permutations: int, rng) -> tuple[float, np.ndarray]:
    """Jensen-Shannon distance of category shares (as evidently's ``jensenshannon``) and its null."""
    pooled = np.concatenate([np.asarray(reference, dtype=str), np.asarray(current, dtype=str)])
    _, codes = np.unique(pooled, return_inverse=True)
    onehot = np.eye(codes.max() + 1)[codes]  # [N, categories]
    m, n = len(reference), len(current)
    totals = onehot.sum(axis=0)

    def distances(window_counts):  # [splits, categories] -> [splits]
        return jensenshannon((totals - window_counts) / m, window_counts / n, axis=1)

    observed = float(distances(onehot[m:].sum(axis=0)[None, :])[0])
    masks = window_masks(m + n, n, permutations, rng)
    return observed, distances(masks.T @ onehot)


def bpb_change_null(reference, current, permutations: int, rng) -> tuple[float, np.ndarray] | None:
    """``|mean(current) - mean(reference)| / mean(reference)`` of bits per byte and its null."""
    ref, cur = np.asarray(reference, dtype=np.float64), np.asarray(current, dtype=np.float64)
    ref, cur = ref[np.isfinite(ref)], cur[np.isfinite(cur)]
    if len(ref) < 2 or len(cur) < 2 or ref.mean() <= 0:
        return None
    pooled = np.concatenate([ref, cur])
    m, n = len(ref), len(cur)
    masks = window_masks(m + n, n, permutations, rng)
    window_mean = pooled @ masks / n
    rest_mean = (pooled.sum() - window_mean * n) / m
    observed = abs(cur.mean() - ref.mean()) / ref.mean()
    return float(observed), np.abs(window_mean - rest_mean) / rest_mean


def _bandwidth_rows(values) -> np.ndarray:
    # the same rows evidently draws (DataFrame.sample with random_state=0), so that sigma matches
    frame = pd.DataFrame(values)
    return frame.sample(min(len(frame), MMD_BANDWIDTH_ROWS), random_state=0).to_numpy()


def mmd_null(reference, current, permutations: int, rng, pca_components: int | None = None):
    """Unbiased MMD² of the embeddings (evidently's ``MMDDriftMethod``, clipped at 0) and its null.

    The kernel (RBF, bandwidth = median reference-to-window distance, as evidently) is computed once
    on the pool; each permutation only re-reads it, as a quadratic form.
    """
    ref, cur = np.asarray(reference, dtype=np.float64), np.asarray(current, dtype=np.float64)
    if pca_components:
        from evidently.legacy.metrics.data_drift.embedding_drift_methods import get_pca_df

        ref_frame, cur_frame = get_pca_df(pd.DataFrame(ref), pd.DataFrame(cur), pca_components)
        ref, cur = ref_frame.to_numpy(), cur_frame.to_numpy()
    m, n = len(ref), len(cur)
    sigma2 = np.median(pairwise_distances(_bandwidth_rows(ref), _bandwidth_rows(cur), metric="euclidean")) ** 2
    if not sigma2 > 0:
        return None
    kernel = pairwise_kernels(np.vstack([ref, cur]), metric="rbf", gamma=1.0 / sigma2)
    diagonal, row_sums, total = np.diag(kernel), kernel.sum(axis=1), kernel.sum()

    def mmd2u(masks):  # masks [N, splits]: 1 marks the window side
        within_window = (masks * (kernel @ masks)).sum(axis=0)
        across = masks.T @ row_sums - within_window
        within_reference = total - 2 * across - within_window
        window_diagonal = masks.T @ diagonal
        return (
            (within_reference - (diagonal.sum() - window_diagonal)) / (m * (m - 1.0))
            + (within_window - window_diagonal) / (n * (n - 1.0))
            - 2.0 * across / (m * n)
        )

    observed_mask = np.zeros((m + n, 1))
    observed_mask[m:] = 1.0
    observed = max(float(mmd2u(observed_mask)[0]), 0.0)
    return observed, np.maximum(mmd2u(window_masks(m + n, n, permutations, rng)), 0.0)


def null_thresholds(reference, current, settings, seed: int) -> tuple[dict[str, float | None], dict[str, Any]]:
    """Thresholds of every signal for this window, and what the permutation null said.

    ``reference`` and ``current`` are :class:`pipeline_tasks.monitor.drift.Features`; ``settings``
    the ``monitor`` params section. Returns ``(thresholds, details)``: the thresholds for
    :func:`pipeline_tasks.monitor.drift.decide_drift` (the configured ones where no null applies or
    ``null_permutations`` is 0), and per signal ``configured``, ``null_quantile``, ``p_value``.
    """
    configured = {
        name: getattr(settings.thresholds, name) for name in ("descriptors", "embedding", "prediction", "label", "bpb")
    }
    permutations, alpha = settings.null_permutations, settings.null_alpha
    details: dict[str, Any] = {"permutations": permutations, "alpha": alpha, "signals": {}}
    if permutations < 1:
        return configured, details
    rng = np.random.default_rng(seed)
    nulls: dict[str, tuple[float, np.ndarray] | None] = {
        "bpb": bpb_change_null(reference.bpb, current.bpb, permutations, rng)
    }
    if settings.category_method == "jensenshannon":
        nulls["prediction"] = category_js_null(reference.predictions, current.predictions, permutations, rng)
        if current.labels is not None and reference.labels is not None:
            nulls["label"] = category_js_null(reference.labels, current.labels, permutations, rng)
    if settings.embedding_method == "mmd" and len(current.embeddings) >= 2:
        nulls["embedding"] = mmd_null(
            reference.embeddings, current.embeddings, permutations, rng, settings.embedding_pca_components
        )
    thresholds = dict(configured)
    for name, null in nulls.items():
        if null is None or configured[name] is None:
            continue
        observed, draws = null
        quantile = float(np.quantile(draws, 1.0 - alpha))
        thresholds[name] = max(float(configured[name]), quantile)
        details["signals"][name] = {
            "configured": configured[name],
            "null_quantile": quantile,
            "threshold": thresholds[name],
            "p_value": float((1 + np.count_nonzero(draws >= observed)) / (1 + permutations)),
            "raised": quantile > configured[name],
        }
    return thresholds, details
