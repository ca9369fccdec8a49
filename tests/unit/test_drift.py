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
        ({"null_permutations": -1}, "null_permutations must be >= 0"),
        ({"null_alpha": 0.5}, "null_alpha must be in"),
        ({"batch": {"path": "in", "date_format": "%d/%m"}}, "monitor.batch: date_format '%d/%m': needs a year"),
        ({"batch": {"path": "in", "date_format": "%Y"}}, "monitor.batch: date_format '%Y': needs a day"),
    ],
)
def test_monitor_params_reject_bad_values(section, match):
    with pytest.raises(ConfigError, match=match):
        parse_params({"monitor": section})


# ---------------------------------------------------------------------------------------------
# permutation null (sample-size-aware thresholds)


def _features(rng, rows, classes=8, shift=0.0):
    names = np.array([f"c{i}" for i in range(classes)], dtype=object)
    return drift.Features(
        {name: rng.normal(size=rows) for name in drift.DESCRIPTORS},
        np.arange(rows),
        rng.normal(shift, 1.0, size=(rows, 16)).astype(np.float32),
        names[rng.integers(0, classes, rows)],
        names[rng.integers(0, classes, rows)],
        rng.gamma(20.0, 0.1, rows) + shift,
    )


def test_permutation_statistics_reproduce_evidently_scores():
    from pipeline_tasks.monitor import permutation

    rng = np.random.default_rng(3)
    ref, cur = _features(rng, 400), _features(rng, 40, shift=0.3)
    settings = parse_params({"monitor": {}}).monitor
    values, _ = drift.compare(ref, cur, settings)
    # the null is only meaningful on the scale of the value it is compared with
    observed_js, _ = permutation.category_js_null(ref.predictions, cur.predictions, 10, rng)
    observed_mmd, _ = permutation.mmd_null(ref.embeddings, cur.embeddings, 10, rng)
    observed_bpb, _ = permutation.bpb_change_null(ref.bpb, cur.bpb, 10, rng)
    assert observed_js == pytest.approx(values["prediction"], rel=1e-9)
    assert observed_mmd == pytest.approx(values["embedding"], rel=1e-4, abs=1e-7)  # evidently works in float32
    assert observed_bpb == pytest.approx(values["bpb"], rel=1e-9)


def test_null_thresholds_keep_small_same_distribution_windows_quiet_and_large_windows_unchanged():
    from pipeline_tasks.monitor.permutation import null_thresholds

    settings = parse_params({"monitor": {}}).monitor
    configured = {name: getattr(settings.thresholds, name) for name in drift.SIGNALS}
    rng = np.random.default_rng(7)
    fixed_alarms = null_alarms = 0
    for seed in range(20):  # 30-row windows of the reference's own distribution: every alarm is false
        ref, cur = _features(rng, 500), _features(rng, 30)
        values, _ = drift.compare(ref, cur, settings)
        thresholds, details = null_thresholds(ref, cur, settings, seed)
        fixed_alarms += drift.decide_drift(values, configured, 1).drift_detected
        null_alarms += drift.decide_drift(values, thresholds, 1).drift_detected
        assert details["signals"]["prediction"]["raised"] and thresholds["descriptors"] == configured["descriptors"]
    assert fixed_alarms >= 10 and null_alarms <= 2
    # a 1,000-row window: the null sits far below the configured thresholds, which stay in force
    thresholds, _ = null_thresholds(_features(rng, 1000), _features(rng, 1000), settings, 0)
    assert thresholds == configured
    # and a real shift is still flagged at 30 rows
    ref, shifted = _features(rng, 500), _features(rng, 30, shift=1.0)
    values, _ = drift.compare(ref, shifted, settings)
    thresholds, _ = null_thresholds(ref, shifted, settings, 0)
    assert {"embedding", "bpb"} <= set(drift.decide_drift(values, thresholds, 1).fired)


def test_null_thresholds_off_gives_the_configured_thresholds():
    from pipeline_tasks.monitor.permutation import null_thresholds

    settings = parse_params({"monitor": {"null_permutations": 0}}).monitor
    rng = np.random.default_rng(0)
    thresholds, details = null_thresholds(_features(rng, 100), _features(rng, 30), settings, 0)
    assert thresholds == {name: getattr(settings.thresholds, name) for name in drift.SIGNALS}
    assert details["signals"] == {}


def test_parse_dates_counts_missing_impossible_and_ambiguous_dates():
    from pipeline_tasks.monitor.batches import parse_dates

    values = ["2022-08-03", "03/04/1987", "13/04/1987", "31/02/1987", None, "", "yesterday"]
    dates, counts = parse_dates(values)
    assert dates[1].date() == dt.date(1987, 3, 4)  # month first unless told otherwise ...
    assert counts["ambiguous"] == 1 and counts["ambiguous_examples"] == ["03/04/1987"]  # ... and counted
    assert counts["missing"] == 2 and counts["unparseable"] == 2
    assert counts["unparseable_examples"] == ["31/02/1987", "yesterday"]
    dates, counts = parse_dates(values, "%d/%m/%Y")
    assert dates[1].date() == dt.date(1987, 4, 3) and dates[0].date() == dt.date(2022, 8, 3)  # ISO still read
    assert counts["ambiguous"] == 0 and counts["unparseable"] == 2
