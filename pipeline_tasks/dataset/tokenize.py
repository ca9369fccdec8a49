"""Stage ``tokenize``: train a byte-level BPE tokenizer and write flat token shards.

Inputs: ``paths.prepared_dir/{train,val,test}.parquet`` (column ``text``; ``kind`` and ``source``
for filtering and per-source statistics).
Outputs (``paths.tokens_dir``, swapped in atomically with a ``manifest.json``):

* ``tokenizer.json`` — a standalone Hugging Face ``tokenizers`` file (``Tokenizer.from_file``):
  GPT-2 style byte-level BPE (every byte is in the base alphabet, so any text round-trips exactly
  and there is no unknown token), no normalizer, no post-processor: ids are the raw encoding.
* ``{train,val,test}.bin`` + ``meta.json`` — see :mod:`pipeline_tasks.dataset.shards` for the layout.
  ``meta.json`` has the special token ids (``eot``, ``pad``, ``cls``), and per split and per
  source ``tokens``, ``bytes`` (UTF-8 bytes of the text) and ``docs``: ``bytes`` lets pretrain
  report bits per byte, which compares models across tokenizers.

``paths.tokenize_reports_dir/metrics.json`` (DVC metrics): token counts and the compression
(tokens per UTF-8 byte) per source.

The tokenizer is trained on the train split only (so val/test compression is honest), streamed
in batches through ``train_from_iterator``; ``train_max_bytes`` caps that sample for big corpora.
A document that contains a special token's literal text (``<|endoftext|>`` in a web page) would
encode it as the special id and fake a document boundary, so the literal is removed and counted.

Params section ``tokenize`` (:class:`~pipeline_tasks.dataset.params.TokenizeParams`).
Command: ``python -m pipeline_tasks tokenize``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from pipeline_tasks.artifacts import atomic_dir, atomic_write_json, sha256_file, write_manifest
from pipeline_tasks.dataset.params import TokenizeParams
from pipeline_tasks.dataset.shards import META_NAME, SPLITS, ShardWriter, token_dtype
from pipeline_tasks.errors import DataError

logger = logging.getLogger(__name__)

TOKENIZER_NAME = "tokenizer.json"


# ---------------------------------------------------------------------------------------------
# Core: tokenizer training and encoding (no paths)
# ---------------------------------------------------------------------------------------------


def train_tokenizer(texts: Iterator[list[str]], vocab_size: int, min_frequency: int, special_tokens: tuple[str, ...]):
    """Byte-level BPE trained on batches of texts; the special tokens get the first ids."""
    tokenizer = Tokenizer(models.BPE())
    # GPT-2 pre-tokenization (regex split, bytes mapped to printable unicode), no prefix space so
    # decode(encode(x)) == x exactly
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def special_token_ids(tokenizer, params: TokenizeParams) -> dict[str, int]:
    ids = {
        "eot": tokenizer.token_to_id(params.eot_token),
        "pad": tokenizer.token_to_id(params.pad_token),
        "cls": tokenizer.token_to_id(params.cls_token),
    }
    missing = [k for k, v in ids.items() if v is None]
    if missing:
        raise DataError(f"trained tokenizer lacks special tokens {missing}; this is a bug")
    return ids


def strip_special_literals(texts: list[str], specials: tuple[str, ...]) -> tuple[list[str], int]:
    """Remove special-token literals from raw text (they would encode as control ids)."""
    removed = 0
    out = []
    for text in texts:
        for special in specials:
            if special in text:
                removed += text.count(special)
                text = text.replace(special, "")
        out.append(text)
    return out, removed


def encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    # encode_batch_fast (tokenizers >= 0.21) skips offset tracking, which we do not need
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    return [enc.ids for enc in encode(texts, add_special_tokens=False)]


# ---------------------------------------------------------------------------------------------
# Reading the prepared splits
# ---------------------------------------------------------------------------------------------


def iter_documents(
    path: Path, kinds: tuple[str, ...], batch_size: int, max_batch_bytes: int = 2 << 20
) -> Iterator[tuple[list[str], list[str], list[int]]]:
    """Batches of (texts, sources, utf8 byte lengths) of non-empty documents of the chosen kinds:
    at most ``batch_size`` documents and, unless one document is larger, ``max_batch_bytes`` of text."""
    try:
        # no pre-buffering: pyarrow would otherwise cache the ranges of many row groups ahead, and
        # memory would grow with the split instead of staying at a batch
        parquet = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: cannot read Parquet ({exc}); re-run the prepare stage") from exc
    missing = {"text", "kind", "source"} - set(parquet.schema_arrow.names)
    if missing:
        raise DataError(
            f"{path}: missing column(s) {sorted(missing)}; expected the prepared schema (docs/ARCHITECTURE.md, prepare)"
        )
    for batch in parquet.iter_batches(batch_size=batch_size, columns=["text", "kind", "source"], use_threads=False):
        keep = pc.and_(
            pc.is_in(batch.column("kind"), value_set=pa.array(list(kinds))),
            pc.greater(pc.fill_null(pc.utf8_length(batch.column("text")), 0), 0),
        )
        batch = batch.filter(keep)
        if not batch.num_rows:
            continue
        texts, sources = batch.column("text").to_pylist(), batch.column("source").to_pylist()
        lengths = pc.binary_length(batch.column("text")).to_pylist()
        # also cut by bytes: encoding takes ~50 MB per MB of text here, so 1,024 long articles in a row (the
        # sorted split puts one wiki source's pages together) would need a GB at once
        start, size = 0, 0
        for end, n_bytes in enumerate(lengths):
            if size and size + n_bytes > max_batch_bytes:
                yield texts[start:end], sources[start:end], lengths[start:end]
                start, size = end, 0
            size += n_bytes
        yield texts[start:], sources[start:], lengths[start:]


def text_bytes(path: Path, kinds: tuple[str, ...]) -> int:
    """UTF-8 bytes of the texts of the chosen kinds, counted in Arrow (no Python strings)."""
    parquet = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)
    total = 0
    for batch in parquet.iter_batches(batch_size=4096, columns=["text", "kind"], use_threads=False):
        keep = pc.fill_null(pc.is_in(batch.column("kind"), value_set=pa.array(list(kinds))), False)
        total += pc.sum(pc.binary_length(pc.filter(batch.column("text"), keep))).as_py() or 0
    return total


def training_sample(path: Path, params: TokenizeParams, seed: int) -> Iterator[list[str]]:
    """The train split's texts, or a seeded random subset of documents of ~train_max_bytes."""
    keep_fraction = 1.0
    if params.train_max_bytes:
        total = text_bytes(path, params.kinds)
        keep_fraction = min(1.0, params.train_max_bytes / max(total, 1))
        logger.info("tokenizer sample: %.1f%% of %d train bytes", 100 * keep_fraction, total)
    rng = np.random.default_rng(seed)
    for texts, _, _ in iter_documents(path, params.kinds, params.batch_size):
        if keep_fraction < 1.0:
            texts = [t for t, u in zip(texts, rng.random(len(texts))) if u < keep_fraction]
        yield strip_special_literals(texts, params.special_tokens)[0]


