"""Benchmark: engines for prepare's heavy part (exact dedup on the normalised key + MinHash LSH near dedup).

Issue 15 asks to measure the candidates side by side on the same input before choosing one. The
semantics are those of :func:`pipeline_tasks.dataset.prepare.prepare_documents`: documents in
priority order (fixed ``test`` row, then labelled row, then smallest id); ``exact_duplicate`` on
:func:`~pipeline_tasks.dataset.textstats.normalize_key` keeps the first; then
:func:`~pipeline_tasks.dataset.dedup.find_near_duplicates` walks the rest greedily, dropping a
document whose MinHash Jaccard estimate to an earlier *kept* document reaches the threshold.

Engines (each one runs in its own subprocess on the same Parquet input):

* ``pandas``: today's code, in memory (pandas sort + ``duplicated``, our numpy MinHash/LSH walk).
* ``duckdb``: out of core (``memory_limit``, ``temp_directory``). DuckDB ranks the rows by priority
  (a sort that spills); one streaming Python pass over the ranked rows computes the key hash
  (blake2b-64 of the normalised key), our MinHash signatures (appended to a flat file indexed by
  rank) and the LSH band keys (Parquet); exact dedup is a window function (``first_value`` over
  the key hash ordered by rank); candidate pairs come from a band-key self-join, sorted by ``i``;
  a streaming pass verifies each pair batch against the signatures (memory-mapped per batch) and
  runs the greedy "drop i if a kept earlier j is similar" rule with a dropped-bitset.
* ``polars``: the same plan with Polars lazy frames and the streaming engine (``sink_parquet``).
* ``datatrove``: DataTrove's MinHash blocks (Signature / Buckets / Cluster / Filter) with a
  ``LocalPipelineExecutor`` (1 worker), same n-gram size and the same bands x rows as ours; its own
  normalisation (``simplify_text``), whitespace words (its English tokenizer needs spaCy or NLTK
  data downloads, so the bench swaps in a whitespace one) and xxhash. It has no exact stage, no Jaccard verification of bucket matches and no priority (a
  cluster keeps its union-find root), so it is compared on the set of removed documents. Its input
  is written in priority order, which is as close as it gets.

Input: the default ingest sources (``ingest_wiki`` + ``ingest_news`` on the offline mirror, run in
a temporary workspace), filtered like prepare (ids, empty text, length, non-letter share); scale
``k`` adds ``k - 1`` rounds of copies with new ids: 5 % exact copies (case, whitespace and
punctuation changes only: same normalised key), 10 % near copies (about one word in 60 replaced) and 85 % new text (first half of
one document + second half of another). Rows are shuffled, so every engine has to sort.

Measured per engine and scale: wall seconds of the subprocess (imports included); peak RSS as
``VmHWM`` from ``/proc/self/status`` of the engine's own process (largest resident set since exec;
file-backed pages it touched count too), overall and per step (the high-water mark is reset
between steps by writing ``5`` to ``/proc/self/clear_refs``); ``ru_maxrss`` from ``wait4`` is not
used because a vfork + exec child inherits the parent's high-water mark on Linux. Also docs/s and
agreement with ``pandas``: same exact-duplicate set, Jaccard of the near-duplicate sets and of all
removed documents (with the counts removed by only one side), the share of common near drops that
name the same kept document, and how many fixed ``test`` rows were removed (prepare's leakage rule:
a test row never loses to a later row). Ingest runs with ``.venv``'s interpreter (it needs
mwparserfromhell and defusedxml, which the engines venv does not have).

Run it in the separate engines venv (never in .venv, which is requirements/tasks.txt)::

    python3 -m venv .venv-engines
    .venv-engines/bin/pip install -r requirements/bench-engines.txt
    .venv-engines/bin/pip install --no-deps -e .
    LMPIPE_DATA_MIRROR=/work/shared/corpora nice .venv-engines/bin/python bench/dedup_engines.py --scales 1 4 16

Prints a table per scale and writes ``bench/results/dedup_engines.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ENGINES = ("pandas", "duckdb", "polars", "datatrove")
RESULT_COLUMNS = ("id", "reason", "kept_id", "similarity")
BATCH_ROWS = 4096


def prepare_params():
    from pipeline_tasks.config import load_params

    return load_params(ROOT / "params.yaml").prepare


# --------------------------------------------------------------------------------------------
# Input


def ingest_raw(workspace: Path, python: str) -> list[Path]:
    """Run the two ingest stages on the default sources in ``workspace``; return the raw folders."""
    workspace.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "params.yaml", workspace / "params.yaml")
    env = {**os.environ, "LMPIPE_DATA_MIRROR": os.environ.get("LMPIPE_DATA_MIRROR", "/work/shared/corpora")}
    for stage in ("ingest_wiki", "ingest_news"):
        done = subprocess.run(
            [python, "-m", "pipeline_tasks", stage, "--params", "params.yaml"],
            cwd=workspace,
            env=env,
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            sys.exit(f"{stage} failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    return [workspace / "data/raw/wiki", workspace / "data/raw/news"]


def base_rows(raw_dirs: list[Path], params):
    """Raw rows after prepare's own filters (what its dedup steps see), columns id/text/label/split."""
    from pipeline_tasks.dataset.prepare import read_raw
    from pipeline_tasks.dataset.rawdocs import SPLIT_ALIASES
    from pipeline_tasks.dataset.textstats import char_profile, normalize_key

    frame, _ = read_raw(raw_dirs)
    frame = frame[frame["id"].notna() & frame["text"].notna()]
    frame = frame.drop_duplicates("id")
    frame = frame[[bool(normalize_key(t)) for t in frame["text"]]]
    profile = [char_profile(t) for t in frame["text"]]
    chars = [p.chars for p in profile]
    nonletter = [p.nonletter_share for p in profile]
    keep = [
        params.min_chars <= c <= params.max_chars
        and (params.max_nonletter_share is None or s <= params.max_nonletter_share)
        for c, s in zip(chars, nonletter)
    ]
    frame = frame[keep]
    split = frame["split"].map(lambda v: SPLIT_ALIASES.get(str(v).strip().lower()) if isinstance(v, str) else None)
    return {
        "id": frame["id"].astype(str).tolist(),
        "text": frame["text"].tolist(),
        "label": frame["label"].tolist(),
        "split": split.tolist(),
    }


