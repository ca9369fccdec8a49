"""Drift core: the decision table, descriptors on a real BPE, bits per byte arithmetic, evidently tests, windows."""

from __future__ import annotations

import csv
import datetime as dt
import math

import numpy as np
import pytest

from pipeline_tasks.config import ConfigError, parse_params
from pipeline_tasks.monitor import drift

BASE = {"descriptors": 0.5, "embedding": 0.015, "prediction": 0.15, "label": 0.15, "bpb": 0.05}
QUIET = {"descriptors": 0.2, "embedding": 0.001, "prediction": 0.05, "label": 0.05, "bpb": 0.01}


# ---------------------------------------------------------------------------------------------
# decision table


def test_decide_drift_quiet_batch_flags_nothing():
    decision = drift.decide_drift(QUIET, BASE, min_signals=1)
    assert not decision.drift_detected and decision.fired == []
    assert set(decision.to_dict()["signals"]) == set(drift.SIGNALS)


@pytest.mark.parametrize("signal", drift.SIGNALS)
def test_decide_drift_each_signal_fires_when_it_crosses_its_threshold(signal):
    below = drift.decide_drift({**QUIET, signal: BASE[signal] * 0.99}, BASE, min_signals=1)
    at = drift.decide_drift({**QUIET, signal: BASE[signal]}, BASE, min_signals=1)
    above = drift.decide_drift({**QUIET, signal: BASE[signal] * 3}, BASE, min_signals=1)
    assert not below.drift_detected
    assert at.drift_detected and at.fired == [signal]  # reaching the threshold fires
    assert above.drift_detected and above.fired == [signal]
    entry = above.to_dict()["signals"][signal]
    assert entry["fired"] and entry["threshold"] == BASE[signal] and entry["value"] == pytest.approx(BASE[signal] * 3)


@pytest.mark.parametrize("signal", drift.SIGNALS)
def test_decide_drift_min_signals_two_needs_a_second_signal(signal):
    one = drift.decide_drift({**QUIET, signal: 1.0}, BASE, min_signals=2)
    other = next(s for s in drift.SIGNALS if s != signal)
    two = drift.decide_drift({**QUIET, signal: 1.0, other: 1.0}, BASE, min_signals=2)
    assert not one.drift_detected and one.fired == [signal]
    assert two.drift_detected and sorted(two.fired) == sorted([signal, other])


def test_decide_drift_disabled_and_unavailable_signals_never_fire():
    values = {**QUIET, "label": None, "bpb": float("nan"), "embedding": 1.0}
    decision = drift.decide_drift(values, {**BASE, "embedding": None}, min_signals=1)
    signals = decision.to_dict()["signals"]
    assert not decision.drift_detected
    assert "disabled" in signals["embedding"]["why"] and not signals["embedding"]["fired"]
    assert "unavailable" in signals["label"]["why"] and signals["label"]["value"] is None
    assert "unavailable" in signals["bpb"]["why"]


def test_decide_drift_rejects_min_signals_below_one():
    with pytest.raises(ValueError, match="min_signals"):
        drift.decide_drift(QUIET, BASE, min_signals=0)


# ---------------------------------------------------------------------------------------------
# descriptors on a real tokenizer


@pytest.fixture(scope="module")
def tokenizer(corpora):
    """A byte-level BPE trained by the real tokenize code on 2,000 AG News texts (about a second)."""
    from pipeline_tasks.dataset.tokenize import train_tokenizer

    with open(corpora / "ag_news/mhjabreel_CharCnn_Keras/test.csv", newline="", encoding="utf-8") as fh:
        texts = [f"{title}\n{desc}" for _, title, desc in list(csv.reader(fh))[:2000]]
    return train_tokenizer(iter([texts]), 1024, 2, ("<|endoftext|>", "<|pad|>", "<|cls|>"))


def test_compute_descriptors_exact_values_on_crafted_texts(tokenizer):
    texts = ["Stocks rally", "A1 b2!", "", "   "]
    d = drift.compute_descriptors(texts, tokenizer)
    assert d["chars"].tolist() == [12.0, 6.0, 0.0, 3.0]
    assert d["words"].tolist() == [2.0, 2.0, 0.0, 0.0]
    # "A1 b2!": 5 visible characters, 2 letters
    assert d["non_letter_share"][1] == pytest.approx(3 / 5)
    assert d["non_letter_share"][0] == 0.0 and d["non_letter_share"][2] == 0.0
    n_tokens = len(tokenizer.encode("Stocks rally", add_special_tokens=False).ids)
    assert d["tokens_per_byte"][0] == pytest.approx(n_tokens / 12)
    assert d["tokens_per_byte"][2] == 0.0 and d["oov_share"][2] == 0.0


def test_compute_descriptors_oov_share_counts_fragmented_words(tokenizer):
    news = "The government said the company will report profits on Tuesday"
    gibberish = "Zqxvbnm plorkfizz wuggleblart thrmpsk"
    d = drift.compute_descriptors([news, gibberish], tokenizer, oov_max_pieces=2)
    assert d["oov_share"][1] == 1.0  # every invented word falls apart into > 2 BPE pieces
    assert d["oov_share"][0] < 0.2
    assert d["tokens_per_byte"][1] > d["tokens_per_byte"][0]
    # by definition: share of words with more than k pieces
    words = drift._WORD.findall(news)
    pieces = [len(tokenizer.encode(" " + w, add_special_tokens=False).ids) for w in words]
    assert d["oov_share"][0] == pytest.approx(sum(p > 2 for p in pieces) / len(words))