def encode_split(
    tokenizer, path: Path, out_path: Path, params: TokenizeParams, dtype: str, eot_id: int
) -> dict[str, Any]:
    """Encode one split into a shard; returns its tokens/bytes/docs totals and per source."""
    per_source: dict[str, dict[str, int]] = {}
    removed = 0
    with (
        ShardWriter(out_path, dtype, eot_id) as writer,
        tqdm(desc=f"tokenize {path.stem}", unit="doc", disable=None) as bar,
    ):
        for texts, sources, byte_lengths in iter_documents(path, params.kinds, params.batch_size):
            texts, n_removed = strip_special_literals(texts, params.special_tokens)
            removed += n_removed
            if n_removed:  # byte counts must describe the text that was actually encoded
                byte_lengths = [len(t.encode("utf-8")) for t in texts]
            ids = encode_texts(tokenizer, texts)
            writer.write_docs(ids)
            for source, doc_ids, n_bytes in zip(sources, ids, byte_lengths):
                stats = per_source.setdefault(source, {"tokens": 0, "bytes": 0, "docs": 0})
                stats["tokens"] += len(doc_ids) + 1  # + the EOT that follows the document
                stats["bytes"] += n_bytes
                stats["docs"] += 1
            bar.update(len(texts))
    if removed:
        logger.warning("%s: removed %d special-token literal(s) from the text", path, removed)
    return {
        "tokens": writer.tokens,
        "docs": writer.docs,
        "bytes": sum(s["bytes"] for s in per_source.values()),
        "special_literals_removed": removed,
        "sources": dict(sorted(per_source.items())),
    }