def scaled_input(base: dict, scale: int, seed: int, path: Path, sorted_path: Path) -> int:
    """Write ``scale`` x the base rows (copies: exact / near / new text), shuffled; return the row count."""
    import numpy as np
    import pandas as pd

    ids, texts, labels, splits = (list(base[c]) for c in ("id", "text", "label", "split"))
    n = len(base["id"])
    for r in range(1, scale):
        rng = np.random.default_rng(seed + r)
        kind = rng.random(n)
        partner = rng.integers(0, n, size=n)
        for i in range(n):
            text = base["text"][i]
            if kind[i] < 0.05:
                new = f"  {text.upper()} !"  # same normalised key
            elif kind[i] < 0.15:
                words = text.split()
                if len(words) >= 20:
                    for pos in rng.integers(0, len(words), size=max(1, len(words) // 60)):
                        words[pos] = f"zq{rng.integers(1_000_000)}"
                    new = " ".join(words)
                else:  # CJK or very short: change characters instead
                    chars = list(text)
                    for pos in rng.integers(0, len(chars), size=max(1, len(chars) // 100)):
                        chars[pos] = "x"
                    new = "".join(chars)
            else:
                other = base["text"][partner[i]]
                new = text[: len(text) // 2] + " " + other[len(other) // 2 :]
            ids.append(f"{base['id'][i]}~{r}")
            texts.append(new)
            labels.append(base["label"][i])
            splits.append(None)  # copies are hashed rows: they never outrank a fixed test row
    frame = pd.DataFrame({"id": ids, "text": texts, "label": labels, "split": splits})
    order = np.random.default_rng(seed).permutation(len(frame))
    frame.iloc[order].to_parquet(path, index=False, row_group_size=16384)
    ranked = frame.assign(_t=frame["split"] != "test", _u=frame["label"].isna())
    ranked = ranked.sort_values(["_t", "_u", "id"], kind="mergesort")[["id", "text"]]
    sorted_path.mkdir(parents=True, exist_ok=True)
    ranked.to_parquet(sorted_path / "input.parquet", index=False, row_group_size=16384)
    return len(frame)


# --------------------------------------------------------------------------------------------
# Shared per-document work (engines b, c): one streaming pass over rows in rank order


def doc_features(text: str, params):
    from pipeline_tasks.dataset.dedup import shingle_hashes
    from pipeline_tasks.dataset.textstats import char_profile, normalize_key

    key = normalize_key(text)
    profile = char_profile(text)
    cjk = (profile.cjk / max(profile.letters, 1)) >= params.cjk_min_share
    return key, shingle_hashes(key, params.shingle_words, params.shingle_chars, cjk)


def signature_pass(batches, work: Path, params) -> int:
    """Key hashes + band keys to Parquet, signatures appended to ``sigs.u32`` (row = rank); returns n."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline_tasks.dataset.dedup import _coefficients, _mix64, lsh_bands, minhash_signatures

    bands, rows = lsh_bands(params.near_dup_threshold, params.num_perm)
    coef = _coefficients()
    key_schema = pa.schema([("rank", pa.int64()), ("key_hash", pa.uint64())])
    band_schema = pa.schema([("rank", pa.int64()), ("band", pa.int16()), ("key", pa.uint64())])
    n = 0
    with (
        open(work / "sigs.u32", "wb") as sig_file,
        pq.ParquetWriter(work / "keys.parquet", key_schema) as keys_out,
        pq.ParquetWriter(work / "bands.parquet", band_schema) as bands_out,
    ):
        for batch in batches:
            ranks = batch.column("rank").to_numpy().astype(np.int64)
            if len(ranks) == 0:
                continue
            assert ranks[0] == n and ranks[-1] == n + len(ranks) - 1, "rows must arrive in rank order"
            key_hashes, hash_arrays = [], []
            for text in batch.column("text").to_pylist():
                key, hashes = doc_features(text, params)
                key_hashes.append(int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little"))
                hash_arrays.append(hashes)
            sigs = minhash_signatures(hash_arrays, params.num_perm, params.minhash_seed, progress=False)
            sig_file.write(sigs.tobytes())
            keys_out.write_table(
                pa.table({"rank": ranks, "key_hash": np.array(key_hashes, dtype=np.uint64)}, key_schema)
            )
            band_keys = np.empty((len(ranks), bands), dtype=np.uint64)
            for band in range(bands):
                block = sigs[:, band * rows : (band + 1) * rows].astype(np.uint64)
                band_keys[:, band] = _mix64((block * coef[:rows]).sum(axis=1, dtype=np.uint64) + np.uint64(band))
            bands_out.write_table(
                pa.table(
                    {
                        "rank": np.repeat(ranks, bands),
                        "band": np.tile(np.arange(bands, dtype=np.int16), len(ranks)),
                        "key": band_keys.ravel(),
                    },
                    band_schema,
                )
            )
            n += len(ranks)
    return n


def greedy_near(pair_batches, sig_path: Path, n: int, params):
    """Greedy pass over candidate pairs (i, j), j < i, sorted by (i, j): earlier kept j wins.

    Returns ``(i, j, similarity)`` arrays of the dropped documents. Memory: the dropped-bitset
    (n / 8 bytes) plus one pair batch; signatures are read from a memory map that is reopened per
    batch, so pages touched by one batch do not accumulate.
    """
    import numpy as np

    dropped = np.zeros((n + 7) // 8, dtype=np.uint8)
    out_i, out_j, out_s = [], [], []
    current, best_j, best_s = -1, -1, -1.0

    def finish():
        if current >= 0 and best_j >= 0:
            dropped[current >> 3] |= np.uint8(1 << (current & 7))
            out_i.append(current)
            out_j.append(best_j)
            out_s.append(best_s)

    for i, j in pair_batches:
        sigs = np.memmap(sig_path, dtype=np.uint32, mode="r", shape=(n, params.num_perm))
        similarity = (sigs[i] == sigs[j]).mean(axis=1)
        del sigs
        similar = similarity >= params.near_dup_threshold  # a pair below it can never drop i
        for ii, jj, s in zip(i[similar].tolist(), j[similar].tolist(), similarity[similar].tolist()):
            if ii != current:
                finish()
                current, best_j, best_s = ii, -1, -1.0
            if not (dropped[jj >> 3] >> (jj & 7)) & 1 and s > best_s:  # strict: ties keep the earliest j
                best_j, best_s = jj, s
    finish()
    return np.array(out_i, dtype=np.int64), np.array(out_j, dtype=np.int64), np.array(out_s, dtype=np.float64)


def parquet_pairs(path: Path):
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(batch_size=1 << 16, columns=["i", "j"]):
        yield batch.column("i").to_numpy(), batch.column("j").to_numpy()


def write_near(path: Path, i, j, s) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"i": i, "j": j, "similarity": s}), path)


# --------------------------------------------------------------------------------------------
# Engines (run in a subprocess: `--run-engine NAME`)


def engine_pandas(input_path: Path, work: Path, result: Path, params, args) -> dict:
    import pandas as pd

    from pipeline_tasks.dataset.dedup import find_near_duplicates

    steps = {}
    t = time.perf_counter()
    df = pd.read_parquet(input_path)
    df["_not_test"] = df["split"] != "test"
    df["_unlabelled"] = df["label"].isna()
    df = df.sort_values(["_not_test", "_unlabelled", "id"], kind="mergesort").reset_index(drop=True)
    steps["read_sort_s"] = time.perf_counter() - t
    steps["read_sort_mib"] = take_peak()
    t = time.perf_counter()
    features = [doc_features(text, params) for text in df["text"]]
    df["_key"] = [k for k, _ in features]
    steps["features_s"] = time.perf_counter() - t
    steps["features_mib"] = take_peak()
    t = time.perf_counter()
    first_of_key = df.drop_duplicates("_key").set_index("_key")["id"]
    exact = df["_key"].duplicated(keep="first")
    gone = [
        pd.DataFrame({"id": df.loc[exact, "id"], "reason": "exact", "kept_id": df.loc[exact, "_key"].map(first_of_key)})
    ]
    steps["exact_s"] = time.perf_counter() - t
    steps["exact_mib"] = take_peak()
    t = time.perf_counter()
    rest = (~exact).to_numpy()
    hashes = [h for (_, h), keep in zip(features, rest) if keep]
    ids = df.loc[rest, "id"].to_numpy()
    found = find_near_duplicates(
        hashes, params.near_dup_threshold, params.num_perm, params.minhash_seed, progress=False
    )
    gone.append(
        pd.DataFrame(
            {
                "id": [ids[d.index] for d in found],
                "reason": "near",
                "kept_id": [ids[d.kept] for d in found],
                "similarity": [d.jaccard for d in found],
            }
        )
    )
    steps["near_s"] = time.perf_counter() - t
    steps["near_mib"] = take_peak()
    pd.concat(gone, ignore_index=True).reindex(columns=list(RESULT_COLUMNS)).to_parquet(result, index=False)
    return steps


def engine_duckdb(input_path: Path, work: Path, result: Path, params, args) -> dict:
    import duckdb
    import pyarrow.parquet as pq

    steps = {}
    con = duckdb.connect()
    con.execute(f"SET memory_limit = '{args.duckdb_memory}'")
    con.execute(f"SET temp_directory = '{work / 'spill'}'")
    con.execute(f"SET threads = {args.threads}")
    con.execute("SET preserve_insertion_order = false")
    t = time.perf_counter()
    # priority: fixed test row, then labelled row, then smallest id (VARCHAR order is byte = code point order)
    con.execute(
        f"""COPY (SELECT row_number() OVER (ORDER BY split IS DISTINCT FROM 'test', label IS NULL, id) - 1 AS rank,
                         id, text FROM read_parquet('{input_path}') ORDER BY rank)
            TO '{work / "ranked.parquet"}' (FORMAT parquet, ROW_GROUP_SIZE 16384)"""
    )
    steps["rank_s"] = time.perf_counter() - t
    steps["rank_mib"] = take_peak()
    t = time.perf_counter()
    batches = pq.ParquetFile(work / "ranked.parquet").iter_batches(batch_size=BATCH_ROWS, columns=["rank", "text"])
    n = signature_pass(batches, work, params)
    steps["features_s"] = time.perf_counter() - t
    steps["features_mib"] = take_peak()
    t = time.perf_counter()
    con.execute(
        f"""COPY (SELECT rank, kept FROM (
                    SELECT rank, first_value(rank) OVER (PARTITION BY key_hash ORDER BY rank) AS kept
                    FROM read_parquet('{work / "keys.parquet"}')) WHERE rank <> kept)
            TO '{work / "exact.parquet"}' (FORMAT parquet)"""
    )
    steps["exact_s"] = time.perf_counter() - t
    steps["exact_mib"] = take_peak()
    t = time.perf_counter()
    con.execute(
        f"""CREATE TEMP VIEW live AS SELECT b.* FROM read_parquet('{work / "bands.parquet"}') b
            ANTI JOIN read_parquet('{work / "exact.parquet"}') e ON b.rank = e.rank"""
    )
    con.execute(
        f"""COPY (SELECT DISTINCT y.rank AS i, x.rank AS j FROM live x JOIN live y
                  ON x.band = y.band AND x.key = y.key AND x.rank < y.rank ORDER BY i, j)
            TO '{work / "pairs.parquet"}' (FORMAT parquet)"""
    )
    steps["pairs_s"] = time.perf_counter() - t
    steps["pairs_mib"] = take_peak()
    steps["pairs"] = con.execute(f"SELECT count(*) FROM read_parquet('{work / 'pairs.parquet'}')").fetchone()[0]
    t = time.perf_counter()
    write_near(work / "near.parquet", *greedy_near(parquet_pairs(work / "pairs.parquet"), work / "sigs.u32", n, params))
    steps["greedy_s"] = time.perf_counter() - t
    steps["greedy_mib"] = take_peak()
    t = time.perf_counter()
    ranked = f"read_parquet('{work / 'ranked.parquet'}')"
    con.execute(
        f"""COPY (SELECT d.id, 'exact' AS reason, k.id AS kept_id, NULL::DOUBLE AS similarity
                  FROM read_parquet('{work / "exact.parquet"}') e JOIN {ranked} d ON d.rank = e.rank
                  JOIN {ranked} k ON k.rank = e.kept
                  UNION ALL
                  SELECT d.id, 'near', k.id, p.similarity FROM read_parquet('{work / "near.parquet"}') p
                  JOIN {ranked} d ON d.rank = p.i JOIN {ranked} k ON k.rank = p.j)
            TO '{result}' (FORMAT parquet)"""
    )
    steps["ids_s"] = time.perf_counter() - t
    steps["ids_mib"] = take_peak()
    return steps


def engine_polars(input_path: Path, work: Path, result: Path, params, args) -> dict:
    import polars as pl
    import pyarrow.parquet as pq

    steps = {}
    t = time.perf_counter()
    (
        pl.scan_parquet(input_path)
        .with_columns(
            _not_test=(pl.col("split") == "test").fill_null(False).not_(), _unlabelled=pl.col("label").is_null()
        )
        .sort(["_not_test", "_unlabelled", "id"], maintain_order=True)
        .with_row_index("rank")
        .select(pl.col("rank").cast(pl.Int64), "id", "text")
        .sink_parquet(work / "ranked.parquet", row_group_size=16384)
    )
    steps["rank_s"] = time.perf_counter() - t
    steps["rank_mib"] = take_peak()
    t = time.perf_counter()
    batches = pq.ParquetFile(work / "ranked.parquet").iter_batches(batch_size=BATCH_ROWS, columns=["rank", "text"])
    n = signature_pass(batches, work, params)
    steps["features_s"] = time.perf_counter() - t
    steps["features_mib"] = take_peak()
    t = time.perf_counter()
    keys = pl.scan_parquet(work / "keys.parquet")
    firsts = keys.group_by("key_hash").agg(kept=pl.col("rank").min())
    (
        keys.join(firsts, on="key_hash")
        .filter(pl.col("rank") != pl.col("kept"))
        .select("rank", "kept")
        .sink_parquet(work / "exact.parquet")
    )
    steps["exact_s"] = time.perf_counter() - t
    steps["exact_mib"] = take_peak()
    t = time.perf_counter()
    live = pl.scan_parquet(work / "bands.parquet").join(pl.scan_parquet(work / "exact.parquet"), on="rank", how="anti")
    (
        live.join(live, on=["band", "key"], suffix="_later")
        .filter(pl.col("rank") < pl.col("rank_later"))
        .select(i=pl.col("rank_later"), j=pl.col("rank"))
        .unique()
        .sort(["i", "j"])
        .sink_parquet(work / "pairs.parquet")
    )
    steps["pairs_s"] = time.perf_counter() - t
    steps["pairs_mib"] = take_peak()
    steps["pairs"] = pq.ParquetFile(work / "pairs.parquet").metadata.num_rows
    t = time.perf_counter()
    write_near(work / "near.parquet", *greedy_near(parquet_pairs(work / "pairs.parquet"), work / "sigs.u32", n, params))
    steps["greedy_s"] = time.perf_counter() - t
    steps["greedy_mib"] = take_peak()
    t = time.perf_counter()
    ranked = pl.scan_parquet(work / "ranked.parquet").select("rank", "id")
    exact = (
        pl.scan_parquet(work / "exact.parquet")
        .join(ranked, on="rank")
        .join(ranked.rename({"rank": "kept", "id": "kept_id"}), on="kept")
        .select("id", reason=pl.lit("exact"), kept_id="kept_id", similarity=pl.lit(None, dtype=pl.Float64))
    )
    near = (
        pl.scan_parquet(work / "near.parquet")
        .join(ranked.rename({"rank": "i"}), on="i")
        .join(ranked.rename({"rank": "j", "id": "kept_id"}), on="j")
        .select("id", reason=pl.lit("near"), kept_id="kept_id", similarity="similarity")
    )
    pl.concat([exact, near]).sink_parquet(result)
    steps["ids_s"] = time.perf_counter() - t
    steps["ids_mib"] = take_peak()
    return steps


def engine_datatrove(input_path: Path, work: Path, result: Path, params, args) -> dict:
    import pandas as pd
    from datatrove.executor.local import LocalPipelineExecutor
    from datatrove.pipeline.dedup import minhash as datatrove_minhash
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.readers import ParquetReader
    from datatrove.pipeline.writers import ParquetWriter
    from datatrove.utils.hashing import HashConfig
    from datatrove.utils.word_tokenizers import WordTokenizer

    from pipeline_tasks.dataset.dedup import lsh_bands

    class WhitespaceTokenizer(WordTokenizer):
        # the text reaching it is already simplified (lowercase, no punctuation): whitespace words suffice
        def word_tokenize(self, text):
            return text.split()

        def sent_tokenize(self, text):
            return [text]

        def span_tokenize(self, text):
            return [(0, len(text))]

    bands, rows = lsh_bands(params.near_dup_threshold, params.num_perm)
    config = MinhashConfig(
        n_grams=params.shingle_words,
        num_buckets=bands,
        hashes_per_bucket=rows,
        seed=params.minhash_seed,
        hash_config=HashConfig(precision=64, hash_fc="xxhash"),
    )
    folder = input_path.parent  # holds only the priority-sorted input
    logs = work / "logs"
    # its English tokenizer needs spaCy or NLTK data (downloads); the block is built in this process (1 worker)
    datatrove_minhash.load_word_tokenizer = lambda language: WhitespaceTokenizer()
    signature = MinhashDedupSignature(output_folder=str(work / "sigs"), config=config)
    steps = {}

    def run(name, pipeline, tasks):
        t = time.perf_counter()
        LocalPipelineExecutor(
            pipeline=pipeline, tasks=tasks, workers=1, logging_dir=str(logs / name), skip_completed=False
        ).run()
        steps[f"{name}_s"] = time.perf_counter() - t
        steps[f"{name}_mib"] = take_peak()

    def reader():
        return ParquetReader(str(folder), text_key="text", id_key="id")

    run("signatures", [reader(), signature], 1)
    run(
        "buckets",
        [MinhashDedupBuckets(input_folder=str(work / "sigs"), output_folder=str(work / "buckets"), config=config)],
        bands,
    )
    run(
        "cluster",
        [MinhashDedupCluster(input_folder=str(work / "buckets"), output_folder=str(work / "remove"), config=config)],
        1,
    )
    writer = ParquetWriter(str(work / "removed"))
    run("filter", [reader(), MinhashDedupFilter(input_folder=str(work / "remove"), exclusion_writer=writer)], 1)
    removed = []
    for path in sorted((work / "removed").glob("*.parquet")):
        removed.extend(pd.read_parquet(path, columns=["id"])["id"])
    pd.DataFrame({"id": removed, "reason": "near", "kept_id": None, "similarity": float("nan")}).to_parquet(
        result, index=False
    )
    return steps


def run_engine(args) -> None:
    import logging

    logging.basicConfig(level=logging.WARNING)
    params = prepare_params()
    work = Path(args.work)
    (work / "spill").mkdir(parents=True, exist_ok=True)
    engine = {"pandas": engine_pandas, "duckdb": engine_duckdb, "polars": engine_polars, "datatrove": engine_datatrove}
    steps = engine[args.run_engine](Path(args.input), work, Path(args.result), params, args)
    steps["peak_rss_mib"] = peak_rss_mib()
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in steps.items()}))


_PEAK_MIB = 0.0


def _vm_hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def take_peak() -> float:
    """Peak RSS (MiB) since the last call, then reset the high-water mark (``5`` > clear_refs, Linux)."""
    global _PEAK_MIB
    peak = _vm_hwm_mib()
    _PEAK_MIB = max(_PEAK_MIB, peak)
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # no reset: later steps report the running peak, still an upper bound
        pass
    return round(peak, 1)


def peak_rss_mib() -> float:
    """VmHWM of this process: its own peak resident set since exec (over all steps).

    Not ``ru_maxrss`` from ``wait4``: on Linux a child started with vfork + exec inherits the
    parent's high-water mark in ``ru_maxrss``, so it would report the parent's size.
    """
    return max(_PEAK_MIB, _vm_hwm_mib())


# --------------------------------------------------------------------------------------------
# Parent: inputs, one subprocess per engine, agreement, table


def run_child(command: list[str], timeout: float):
    """Run ``command``; return (returncode, stdout, stderr, wall_s)."""
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return 124, "", f"timeout after {timeout} s", time.perf_counter() - started
    return done.returncode, done.stdout, done.stderr, time.perf_counter() - started


def agreement(reference, other, test_ids: set) -> dict:
    ref_exact = set(reference.loc[reference["reason"] == "exact", "id"])
    ref_near = reference[reference["reason"] == "near"].set_index("id")["kept_id"]
    got_exact = set(other.loc[other["reason"] == "exact", "id"])
    got_near = other[other["reason"] == "near"].set_index("id")["kept_id"]
    ref_all, got_all = set(reference["id"]), set(other["id"])

    def jaccard(a, b):
        return round(len(a & b) / len(a | b), 4) if a | b else 1.0

    common = sorted(set(ref_near.index) & set(got_near.index))
    same_kept = sum(ref_near[c] == got_near[c] for c in common) if got_near.notna().any() else None
    has_exact = (other["reason"] == "exact").any() or not ref_exact
    return {
        "exact": len(got_exact),
        "near": len(got_near),
        "exact_same": (got_exact == ref_exact) if has_exact else None,  # None: the engine has no exact stage
        "near_jaccard": jaccard(set(ref_near.index), set(got_near.index)),
        "removed_jaccard": jaccard(ref_all, got_all),
        "removed_only_reference": len(ref_all - got_all),
        "removed_only_engine": len(got_all - ref_all),
        # prepare never drops a fixed test row for a later one (the cross-split leakage rule)
        "test_rows_removed": len(got_all & test_ids),
        "same_kept_share": None if same_kept is None else round(same_kept / max(len(common), 1), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--raw", nargs="*", help="raw wiki/news Parquet folders (default: run ingest in a temp dir)")
    parser.add_argument(
        "--ingest-python",
        default=str(ROOT / ".venv/bin/python") if (ROOT / ".venv/bin/python").exists() else sys.executable,
        help="interpreter for the ingest stages (they need the project venv's mwparserfromhell, defusedxml)",
    )
    parser.add_argument("--duckdb-memory", default="1GB")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--seed", type=int, default=15)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--output", default=str(ROOT / "bench/results/dedup_engines.json"))
    parser.add_argument("--run-engine", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_engine:
        run_engine(args)
        return
    if importlib.util.find_spec("duckdb") is None:  # `make bench` runs every bench with .venv
        engines_python = ROOT / ".venv-engines/bin/python"
        if engines_python.exists() and Path(sys.executable).resolve() != engines_python.resolve():
            os.execv(engines_python, [str(engines_python), *sys.argv])
        print("dedup_engines: skipped, the engines are not installed (see requirements/bench-engines.txt)")
        return

    import pandas as pd

    params = prepare_params()
    tmp = Path(tempfile.mkdtemp(prefix="dedup_engines_"))
    report = {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "peak_rss": "VmHWM of each engine's own subprocess (/proc/self/status at its end)",
        "params": {k: getattr(params, k) for k in ("near_dup_threshold", "num_perm", "shingle_words", "minhash_seed")},
        "duckdb_memory_limit": args.duckdb_memory,
        "threads": args.threads,
        "scales": {},
    }
    try:
        raw = [Path(p) for p in args.raw] if args.raw else ingest_raw(tmp / "ingest", args.ingest_python)
        base = base_rows(raw, params)
        print(f"base: {len(base['id'])} documents after prepare's filters", flush=True)
        for scale in args.scales:
            folder = tmp / f"x{scale}"
            folder.mkdir()
            n = scaled_input(base, scale, args.seed, folder / "input.parquet", folder / "sorted")
            test_ids = {i for i, s in zip(base["id"], base["split"]) if s == "test"}
            rows, reference = {}, None
            for engine in args.engines:
                work = folder / engine
                work.mkdir()
                input_path = folder / ("sorted/input.parquet" if engine == "datatrove" else "input.parquet")
                result = folder / f"{engine}.parquet"
                command = [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "--run-engine",
                    engine,
                    "--input",
                    str(input_path),
                    "--work",
                    str(work),
                    "--result",
                    str(result),
                    "--duckdb-memory",
                    args.duckdb_memory,
                    "--threads",
                    str(args.threads),
                ]
                code, stdout, stderr, wall = run_child(command, args.timeout)
                row = {"wall_s": round(wall, 2), "docs_per_s": round(n / wall)}
                if code != 0:
                    row["error"] = (stderr.strip().splitlines() or [f"exit {code}"])[-1][:300]
                else:
                    row["steps"] = json.loads(stdout.strip().splitlines()[-1])
                    row["peak_rss_mib"] = row["steps"].pop("peak_rss_mib")
                    got = pd.read_parquet(result)
                    if engine == "pandas":
                        reference = got
                    if reference is not None:
                        row.update(agreement(reference, got, test_ids))
                shutil.rmtree(work, ignore_errors=True)
                rows[engine] = row
                print(f"  x{scale} {engine}: {json.dumps(row)}", flush=True)
            report["scales"][str(scale)] = {"docs": n, "engines": rows}
            print_table(scale, n, rows)
            shutil.rmtree(folder, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    report["growth"] = growth(report["scales"])
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


def growth(scales: dict) -> dict:
    """Wall-time and peak-RSS ratio of each engine between the smallest and the largest scale."""
    if len(scales) < 2:
        return {}
    keys = sorted(scales, key=int)
    low, high = scales[keys[0]], scales[keys[-1]]
    out = {"docs": round(high["docs"] / low["docs"], 2)}
    for engine, row in high["engines"].items():
        base = low["engines"].get(engine, {})
        if "wall_s" in row and "wall_s" in base and "error" not in row and "error" not in base:
            out[engine] = {
                "wall": round(row["wall_s"] / base["wall_s"], 2),
                "rss": round(row["peak_rss_mib"] / base["peak_rss_mib"], 2),
            }
    return out


def print_table(scale: int, n: int, rows: dict) -> None:
    print(f"\nscale x{scale}: {n} documents")
    header = f"{'engine':<10} {'wall s':>8} {'peak MiB':>9} {'docs/s':>8} {'exact':>7} {'near':>7} {'exact=':>7} {'near J':>7} {'all J':>7} {'kept=':>6}"
    print(header)
    print("-" * len(header))
    for engine, row in rows.items():
        if "error" in row:
            print(f"{engine:<10} {row['wall_s']:>8} {'':>9} {'':>8} ERROR {row['error']}")
            continue
        print(
            f"{engine:<10} {row['wall_s']:>8} {row['peak_rss_mib']:>9} {row['docs_per_s']:>8} "
            f"{row.get('exact', ''):>7} {row.get('near', ''):>7} {str(row.get('exact_same', '')):>7} "
            f"{row.get('near_jaccard', ''):>7} {row.get('removed_jaccard', ''):>7} {str(row.get('same_kept_share', '')):>6}"
        )
    print()


if __name__ == "__main__":
    main()
