"""Pure parts of the out-of-core prepare: the k-way merge of sorted runs, the signature matrix."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline_tasks.dataset.prepare_outofcore import MERGE_BATCH_ROWS, _signature_matrix, merge_runs
from pipeline_tasks.dataset.prepared import COLUMNS, prepared_schema
from pipeline_tasks.dataset.rawdocs import OUTPUT_ROW_GROUP_ROWS


def _run(path, ids):
    n = len(ids)
    columns = {c: pa.nulls(n, pa.string()) for c in COLUMNS}
    columns.update(
        id=pa.array(ids),
        kind=pa.array(["news"] * n),
        source=pa.array(["s"] * n),
        lang=pa.array(["en"] * n),
        text=pa.array([f"text of {i}" for i in ids]),
        split=pa.array(["train"] * n),
        date=pa.nulls(n, pa.timestamp("s", tz="UTC")),
    )
    table = pa.table([columns[c] for c in COLUMNS], schema=prepared_schema())
    pq.write_table(table, path, row_group_size=MERGE_BATCH_ROWS)
    return path


def test_merge_runs_writes_every_row_once_in_id_order_in_full_row_groups(tmp_path):
    rng = np.random.default_rng(0)
    ids = [f"doc:{i:06d}" for i in rng.permutation(10_000)]
    # uneven runs, some interleaving heavily, one with a single row, including non-ASCII ids
    ids += ["doc:é", "doc:z", "doc:Ω"]
    cuts = [0, 1, 3000, 3001, 9000, len(ids)]
    runs = [_run(tmp_path / f"run{k}.parquet", sorted(ids[a:b])) for k, (a, b) in enumerate(zip(cuts, cuts[1:]))]
    out = tmp_path / "merged.parquet"
    assert merge_runs(runs, out) == len(ids)
    merged = pq.read_table(out)
    assert merged.column("id").to_pylist() == sorted(ids)  # code point order, as pandas sorts str
    assert merged.column("text").to_pylist() == [f"text of {i}" for i in sorted(ids)]
    groups = pq.ParquetFile(out).metadata
    sizes = [groups.row_group(g).num_rows for g in range(groups.num_row_groups)]
    assert sizes[:-1] == [OUTPUT_ROW_GROUP_ROWS] * (len(sizes) - 1) and 0 < sizes[-1] <= OUTPUT_ROW_GROUP_ROWS


def test_merge_runs_of_nothing_writes_an_empty_file_with_the_schema(tmp_path):
    out = tmp_path / "empty.parquet"
    assert merge_runs([], out) == 0
    empty = pq.read_table(out)
    assert empty.num_rows == 0 and empty.schema.names == prepared_schema().names


def test_signature_matrix_reads_fixed_size_binary_rows_with_an_offset():
    signatures = np.arange(5 * 16, dtype=np.uint32).reshape(5, 16)
    column = pa.array([row.tobytes() for row in signatures], pa.binary(64))
    assert (_signature_matrix(column.slice(2), 16) == signatures[2:]).all()
