"""Unit tests of the prepare core: normalisation, profiles, hash split, dedup tie-breaks, MinHash."""

from __future__ import annotations

import dataclasses

import pytest

from pipeline_tasks.config import ConfigError, parse_params
from pipeline_tasks.dataset import dedup, prepare
from pipeline_tasks.dataset.params import PrepareParams
from pipeline_tasks.dataset.prepared import hash_split
from pipeline_tasks.dataset.textstats import char_profile, normalize_key
from pipeline_tasks.errors import DataError

WIKITEXT = "wikitext2/DRAGNLabs_LLMHumanModeling/wiki.valid.raw"


@pytest.fixture(scope="module")
def paragraphs(corpora) -> list[str]:
    """Real WikiText-2 paragraphs of 80+ words."""
    text = (corpora / WIKITEXT).read_text(encoding="utf-8").replace("\r\n", "\n")
    return [p.strip() for p in text.split("\n") if len(p.split()) >= 80 and not p.strip().startswith("=")]


def doc(doc_id: str, text: str, **fields) -> dict:
    row = {
        "id": doc_id,
        "kind": "news",
        "source": (doc_id or "").split(":")[0],
        "lang": "en",
        "title": None,
        "text": text,
        "label": None,
        "raw_label": None,
        "date": None,
        "url": None,
        "split": None,
    }
    row.update(fields)
    return row


def run_core(rows: list[dict], **overrides):
    import pandas as pd

    params = dataclasses.replace(PrepareParams(min_chars=10), **overrides)
    return prepare.prepare_documents(pd.DataFrame(rows), params, progress=False)


# ---------------------------------------------------------------------------------------------
# normalisation and profiles


def test_normalize_key_folds_width_case_punctuation_and_space():
    assert normalize_key("  Ｈｅｌｌｏ,\tWORLD!!  — Straße…") == "hello world strasse"
    assert normalize_key("U.S. stocks rise") == normalize_key("u s  stocks RISE!")
    assert normalize_key("北京，中国。") == "北京 中国"
    assert normalize_key("!!! ... ---") == "" and normalize_key("") == ""


def test_normalize_key_keeps_words_that_differ():
    assert normalize_key("stocks rise") != normalize_key("stocks fall")


def test_char_profile_counts_scripts_and_nonletters():
    profile = char_profile("Hello мир 世界 42!")
    assert (profile.latin, profile.cyrillic, profile.cjk, profile.letters) == (5, 3, 2, 10)
    assert profile.nonspace == 13 and profile.nonletter_share == pytest.approx(3 / 13)
    assert char_profile("Григориански календар").dominant_script() == "cyrillic"
    assert char_profile("数学是研究数量").dominant_script() == "cjk"
    assert char_profile("12 + 3").dominant_script() is None


# ---------------------------------------------------------------------------------------------
# deterministic split


def test_hash_split_is_stable_and_close_to_the_fractions():
    ids = [f"src:{i}" for i in range(20000)]
    splits = [hash_split(i, "salt", 0.1, 0.05) for i in ids]
    assert splits == [hash_split(i, "salt", 0.1, 0.05) for i in ids]
    assert splits.count("val") / len(ids) == pytest.approx(0.10, abs=0.01)
    assert splits.count("test") / len(ids) == pytest.approx(0.05, abs=0.01)
    assert splits != [hash_split(i, "other salt", 0.1, 0.05) for i in ids]


def test_prepare_adding_documents_never_moves_existing_ones(paragraphs):
    first = [doc(f"wiki:{i}", p, kind="wiki") for i, p in enumerate(paragraphs[:60])]
    more = [doc(f"wiki:{i}", p, kind="wiki") for i, p in enumerate(paragraphs[60:120], start=60)]
    before = run_core(first)[0].set_index("id")["split"]
    after = run_core(first + more)[0].set_index("id")["split"]
    assert len(after) > len(before)
    assert (after.loc[before.index] == before).all()


