"""Flat token shards on disk: the contract between ``tokenize`` and ``pretrain``.

Layout (``paths.tokens_dir``): ``{train,val,test}.bin`` hold the token ids of every document of
a split back to back, each document followed by the ``<|endoftext|>`` id, as raw little-endian
``uint16`` (vocab <= 65536) or ``uint32``: readable with ``np.memmap`` and no Python per token,
as in nanoGPT. ``meta.json`` names the dtype, the vocab size, the special token ids and per split
``tokens`` (EOT separators included), ``bytes`` (UTF-8 bytes of the encoded text) and ``docs``.

Sampling is stateless: the windows of a micro-batch are a pure function of
``(seed, step, micro_batch)``, where ``micro_batch`` is the index of the micro-batch within the
optimizer step over all ranks (``rank * accumulation + micro_step``). So the data position of a run
is just its step counter — a resumed run draws exactly the batches the uninterrupted run would have —
and a step consumes the same windows whatever the topology: 1 process x 8 micro-batches, 2 nodes x
4 or 8 GPUs x 1 see the same tokens, and only the float summation order of the gradient differs.

Only numpy (and torch for :func:`windows_to_tensors`) is needed: this runs on the GPU machine.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from pipeline_tasks.errors import DataError

META_NAME = "meta.json"
SPLITS = ("train", "val", "test")
_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


def token_dtype(vocab_size: int) -> str:
    """Smallest unsigned dtype that holds every id (``uint16`` up to 65,536 ids)."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def shard_path(tokens_dir: str | os.PathLike, split: str) -> Path:
    return Path(tokens_dir) / f"{split}.bin"


def load_meta(tokens_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(tokens_dir) / META_NAME
    if not path.is_file():
        raise DataError(f"{path} not found: run the tokenize stage first (python -m pipeline_tasks tokenize)")
    with open(path, encoding="utf-8") as fh:
        meta = json.load(fh)
    for key in ("vocab_size", "dtype", "special_tokens", "splits"):
        if key not in meta:
            raise DataError(f"{path}: missing key {key!r}; re-run the tokenize stage")
    if meta["dtype"] not in _DTYPES:
        raise DataError(f"{path}: dtype {meta['dtype']!r} is not one of {sorted(_DTYPES)}")
    return meta


def open_shard(tokens_dir: str | os.PathLike, split: str, meta: dict[str, Any]) -> np.memmap:
    """Read-only memmap of one split, checked against the token count in ``meta.json``."""
    path = shard_path(tokens_dir, split)
    if not path.is_file():
        raise DataError(f"{path} not found: run the tokenize stage first")
    dtype = _DTYPES[meta["dtype"]]
    # mmap of an empty file is an error; an empty split (a tiny corpus' test set) is not
    data = np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.zeros(0, dtype=dtype)
    expected = meta["splits"].get(split, {}).get("tokens")
    if expected is not None and len(data) != expected:
        raise DataError(
            f"{path}: {len(data)} tokens on disk but meta.json says {expected}; "
            "the shard is truncated or stale, re-run the tokenize stage"
        )
    return data


class ShardWriter:
    """Append documents' ids (+ EOT after each) to a ``.bin`` file, counting tokens and docs."""

    def __init__(self, path: str | os.PathLike, dtype: str, eot_id: int):
        self.path, self.dtype, self.eot_id = Path(path), np.dtype(_DTYPES[dtype]), int(eot_id)
        self.tokens = 0
        self.docs = 0
        self._fh = open(self.path, "wb")

    def write_docs(self, docs_ids: list[list[int]]) -> int:
        """Write a batch of documents; returns the number of tokens written (EOTs included)."""
        if not docs_ids:
            return 0
        lengths = [len(ids) + 1 for ids in docs_ids]
        flat = np.empty(sum(lengths), dtype=self.dtype)
        pos = 0
        for ids, n in zip(docs_ids, lengths):
            flat[pos : pos + n - 1] = ids
            flat[pos + n - 1] = self.eot_id
            pos += n
        flat.tofile(self._fh)
        self.tokens += len(flat)
        self.docs += len(docs_ids)
        return len(flat)

    def close(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def window_starts(
    n_tokens: int, block_size: int, batch_size: int, *, seed: int, step: int, micro_batch: int
) -> np.ndarray:
    """Start offsets of ``batch_size`` random windows of ``block_size + 1`` tokens.

    A pure function of its arguments (a fresh PCG64 stream per micro-batch from a SeedSequence),
    which is what makes resume exact and the draw independent of the topology. ``micro_batch`` is
    the global index of the micro-batch within the step (``rank * accumulation + micro_step``).
    """
    high = n_tokens - block_size - 1
    if high < 1:
        raise DataError(
            f"the split has {n_tokens} tokens, fewer than block_size + 2 = {block_size + 2}; "
            "use more data or a smaller model.block_size"
        )
    # the 0 was the rank of the per-rank sampler this replaced: with it, single-process runs draw the
    # windows they always drew, so their results and checkpoints stay valid
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0, step, micro_batch]))
    return rng.integers(0, high, size=batch_size)


def micro_batch_seed(seed: int, step: int, micro_batch: int) -> int:
    """Torch seed of one micro-batch's dropout masks: like the windows, the same in every topology."""
    return int(np.random.SeedSequence([seed, 1, step, micro_batch]).generate_state(1, np.uint64)[0] >> 1)


def eval_window_starts(n_tokens: int, block_size: int, n_windows: int) -> np.ndarray:
    """``n_windows`` evenly spaced windows over the whole split: the same set at every evaluation."""
    high = n_tokens - block_size - 1
    if high < 1:
        raise DataError(
            f"the validation split has {n_tokens} tokens, fewer than block_size + 2 = "
            f"{block_size + 2}; use more data or a smaller model.block_size"
        )
    return np.unique(np.linspace(0, high - 1, num=n_windows).astype(np.int64))


def windows_to_tensors(data: np.ndarray, starts: np.ndarray, block_size: int, device: Any = "cpu"):
    """Inputs ``x`` and next-token targets ``y``, both ``(B, T)`` int64 tensors on ``device``."""
    import torch  # why: only pretrain needs torch here; tokenize writes shards without importing it

    batch = np.stack([data[s : s + block_size + 1] for s in starts]).astype(np.int64)  # (B, T+1)
    batch = torch.from_numpy(batch)
    x, y = batch[:, :-1], batch[:, 1:]  # (B, T) each: y is x shifted left by one
    device = torch.device(device)
    if device.type == "cuda":  # pinned host memory lets the copy overlap with compute
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.contiguous(), y.contiguous()