def compression_metrics(meta: dict[str, Any]) -> dict[str, Any]:
    """DVC metrics: tokens per split and tokens per UTF-8 byte per source (all splits pooled)."""
    pooled: dict[str, dict[str, int]] = {}
    for split in meta["splits"].values():
        for source, stats in split["sources"].items():
            agg = pooled.setdefault(source, {"tokens": 0, "bytes": 0})
            agg["tokens"] += stats["tokens"]
            agg["bytes"] += stats["bytes"]
    all_tokens = sum(s["tokens"] for s in pooled.values())
    all_bytes = sum(s["bytes"] for s in pooled.values())
    return {
        "vocab_size": meta["vocab_size"],
        "tokens": {name: split["tokens"] for name, split in meta["splits"].items()},
        "docs": {name: split["docs"] for name, split in meta["splits"].items()},
        "tokens_per_byte": {
            "all": round(all_tokens / max(all_bytes, 1), 4),
            **{src: round(s["tokens"] / max(s["bytes"], 1), 4) for src, s in sorted(pooled.items())},
        },
    }


# ---------------------------------------------------------------------------------------------
# Runner
# ---------------------------------------------------------------------------------------------


def run(params, **_options) -> dict[str, Any]:
    cfg: TokenizeParams = params.tokenize
    prepared_dir, tokens_dir = Path(params.paths.prepared_dir), Path(params.paths.tokens_dir)
    reports_dir = Path(params.paths.tokenize_reports_dir)
    inputs = {split: prepared_dir / f"{split}.parquet" for split in SPLITS}
    for split, path in inputs.items():
        if not path.is_file():
            raise DataError(f"{path} not found: run the prepare stage first (python -m pipeline_tasks prepare)")

    logger.info("training byte-level BPE (vocab %d) on %s", cfg.vocab_size, inputs["train"])
    tokenizer = train_tokenizer(
        training_sample(inputs["train"], cfg, params.seed), cfg.vocab_size, cfg.min_frequency, cfg.special_tokens
    )
    vocab_size = tokenizer.get_vocab_size()
    if vocab_size < cfg.vocab_size:
        logger.warning(
            "the training text supports only %d of %d requested tokens (min_frequency=%d)",
            vocab_size,
            cfg.vocab_size,
            cfg.min_frequency,
        )
    special = special_token_ids(tokenizer, cfg)
    dtype = token_dtype(vocab_size)

    with atomic_dir(tokens_dir) as tmp:
        tokenizer.save(str(tmp / TOKENIZER_NAME))
        splits = {
            split: encode_split(tokenizer, path, tmp / f"{split}.bin", cfg, dtype, special["eot"])
            for split, path in inputs.items()
        }
        meta = {
            "vocab_size": vocab_size,
            "dtype": dtype,
            "special_tokens": special,
            "special_token_strings": {"eot": cfg.eot_token, "pad": cfg.pad_token, "cls": cfg.cls_token},
            "layout": "each document's ids followed by the eot id; raw little-endian array",
            "splits": splits,
        }
        atomic_write_json(tmp / META_NAME, meta)
        write_manifest(
            tmp, "tokenize", cfg, inputs={str(p): sha256_file(p) for p in inputs.values()}, extra={"seed": params.seed}
        )
    metrics = compression_metrics(meta)
    atomic_write_json(reports_dir / "metrics.json", metrics)
    for split, stats in splits.items():
        logger.info(
            "%s: %d docs, %d tokens, %.3f tokens/byte",
            split,
            stats["docs"],
            stats["tokens"],
            stats["tokens"] / max(stats["bytes"], 1),
        )
    return {
        "vocab_size": vocab_size,
        "dtype": dtype,
        "tokens": metrics["tokens"],
        "tokens_per_byte": metrics["tokens_per_byte"]["all"],
        "tokens_dir": str(tokens_dir),
    }