def test_prepare_fixed_split_overrides_the_hash():
    rows = [doc(f"ag:{i}", f"Story number {i} about markets and rain", split="test") for i in range(40)]
    rows += [doc("ag:val", "A story from the validation split of a source", split="Validation")]
    kept = run_core(rows, near_dup=False)[0].set_index("id")
    assert set(kept.loc[[f"ag:{i}" for i in range(40)], "split"]) == {"test"}  # a hash gives ~90% train
    assert kept.loc["ag:val", "split"] == "val"


def test_prepare_unknown_fixed_split_names_file_and_record():
    rows = [doc("ag:1", "A perfectly fine story text", split="holdout", _file="raw/news/ag.parquet")]
    with pytest.raises(DataError, match=r"raw/news/ag\.parquet.*'ag:1'.*'holdout'"):
        run_core(rows)


# ---------------------------------------------------------------------------------------------
# exact duplicates and tie-breaking


def test_exact_dedup_prefers_fixed_test_then_label_then_smallest_id():
    text = "Stocks rally as oil prices fall sharply"
    rows = [
        doc("a:1", text),
        doc("b:2", text.upper() + "!!", label="business"),
        doc("c:3", "  " + text.lower(), split="test"),
    ]
    kept, dropped, stats = run_core(rows)
    assert kept["id"].tolist() == ["c:3"]
    assert set(dropped["duplicate_of"]) == {"c:3"} and stats["dropped"]["exact_duplicate"] == 2
    kept, _, _ = run_core(rows[:2])
    assert kept["id"].tolist() == ["b:2"]  # labelled beats the smaller id
    kept, _, _ = run_core([doc("z:9", text), doc("a:1", text + ".")])
    assert kept["id"].tolist() == ["a:1"]


def test_exact_dedup_result_does_not_depend_on_input_order(paragraphs):
    rows = [doc(f"w:{i}", p) for i, p in enumerate(paragraphs[:30])]
    rows += [doc(f"x:{i}", p.upper()) for i, p in enumerate(paragraphs[:10])]
    a = run_core(rows)
    b = run_core(list(reversed(rows)))
    assert a[0].equals(b[0]) and a[1].equals(b[1])


def test_duplicate_ids_keep_one_row_and_count_it():
    kept, dropped, stats = run_core(
        [doc("a:1", "First version of the text"), doc("a:1", "Second version of the text", label="world")]
    )
    assert kept["text"].tolist() == ["Second version of the text"]
    assert stats["dropped"]["duplicate_id"] == 1 and stats["sources"]["a"]["dropped"]["duplicate_id"] == 1


def test_filters_count_each_reason_per_source():
    rows = [
        doc("n:1", "tiny"),
        doc("n:2", "x" * 500),
        doc("n:3", "12 34 56 78 90 12 34 56 ab"),
        doc("n:4", "A normal sentence about the weather today."),
        doc("n:5", "   "),
        doc(None, "No id here", source="n"),
    ]
    kept, dropped, stats = run_core(rows, max_chars=400)
    assert kept["id"].tolist() == ["n:4"]
    assert {k: v for k, v in stats["dropped"].items() if v} == {
        "too_short": 1,
        "too_long": 1,
        "nonletter": 1,
        "empty_text": 1,
        "missing_id": 1,
    }
    assert stats["sources"]["n"]["in"] == 6 and stats["sources"]["n"]["out"] == 1


# ---------------------------------------------------------------------------------------------
# near duplicates (MinHash LSH)


