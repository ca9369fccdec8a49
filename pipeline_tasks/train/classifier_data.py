"""Labels, encoding and batching for the topic classifier (numpy + tokenizers).

Pure helpers used by :mod:`pipeline_tasks.train.finetune` and reusable by ``evaluate`` / ``predict``
(labelled rows come from :func:`pipeline_tasks.dataset.prepared.read_labelled_split`):

* :func:`encode_texts` — the one text -> token ids rule of the classifier: tokenizer ids,
  truncated to ``max_len`` (keeping room for the ``<|cls|>`` id appended at the end when the
  model uses one). Export and predict must encode exactly like this; the rule's inputs travel in
  the checkpoint's ``classifier`` dict (``max_len``, ``cls_id``, ``pad_id``);
* :func:`pad_batch` — right padding + attention mask, the layout :class:`SequenceClassifier`
  expects (causal backbones never see right pads, the mask is only used to pool);
* :func:`length_bucketed_batches` — shuffled batches of similar length, so that dynamic padding
  wastes little compute on CPU (AG News items are 20-150 tokens);
* :func:`class_weights` / :func:`sample_weights` — class-imbalance handling.

No torch here: this module is on the serving path (``ship.bundle``), which runs with ONNX Runtime,
numpy and tokenizers only.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from pipeline_tasks.errors import DataError

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
PAD_TOKEN = "<|pad|>"
CLS_TOKEN = "<|cls|>"


def label_vocabulary(labels: Sequence[str]) -> list[str]:
    """Sorted distinct labels: class ``i`` is ``vocab[i]`` (stored with the model)."""
    return sorted(set(labels))


def labels_to_ids(labels: Sequence[str], vocab: Sequence[str], where: str) -> np.ndarray:
    """Class ids for ``labels``; a label outside ``vocab`` fails naming ``where`` and the label."""
    index = {name: i for i, name in enumerate(vocab)}
    unknown = sorted({lab for lab in labels if lab not in index})
    if unknown:
        raise DataError(
            f"{where}: labels {unknown} do not occur in the training data (classes {list(vocab)}); "
            "check finetune sources / the label maps in ingest_news"
        )
    return np.fromiter((index[lab] for lab in labels), dtype=np.int64, count=len(labels))


def special_token_id(tokenizer: Any, token: str, required: bool = True) -> int | None:
    tid = tokenizer.token_to_id(token)
    if tid is None and required:
        raise DataError(
            f"tokenizer has no {token!r} token; re-run tokenize (its special tokens are part of the tokenizer contract)"
        )
    return tid


def encode_texts(
    tokenizer: Any, texts: Sequence[str], max_len: int, cls_id: int | None = None, batch_size: int = 2048
) -> list[np.ndarray]:
    """Token ids per text (int64), at most ``max_len`` long including the trailing ``cls_id``.

    Truncation keeps the beginning (the headline and the lead carry the topic). Texts that encode
    to nothing become a single ``cls_id`` (or keep zero tokens and are caught by the caller).
    """
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2, got {max_len}")
    keep = max_len - (1 if cls_id is not None else 0)
    out: list[np.ndarray] = []
    for start in range(0, len(texts), batch_size):
        # encode_batch runs in Rust threads; add_special_tokens=False: our specials are explicit
        for enc in tokenizer.encode_batch(list(texts[start : start + batch_size]), add_special_tokens=False):
            ids = enc.ids[:keep]
            if cls_id is not None:
                ids = [*ids, cls_id]
            out.append(np.asarray(ids, dtype=np.int64))
    return out


def pad_batch(seqs: Sequence[np.ndarray], pad_id: int, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad ``seqs`` to ``length`` (default: the longest) -> ``(input_ids, attention_mask)``."""
    if not len(seqs):
        raise ValueError("pad_batch needs at least one sequence")
    width = max(len(s) for s in seqs) if length is None else int(length)
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for i, s in enumerate(seqs):
        n = min(len(s), width)
        if n == 0:
            raise ValueError(f"sequence {i} is empty: every example needs at least one token")
        ids[i, :n] = s[:n]
        mask[i, :n] = 1
    return ids, mask


def length_bucketed_batches(
    lengths: Sequence[int],
    batch_size: int,
    rng: np.random.Generator,
    bucket_factor: int = 50,
    order: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Shuffled index batches whose members have similar lengths.

    Indices (``order``, default a random permutation) are cut into chunks of ``batch_size *
    bucket_factor``; each chunk is sorted by length and split into batches; the batches are
    shuffled. Randomness stays (chunks and batch order are random) while padding drops to a few
    percent. ``order`` lets a weighted sampler choose the indices.
    """
    lengths = np.asarray(lengths)
    order = rng.permutation(len(lengths)) if order is None else np.asarray(order)
    batches = []
    chunk = batch_size * max(1, bucket_factor)
    for start in range(0, len(order), chunk):
        idx = order[start : start + chunk]
        idx = idx[np.argsort(lengths[idx], kind="stable")]
        batches.extend(idx[i : i + batch_size] for i in range(0, len(idx), batch_size))
    rng.shuffle(batches)
    return batches


def sorted_batches(lengths: Sequence[int], batch_size: int) -> Iterator[np.ndarray]:
    """Deterministic batches in length order (evaluation: minimal padding, order restored later)."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    for i in range(0, len(order), batch_size):
        yield order[i : i + batch_size]


def class_weights(label_ids: np.ndarray, num_classes: int, scheme: str) -> np.ndarray | None:
    """Per-class loss weights, normalised so that the weighted mean over the data is 1.

    ``none`` -> None; ``inverse_freq`` -> n / (k * count_c) (sklearn's "balanced");
    ``sqrt_inverse_freq`` -> its square root (a milder correction for long-tailed data).
    """
    if scheme == "none":
        return None
    counts = np.bincount(np.asarray(label_ids), minlength=num_classes).astype(np.float64)
    if (counts == 0).any():
        raise DataError(
            f"class weighting {scheme!r}: classes {np.flatnonzero(counts == 0).tolist()} have no training examples"
        )
    if scheme == "inverse_freq":
        w = counts.sum() / (num_classes * counts)
    elif scheme == "sqrt_inverse_freq":
        w = np.sqrt(counts.sum() / (num_classes * counts))
    else:
        raise ValueError(f"unknown class weighting {scheme!r} (none, inverse_freq, sqrt_inverse_freq)")
    # keep the loss scale comparable to the unweighted loss: sum_c count_c * w_c == n
    return w * counts.sum() / (counts * w).sum()


def sample_weights(label_ids: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-example weights that make every class equally likely under a weighted sampler."""
    counts = np.bincount(np.asarray(label_ids), minlength=num_classes).astype(np.float64)
    return 1.0 / counts[np.asarray(label_ids)]
