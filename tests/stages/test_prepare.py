"""Stage test: ``prepare.run`` on tiny real-text raw Parquet (WikiText, zhwiki, AG News, HuffPost)."""

from __future__ import annotations

import json

import pytest
from _prepare_data import project_params, write_raw

from pipeline_tasks.dataset import prepare
from pipeline_tasks.dataset.prepared import COLUMNS, SPLITS, prepared_schema
from pipeline_tasks.errors import DataError


@pytest.fixture()
def project(corpora, tmp_path):
    raw = write_raw(corpora, tmp_path)
    return tmp_path, raw, project_params(tmp_path, raw)


def _read(path):
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pandas()


def test_prepare_run_writes_splits_stats_and_manifest(project):
    import pyarrow.parquet as pq

    root, raw, params = project
    result = prepare.run(params)
    prepared = root / "prepared"
    assert sorted(p.name for p in prepared.iterdir()) == [
        "dropped.parquet",
        "manifest.json",
        "test.parquet",
        "train.parquet",
        "val.parquet",
    ]
    expected = prepared_schema()
    for split in SPLITS:
        schema = pq.read_schema(prepared / f"{split}.parquet")
        assert schema.names == list(COLUMNS)
        assert [str(f.type) for f in schema if f.name != "date"] == [str(f.type) for f in expected if f.name != "date"]
        frame = _read(prepared / f"{split}.parquet")
        assert frame["id"].tolist() == sorted(frame["id"])  # deterministic order
        assert set(frame["split"]) == {split}
    stats = json.loads((root / "reports" / "prepare" / "stats.json").read_text())
    assert stats["docs"]["in"] == stats["docs"]["out"] + stats["docs"]["dropped"]
    assert stats["docs"]["out"] == sum(result["splits"].values())
    assert sum(s["in"] for s in stats["sources"].values()) == stats["docs"]["in"]
    assert {k: stats["dropped"][k] for k in ("duplicate_id", "empty_text", "too_short")} == {
        "duplicate_id": 1,
        "empty_text": 1,
        "too_short": 1,
    }
    assert stats["dropped"]["exact_duplicate"] >= 1 and stats["dropped"]["near_duplicate"] >= 2
    assert stats["dedup"]["near_cross_split"] >= 1  # the planted AG train copy of a test row
    assert stats["lang"]["zh"]["script_share"]["cjk"] > 0.5 and stats["lang"]["en"]["script_share"]["latin"] > 0.99
    assert set(stats["length_chars"]) == {"news", "wiki"}
    assert stats["splits"]["test"]["fixed"] >= 140  # the official AG News test rows
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert manifest["stage"] == "prepare" and len(manifest["inputs"]) == 5
    assert set(manifest["outputs"]) == {"train.parquet", "val.parquet", "test.parquet", "dropped.parquet"}


def test_prepare_run_drops_planted_rows_for_the_right_reason(project):
    root, raw, params = project
    prepare.run(params)
    dropped = _read(root / "prepared" / "dropped.parquet").set_index("id")
    assert dropped.loc["ag_news_train:planted-exact", "reason"] == "exact_duplicate"
    assert dropped.loc["ag_news_train:planted-exact", "duplicate_of"] == "ag_news_test:00000"
    assert dropped.loc["ag_news_train:planted-near", "reason"] == "near_duplicate"
    assert dropped.loc["ag_news_train:planted-near", "duplicate_of"] == "ag_news_test:00001"
    assert dropped.loc["ag_news_train:planted-near", "similarity"] >= 0.8
    assert dropped.loc["huffpost:planted-short", "reason"] == "too_short"
    assert dropped.loc["huffpost:planted-blank", "reason"] == "empty_text"
    # the planted wiki copy and its original: exactly one is kept (the smaller id)
    wiki_near = dropped[dropped["source"] == "wikitext2"]
    assert (wiki_near["reason"] == "near_duplicate").sum() == 1
    test = _read(root / "prepared" / "test.parquet").set_index("id")
    assert {"ag_news_test:00000", "ag_news_test:00001"} <= set(test.index)


def test_prepare_run_keeps_stored_text_exactly_as_ingested(project):
    import pyarrow.parquet as pq

    root, raw, params = project
    prepare.run(params)
    source = pq.read_table(raw["raw_news_dir"] / "ag_news_test.parquet").to_pandas().set_index("id")
    test = _read(root / "prepared" / "test.parquet").set_index("id")
    common = test.index.intersection(source.index)
    assert len(common) >= 140
    assert (test.loc[common, "text"] == source.loc[common, "text"]).all()


def test_prepare_rerun_is_byte_identical(project):
    root, raw, params = project
    prepare.run(params)
    first = {p.name: p.read_bytes() for p in (root / "prepared").glob("*.parquet")}
    stats = (root / "reports" / "prepare" / "stats.json").read_bytes()
    prepare.run(params)
    assert {p.name: p.read_bytes() for p in (root / "prepared").glob("*.parquet")} == first
    assert (root / "reports" / "prepare" / "stats.json").read_bytes() == stats


def test_prepare_new_source_never_moves_existing_documents(project, corpora):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from _prepare_data import bbc_rows, news_schema

    root, raw, params = project
    prepare.run(params)
    before = {s: set(_read(root / "prepared" / f"{s}.parquet")["id"]) for s in SPLITS}
    pq.write_table(pa.Table.from_pylist(bbc_rows(corpora), schema=news_schema()), raw["raw_news_dir"] / "bbc.parquet")
    prepare.run(params)
    after = {s: set(_read(root / "prepared" / f"{s}.parquet")["id"]) for s in SPLITS}
    for split in SPLITS:
        assert before[split] <= after[split], f"documents left {split}"
    assert sum(map(len, after.values())) > sum(map(len, before.values()))


def test_prepare_missing_raw_folder_names_it(project, tmp_path):
    root, raw, params = project
    raw["raw_news_dir"] = tmp_path / "nowhere"
    with pytest.raises(DataError, match="nowhere.*not found"):
        prepare.run(project_params(root, raw))


def test_prepare_rejects_raw_file_without_required_column(project):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root, raw, params = project
    pq.write_table(pa.table({"id": ["x:1"], "text": ["some text"]}), raw["raw_news_dir"] / "broken.parquet")
    with pytest.raises(DataError, match=r"broken\.parquet.*missing column"):
        prepare.run(params)