def test_describe_reports_quantiles_and_skips_nan():
    stats = drift.describe({"x": np.array([1.0, 2.0, 3.0, np.nan])})["x"]
    assert stats["n"] == 3 and stats["mean"] == 2.0 and stats["q50"] == 2.0


# ---------------------------------------------------------------------------------------------
# bits per byte


def test_bits_per_byte_of_a_uniform_lm_is_log2_vocab_per_byte(tokenizer):
    vocab = tokenizer.get_vocab_size()
    texts = ["Oil prices jump after the storm", "Striker scores twice", "x"]

    def uniform(ids):  # equal logits: every next token costs exactly log2(vocab) bits
        return np.zeros((*ids.shape, vocab), dtype=np.float32)

    bpb = drift.bits_per_byte(uniform, tokenizer, texts, block_size=64, bos_id=0, pad_id=1, batch_size=2)
    for text, value in zip(texts, bpb):
        n = len(tokenizer.encode(text, add_special_tokens=False).ids)
        assert value == pytest.approx(n * math.log2(vocab) / len(text.encode()), rel=1e-5)


def test_bits_per_byte_truncation_counts_only_scored_bytes(tokenizer):
    text = "The quick brown fox jumps over the lazy dog " * 8
    windows, nbytes = drift.lm_windows(tokenizer, [text, ""], block_size=9, bos_id=0)
    enc = tokenizer.encode(text, add_special_tokens=False)
    assert windows[0] == [0] + enc.ids[:8]
    assert nbytes[0] == len(text[: enc.offsets[7][1]].encode())
    assert windows[1] == [] and nbytes[1] == 0
    bpb = drift.bits_per_byte(lambda ids: np.zeros((*ids.shape, 1024), np.float32), tokenizer, [""], 9, 0, 1)
    assert np.isnan(bpb[0])


# ---------------------------------------------------------------------------------------------
# evidently statistics


def test_column_drift_ks_separates_shift_from_resample():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=800)
    same = drift.column_drift(ref, rng.normal(size=300), "num", "ks", 0.05)
    shifted = drift.column_drift(ref, rng.normal(0.6, 1.0, size=300), "num", "ks", 0.05)
    assert not same["drifted"] and same["score"] > 0.05
    assert shifted["drifted"] and shifted["score"] < 1e-6


def test_column_drift_jensenshannon_on_categories():
    ref = np.array(["world"] * 50 + ["sports"] * 50, dtype=object)
    cur = np.array(["world"] * 95 + ["sports"] * 5, dtype=object)
    result = drift.column_drift(ref, cur, "cat", "jensenshannon", 0.1)
    assert result["drifted"] and result["score"] > 0.3
    assert drift.column_drift(ref, ref, "cat", "jensenshannon", 0.1)["score"] == pytest.approx(0.0, abs=1e-9)


def test_embedding_drift_mmd_separates_shifted_embeddings():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(300, 8))
    assert drift.embedding_drift(ref, rng.normal(size=(200, 8)))["score"] < 0.015
    assert drift.embedding_drift(ref, rng.normal(0.8, 1.0, size=(200, 8)))["score"] > 0.015


# ---------------------------------------------------------------------------------------------
# monitor params and windows


def test_month_windows_cut_at_calendar_months():
    from pipeline_tasks.monitor.batches import month_windows

    utc = dt.UTC
    windows = month_windows(dt.datetime(2021, 11, 15, tzinfo=utc), dt.datetime(2022, 2, 10, tzinfo=utc), 1)
    assert [(a.date().isoformat(), b.date().isoformat()) for a, b in windows] == [
        ("2021-11-15", "2021-12-01"),
        ("2021-12-01", "2022-01-01"),
        ("2022-01-01", "2022-02-01"),
        ("2022-02-01", "2022-02-10"),
    ]


def test_monitor_params_build_main_and_timeline_windows():
    from pipeline_tasks.monitor.monitor import batch_windows

    params = parse_params(
        {
            "monitor": {
                "window_start": "2022-08-01",
                "window_end": "2022-09-01",
                "windows": [{"start": "2019-01-01", "end": "2019-02-01"}],
                "timeline": {"start": "2022-01-01", "end": "2022-07-01", "step_months": 3},
            }
        }
    )
    names = [w[0] for w in batch_windows(params.monitor)]
    assert names == ["main", "2019-01-01..2019-02-01", "2022-01-01..2022-04-01", "2022-04-01..2022-07-01"]


@pytest.mark.parametrize(
    "section, match",
    [
        ({"batch": {"source": "a", "path": "b"}}, "exactly one"),
        ({"reference": {}}, "exactly one"),
        ({"window_start": "last tuesday"}, "ISO date"),
        ({"timeline": {"start": "2022-01-01"}}, "both start and end"),
        ({"descriptor_method": "vibes"}, "descriptor_method"),
        ({"min_signals": 0}, "min_signals"),
        ({"thresholds": {"embeding": 0.1}}, "unknown key"),
    ],
)
def test_monitor_params_reject_bad_values(section, match):
    with pytest.raises(ConfigError, match=match):
        parse_params({"monitor": section})
