"""Stage ``tokenize`` on tiny real prepared data (WikiText-2, AG News, Chinese Wikipedia)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from _lm_data import write_params, write_prepared

from pipeline_tasks.config import load_params
from pipeline_tasks.dataset.shards import open_shard
from pipeline_tasks.errors import DataError


@pytest.fixture(scope="module")
def tokenized(corpora, tmp_path_factory):
    from pipeline_tasks.dataset import tokenize

    tmp = tmp_path_factory.mktemp("tokenize")
    params = load_params(write_params(tmp, tokenize={"vocab_size": 1024}))
    counts = write_prepared(corpora, tmp / "data/prepared")
    result = tokenize.run(params)
    return params, counts, result


def test_tokenize_writes_standalone_tokenizer_and_consistent_shards(tokenized):
    from tokenizers import Tokenizer

    params, counts, result = tokenized
    tokens_dir = params.paths.tokens_dir
    meta = json.loads(open(f"{tokens_dir}/meta.json", encoding="utf-8").read())
    tokenizer = Tokenizer.from_file(f"{tokens_dir}/tokenizer.json")
    assert tokenizer.get_vocab_size() == meta["vocab_size"] == 1024 == result["vocab_size"]
    assert meta["dtype"] == "uint16"
    eot = meta["special_tokens"]["eot"]
    assert tokenizer.id_to_token(eot) == "<|endoftext|>"
    for split, n_docs in counts.items():
        data = open_shard(tokens_dir, split, meta)  # raises if the size disagrees with meta
        stats = meta["splits"][split]
        assert stats["docs"] == n_docs == int((data == eot).sum())
        assert data[-1] == eot
        assert sum(s["tokens"] for s in stats["sources"].values()) == stats["tokens"] == len(data)
        assert sum(s["bytes"] for s in stats["sources"].values()) == stats["bytes"]

    # the first document of train.bin decodes back to the first prepared train text, byte for byte
    train = np.memmap(f"{tokens_dir}/train.bin", dtype=np.uint16, mode="r")
    first_doc = train[: int(np.argmax(train == eot))].tolist()
    first_text = pq.read_table(f"{params.paths.prepared_dir}/train.parquet").column("text")[0].as_py()
    assert tokenizer.decode(first_doc) == first_text


def test_tokenize_reports_compression_per_source(tokenized):
    params, _, _ = tokenized
    metrics = json.loads(open(f"{params.paths.tokenize_reports_dir}/metrics.json", encoding="utf-8").read())
    tpb = metrics["tokens_per_byte"]
    assert set(tpb) == {"all", "ag_news", "wikitext2", "zhwiki"}
    # byte-level BPE never needs more than one token per byte, and merges compress English well
    assert all(0 < v <= 1 for v in tpb.values())
    assert tpb["wikitext2"] < 0.5
    manifest = json.loads(open(f"{params.paths.tokens_dir}/manifest.json", encoding="utf-8").read())
    assert manifest["stage"] == "tokenize" and "train.bin" in manifest["outputs"]


def test_tokenize_kinds_filter_keeps_only_selected_documents(corpora, tmp_path):
    from pipeline_tasks.dataset import tokenize

    params = load_params(write_params(tmp_path, tokenize={"vocab_size": 600, "kinds": ["news"]}))
    write_prepared(corpora, tmp_path / "data/prepared", n_wiki=4, n_news=60, n_zh=2)
    tokenize.run(params)
    meta = json.loads(open(f"{params.paths.tokens_dir}/meta.json", encoding="utf-8").read())
    assert {src for s in meta["splits"].values() for src in s["sources"]} == {"ag_news"}


def test_tokenize_missing_prepared_split_names_the_file(tmp_path):
    from pipeline_tasks.dataset import tokenize

    params = load_params(write_params(tmp_path, tokenize={"vocab_size": 600}))
    with pytest.raises(DataError, match="train.parquet not found: run the prepare stage"):
        tokenize.run(params)
