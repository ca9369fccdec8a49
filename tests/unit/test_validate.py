"""Unit tests of the validate helpers: derived columns, split modes, schema table, bounds, reporting."""

from __future__ import annotations

import datetime as dt

import pytest

from pipeline_tasks.config import ConfigError, parse_params
from pipeline_tasks.dataset import prepared, validate
from pipeline_tasks.dataset.params import PrepareParams

PP = PrepareParams()


def frame(rows):
    import pandas as pd

    base = {c: None for c in prepared.COLUMNS}
    return pd.DataFrame([{**base, **r} for r in rows])


def split_of(doc_id: str) -> str:
    return prepared.hash_split(doc_id, PP.salt, PP.val_fraction, PP.test_fraction)


def test_add_computed_columns_derives_key_share_source_and_hash_split():
    out = validate.add_computed_columns(frame([{"id": "bbc:tech/001", "text": "Hello, WORLD 42!"}]), PP)
    row = out.iloc[0]
    assert row["_text_key"] == "hello world 42" and row["_id_source"] == "bbc"
    assert row["_nonletter"] == pytest.approx(4 / 14)  # ", 4 2 !" of 14 non-space characters
    assert row["_hash_split"] == split_of("bbc:tech/001")
    assert list(out.columns) == [*prepared.COLUMNS, *validate.COMPUTED]


def test_cross_split_frame_classifies_hash_fixed_and_inconsistent_sources():
    ids = [f"h:{i}" for i in range(40)]
    hashed = [{"id": i, "source": "h", "split": split_of(i)} for i in ids]
    fixed = [{"id": f"t:{i}", "source": "t", "split": "test"} for i in range(20)]
    # a source whose rows neither follow the hash nor share one split
    moved = [
        {"id": i, "source": "m", "split": "val" if split_of(i) == "train" else "train"}
        for i in (f"m:{k}" for k in range(10))
    ]
    frames = {}
    for split in prepared.SPLITS:
        rows = [r for r in hashed + fixed + moved if r["split"] == split]
        frames[split] = validate.add_computed_columns(frame(rows), PP)
    cross = validate.cross_split_frame(frames)
    modes = cross.groupby("source")["_split_mode"].unique().to_dict()
    assert list(modes["h"]) == ["hash"] and list(modes["t"]) == ["fixed"]
    assert list(modes["m"]) == ["inconsistent:m"]
    assert cross.loc[cross["_hashed_source"], "source"].unique().tolist() == ["h"]


def test_schema_frame_accepts_parquet_ms_timestamps_and_flags_wrong_types():
    import pyarrow as pa

    good = pa.schema(
        [f if f.name != "date" else pa.field("date", pa.timestamp("ms", tz="UTC")) for f in prepared.prepared_schema()]
    )
    bad = pa.schema(
        [
            f if f.name != "label" else pa.field("label", pa.int64())
            for f in prepared.prepared_schema()
            if f.name != "url"
        ]
    )
    table = validate.schema_frame({"train": good, "val": bad})
    mismatched = table[table["arrow_type"] != table["expected_type"]]
    assert mismatched["arrow_type"].tolist() == ["val.label: int64", "val.url: <missing>"]


def test_split_share_bounds_widen_on_small_data_only():
    assert validate.split_share_bounds(0.05, 1_000_000, 0.01, 4.0) == pytest.approx((0.04, 0.06))
    low, high = validate.split_share_bounds(0.05, 100, 0.01, 4.0)
    assert low == 0.0 and high == pytest.approx(0.05 + 4 * (0.05 * 0.95 / 100) ** 0.5)


def test_validate_params_reject_unquoted_or_bad_dates():
    with pytest.raises(ConfigError, match="validate.news_date_min"):
        parse_params({"validate": {"news_date_min": dt.date(2000, 1, 1)}})
    with pytest.raises(ConfigError, match="ISO date"):
        parse_params({"validate": {"news_date_max": "31/12/2030"}})
    assert parse_params({"validate": {}}).validate.date_bound("news_date_min") == dt.datetime(1990, 1, 1, tzinfo=dt.UTC)


def test_run_suites_reports_observed_values_of_failures(tmp_path):
    import great_expectations as gx

    data = frame([{"id": "a:1", "label": "world"}, {"id": "a:1", "label": "weather"}])
    expectations = [
        gx.expectations.ExpectColumnValuesToBeUnique(column="id"),
        gx.expectations.ExpectColumnValuesToBeInSet(column="label", value_set=["world"]),
        gx.expectations.ExpectTableRowCountToBeBetween(min_value=5),
    ]
    results = validate.run_suites({"tiny": (data, expectations)}, tmp_path / "docs")
    summary = validate.summarize(results, {"tiny": 2}, {"checked": False})
    assert summary["success"] is False and summary["evaluated"] == 3 and summary["failed"] == 3
    lines = [validate.failure_line("tiny", f) for f in summary["suites"]["tiny"]["failures"]]
    assert any("expect_column_values_to_be_unique(id) 2 unexpected of 2" in line for line in lines)
    assert any("be_in_set(label)" in line and "'weather'" in line for line in lines)
    assert any("expect_table_row_count_to_be_between observed 2" in line for line in lines)
    assert (tmp_path / "docs" / "index.html").is_file()
