"""Stage test: ``validate.run`` (real great-expectations) on splits made by ``prepare.run`` from real text.

The good splits must pass; corrupted copies (duplicate ids, an unknown label, blank text, a
string date, rows moved between splits) must fail with the expectation, column and observed
value named in the error and in ``summary.json``, and the Data Docs must still be written.
"""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from _prepare_data import project_params, write_raw

from pipeline_tasks import cli
from pipeline_tasks.dataset import prepare, validate
from pipeline_tasks.errors import DataError, ValidationFailedError


@pytest.fixture(scope="module")
def prepared_once(corpora, tmp_path_factory):
    root = tmp_path_factory.mktemp("validate_src")
    raw = write_raw(corpora, root)
    prepare.run(project_params(root, raw))
    return root / "prepared", raw


@pytest.fixture()
def project(prepared_once, tmp_path):
    prepared, raw = prepared_once
    shutil.copytree(prepared, tmp_path / "prepared")
    return tmp_path, project_params(tmp_path, raw)


@pytest.fixture(params=["whole", "chunks"])
def any_project(request, project, monkeypatch):
    """``project``, validated whole (the splits fit the budget) or in chunks of at most 7 rows, so
    that duplicates, moved rows and wrong types sit in other chunks than their first occurrence."""
    if request.param == "chunks":
        real = validate.chunk_rows
        monkeypatch.setattr(validate, "chunk_rows", lambda path, budget: (real(path, budget)[0], 7))
    return project


def _summary(root):
    return json.loads((root / "reports" / "validate" / "summary.json").read_text())