def test_near_duplicate_pair_is_found_and_different_texts_are_not(paragraphs):
    original = paragraphs[0]
    words = original.split()
    words[len(words) // 2] = "zanzibar"
    rows = [doc("w:1", original), doc("w:2", " ".join(words))] + [
        doc(f"w:{i + 3}", p) for i, p in enumerate(paragraphs[1:40])
    ]
    kept, dropped, stats = run_core(rows)
    assert dropped["id"].tolist() == ["w:2"] and dropped["reason"].tolist() == ["near_duplicate"]
    assert dropped["duplicate_of"].tolist() == ["w:1"] and dropped["similarity"].iloc[0] >= 0.8
    assert stats["dedup"]["near"] == 1 and len(kept) == 40


def test_near_duplicates_in_cjk_text_use_character_shingles():
    text = (
        "数学是利用符号语言研究数量、结构、变化以及空间等概念的一门学科，从某种角度看属于形式科学的一种。"
        "数学透过抽象化和逻辑推理的使用，由计数、计算、量度和对物体形状及运动的观察而产生。"
    )
    kept, dropped, _ = run_core(
        [
            doc("zh:1", text, lang="zh"),
            doc("zh:2", text + "参见", lang="zh"),
            doc("zh:3", "北京是中华人民共和国的首都，是全国的政治中心和文化中心，历史悠久。", lang="zh"),
        ]
    )
    assert kept["id"].tolist() == ["zh:1", "zh:3"] and dropped["reason"].tolist() == ["near_duplicate"]


def test_leakage_rule_drops_the_train_candidate_never_the_test_row(paragraphs):
    text = paragraphs[3]
    # the train candidate has every other advantage: a smaller id and a label
    rows = [doc("a:train", text + " (AP)", label="world"), doc("z:test", text, split="test")]
    kept, dropped, stats = run_core(rows)
    assert kept["id"].tolist() == ["z:test"] and kept["split"].tolist() == ["test"]
    assert dropped["id"].tolist() == ["a:train"] and dropped["reason"].tolist() == ["near_duplicate"]
    assert stats["dedup"]["near_cross_split"] == (hash_split("a:train", "lm-pipeline-split-v1", 0.05, 0.05) != "test")


def test_minhash_estimate_tracks_exact_jaccard(paragraphs):
    import random

    rng = random.Random(0)
    for paragraph in paragraphs[:5]:
        key = normalize_key(paragraph)
        words = key.split()
        for _ in range(len(words) // 10):  # change ~10% of the words
            words[rng.randrange(len(words))] = "qqq"
        other = " ".join(words)
        a, b = dedup.shingles(key), dedup.shingles(other)
        exact = len(a & b) / len(a | b)
        sig = dedup.minhash_signatures([dedup.shingle_hashes(key), dedup.shingle_hashes(other)], 256, seed=1)
        estimate = float((sig[0] == sig[1]).mean())
        assert estimate == pytest.approx(exact, abs=0.12), (exact, estimate)


def test_minhash_signatures_are_seeded_and_deterministic(paragraphs):
    hashes = [dedup.shingle_hashes(normalize_key(p)) for p in paragraphs[:5]]
    a = dedup.minhash_signatures(hashes, 64, seed=3)
    assert (a == dedup.minhash_signatures(hashes, 64, seed=3)).all()
    assert not (a == dedup.minhash_signatures(hashes, 64, seed=4)).all()


def test_shingle_hashes_of_a_huge_document_match_a_split_computation(paragraphs):
    key = normalize_key(" ".join(paragraphs * 3))
    hashes = dedup.shingle_hashes(key)
    assert len(hashes) > dedup._BATCH_ROWS  # takes the running-minimum path
    whole = dedup.minhash_signatures([hashes], 32, seed=1)[0]
    half = len(hashes) // 2
    parts = dedup.minhash_signatures([hashes[:half], hashes[half:]], 32, seed=1)
    assert (whole == parts.min(axis=0)).all()


# ---------------------------------------------------------------------------------------------
# stats and params


def test_stats_flag_language_script_mismatch():
    rows = [
        doc("zh:1", "This page is in English although it is labelled Chinese.", lang="zh"),
        doc("zh:2", "北京是中华人民共和国的首都，是全国的政治中心和文化中心。", lang="zh"),
    ]
    stats = run_core(rows)[2]
    assert stats["lang"]["zh"]["docs"] == 2 and stats["lang"]["zh"]["script_mismatch"] == 1


def test_prepare_params_reject_bad_values():
    with pytest.raises(ConfigError, match="prepare.*val_fraction"):
        parse_params({"prepare": {"val_fraction": 0.6, "test_fraction": 0.5}})
    with pytest.raises(ConfigError, match="prepare.lang_scripts.xx"):
        parse_params({"prepare": {"lang_scripts": {"xx": "klingon"}}})
    with pytest.raises(ConfigError, match="prepare.min_chars"):
        parse_params({"prepare": {"min_chars": "short"}})
