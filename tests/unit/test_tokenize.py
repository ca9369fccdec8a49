"""Tokenizer core and shard layout: exact round trips (English, Chinese, unseen scripts), special
tokens, the on-disk shard format and the stateless window sampler."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline_tasks.config import ConfigError, parse_params
from pipeline_tasks.dataset.params import TokenizeParams
from pipeline_tasks.dataset.shards import (
    ShardWriter,
    eval_window_starts,
    micro_batch_seed,
    open_shard,
    token_dtype,
    window_starts,
)
from pipeline_tasks.dataset.tokenize import encode_texts, strip_special_literals, train_tokenizer

SPECIALS = ("<|endoftext|>", "<|pad|>", "<|cls|>")


@pytest.fixture(scope="module")
def corpus_texts(corpora) -> list[str]:
    en = (corpora / "wikitext2/DRAGNLabs_LLMHumanModeling/wiki.valid.raw").read_text(encoding="utf-8")[:150_000]
    with open(corpora / "wikipedia_text/jastfkjg_Chinese-relation-extraction/wiki_00", encoding="utf-8") as fh:
        zh = [json.loads(next(fh))["text"][:20_000] for _ in range(3)]
    return [en[i : i + 5000] for i in range(0, len(en), 5000)] + zh


@pytest.fixture(scope="module")
def tokenizer(corpus_texts):
    return train_tokenizer(iter([corpus_texts]), vocab_size=1000, min_frequency=2, special_tokens=SPECIALS)


def test_tokenizer_roundtrips_english_and_chinese_exactly(tokenizer, corpus_texts):
    english = corpus_texts[1]  # real WikiText with CRLF line ends, @-@ and unicode dashes
    chinese = corpus_texts[-1]
    for text in (english, chinese):
        ids = tokenizer.encode(text).ids
        assert tokenizer.decode(ids) == text
    # merges learned something: fewer tokens than UTF-8 bytes on the language it saw most of
    assert len(tokenizer.encode(english).ids) < 0.6 * len(english.encode("utf-8"))


@pytest.mark.parametrize(
    "text",
    [
        "Привет, мир! 👋🏽 naïve café\t\u00a0x",
        "  leading spaces\n\nand\r\n trailing ",
        "日本語のテキストと emoji 🚀",
        "\x00\x01 control bytes \ufeff",
    ],
)
def test_tokenizer_roundtrips_unseen_text_without_unknown_tokens(tokenizer, text):
    ids = tokenizer.encode(text).ids
    assert tokenizer.decode(ids) == text


def test_special_tokens_get_the_first_ids_and_literals_are_stripped(tokenizer):
    assert [tokenizer.token_to_id(t) for t in SPECIALS] == [0, 1, 2]
    texts, removed = strip_special_literals(["a <|endoftext|> b", "plain", "<|pad|><|pad|>"], SPECIALS)
    assert texts == ["a  b", "plain", ""] and removed == 3
    assert 0 not in encode_texts(tokenizer, texts)[0]


def test_token_dtype_switches_to_uint32_above_65536():
    assert token_dtype(65536) == "uint16"
    assert token_dtype(65537) == "uint32"


def test_shard_writer_separates_documents_with_eot(tmp_path):
    path = tmp_path / "train.bin"
    with ShardWriter(path, "uint16", eot_id=0) as writer:
        writer.write_docs([[5, 6, 7], [8]])
        writer.write_docs([[65535, 9]])
    assert (writer.tokens, writer.docs) == (9, 3)
    meta = {"dtype": "uint16", "splits": {"train": {"tokens": 9}}}
    data = open_shard(tmp_path, "train", meta)
    assert data.dtype == np.uint16
    assert data.tolist() == [5, 6, 7, 0, 8, 0, 65535, 9, 0]
    assert path.stat().st_size == 9 * 2


def test_open_shard_rejects_a_truncated_shard(tmp_path):
    with ShardWriter(tmp_path / "val.bin", "uint32", eot_id=1) as writer:
        writer.write_docs([[2, 3, 4]])
    from pipeline_tasks.errors import DataError

    with pytest.raises(DataError, match="4 tokens on disk but meta.json says 10"):
        open_shard(tmp_path, "val", {"dtype": "uint32", "splits": {"val": {"tokens": 10}}})


def test_window_starts_are_a_pure_function_of_seed_step_and_global_micro_batch():
    kwargs = dict(n_tokens=10_000, block_size=64, batch_size=8, seed=1)
    a = window_starts(**kwargs, step=5, micro_batch=0)
    assert np.array_equal(a, window_starts(**kwargs, step=5, micro_batch=0))
    assert not np.array_equal(a, window_starts(**kwargs, step=5, micro_batch=1))
    assert not np.array_equal(a, window_starts(**kwargs, step=6, micro_batch=0))
    assert a.min() >= 0 and a.max() <= 10_000 - 64 - 2
    # single-process runs draw what the per-rank sampler drew for rank 0: old results stay valid
    legacy = np.random.default_rng(np.random.SeedSequence([1, 0, 5, 3])).integers(0, 10_000 - 64 - 1, size=8)
    assert np.array_equal(window_starts(**kwargs, step=5, micro_batch=3), legacy)


def test_a_step_draws_the_same_windows_in_every_topology():
    """1 process x 8 micro-batches, 2 ranks x 4, 4 ranks x 2, 8 x 1: the same 8 draws."""
    kwargs = dict(n_tokens=50_000, block_size=32, batch_size=4, seed=7, step=11)
    micro_batches = 8

    def draws(world: int) -> list[list[int]]:
        accum = micro_batches // world
        return [
            window_starts(**kwargs, micro_batch=rank * accum + m).tolist()
            for rank in range(world)
            for m in range(accum)
        ]

    assert draws(1) == draws(2) == draws(4) == draws(8)
    assert micro_batch_seed(7, 11, 3) == micro_batch_seed(7, 11, 3) != micro_batch_seed(7, 11, 4)

    evals = eval_window_starts(10_000, 64, 16)
    assert len(evals) == 16 and evals.max() + 65 <= 10_000


def test_tokenize_params_reject_bad_values():
    with pytest.raises(ValueError, match="vocab_size must be >"):
        TokenizeParams(vocab_size=200)
    with pytest.raises(ValueError, match="distinct"):
        TokenizeParams(pad_token="<|endoftext|>")
    with pytest.raises(ConfigError, match="tokenize.vocab_sise: unknown key"):
        parse_params({"tokenize": {"vocab_sise": 1000}})


def _prepared_texts(path, texts_by_kind):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [(t, k) for k, texts in texts_by_kind.items() for t in texts]
    pq.write_table(
        pa.table({"text": [t for t, _ in rows], "kind": [k for _, k in rows], "source": ["s"] * len(rows)}),
        path,
        row_group_size=100,
    )


def test_training_sample_is_whole_under_the_cap_and_a_seeded_subset_over_it(tmp_path):
    import dataclasses

    from pipeline_tasks.dataset.tokenize import text_bytes, training_sample

    path = tmp_path / "train.parquet"
    texts = [f"document {i} " + "word " * (i % 50 + 1) for i in range(2000)]
    _prepared_texts(path, {"wiki": texts, "other": ["not counted " * 100] * 50})
    total = sum(len(t.encode()) for t in texts)
    assert text_bytes(path, ("wiki",)) == total  # only the chosen kinds

    def sample(cap, seed=1):
        params = dataclasses.replace(TokenizeParams(kinds=("wiki",)), train_max_bytes=cap)
        return [t for batch in training_sample(path, params, seed) for t in batch]

    assert sample(total) == sample(0) == texts  # the default corpus trains on all of it, in order
    subset = sample(total // 4)
    assert subset == sample(total // 4) and subset != sample(total // 4, seed=2)
    assert 0.15 * total < sum(len(t.encode()) for t in subset) < 0.35 * total
    assert TokenizeParams().train_max_bytes == 1 << 30
