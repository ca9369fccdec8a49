"""``prepare`` with memory bounded by ``prepare.memory_budget_mb``, not by the corpus (``engine: duckdb``).

The decisions are those of the in-memory core (:func:`pipeline_tasks.dataset.prepare.prepare_documents`,
``engine: pandas``): the same documents kept, the same splits, the same ``dropped.parquet`` and
``stats.json`` (tests/stages/test_prepare_engines.py runs both on the same input).

Why DuckDB: ``bench/dedup_engines.py`` ran today's pandas core, DuckDB, Polars and DataTrove on
the same input at 1x, 4x and 16x the default corpus. DuckDB and Polars found the same exact and
near duplicate sets as pandas; DuckDB held its memory limit (1,062 MiB peak at 16x, against 4,036
for pandas) because its joins, window functions and sorts spill to disk, and it runs in-process on a
laptop with nothing to deploy. DataTrove's MinHash blocks decide differently (no exact stage, no
priority order: they removed 52 fixed test rows). The per-document work (normalised key, character
profile, MinHash) stays our vectorised numpy code from :mod:`pipeline_tasks.dataset.dedup`: it is
~90 % of the time and no candidate did it faster.

Passes, all in a scratch folder (``prepare.spill_dir``, else beside ``paths.prepared_dir``):

1. **features**: every raw file is streamed in batches sized from the budget; each batch is cast to the
   prepared schema (``rows.parquet``) and its per-document features are computed (fixed or hashed
   split, priority flags, a blake2b-128 hash of the normalised key, the character profile, and for
   documents the per-row filters keep, the MinHash signature and LSH band keys: ``features.parquet``);
2. **drops** in the core's order, as DuckDB window functions over a database file with a
   ``memory_limit``: missing_id, empty_text, duplicate_id (first by priority per id), too_short,
   too_long, nonletter, exact_duplicate (first by priority per key hash);
3. **near duplicates**: candidate pairs from a self-join on (band, key) of the surviving documents,
   verified with the MinHash Jaccard estimate batch by batch in numpy, then one greedy pass in
   priority order over the verified pairs sorted by DuckDB: a document is dropped for its most similar
   *kept* earlier document (ties: the earlier one). That is what the in-memory LSH walk decides,
   since it compares a document with exactly the kept earlier documents that share a band. Only a
   bitset of kept candidates (one byte per document) lives in Python;
4. **outputs** from DuckDB queries: each split file sorted by id, written batch by batch; statistics
   as aggregates (the length quantiles read one integer column per kind).

Memory: DuckDB gets ``memory_budget_mb / 2``; a feature batch holds about ``memory_budget_mb / 16``
of raw text (and its signatures). Costs that still grow with the corpus are small and said here:
the word-hash cache (bounded at 2 M words), one byte per near-duplicate candidate, 8 bytes per kept
document of one ``kind`` for the length quantiles. A raw Parquet row group is read whole, so ingest
writes small row groups. Two different keys with the same 128-bit hash would be merged as exact
duplicates: probability about ``n**2 / 2**129``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline_tasks.artifacts import sha256_file
from pipeline_tasks.dataset.dedup import band_keys, lsh_bands, minhash_signatures, shingle_hashes
from pipeline_tasks.dataset.params import PrepareParams
from pipeline_tasks.dataset.prepared import COLUMNS, SPLITS, hash_split, prepared_schema
from pipeline_tasks.dataset.rawdocs import (
    DROP_REASONS,
    OUTPUT_ROW_GROUP_ROWS,
    cast_raw,
    check_raw_columns,
    fixed_splits,
    length_quantiles,
    raw_files,
    reading_schema,
)
from pipeline_tasks.dataset.textstats import SCRIPTS, char_profile, normalize_key
from pipeline_tasks.errors import DataError
from pipeline_tasks.executor import ExecutorParams, ordered_map

logger = logging.getLogger(__name__)

MERGE_BATCH_ROWS = 64  # rows per run row group: the merge holds one such batch per run
_PROFILE = ("chars", "nonspace", "letters", *SCRIPTS)


def features_schema(num_perm: int) -> pa.Schema:
    return pa.schema(
        [
            ("pos", pa.int64()),  # position in reading order: the last tie-breaker, as in the core
            ("id", pa.string()),
            ("source", pa.string()),
            ("split", pa.string()),  # fixed, else hashed; a row without id keeps its raw value
            ("fixed", pa.string()),
            ("not_test", pa.bool_()),
            ("unlabelled", pa.bool_()),
            ("label", pa.string()),
            ("lang", pa.string()),
            ("kind", pa.string()),
            ("missing_id", pa.bool_()),
            ("key_empty", pa.bool_()),
            ("key_hash", pa.binary(16)),
            *[(name, pa.int64()) for name in _PROFILE],
            ("nonletter", pa.float64()),
            ("dominant", pa.string()),  # the script with most letters; null without letters
            ("has_shingles", pa.bool_()),
            ("sig", pa.binary(4 * num_perm)),
            ("bands", pa.list_(pa.uint64())),
        ]
    )


# --------------------------------------------------------------------------------------------
# Pass 1: stream the raw files, compute per-document features


def open_streaming(path: Path, buffer_size: int = 1 << 20) -> pq.ParquetFile:
    """A Parquet file to read batch by batch in bounded memory: pre-buffering (pyarrow's default)
    caches the column ranges of many row groups ahead (~100 MB on a 150 MB file here)."""
    return pq.ParquetFile(path, pre_buffer=False, buffer_size=buffer_size)


def _rows_per_batch(pf: pq.ParquetFile, budget_mb: int) -> int:
    meta = pf.metadata
    rows = max(meta.num_rows, 1)
    raw_bytes = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    # text as Python str, its key, shingle hashes and (bytes x ~16) in the worst case: a 16th of the budget
    return int(np.clip(budget_mb * 2**20 / 16 / max(raw_bytes / rows, 1), 64, 65536))


def raw_batches(dirs: list[Path], budget_mb: int, inputs: dict[str, str]) -> Iterator[tuple[Path, pa.Table]]:
    for path in raw_files(dirs):
        pf = open_streaming(path)
        check_raw_columns(path, pf.schema_arrow.names)
        columns = [c for c in COLUMNS if c in pf.schema_arrow.names]
        for batch in pf.iter_batches(batch_size=_rows_per_batch(pf, budget_mb), columns=columns, use_threads=False):
            yield path, cast_raw(path, pa.Table.from_batches([batch]))
        inputs[str(path)] = sha256_file(path)
        logger.info("read %s: %d rows", path, pf.metadata.num_rows)


def batch_features(table: pa.Table, path: Path, first_pos: int, params: PrepareParams, bands: tuple[int, int]):
    """Per-document features of one raw batch (a :func:`features_schema` table)."""
    df = table.select(["id", "source", "split", "label", "lang", "kind", "text"]).to_pandas()
    n = len(df)
    df["_file"] = str(path)
    fixed = fixed_splits(df)  # a bad split value fails here, naming the file and the record
    ids = df["id"]
    missing = (ids.isna() | (ids.astype(str).str.strip() == "")).to_numpy()
    split = [
        raw
        if gone
        else (fx if fx is not None else hash_split(i, params.salt, params.val_fraction, params.test_fraction))
        for i, fx, raw, gone in zip(ids, fixed.where(fixed.notna(), None), df["split"], missing)
    ]
    keys = [normalize_key(t) if isinstance(t, str) else "" for t in df["text"]]
    profiles = np.array([char_profile(t if isinstance(t, str) else "") for t in df["text"]], dtype=np.int64)
    profiles = profiles.reshape(n, len(_PROFILE))
    chars, nonspace, letters = profiles[:, 0], profiles[:, 1], profiles[:, 2]
    scripts = profiles[:, 3:]
    nonletter = (nonspace - letters) / np.clip(nonspace, 1, None)
    dominant = np.where(letters > 0, np.array(SCRIPTS, dtype=object)[scripts.argmax(axis=1)], None)
    cjk = scripts[:, SCRIPTS.index("cjk")] / np.clip(letters, 1, None) >= params.cjk_min_share

    # signatures only where the per-row filters keep the document: the rest can never be compared
    maybe_kept = ~missing & (np.array([k != "" for k in keys])) & (chars >= params.min_chars)
    maybe_kept &= chars <= params.max_chars
    if params.max_nonletter_share is not None:
        maybe_kept &= nonletter <= params.max_nonletter_share
    has_shingles = np.zeros(n, dtype=bool)
    sig_col, band_col = [None] * n, [None] * n
    if params.near_dup:
        rows = np.flatnonzero(maybe_kept)
        hashes = [shingle_hashes(keys[r], params.shingle_words, params.shingle_chars, bool(cjk[r])) for r in rows]
        signatures = minhash_signatures(hashes, params.num_perm, params.minhash_seed, progress=False)
        keys_by_band = band_keys(signatures, *bands)
        for k, r in enumerate(rows):
            if len(hashes[k]):
                has_shingles[r] = True
                sig_col[r] = signatures[k].tobytes()
                band_col[r] = keys_by_band[k]
    columns = {
        "pos": np.arange(first_pos, first_pos + n, dtype=np.int64),
        "id": ids,
        "source": df["source"].fillna("<none>"),
        "split": split,
        "fixed": fixed.where(fixed.notna(), None),
        "not_test": (fixed != "test").to_numpy(),
        "unlabelled": df["label"].isna().to_numpy(),
        "label": df["label"],
        "lang": df["lang"],
        "kind": df["kind"],
        "missing_id": missing,
        "key_empty": np.array([k == "" for k in keys]),
        "key_hash": [hashlib.blake2b(k.encode("utf-8", "surrogatepass"), digest_size=16).digest() for k in keys],
        **{name: profiles[:, j] for j, name in enumerate(_PROFILE)},
        "nonletter": nonletter,
        "dominant": dominant,
        "has_shingles": has_shingles,
        "sig": sig_col,
        "bands": band_col,
    }
    schema = features_schema(params.num_perm)
    return pa.Table.from_arrays(
        [pa.array(list(v) if isinstance(v, pd.Series) else v, type=schema.field(k).type) for k, v in columns.items()],
        schema=schema,
    )


def write_features(
    dirs: list[Path], scratch: Path, params: PrepareParams, executor: ExecutorParams
) -> tuple[int, dict[str, str]]:
    """Pass 1. The batches go to the executor (:func:`pipeline_tasks.executor.ordered_map`: a process
    pool of ``prepare.workers``, or Ray), a bounded number in flight, and come back in order, so
    positions and outputs depend neither on the executor nor on the worker count."""
    inputs: dict[str, str] = {}
    bands = lsh_bands(params.near_dup_threshold, params.num_perm)
    workers = params.workers or os.cpu_count() or 1
    rows_schema = reading_schema().append(pa.field("pos", pa.int64()))
    total = 0
    # the budget is shared by the batches in flight (two per worker)
    batches = raw_batches(dirs, max(params.memory_budget_mb // (2 * workers), 1), inputs)
    with contextlib.ExitStack() as stack:
        rows_out = stack.enter_context(pq.ParquetWriter(scratch / "rows.parquet", rows_schema, compression="zstd"))
        features_out = stack.enter_context(
            pq.ParquetWriter(scratch / "features.parquet", features_schema(params.num_perm))
        )
        job_params = dataclasses.replace(params, lang_scripts={})  # a mapping proxy does not pickle

        def jobs():
            nonlocal total
            for path, table in batches:
                rows_out.write_table(_with_positions(table, total))
                yield table, path, total, job_params, bands
                total += table.num_rows

        for features in ordered_map(batch_features, jobs(), params=executor, workers=workers):
            features_out.write_table(features)
    if total == 0:
        raise DataError(f"no raw documents in {', '.join(map(str, dirs))}; run the ingest stages first")
    return total, inputs


def _with_positions(table: pa.Table, first: int) -> pa.Table:
    return table.append_column("pos", pa.array(np.arange(first, first + table.num_rows, dtype=np.int64)))


# --------------------------------------------------------------------------------------------
# Pass 2 and 3: drops in the core's order, near duplicates


def _connect(scratch: Path, budget_mb: int):
    con = duckdb.connect(str(scratch / "prepare.duckdb"))
    con.execute(f"SET memory_limit = '{budget_mb * 3 // 4}MB'")
    # DuckDB wants a few tens of MB per thread for a sort that spills; small budgets get fewer threads
    con.execute(f"SET threads = {max(1, min(os.cpu_count() or 1, budget_mb // 128))}")
    con.execute("SET temp_directory = ?", [str(scratch / "spill")])
    con.execute("SET TimeZone = 'UTC'")
    return con


def apply_drops(con, scratch: Path, params: PrepareParams) -> None:
    features = str(scratch / "features.parquet")
    con.execute(
        f"""CREATE TABLE docs AS SELECT * EXCLUDE (sig, bands),
                CAST(NULL AS VARCHAR) AS reason, CAST(NULL AS VARCHAR) AS duplicate_of,
                CAST(NULL AS DOUBLE) AS similarity
            FROM read_parquet('{features}')"""
    )
    con.execute("UPDATE docs SET reason = 'missing_id' WHERE missing_id")
    con.execute("UPDATE docs SET reason = 'empty_text' WHERE reason IS NULL AND key_empty")
    con.execute(
        """UPDATE docs SET reason = 'duplicate_id', duplicate_of = docs.id FROM (
               SELECT pos, row_number() OVER (PARTITION BY id ORDER BY not_test, unlabelled, pos) AS n
               FROM docs WHERE reason IS NULL) AS ranked
           WHERE docs.pos = ranked.pos AND ranked.n > 1"""
    )
    con.execute("UPDATE docs SET reason = 'too_short' WHERE reason IS NULL AND chars < ?", [params.min_chars])
    con.execute("UPDATE docs SET reason = 'too_long' WHERE reason IS NULL AND chars > ?", [params.max_chars])
    if params.max_nonletter_share is not None:
        con.execute(
            "UPDATE docs SET reason = 'nonletter' WHERE reason IS NULL AND nonletter > ?",
            [params.max_nonletter_share],
        )
    con.execute(
        """UPDATE docs SET reason = 'exact_duplicate', duplicate_of = ranked.first_id FROM (
               SELECT pos, row_number() OVER w AS n, first_value(id) OVER w AS first_id
               FROM docs WHERE reason IS NULL
               WINDOW w AS (PARTITION BY key_hash ORDER BY not_test, unlabelled, id, pos)) AS ranked
           WHERE docs.pos = ranked.pos AND ranked.n > 1"""
    )
    if params.near_dup:
        near_duplicates(con, scratch, params)


def near_duplicates(con, scratch: Path, params: PrepareParams) -> None:
    features = str(scratch / "features.parquet")
    con.execute(
        """CREATE TABLE cand AS SELECT pos, id, row_number() OVER (ORDER BY not_test, unlabelled, id) - 1 AS rank
           FROM docs WHERE reason IS NULL AND has_shingles"""
    )
    count = con.execute("SELECT count(*) FROM cand").fetchall()[0][0]
    con.execute(
        f"""CREATE TABLE band_keys AS
            SELECT c.rank, f.band, f.key FROM cand c JOIN (
                SELECT pos, generate_subscripts(bands, 1) AS band, unnest(bands) AS key
                FROM read_parquet('{features}') WHERE has_shingles) f USING (pos)"""
    )
    con.execute(
        """CREATE TABLE pairs AS SELECT DISTINCT a.rank AS i, b.rank AS j
           FROM band_keys a JOIN band_keys b ON a.band = b.band AND a.key = b.key AND a.rank < b.rank"""
    )
    con.execute(f"CREATE TABLE sigs AS SELECT c.rank, f.sig FROM cand c JOIN read_parquet('{features}') f USING (pos)")
    n_pairs = con.execute("SELECT count(*) FROM pairs").fetchall()[0][0]
    verified_path = scratch / "verified.parquet"
    verified_schema = pa.schema([("j", pa.int64()), ("i", pa.int64()), ("sim", pa.float64())])
    reader = con.sql(
        """SELECT p.i, p.j, si.sig AS sig_i, sj.sig AS sig_j
           FROM pairs p JOIN sigs si ON si.rank = p.i JOIN sigs sj ON sj.rank = p.j"""
    ).to_arrow_reader(65536)
    with pq.ParquetWriter(verified_path, verified_schema) as out:
        for batch in reader:
            sig_i = _signature_matrix(batch.column("sig_i"), params.num_perm)
            sig_j = _signature_matrix(batch.column("sig_j"), params.num_perm)
            similarity = (sig_i == sig_j).mean(axis=1)
            keep = similarity >= params.near_dup_threshold
            i = batch.column("i").to_numpy()[keep]
            j = batch.column("j").to_numpy()[keep]
            out.write_table(pa.table({"j": j, "i": i, "sim": similarity[keep]}, schema=verified_schema))

    kept = np.ones(count, dtype=bool)
    dropped_j, dropped_i, dropped_sim = [], [], []
    reader = con.sql(f"SELECT j, i, sim FROM read_parquet('{verified_path}') ORDER BY j, sim DESC, i").to_arrow_reader(
        65536
    )
    decided = -1
    for batch in reader:
        for j, i, sim in zip(*(batch.column(c).to_numpy().tolist() for c in ("j", "i", "sim"))):
            if j == decided or not kept[i]:
                continue
            kept[j], decided = False, j
            dropped_j.append(j)
            dropped_i.append(i)
            dropped_sim.append(sim)
    near = pa.table({"j": dropped_j, "i": dropped_i, "sim": dropped_sim}, schema=verified_schema)
    con.register("near", near)
    con.execute(
        """UPDATE docs SET reason = 'near_duplicate', duplicate_of = u.kept_id, similarity = u.sim FROM (
               SELECT c.pos, k.id AS kept_id, n.sim FROM near n
               JOIN cand c ON c.rank = n.j JOIN cand k ON k.rank = n.i) AS u
           WHERE docs.pos = u.pos"""
    )
    con.unregister("near")
    logger.info("minhash lsh: %d docs, %d candidate pairs, %d near duplicates", count, n_pairs, len(dropped_j))


def _signature_matrix(column, num_perm: int):
    # fixed-size binary: one contiguous buffer of rows x num_perm uint32
    column = column.cast(pa.binary(4 * num_perm)) if column.type != pa.binary(4 * num_perm) else column
    data = column.buffers()[1]
    start = column.offset * 4 * num_perm
    return np.frombuffer(data, dtype=np.uint32, count=len(column) * num_perm, offset=start).reshape(-1, num_perm)


# --------------------------------------------------------------------------------------------
# Pass 4: outputs and statistics


def export_decisions(con, scratch: Path, out_dir: Path, dropped_schema: pa.Schema) -> Path:
    """``dropped.parquet`` into ``out_dir``, and the kept rows' (pos, split, source) for the merge sort."""
    kept_path = scratch / "kept.parquet"
    con.execute(f"COPY (SELECT pos, split, source FROM docs WHERE reason IS NULL ORDER BY pos) TO '{kept_path}'")
    _write_query(
        con.sql(
            """SELECT id, source, split, reason, duplicate_of, similarity FROM docs WHERE reason IS NOT NULL
               ORDER BY reason, id NULLS LAST,
                   CASE WHEN reason = 'missing_id' THEN false ELSE not_test END,
                   CASE WHEN reason = 'missing_id' THEN false ELSE unlabelled END, pos"""
        ),
        dropped_schema,
        out_dir / "dropped.parquet",
    )
    return kept_path


def write_splits(scratch: Path, kept_path: Path, out_dir: Path, budget_mb: int) -> dict[str, int]:
    """The split files sorted by id: sorted runs holding a quarter of the budget, then the merge."""
    runs = sorted_runs(scratch, kept_path, run_bytes=budget_mb * 2**20 // 4)
    return {split: merge_runs(runs[split], out_dir / f"{split}.parquet") for split in SPLITS}


# DuckDB's own ORDER BY of the wide rows (text) could not stay under small memory limits here
# (out of memory at 48 MB on 160 MB of text), so the split files are sorted by a plain external
# merge sort: sorted runs of at most run_bytes, then a k-way merge that moves whole slices.


def sorted_runs(scratch: Path, kept_path: Path, run_bytes: int) -> dict[str, list[Path]]:
    """Kept rows per split in id-sorted run files; ``rows.parquet`` and ``kept_path`` are both in pos order."""
    schema = prepared_schema()
    runs: dict[str, list[Path]] = {split: [] for split in SPLITS}
    buffers: dict[str, list[pa.Table]] = {split: [] for split in SPLITS}
    sizes = dict.fromkeys(SPLITS, 0)  # run_bytes is shared: the fullest split is flushed first

    def flush(split: str) -> None:
        if not buffers[split]:
            return
        table = pa.concat_tables(buffers[split])
        table = table.take(pc.sort_indices(table, [("id", "ascending")]))
        path = scratch / f"run-{split}-{len(runs[split]):05d}.parquet"
        pq.write_table(table, path, row_group_size=MERGE_BATCH_ROWS)
        runs[split].append(path)
        buffers[split], sizes[split] = [], 0

    kept = open_streaming(kept_path).iter_batches(batch_size=65536, use_threads=False)
    kept_pos, kept_split, kept_source = np.empty(0, np.int64), np.empty(0, object), np.empty(0, object)
    for batch in open_streaming(scratch / "rows.parquet").iter_batches(batch_size=1024, use_threads=False):
        pos = batch.column("pos").to_numpy()
        last = pos[-1]
        while kept_pos.size == 0 or kept_pos[-1] < last:  # read the kept list up to this batch's end
            more = next(kept, None)
            if more is None:
                break
            kept_pos = np.concatenate([kept_pos, more.column("pos").to_numpy()])
            kept_split = np.concatenate([kept_split, more.column("split").to_numpy(zero_copy_only=False)])
            kept_source = np.concatenate([kept_source, more.column("source").to_numpy(zero_copy_only=False)])
        stop = int(np.searchsorted(kept_pos, last, side="right"))
        here = np.searchsorted(pos, kept_pos[:stop])  # rows of this batch that are kept, in pos order
        table = pa.Table.from_batches([batch]).take(pa.array(here))
        table = table.set_column(
            table.schema.get_field_index("split"), "split", pa.array(kept_split[:stop], pa.string())
        )
        table = table.set_column(
            table.schema.get_field_index("source"), "source", pa.array(kept_source[:stop], pa.string())
        )
        table = table.select(list(COLUMNS)).cast(schema, safe=False)
        kept_pos, kept_split, kept_source = kept_pos[stop:], kept_split[stop:], kept_source[stop:]
        for split in SPLITS:
            part = table.filter(pc.equal(table.column("split"), split))
            if part.num_rows:
                buffers[split].append(part)
                sizes[split] += part.nbytes
        while sum(sizes.values()) >= run_bytes:
            flush(max(sizes, key=sizes.get))
    for split in SPLITS:
        flush(split)
    return runs


def merge_runs(runs: list[Path], path: Path) -> int:
    """K-way merge of id-sorted runs into ``path``, a slice at a time: every row up to the smallest
    last id of the runs' current batches is final, so that block is sorted and written at once."""
    schema = prepared_schema()
    readers = [
        open_streaming(run, 1 << 16).iter_batches(batch_size=MERGE_BATCH_ROWS, use_threads=False) for run in runs
    ]
    heads: list[pa.Table | None] = [_next_table(reader) for reader in readers]
    written, pending = 0, None
    with pq.ParquetWriter(path, schema, compression="zstd") as out:

        def emit(table: pa.Table) -> None:
            nonlocal written, pending
            pending = table if pending is None else pa.concat_tables([pending, table])
            while pending.num_rows >= OUTPUT_ROW_GROUP_ROWS:
                out.write_table(
                    pending.slice(0, OUTPUT_ROW_GROUP_ROWS).cast(schema).combine_chunks(), OUTPUT_ROW_GROUP_ROWS
                )
                written += OUTPUT_ROW_GROUP_ROWS
                pending = pending.slice(OUTPUT_ROW_GROUP_ROWS)

        while any(head is not None for head in heads):
            live = [k for k, head in enumerate(heads) if head is not None]
            bound = min(heads[k].column("id")[-1].as_py() for k in live)
            block = []
            for k in live:
                ids = heads[k].column("id")
                upto = int(pc.sum(pc.less_equal(ids, bound)).as_py() or 0)
                if upto:
                    block.append(heads[k].slice(0, upto))
                heads[k] = heads[k].slice(upto) if upto < heads[k].num_rows else _next_table(readers[k])
            table = pa.concat_tables(block)
            emit(table.take(pc.sort_indices(table, [("id", "ascending")])))
        if pending is not None and pending.num_rows:
            out.write_table(pending.cast(schema).combine_chunks(), OUTPUT_ROW_GROUP_ROWS)
            written += pending.num_rows
        if not written:
            out.write_table(schema.empty_table())
    return written


def _next_table(reader) -> pa.Table | None:
    batch = next(reader, None)
    return None if batch is None else pa.Table.from_batches([batch])


def _write_query(result, schema: pa.Schema, path: Path) -> int:
    """Stream a query into ``path`` in row groups of exactly OUTPUT_ROW_GROUP_ROWS (as the pandas engine)."""
    written, pending = 0, None
    with pq.ParquetWriter(path, schema, compression="zstd") as out:

        def write(table) -> None:
            nonlocal written
            out.write_table(table.cast(schema, safe=False).combine_chunks(), row_group_size=OUTPUT_ROW_GROUP_ROWS)
            written += table.num_rows

        for batch in result.to_arrow_reader(OUTPUT_ROW_GROUP_ROWS):
            table = pa.Table.from_batches([batch])
            pending = table if pending is None else pa.concat_tables([pending, table])
            while pending.num_rows >= OUTPUT_ROW_GROUP_ROWS:
                write(pending.slice(0, OUTPUT_ROW_GROUP_ROWS))
                pending = pending.slice(OUTPUT_ROW_GROUP_ROWS)
        if pending is not None and pending.num_rows:
            write(pending)
        if not written:  # the same bytes as pyarrow's write_table of an empty table
            out.write_table(schema.empty_table())
    return written


def compute_stats(con, params: PrepareParams) -> dict[str, Any]:
    """The in-memory core's ``stats.json``, as DuckDB aggregates (see prepare.compute_stats)."""

    def rows(query: str, args=()) -> list[tuple]:
        return con.execute(query, list(args)).fetchall()

    counts_in = dict(rows("SELECT source, count(*) FROM docs GROUP BY source"))
    n_out = rows("SELECT count(*) FROM docs WHERE reason IS NULL")[0][0]
    n_dropped = rows("SELECT count(*) FROM docs WHERE reason IS NOT NULL")[0][0]
    by_reason = dict(rows("SELECT reason, count(*) FROM docs WHERE reason IS NOT NULL GROUP BY reason"))

    # the split of the document a duplicate was dropped for: kept, else the last dropped row with that id
    cross = dict(
        rows(
            """WITH kept AS (SELECT id, split FROM docs WHERE reason IS NULL),
                    gone AS (SELECT id, list(split ORDER BY reason, not_test, unlabelled, pos)[-1] AS split
                             FROM docs WHERE reason IS NOT NULL AND id IS NOT NULL GROUP BY id)
               SELECT d.reason, count(*) FILTER (WHERE coalesce(k.split, g.split) IS DISTINCT FROM d.split)
               FROM docs d LEFT JOIN kept k ON k.id = d.duplicate_of LEFT JOIN gone g ON g.id = d.duplicate_of
               WHERE d.reason IN ('exact_duplicate', 'near_duplicate') GROUP BY d.reason"""
        )
    )
    dedup: dict[str, Any] = {}
    for reason, name in (("exact_duplicate", "exact"), ("near_duplicate", "near")):
        dedup[name] = int(by_reason.get(reason, 0))
        dedup[f"{name}_cross_split"] = int(cross.get(reason, 0))
    near_mean = rows("SELECT avg(similarity) FROM docs WHERE reason = 'near_duplicate'")[0][0]
    dedup["near_mean_similarity"] = round(float(near_mean), 4) if near_mean is not None else 0.0

    out_by_source = dict(rows("SELECT source, count(*) FROM docs WHERE reason IS NULL GROUP BY source"))
    gone_by_source: dict[str, dict[str, int]] = {}
    for source, reason, n in rows(
        "SELECT source, reason, count(*) FROM docs WHERE reason IS NOT NULL GROUP BY source, reason"
    ):
        gone_by_source.setdefault(source, {})[reason] = n
    sources = {
        source: {
            "in": int(counts_in[source]),
            "out": int(out_by_source.get(source, 0)),
            "dropped": {r: int(gone_by_source.get(source, {}).get(r, 0)) for r in DROP_REASONS},
        }
        for source in sorted(counts_in)
    }

    langs = {}
    script_sums = ", ".join(f"sum({s})" for s in SCRIPTS)
    lang_rows = rows(
        f"""SELECT coalesce(lang, '<none>') AS lang, count(*), sum(letters), {script_sums}
            FROM docs WHERE reason IS NULL GROUP BY 1"""
    )
    dominant_rows = rows(
        """SELECT coalesce(lang, '<none>'), dominant, count(*) FROM docs
           WHERE reason IS NULL AND dominant IS NOT NULL GROUP BY 1, 2"""
    )
    for lang, docs, letter_sum, *script_counts in sorted(lang_rows):
        letters = max(int(letter_sum), 1)
        expected = params.lang_scripts.get(lang)
        mismatch = sum(n for lg, dom, n in dominant_rows if lg == lang and dom != expected) if expected else 0
        langs[lang] = {
            "docs": docs,
            "share": round(docs / max(n_out, 1), 4),
            "script_mismatch": int(mismatch),
            "script_share": {s: round(int(c) / letters, 4) for s, c in zip(SCRIPTS, script_counts)},
        }
        if mismatch:
            examples = [
                r[0]
                for r in rows(
                    """SELECT id FROM docs WHERE reason IS NULL AND coalesce(lang, '<none>') = ?
                       AND dominant IS NOT NULL AND dominant <> ? ORDER BY id LIMIT 5""",
                    (lang, expected),
                )
            ]
            logger.warning("lang %s: %d docs are mostly not %s script (e.g. %s)", lang, mismatch, expected, examples)

    labels = sorted(r[0] for r in rows("SELECT DISTINCT label FROM docs WHERE reason IS NULL AND label IS NOT NULL"))
    hashed_total = max(rows("SELECT count(*) FROM docs WHERE reason IS NULL AND fixed IS NULL")[0][0], 1)
    splits = {}
    for split in SPLITS:
        docs, hashed, unlabelled = rows(
            """SELECT count(*), count(*) FILTER (WHERE fixed IS NULL), count(*) FILTER (WHERE label IS NULL)
               FROM docs WHERE reason IS NULL AND split = ?""",
            (split,),
        )[0]
        counts = dict(
            rows(
                "SELECT label, count(*) FROM docs WHERE reason IS NULL AND split = ? AND label IS NOT NULL GROUP BY 1",
                (split,),
            )
        )
        splits[split] = {
            "docs": docs,
            "share": round(docs / max(n_out, 1), 4),
            "fixed": docs - hashed,
            "hashed": hashed,
            "hashed_share": round(hashed / hashed_total, 4),
            "labels": {**{lb: int(counts.get(lb, 0)) for lb in labels}, "unlabelled": int(unlabelled)},
        }
    kinds = [r[0] for r in rows("SELECT DISTINCT coalesce(kind, '<none>') FROM docs WHERE reason IS NULL")]
    length_chars = {}
    for kind in sorted(kinds):
        chars = con.execute(
            "SELECT chars FROM docs WHERE reason IS NULL AND coalesce(kind, '<none>') = ?", [kind]
        ).fetchnumpy()["chars"]
        length_chars[kind] = length_quantiles(np.asarray(chars))
    return {
        "docs": {"in": int(sum(counts_in.values())), "out": int(n_out), "dropped": int(n_dropped)},
        "dropped": {r: int(by_reason.get(r, 0)) for r in DROP_REASONS},
        "dedup": dedup,
        "sources": sources,
        "length_chars": length_chars,
        "lang": langs,
        "splits": splits,
    }


def _peak_mb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


@contextlib.contextmanager
def scratch_folder(params: PrepareParams, prepared_dir: Path) -> Iterator[Path]:
    parent = Path(params.spill_dir) if params.spill_dir else prepared_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=".prepare-scratch-", dir=parent))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def prepare_into(
    dirs: list[Path],
    out_dir: Path,
    params: PrepareParams,
    dropped_schema: pa.Schema,
    prepared_dir: Path,
    executor: ExecutorParams | None = None,
) -> tuple[dict[str, int], dict[str, Any], dict[str, str], Mapping[str, float]]:
    """Write ``{train,val,test,dropped}.parquet`` into ``out_dir``; return rows, stats, inputs, seconds."""
    started = time.perf_counter()
    with scratch_folder(params, prepared_dir) as scratch:
        total, inputs = write_features(dirs, scratch, params, executor or ExecutorParams())
        features_s = time.perf_counter() - started
        logger.info("prepare: features of %d documents in %.1f s (peak RSS %d MB)", total, features_s, _peak_mb())
        con = _connect(scratch, params.memory_budget_mb)
        try:
            apply_drops(con, scratch, params)
            drops_s = time.perf_counter() - started - features_s
            logger.info("prepare: drops and near duplicates (peak RSS %d MB)", _peak_mb())
            kept_path = export_decisions(con, scratch, out_dir, dropped_schema)
            stats = compute_stats(con, params)
        finally:
            con.close()  # DuckDB's buffers go before the sort takes its share of the budget
        rows = write_splits(scratch, kept_path, out_dir, params.memory_budget_mb)
        logger.info("prepare: outputs written (peak RSS %d MB)", _peak_mb())
    seconds = {
        "features": round(features_s, 2),
        "dedup": round(drops_s, 2),
        "write": round(time.perf_counter() - started - features_s - drops_s, 2),
    }
    return rows, stats, inputs, seconds
