"""The prepared-split contract: the one reader of labelled rows and the two test sets it yields."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline_tasks.dataset.prepared import prepared_schema, read_labelled_split
from pipeline_tasks.errors import DataError

LABELS = ["business", "sports", "world"]


def _write_split(path, rows):
    schema = pa.schema(
        [
            ("id", pa.string()),
            ("kind", pa.string()),
            ("source", pa.string()),
            ("text", pa.string()),
            ("label", pa.string()),
        ]
    )
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def _row(doc_id: str, label: str | None, kind: str = "news", text: str = "some text") -> dict:
    return {"id": doc_id, "kind": kind, "source": doc_id.split(":")[0], "text": text, "label": label}


def test_read_labelled_split_keeps_labelled_rows_of_selected_sources(tmp_path):
    _write_split(
        tmp_path / "train.parquet",
        [
            {"id": "ag:1", "kind": "news", "source": "ag", "text": "a", "label": "sports"},
            {"id": "ag:2", "kind": "news", "source": "ag", "text": "b", "label": None},
            {"id": "bbc:1", "kind": "news", "source": "bbc", "text": "c", "label": "business"},
            {"id": "wiki:1", "kind": "wiki", "source": "wiki", "text": "d", "label": None},
        ],
    )
    assert read_labelled_split(tmp_path, "train", sources=["ag"])["id"].to_pylist() == ["ag:1"]
    # None or () = every labelled source
    assert read_labelled_split(tmp_path, "train", sources=[])["id"].to_pylist() == ["ag:1", "bbc:1"]
    assert read_labelled_split(tmp_path, "train")["id"].to_pylist() == ["ag:1", "bbc:1"]
    rows = read_labelled_split(tmp_path, "train", sources=["ag", "bbc"]).to_pydict()
    assert rows["label"] == ["sports", "business"] and rows["source"] == ["ag", "bbc"]


def test_read_labelled_split_filters_labels_and_kinds_and_adds_label_idx(tmp_path):
    _write_split(
        tmp_path / "test.parquet",
        [
            _row("ag:1", "world"),
            _row("ag:2", "scitech"),
            _row("bbc:1", "business"),
            _row("wiki:1", "sports", "wiki"),
            _row("bbc:2", None),
        ],
    )
    table = read_labelled_split(tmp_path, "test", labels=LABELS, kinds=("news",))
    assert table["id"].to_pylist() == ["ag:1", "bbc:1"]  # file order; unknown label, wiki, unlabelled dropped
    assert table["label_idx"].type == pa.int64() and table["label_idx"].to_pylist() == [2, 0]
    assert "label_idx" not in read_labelled_split(tmp_path, "test").column_names


def test_read_labelled_split_sample_matches_pandas_sample(tmp_path):
    """``max_rows`` draws the rows ``DataFrame.sample(random_state=seed)`` drew before, in its order."""
    rows = [_row(f"ag:{i:03d}", LABELS[i % 3]) for i in range(50)]
    _write_split(tmp_path / "val.parquet", rows)
    expected = pq.read_table(tmp_path / "val.parquet").to_pandas().sample(n=7, random_state=11)["id"].tolist()
    assert read_labelled_split(tmp_path, "val", labels=LABELS, max_rows=7, seed=11)["id"].to_pylist() == expected
    assert read_labelled_split(tmp_path, "val", labels=LABELS, max_rows=50, seed=11).num_rows == 50


def test_read_labelled_split_returns_the_prepared_types(tmp_path):
    table = pa.Table.from_pylist(
        [{"id": "ag:1", "kind": "news", "source": "ag", "lang": "en", "text": "t", "label": "world", "split": "test"}],
        schema=prepared_schema(),
    )
    pq.write_table(table, tmp_path / "test.parquet")
    frame = read_labelled_split(tmp_path, "test", labels=LABELS).to_pandas()
    assert list(frame.columns) == [*prepared_schema().names, "label_idx"]
    assert str(frame["date"].dtype).startswith("datetime64") and frame["label_idx"].tolist() == [2]


def test_read_labelled_split_missing_file_names_the_fix(tmp_path):
    with pytest.raises(DataError, match=r"val\.parquet: prepared split not found; run .*prepare"):
        read_labelled_split(tmp_path, "val", sources=["ag"])


def test_read_labelled_split_missing_column_names_file(tmp_path):
    pq.write_table(pa.table({"id": ["x"], "text": ["t"]}), tmp_path / "test.parquet")
    with pytest.raises(DataError, match=r"test\.parquet: columns \['source', 'label'\] missing"):
        read_labelled_split(tmp_path, "test")


def test_read_labelled_split_rejects_empty_text_naming_record(tmp_path):
    _write_split(tmp_path / "train.parquet", [_row("ag:9", "world", text="  ")])
    with pytest.raises(DataError, match="first id 'ag:9'"):
        read_labelled_split(tmp_path, "train", sources=["ag"])


def test_read_labelled_split_without_rows_names_the_selection(tmp_path):
    _write_split(tmp_path / "test.parquet", [_row("ag:1", "world"), _row("wiki:1", None, "wiki")])
    with pytest.raises(DataError, match=r"test\.parquet: no labelled rows from sources \['bbc'\]"):
        read_labelled_split(tmp_path, "test", sources=["bbc"])
    with pytest.raises(DataError, match=r"no labelled news rows with a label in \['sports'\]"):
        read_labelled_split(tmp_path, "test", labels=["sports"], kinds=("news",))
