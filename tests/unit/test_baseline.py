"""The n-gram baseline of evaluate (TF-IDF + logistic regression): C is chosen on val, the fit is usable."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline_tasks.ship.baseline import fit_tfidf_lr, predict_baseline
from pipeline_tasks.ship.params import BaselineParams

TOPICS = {0: ["goal", "match", "striker", "league"], 1: ["shares", "profit", "market", "investors"]}


def _texts(n: int, seed: int) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    filler = ["the", "a", "on", "report", "today", "said"]
    return [" ".join(rng.choice(TOPICS[int(c)] + filler, 8)) for c in y], y


def test_fit_tfidf_lr_picks_c_by_val_macro_f1_and_separates_topics():
    cfg = BaselineParams(c_grid=(0.01, 1.0, 16.0), min_df=1)
    train, y_train = _texts(200, 0)
    val, y_val = _texts(60, 1)
    model, selection = fit_tfidf_lr(train, y_train, val, y_val, 2, cfg, seed=0)
    assert [row["C"] for row in selection["grid"]] == [0.01, 1.0, 16.0]
    best = max(selection["grid"], key=lambda row: row["val_macro_f1"])
    assert selection["selected"] == best
    assert model.named_steps["lr"].C == best["C"]
    test, y_test = _texts(100, 2)
    pred, seconds = predict_baseline(model, test)
    assert pred.dtype == np.int64 and seconds >= 0
    assert (pred == y_test).mean() > 0.9


def test_baseline_params_reject_bad_values():
    with pytest.raises(ValueError, match="c_grid"):
        BaselineParams(c_grid=(0.0,))
    with pytest.raises(ValueError, match="ngram_max"):
        BaselineParams(ngram_max=0)
