"""The n-gram baseline every evaluation measures the model against.

Why a baseline at all: the point of pretraining a language model and fine-tuning it is a better
classifier than a cheap one. On AG News a bag of word uni- and bigrams with a linear model is the
classic strong baseline (Joulin et al. 2016, Wang & Manning 2012): it trains in seconds and is
hard to beat with a small model. If our model does not beat it, the user should know, and
``evaluate.gates.min_gain_over_baseline`` refuses to register it.

What is trained: scikit-learn's ``TfidfVectorizer`` (word 1..``ngram_max``-grams, sublinear tf,
``min_df``) + multinomial ``LogisticRegression``; the regularisation ``C`` is chosen from
``c_grid`` by macro-F1 on the val rows only. Rows: exactly those ``finetune`` trains and selects
on (``finetune.dataset.train_sources`` in ``train.parquet`` / ``val.parquet``, capped by
``finetune.max_train_rows`` the same way), so model and baseline see the same labelled data.
The caller scores it on exactly the rows the served model is scored on, and compares the two
with a paired bootstrap (:func:`pipeline_tasks.metrics.paired_bootstrap_diff`).

Params: ``evaluate.baseline`` (:class:`~pipeline_tasks.ship.params.BaselineParams`); ``kind:
none`` skips it (the gate then fails for want of a baseline unless it is disabled too).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from pipeline_tasks.dataset.prepared import finetune_rows
from pipeline_tasks.metrics import accuracy, macro_f1
from pipeline_tasks.train.classifier_data import labels_to_ids

logger = logging.getLogger(__name__)


def fit_tfidf_lr(
    train_texts: Sequence[str],
    train_y: np.ndarray,
    val_texts: Sequence[str],
    val_y: np.ndarray,
    num_classes: int,
    cfg,
    seed: int,
):
    """``(fitted pipeline, selection table)``; ``C`` is the val-macro-F1 best of ``cfg.c_grid``.

    The vectorizer is fitted once (it does not depend on ``C``); each ``C`` starts from the
    previous solution (``warm_start``), which makes the grid cost little more than one fit.
    """
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline

    vectorizer = TfidfVectorizer(
        ngram_range=(1, cfg.ngram_max), min_df=cfg.min_df, sublinear_tf=True, lowercase=True, dtype=np.float32
    )
    x_train = vectorizer.fit_transform(train_texts)
    x_val = vectorizer.transform(val_texts)
    classifier = LogisticRegression(max_iter=cfg.max_iter, warm_start=True, random_state=seed)
    table, best = [], None
    for c in sorted(cfg.c_grid):
        classifier.set_params(C=c)
        # one BLAS thread: lbfgs' dot products then sum in one order, so a container and a laptop
        # fit the same weights (with the host's thread count the last digits moved); the
        # matrices are small, so it costs little
        with threadpool_limits(limits=1):
            classifier.fit(x_train, train_y)
        pred = classifier.predict(x_val)
        row = {"C": c, "val_accuracy": accuracy(val_y, pred), "val_macro_f1": macro_f1(val_y, pred, num_classes)}
        table.append(row)
        if best is None or row["val_macro_f1"] > best[0]["val_macro_f1"]:
            best = (row, classifier.coef_.copy(), classifier.intercept_.copy())
    row, coef, intercept = best
    classifier.set_params(C=row["C"])
    classifier.coef_, classifier.intercept_ = coef, intercept
    return Pipeline([("tfidf", vectorizer), ("lr", classifier)]), {"selected": row, "grid": table}


def train_baseline(params, labels: Sequence[str]) -> tuple[Any, dict[str, Any]] | tuple[None, None]:
    """The fitted baseline and its training facts, or ``(None, None)`` when ``kind`` is ``none``."""
    cfg = params.evaluate.baseline
    if cfg.kind == "none":
        return None, None
    rows = finetune_rows(Path(params.paths.prepared_dir), params.finetune, params.seed)
    prepared = Path(params.paths.prepared_dir)
    y = {
        split: labels_to_ids(rows[split]["label"], labels, str(prepared / f"{split}.parquet"))
        for split in ("train", "val")
    }
    start = time.perf_counter()
    model, selection = fit_tfidf_lr(
        rows["train"]["text"], y["train"], rows["val"]["text"], y["val"], len(labels), cfg, params.seed
    )
    seconds = time.perf_counter() - start
    info = {
        "kind": cfg.kind,
        "n_train": len(y["train"]),
        "n_val": len(y["val"]),
        "features": len(model.named_steps["tfidf"].vocabulary_),
        "train_seconds": seconds,
        **selection,
    }
    logger.info(
        "evaluate: baseline %s on %d train rows (%d n-grams), C %g by val macro-F1 %.4f, %.1f s",
        cfg.kind,
        info["n_train"],
        info["features"],
        selection["selected"]["C"],
        selection["selected"]["val_macro_f1"],
        seconds,
    )
    return model, info


def predict_baseline(model, texts: Sequence[str]) -> tuple[np.ndarray, float]:
    """``(class ids, seconds)`` of the baseline on ``texts``."""
    start = time.perf_counter()
    pred = np.asarray(model.predict(list(texts)), dtype=np.int64)
    return pred, time.perf_counter() - start
