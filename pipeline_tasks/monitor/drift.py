"""Drift monitoring core: text descriptors, LM bits per byte, evidently statistics and the decision table.

Pure functions on in-memory data, used by the ``monitor`` stage (:mod:`pipeline_tasks.monitor.monitor`),
``bench/drift.py`` and the tests. No paths, no params file.

Descriptors (one numeric value per text, computed by us, tested for drift by evidently):

* ``chars`` — length in characters;
* ``words`` — number of words (maximal runs of letters);
* ``non_letter_share`` — share of non-whitespace characters that are not letters (digits,
  punctuation, symbols, emoji);
* ``oov_share`` — share of the text's words that OUR byte-level BPE tokenizer splits into more
  than ``oov_max_pieces`` tokens (a word is encoded as it appears mid-sentence, with its leading
  space). A byte-level BPE has no unknown token: a word it never saw in training falls apart
  into many short pieces, so heavy fragmentation is the tokenizer's own "out of vocabulary".
  This replaces evidently's ``OOVWordsPercentage``, which downloads NLTK word lists at run time;
* ``tokens_per_byte`` — tokens of the whole text divided by its UTF-8 bytes (text the tokenizer
  compresses worse than its training data has more tokens per byte).

Signals of the decision table (:func:`decide_drift`), every one "larger means more drift":

* ``descriptors`` — share of descriptor columns whose evidently drift test fires;
* ``embedding`` — evidently's embedding drift score (MMD² by default) on the pooled hidden states
  of our own exported classifier;
* ``prediction`` — evidently's Jensen-Shannon distance between predicted-class distributions;
* ``label`` — the same on the labels, only when the batch has labels;
* ``bpb`` — relative change of the language model's mean bits per byte, ``|cur - ref| / ref``,
  a signal generic tools do not have: a LM that finds the new text harder (or suspiciously
  easier) than its training reference.

A signal fires when its value reaches its threshold; a threshold of ``None`` disables it and a
value of ``None`` (e.g. no labels) makes it unavailable. Drift is flagged when at least
``min_signals`` signals fire: one noisy signal alone must not page anyone.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from evidently.legacy.calculations.stattests.registry import get_stattest
from evidently.legacy.core import ColumnType
from evidently.metrics.embeddings import DistanceDriftMethod, MMDDriftMethod, ModelDriftMethod, RatioDriftMethod

DESCRIPTORS: tuple[str, ...] = ("chars", "words", "non_letter_share", "oov_share", "tokens_per_byte")
SIGNALS: tuple[str, ...] = ("descriptors", "embedding", "prediction", "label", "bpb")
UNLABELLED = "(none)"  # label category for rows without a label, so the labelled share can drift too

_WORD = re.compile(r"[^\W\d_]+")
_SPACE = re.compile(r"\s+")


# ---------------------------------------------------------------------------------------------
# descriptors


def compute_descriptors(
    texts: Sequence[str], tokenizer, oov_max_pieces: int = 2, batch_size: int = 8192
) -> dict[str, Any]:
    """Descriptor columns (numpy float64 arrays, one value per text) for ``texts``.

    ``tokenizer`` is a ``tokenizers.Tokenizer`` (the bundle's). Word fragmentation is cached per
    distinct word, so the cost is one ``encode_batch`` over the texts plus one over the vocabulary.
    """
    n = len(texts)
    chars = np.fromiter((len(t) for t in texts), dtype=np.float64, count=n)
    nbytes = np.fromiter((len(t.encode("utf-8")) for t in texts), dtype=np.float64, count=n)
    words = [_WORD.findall(t) for t in texts]
    non_letter = np.zeros(n, dtype=np.float64)
    for i, (text, ws) in enumerate(zip(texts, words)):
        visible = len(text) - sum(len(m) for m in _SPACE.findall(text))
        if visible:
            non_letter[i] = (visible - sum(len(w) for w in ws)) / visible
    vocab = sorted({w for ws in words for w in ws})
    pieces: dict[str, int] = {}
    for start in range(0, len(vocab), batch_size):
        chunk = vocab[start : start + batch_size]
        # " word": byte-level BPE attaches the leading space, the form a word has mid-sentence
        for word, enc in zip(chunk, tokenizer.encode_batch([" " + w for w in chunk], add_special_tokens=False)):
            pieces[word] = len(enc.ids)
    oov = np.fromiter(
        (sum(pieces[w] > oov_max_pieces for w in ws) / len(ws) if ws else 0.0 for ws in words),
        dtype=np.float64,
        count=n,
    )
    n_tokens = np.zeros(n, dtype=np.float64)
    for start in range(0, n, batch_size):
        encs = tokenizer.encode_batch(list(texts[start : start + batch_size]), add_special_tokens=False)
        n_tokens[start : start + len(encs)] = [len(e.ids) for e in encs]
    return {
        "chars": chars,
        "words": np.fromiter((len(ws) for ws in words), dtype=np.float64, count=n),
        "non_letter_share": non_letter,
        "oov_share": oov,
        "tokens_per_byte": np.divide(n_tokens, nbytes, out=np.zeros(n), where=nbytes > 0),
    }


def describe(values: Mapping[str, Any], quantiles: Sequence[float] = (0.05, 0.5, 0.95)) -> dict[str, dict]:
    """Mean, std and quantiles of each numeric column (for summaries and the reference statistics)."""
    out = {}
    for name, column in values.items():
        col = np.asarray(column, dtype=np.float64)
        col = col[np.isfinite(col)]
        if not col.size:
            out[name] = {"n": 0}
            continue
        out[name] = {
            "n": int(col.size),
            "mean": float(col.mean()),
            "std": float(col.std()),
            **{f"q{int(q * 100):02d}": float(np.quantile(col, q)) for q in quantiles},
        }
    return out


# ---------------------------------------------------------------------------------------------
# language-model bits per byte


def lm_windows(tokenizer, texts: Sequence[str], block_size: int, bos_id: int) -> tuple[list[list[int]], list[int]]:
    """Token windows for scoring and the UTF-8 bytes each window's targets cover.

    Each text is scored as a document start: ``[bos] + ids[:block_size - 1]`` predicts
    ``ids[:block_size - 1]`` (the LM was trained on documents separated by ``<|endoftext|>``).
    A truncated text counts only the bytes up to the end of its last scored token (from the
    tokenizer's offsets), so bits per byte stay exact under truncation.
    """
    windows, nbytes = [], []
    for text, enc in zip(texts, tokenizer.encode_batch(list(texts), add_special_tokens=False)):
        ids = list(enc.ids)[: block_size - 1]
        if not ids:
            windows.append([])
            nbytes.append(0)
            continue
        end = enc.offsets[len(ids) - 1][1] if len(ids) < len(enc.ids) else len(text)
        windows.append([bos_id] + ids)
        nbytes.append(len(text[:end].encode("utf-8")))
    return windows, nbytes


def bits_per_byte(
    lm_logits, tokenizer, texts: Sequence[str], block_size: int, bos_id: int, pad_id: int, batch_size: int = 32
):
    """Per-text bits per byte of a causal LM; ``lm_logits(ids [B, T]) -> logits [B, T, V]``.

    Texts with no tokens get NaN. Batches are built from length-sorted texts to limit padding;
    right padding cannot change earlier positions of a causal LM.
    """
    windows, nbytes = lm_windows(tokenizer, texts, block_size, bos_id)
    result = np.full(len(texts), np.nan, dtype=np.float64)
    order = sorted((i for i, w in enumerate(windows) if len(w) > 1), key=lambda i: len(windows[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(windows[i]) for i in rows)
        ids = np.full((len(rows), width), pad_id, dtype=np.int64)
        for r, i in enumerate(rows):
            ids[r, : len(windows[i])] = windows[i]
        z = np.asarray(lm_logits(ids), dtype=np.float32)[:, :-1, :]  # [B, T-1, V]: position t predicts t+1
        target = ids[:, 1:]
        # NLL = logsumexp(z) - z[target], without materialising a second [B, T, V] array
        peak = z.max(axis=-1)
        picked = np.take_along_axis(z, target[..., None], axis=-1)[..., 0]
        np.subtract(z, peak[..., None], out=z)
        np.exp(z, out=z)
        nll = (np.log(z.sum(axis=-1, dtype=np.float64)) + peak - picked).astype(np.float64)  # [B, T-1] nats
        for r, i in enumerate(rows):
            result[i] = nll[r, : len(windows[i]) - 1].sum() / math.log(2) / max(nbytes[i], 1)
    return result


# ---------------------------------------------------------------------------------------------
# model features of a text set (embeddings, predictions, bits per byte) through an ONNX bundle


@dataclasses.dataclass
class Features:
    """Everything the comparison needs about one set of texts.

    ``descriptors`` cover every text; the model outputs cover the rows ``sample`` (indices into
    the texts), the fixed-size subset the statistical tests run on.
    """

    descriptors: dict[str, Any]
    sample: Any  # int64 [s]
    embeddings: Any  # float32 [s, hidden]
    predictions: Any  # object [s] (label names)
    labels: Any | None  # object [s] (label names, UNLABELLED for missing) or None
    bpb: Any  # float64 [s]

    @property
    def rows(self) -> int:
        return len(next(iter(self.descriptors.values())))

    def take(self, idx) -> Features:
        """Rows ``idx`` as a new set, for features whose sample is every text (resampling studies)."""
        return Features(
            {k: v[idx] for k, v in self.descriptors.items()},
            np.arange(len(idx)),
            self.embeddings[idx],
            self.predictions[idx],
            None if self.labels is None else self.labels[idx],
            self.bpb[idx],
        )

    def sample_frame(self):
        """The sampled rows as evidently's input table: descriptors, bpb, prediction, label, emb_*."""
        frame = pd.DataFrame({name: col[self.sample] for name, col in self.descriptors.items()})
        frame["bpb"] = self.bpb
        frame["prediction"] = self.predictions
        if self.labels is not None:
            frame["label"] = self.labels
        emb = pd.DataFrame(self.embeddings, columns=[f"emb_{i}" for i in range(self.embeddings.shape[1])])
        return pd.concat([frame, emb], axis=1)


def model_outputs(bundle, texts: Sequence[str], variant: str = "fp32", batch_size: int = 64):
    """Pooled embeddings [N, hidden] and logits [N, classes] from one pass of the classifier graph.

    Texts are batched by character length (a cheap proxy for token length) so that padding, the
    main waste of batched inference on short headlines, stays small.
    """
    order = np.argsort(np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts)), kind="stable")
    hidden, classes = int(bundle.config["hidden_size"]), len(bundle.labels)
    pooled = np.zeros((len(texts), hidden), dtype=np.float32)
    logits = np.zeros((len(texts), classes), dtype=np.float32)
    for start in range(0, len(texts), batch_size):
        idx = order[start : start + batch_size]
        out = bundle.run(*bundle.encode([texts[i] for i in idx]), variant=variant)
        pooled[idx], logits[idx] = out["pooled"], out["logits"]
    return pooled, logits