def _rewrite(path, change):
    """Apply ``change(rows)`` to a prepared split and write it back with the prepared schema."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    rows = table.to_pylist()
    change(rows)
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)


def test_validate_passes_on_prepared_real_data_and_writes_data_docs(any_project):
    root, params = any_project
    result = validate.run(params)
    summary = _summary(root)
    assert result["success"] and summary["success"] is True and summary["failed"] == 0
    assert set(summary["suites"]) == {"train", "val", "test", "cross_split", "schema"}
    assert summary["evaluated"] == summary["successful"] >= 90
    assert summary["split_shares"]["checked"] and summary["split_shares"]["hashed_rows"] > 200
    index = root / "reports" / "validate" / "data_docs" / "index.html"
    html = index.read_text(encoding="utf-8")
    assert all(name in html for name in ("train", "val", "test", "cross_split"))
    assert list((root / "reports" / "validate" / "data_docs" / "validations").rglob("*.html"))
    assert json.loads((root / "reports" / "validate" / "manifest.json").read_text())["success"] is True


def test_validate_fails_on_corrupted_split_and_names_each_failure(any_project):
    root, params = any_project

    def corrupt(rows):
        rows[1]["id"] = rows[0]["id"]  # duplicate id
        rows[2]["label"] = "politics"  # not a canonical label
        rows[3]["text"] = ""  # empty text

    _rewrite(root / "prepared" / "val.parquet", corrupt)
    with pytest.raises(ValidationFailedError) as info:
        validate.run(params)
    message = str(info.value)
    assert "expect_column_values_to_be_unique(id)" in message
    assert "expect_column_values_to_be_in_set(label)" in message and "'politics'" in message
    assert "expect_column_value_lengths_to_be_between(text)" in message
    assert info.value.exit_code == 3
    summary = _summary(root)
    assert summary["success"] is False and summary["suites"]["val"]["success"] is False
    assert summary["suites"]["train"]["success"] is True
    failed = {(f["expectation"], f["column"]): f for f in summary["suites"]["val"]["failures"]}
    assert failed[("expect_column_values_to_be_in_set", "label")]["partial_unexpected_list"] == ["politics"]
    assert failed[("expect_column_values_to_be_unique", "id")]["unexpected_count"] == 2
    assert ("expect_column_values_to_be_unique", "id") in {
        (f["expectation"], f["column"]) for f in summary["suites"]["cross_split"]["failures"]
    }
    assert (root / "reports" / "validate" / "data_docs" / "index.html").is_file()


def test_validate_fails_on_wrong_column_type(any_project):
    import pyarrow.parquet as pq

    root, params = any_project
    path = root / "prepared" / "test.parquet"
    table = pq.read_table(path)
    column = table.column("date").cast("string")
    pq.write_table(table.set_column(table.schema.get_field_index("date"), "date", column), path)
    with pytest.raises(ValidationFailedError, match=r"schema: expect_column_pair_values_to_be_equal"):
        validate.run(params)
    schema_failure = _summary(root)["suites"]["schema"]["failures"][0]
    assert "test.date: string" in str(schema_failure["partial_unexpected_list"])


def test_validate_fails_when_documents_move_between_splits(any_project):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root, params = any_project
    train = pq.read_table(root / "prepared" / "train.parquet")
    moved = [r for r in train.to_pylist() if r["source"] == "huffpost"][:10]
    ids = {r["id"] for r in moved}
    pq.write_table(
        train.filter(pa.compute.invert(pa.compute.is_in(train.column("id"), pa.array(sorted(ids))))),
        root / "prepared" / "train.parquet",
    )
    _rewrite(root / "prepared" / "val.parquet", lambda rows: rows.extend({**r, "split": "val"} for r in moved))
    with pytest.raises(ValidationFailedError, match=r"cross_split: .*_split_mode.*inconsistent:huffpost"):
        validate.run(params)


def test_validate_cli_exits_3_and_a_crash_leaves_no_stale_success(project, monkeypatch):
    root, params = project
    plain = params.to_dict()
    # relative paths, as in the project's params.yaml (GX needs its docs folder made absolute)
    plain["paths"].update(prepared_dir="prepared", validate_dir="reports/validate")
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump(plain), encoding="utf-8")
    monkeypatch.chdir(root)
    assert cli.main(["validate", "--params", str(params_file)]) == 0
    assert _summary(root)["success"] is True
    _rewrite(root / "prepared" / "train.parquet", lambda rows: rows[0].update(kind="blog"))
    assert cli.main(["validate", "--params", str(params_file)]) == 3
    assert _summary(root)["success"] is False
    (root / "prepared" / "val.parquet").unlink()
    with pytest.raises(DataError, match="val.parquet"):
        validate.run(params)
    assert not (root / "reports" / "validate" / "summary.json").exists()


def test_chunked_validation_reports_what_whole_validation_reports(project, monkeypatch):
    """The same splits, good and then corrupted, validated whole and in chunks of 7 rows: the same
    summary when they pass, the same failed expectations with the same counts when they do not."""
    root, params = project
    real = validate.chunk_rows

    def both():
        monkeypatch.setattr(validate, "chunk_rows", real)
        outcomes = []
        for chunk in (None, 7):
            if chunk:
                monkeypatch.setattr(validate, "chunk_rows", lambda path, budget: (real(path, budget)[0], chunk))
            try:
                validate.run(params)
            except ValidationFailedError:
                pass
            outcomes.append(_summary(root))
        return outcomes

    whole, chunked = both()
    assert whole["success"] and whole == chunked

    def corrupt(rows):
        rows[5]["id"] = rows[0]["id"]  # a duplicate id in another chunk than the first
        rows[9]["label"] = "politics"
        rows[12]["text"] = rows[1]["text"]  # a duplicate text

    _rewrite(root / "prepared" / "train.parquet", corrupt)
    whole, chunked = both()

    def counts(summary):
        return {
            (suite, f["expectation"], f["column"], f.get("element_count"), f.get("unexpected_count"))
            for suite, s in summary["suites"].items()
            for f in s["failures"]
        }

    assert not whole["success"] and counts(whole) == counts(chunked)
    assert {c[:3] for c in counts(whole)} >= {
        ("train", "expect_column_values_to_be_unique", "id"),
        ("train", "expect_column_values_to_be_in_set", "label"),
        ("cross_split", "expect_column_values_to_be_unique", "id"),
    }
    assert [s["evaluated"] for s in whole["suites"].values()] == [s["evaluated"] for s in chunked["suites"].values()]