def featurize(
    bundle,
    texts: Sequence[str],
    labels: Sequence[str | None] | None,
    sample,
    *,
    oov_max_pieces: int = 2,
    variant: str = "fp32",
    batch_size: int = 64,
    timings: dict[str, float] | None = None,
) -> Features:
    """Descriptors of every text, model outputs and bits per byte of the ``sample`` rows."""
    timings = timings if timings is not None else {}
    started = time.perf_counter()
    descriptors = compute_descriptors(texts, bundle.tokenizer, oov_max_pieces)
    timings["descriptors_s"] = timings.get("descriptors_s", 0.0) + time.perf_counter() - started
    sample = np.asarray(sample, dtype=np.int64)
    sampled = [texts[i] for i in sample]
    started = time.perf_counter()
    embeddings, logits = model_outputs(bundle, sampled, variant, batch_size)
    timings["embedding_s"] = timings.get("embedding_s", 0.0) + time.perf_counter() - started
    started = time.perf_counter()
    lm = bundle.config.get("lm")
    if lm:
        bpb = bits_per_byte(
            bundle.lm_logits,
            bundle.tokenizer,
            sampled,
            int(lm["model_config"]["block_size"]),
            int(bundle.config["eot_id"]),
            int(bundle.config["pad_id"]),
            batch_size=max(8, batch_size // 2),
        )
    else:  # a bundle exported without its LM: the bpb signal is unavailable
        bpb = np.full(len(sampled), np.nan)
    timings["bpb_s"] = timings.get("bpb_s", 0.0) + time.perf_counter() - started
    names = np.asarray(bundle.labels, dtype=object)
    label_col = None
    if labels is not None:
        label_col = np.asarray([labels[i] if labels[i] else UNLABELLED for i in sample], dtype=object)
    return Features(descriptors, sample, embeddings, names[logits.argmax(axis=1)], label_col, bpb)


# ---------------------------------------------------------------------------------------------
# evidently statistics (the same functions evidently's Report calls)


def column_drift(reference, current, kind: str, method: str, threshold: float) -> dict[str, Any]:
    """Drift of one column with an evidently stat test: ``{score, drifted, method, threshold}``.

    ``kind`` is ``num`` or ``cat``. For p-value tests (``ks``, ``chisquare`` ...) drift means
    ``score < threshold``; for distances (``wasserstein``, ``jensenshannon`` ...) ``score >=
    threshold``; evidently's own verdict is used either way.
    """
    ref, cur = pd.Series(reference).dropna(), pd.Series(current).dropna()
    if ref.empty or cur.empty:
        return {
            "score": None,
            "drifted": False,
            "method": method,
            "threshold": threshold,
            "note": "no values on one side",
        }
    column_type = ColumnType.Numerical if kind == "num" else ColumnType.Categorical
    test = get_stattest(ref, cur, column_type, method)
    result = test(ref, cur, column_type, threshold)
    return {
        "score": float(result.drift_score),
        "drifted": bool(result.drifted),
        "method": method,
        "threshold": float(result.actual_threshold),
    }


def embedding_drift_method(method: str, threshold: float | None, pca_components: int | None = None):
    """An evidently embedding drift method object (``evidently.metrics.embeddings``)."""
    kwargs: dict[str, Any] = {"pca_components": pca_components}
    if threshold is not None:
        kwargs["threshold"] = threshold
    classes = {
        "mmd": MMDDriftMethod,
        "model": ModelDriftMethod,
        "ratio": RatioDriftMethod,
        "distance": DistanceDriftMethod,
    }
    if method not in classes:
        raise ValueError(f"embedding method {method!r}: expected one of {sorted(classes)}")
    return classes[method](**kwargs)


def embedding_drift(
    reference, current, method: str = "mmd", threshold: float | None = None, pca_components: int | None = None
) -> dict[str, Any]:
    """Embedding drift score of ``current`` [n, d] against ``reference`` [m, d] via evidently."""
    drift = embedding_drift_method(method, threshold, pca_components)
    cols = [f"emb_{i}" for i in range(reference.shape[1])]
    score, detected, name = drift(pd.DataFrame(current, columns=cols), pd.DataFrame(reference, columns=cols))
    return {"score": float(score), "evidently_detected": bool(detected), "method": name}


def compare(reference: Features, current: Features, settings) -> tuple[dict[str, float | None], dict[str, Any]]:
    """Signal values and their details for ``current`` against ``reference``.

    ``settings`` is the ``monitor`` params section (:class:`pipeline_tasks.monitor.params.MonitorParams`):
    ``descriptor_method`` / ``descriptor_threshold`` (per-column test), ``embedding_method`` /
    ``embedding_pca_components``, ``category_method`` and ``thresholds``. Every statistic is
    evidently's (stat-test registry and embedding drift methods), on the sampled rows.
    """
    thresholds = settings.thresholds
    details: dict[str, Any] = {}
    columns = {
        name: column_drift(
            reference.descriptors[name][reference.sample],
            current.descriptors[name][current.sample],
            "num",
            settings.descriptor_method,
            settings.descriptor_threshold,
        )
        for name in DESCRIPTORS
    }
    tested = [c for c in columns.values() if c["score"] is not None]
    details["descriptors"] = {
        "columns": columns,
        "drifted": sorted(n for n, c in columns.items() if c["drifted"]),
        "method": settings.descriptor_method,
    }
    values: dict[str, float | None] = {
        "descriptors": sum(c["drifted"] for c in tested) / len(tested) if tested else None
    }

    emb = embedding_drift(
        reference.embeddings,
        current.embeddings,
        settings.embedding_method,
        thresholds.embedding,
        settings.embedding_pca_components,
    )
    details["embedding"] = emb
    values["embedding"] = emb["score"]

    pred = column_drift(
        reference.predictions,
        current.predictions,
        "cat",
        settings.category_method,
        thresholds.prediction if thresholds.prediction is not None else 0.1,
    )
    details["prediction"] = {
        **pred,
        "reference": distribution(reference.predictions),
        "current": distribution(current.predictions),
    }
    values["prediction"] = pred["score"]

    has_labels = (
        current.labels is not None and reference.labels is not None and bool(np.any(current.labels != UNLABELLED))
    )
    if has_labels:
        lab = column_drift(
            reference.labels,
            current.labels,
            "cat",
            settings.category_method,
            thresholds.label if thresholds.label is not None else 0.1,
        )
        details["label"] = {**lab, "reference": distribution(reference.labels), "current": distribution(current.labels)}
        values["label"] = lab["score"]
    else:
        details["label"] = {"score": None, "note": "the batch has no labels"}
        values["label"] = None

    ref_bpb, cur_bpb = _nanmean(reference.bpb), _nanmean(current.bpb)
    change = None if ref_bpb is None or cur_bpb is None or ref_bpb <= 0 else (cur_bpb - ref_bpb) / ref_bpb
    bpb_test = column_drift(reference.bpb, current.bpb, "num", "ks", 0.05) if change is not None else None
    details["bpb"] = {"reference": ref_bpb, "current": cur_bpb, "relative_change": change, "ks": bpb_test}
    values["bpb"] = None if change is None else abs(change)
    return values, details


def distribution(values) -> dict[str, float]:
    """Share of each category, sorted by name."""
    names, counts = np.unique(np.asarray(values, dtype=str), return_counts=True)
    total = counts.sum()
    return {str(n): float(c) / total for n, c in zip(names, counts)} if total else {}


def _nanmean(values) -> float | None:
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else None


# ---------------------------------------------------------------------------------------------
# the decision table


@dataclasses.dataclass(frozen=True)
class SignalResult:
    name: str
    value: float | None
    threshold: float | None
    fired: bool
    why: str


@dataclasses.dataclass(frozen=True)
class DriftDecision:
    drift_detected: bool
    min_signals: int
    signals: tuple[SignalResult, ...]

    @property
    def fired(self) -> list[str]:
        return [s.name for s in self.signals if s.fired]

    def summary(self) -> str:
        verdict = "DRIFT" if self.drift_detected else "no drift"
        checked = sum(1 for s in self.signals if s.threshold is not None and s.value is not None)
        return (
            f"{verdict}: {len(self.fired)} of {checked} signals fired ({', '.join(self.fired) or 'none'}; "
            f"drift at >= {self.min_signals})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "drift_detected": self.drift_detected,
            "min_signals": self.min_signals,
            "fired": self.fired,
            "summary": self.summary(),
            "signals": {s.name: dataclasses.asdict(s) for s in self.signals},
        }


def _finite(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def decide_drift(
    values: Mapping[str, float | None], thresholds: Mapping[str, float | None], min_signals: int
) -> DriftDecision:
    """Each signal against its threshold; drift when at least ``min_signals`` fire.

    ``values`` and ``thresholds`` are keyed by signal name (:data:`SIGNALS`, or any other name:
    the table is open). A missing value makes the signal unavailable, a ``None`` threshold
    disables it; neither can fire.
    """
    if min_signals < 1:
        raise ValueError(f"min_signals must be >= 1, got {min_signals}")
    names = [n for n in SIGNALS if n in values or n in thresholds]
    names += sorted((set(values) | set(thresholds)) - set(names))
    results = []
    for name in names:
        value, threshold = _finite(values.get(name)), thresholds.get(name)
        if threshold is None:
            results.append(SignalResult(name, value, None, False, f"{name}: disabled (threshold null)"))
        elif value is None:
            results.append(SignalResult(name, None, float(threshold), False, f"{name}: unavailable for this batch"))
        else:
            fired = value >= threshold
            results.append(
                SignalResult(
                    name, value, float(threshold), fired, f"{name} {value:.4g} {'>=' if fired else '<'} {threshold:.4g}"
                )
            )
    fired_count = sum(r.fired for r in results)
    return DriftDecision(fired_count >= min_signals, min_signals, tuple(results))
