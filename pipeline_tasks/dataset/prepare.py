"""Stage ``prepare``: merge raw wiki + news, filter, deduplicate, and split deterministically.

Inputs: every ``*.parquet`` under ``paths.raw_wiki_dir`` and ``paths.raw_news_dir`` (schemas in
docs/ARCHITECTURE.md; wiki files have no ``label``/``raw_label``/``split`` -> null).

Steps (pure core :func:`prepare_documents`, each drop counted per source and reason):

1. ``missing_id`` / ``empty_text`` (no letters or digits at all), ``duplicate_id`` (one row per id);
2. filters: ``too_short`` / ``too_long`` (characters), ``nonletter`` (share of non-space characters
   that are not letters above ``max_nonletter_share``);
3. ``exact_duplicate`` on :func:`~pipeline_tasks.dataset.textstats.normalize_key` (NFKC, casefold,
   punctuation stripped, whitespace collapsed; the stored text stays as ingested);
4. split: a fixed ``split`` from ingest (AG News test -> test) wins, else
   ``sha1(f"{salt}:{id}")`` mapped to [0, 1) against ``test_fraction`` / ``val_fraction``, so a
   document never moves between splits when new data arrives;
5. ``near_duplicate`` with MinHash LSH (:mod:`pipeline_tasks.dataset.dedup`).

Whenever two rows compete (same id, same key, near duplicates) the representative is the first by
priority: a fixed ``test`` row, then a labelled row, then the smallest id. So a test row is never
dropped in favour of a train candidate, and no near duplicate spans two splits afterwards.

Outputs: ``paths.prepared_dir/{train,val,test}.parquet`` (the contract of
:mod:`pipeline_tasks.dataset.prepared`; sorted by id, so re-runs are byte-identical),
``dropped.parquet`` (id, source, split, reason, duplicate_of, similarity), ``manifest.json``;
``paths.prepare_reports_dir/stats.json`` (DVC metrics: counts per source and reason, length
quantiles, language and script shares, split sizes, labels per split).

Engines (``prepare.engine``): ``duckdb`` (default, :mod:`pipeline_tasks.dataset.prepare_outofcore`)
streams the corpus and keeps memory within ``prepare.memory_budget_mb``; ``pandas`` runs
:func:`prepare_documents` on one in-memory frame. Both write the same bytes.

Params: section ``prepare`` (:class:`~pipeline_tasks.dataset.params.PrepareParams`).
Command: ``python -m pipeline_tasks prepare``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline_tasks.artifacts import atomic_dir, atomic_write_json, sha256_file, write_manifest
from pipeline_tasks.dataset.dedup import find_near_duplicates, shingle_hashes
from pipeline_tasks.dataset.params import PrepareParams
from pipeline_tasks.dataset.prepared import COLUMNS, SPLITS, hash_split, prepared_schema
from pipeline_tasks.dataset.rawdocs import (
    DROP_REASONS,
    OUTPUT_ROW_GROUP_ROWS,
    cast_raw,
    check_raw_columns,
    dropped_schema,
    fixed_splits,
    length_quantiles,
    raw_files,
)
from pipeline_tasks.dataset.textstats import SCRIPTS, char_profile, normalize_key
from pipeline_tasks.errors import DataError

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Reading the raw tables


def read_raw(dirs: list[Path]):
    """Concatenate every ``*.parquet`` of ``dirs`` into one DataFrame with :data:`COLUMNS` + ``_file``.

    Returns ``(frame, inputs)`` where ``inputs`` maps each file to its sha256 (for the manifest).
    """
    tables, inputs = [], {}
    for path in raw_files(dirs):
        table = pq.read_table(path)
        check_raw_columns(path, table.column_names)
        read = cast_raw(path, table)
        tables.append(read.append_column("_file", pa.array([str(path)] * table.num_rows, pa.string())))
        inputs[str(path)] = sha256_file(path)
        logger.info("read %s: %d rows", path, table.num_rows)
    if not tables or sum(t.num_rows for t in tables) == 0:
        raise DataError(f"no raw documents in {', '.join(map(str, dirs))}; run the ingest stages first")
    frame = pa.concat_tables(tables).to_pandas()
    return frame, inputs


# --------------------------------------------------------------------------------------------
# Core


def prepare_documents(frame, params: PrepareParams, progress: bool | None = None):
    """Filter, deduplicate and split raw documents.

    ``frame`` has :data:`COLUMNS` (missing optional ones are treated as null) and optionally
    ``_file`` (for error messages). Returns ``(kept, dropped, stats)``: ``kept`` has
    :data:`COLUMNS` sorted by id with ``split`` filled; ``dropped`` has one row per dropped
    document (``id, source, split, reason, duplicate_of, similarity``); ``stats`` is the
    JSON-able statistics dict written to ``stats.json``.
    """
    df = frame.reset_index(drop=True).copy()
    for column in COLUMNS:
        if column not in df:
            df[column] = None
    if "_file" not in df:
        df["_file"] = "<memory>"
    df["source"] = df["source"].fillna("<none>")
    counts_in = df["source"].value_counts().to_dict()
    drops: list = []

    def drop(mask, reason, duplicate_of=None, similarity=None):
        nonlocal df
        gone = df.loc[mask, ["id", "source", "split"]].copy()
        gone["reason"] = reason
        gone["duplicate_of"] = None if duplicate_of is None else duplicate_of[mask]
        gone["similarity"] = float("nan") if similarity is None else similarity[mask]
        drops.append(gone)
        df = df.loc[~mask]
        if len(gone):
            logger.info("dropped %d rows: %s", len(gone), reason)

    # split first, so every dropped row records the split it would have had
    df["_fixed"] = fixed_splits(df)
    drop(df["id"].isna() | (df["id"].astype(str).str.strip() == ""), "missing_id")
    hashed = df["id"].map(lambda i: hash_split(i, params.salt, params.val_fraction, params.test_fraction))
    df["split"] = df["_fixed"].where(df["_fixed"].notna(), hashed)

    # priority order: fixed test row, then labelled row, then smallest id (mergesort: stable)
    df["_not_test"] = df["_fixed"] != "test"
    df["_unlabelled"] = df["label"].isna()
    df = df.sort_values(["_not_test", "_unlabelled", "id"], kind="mergesort")

    df["_key"] = df["text"].map(lambda t: normalize_key(t) if isinstance(t, str) else "")
    drop(df["_key"] == "", "empty_text")
    drop(df["id"].duplicated(keep="first"), "duplicate_id", duplicate_of=df["id"])

    profiles = pd.DataFrame([char_profile(t) for t in df["text"]], index=df.index)
    df = df.join(profiles.add_prefix("_"))
    df["_nonletter"] = (df["_nonspace"] - df["_letters"]) / df["_nonspace"].clip(lower=1)
    drop(df["_chars"] < params.min_chars, "too_short")
    drop(df["_chars"] > params.max_chars, "too_long")
    if params.max_nonletter_share is not None:
        drop(df["_nonletter"] > params.max_nonletter_share, "nonletter")

    first_of_key = df.drop_duplicates("_key").set_index("_key")["id"]
    drop(df["_key"].duplicated(keep="first"), "exact_duplicate", duplicate_of=df["_key"].map(first_of_key))

    if params.near_dup and len(df):
        cjk = (df["_cjk"] / df["_letters"].clip(lower=1)) >= params.cjk_min_share
        hashes = [shingle_hashes(k, params.shingle_words, params.shingle_chars, c) for k, c in zip(df["_key"], cjk)]
        found = find_near_duplicates(
            hashes, params.near_dup_threshold, params.num_perm, params.minhash_seed, progress=progress
        )
        ids = df["id"].to_numpy()
        mask = pd.Series(False, index=df.index)
        kept_id = pd.Series(None, index=df.index, dtype=object)
        similarity = pd.Series(float("nan"), index=df.index)
        for dup in found:
            label = df.index[dup.index]
            mask[label], kept_id[label], similarity[label] = True, ids[dup.kept], dup.jaccard
        drop(mask, "near_duplicate", duplicate_of=kept_id, similarity=similarity)

    kept = df.sort_values("id", kind="mergesort").reset_index(drop=True)
    dropped = (
        pd.concat(drops, ignore_index=True)
        if drops
        else pd.DataFrame(columns=["id", "source", "split", "reason", "duplicate_of", "similarity"])
    )
    dropped = dropped.sort_values(["reason", "id"], kind="mergesort").reset_index(drop=True)
    stats = compute_stats(kept, dropped, counts_in, params, SCRIPTS)
    return kept[list(COLUMNS)], dropped, stats


def compute_stats(
    kept, dropped, counts_in: Mapping[str, int], params: PrepareParams, scripts: tuple[str, ...]
) -> dict[str, Any]:
    """Numbers-only statistics (nested dicts) for ``stats.json`` / ``dvc metrics show``."""
    n_out = len(kept)
    by_id_split = dict(zip(kept["id"], kept["split"]))
    by_id_split.update({i: s for i, s in zip(dropped["id"], dropped["split"]) if i not in by_id_split})
    dedup: dict[str, Any] = {}
    for reason, name in (("exact_duplicate", "exact"), ("near_duplicate", "near")):
        rows = dropped[dropped["reason"] == reason]
        cross = sum(by_id_split.get(k) != s for k, s in zip(rows["duplicate_of"], rows["split"]))
        dedup[name] = len(rows)
        dedup[f"{name}_cross_split"] = int(cross)
    near = dropped.loc[dropped["reason"] == "near_duplicate", "similarity"]
    dedup["near_mean_similarity"] = round(float(near.mean()), 4) if len(near) else 0.0

    sources = {}
    for source in sorted(counts_in):
        gone = dropped[dropped["source"] == source]["reason"].value_counts()
        sources[source] = {
            "in": int(counts_in[source]),
            "out": int((kept["source"] == source).sum()),
            "dropped": {r: int(gone.get(r, 0)) for r in DROP_REASONS},
        }

    langs = {}
    for lang, group in kept.groupby(kept["lang"].fillna("<none>"), sort=True):
        letters = max(int(group["_letters"].sum()), 1)
        expected = params.lang_scripts.get(lang)
        dominant = group[[f"_{s}" for s in scripts]].idxmax(axis=1).str[1:].where(group["_letters"] > 0)
        mismatch = int(((dominant != expected) & dominant.notna()).sum()) if expected else 0
        langs[lang] = {
            "docs": len(group),
            "share": round(len(group) / max(n_out, 1), 4),
            "script_mismatch": mismatch,
            "script_share": {s: round(int(group[f"_{s}"].sum()) / letters, 4) for s in scripts},
        }
        if mismatch:
            examples = group.loc[(dominant != expected) & dominant.notna(), "id"].head(5).tolist()
            logger.warning("lang %s: %d docs are mostly not %s script (e.g. %s)", lang, mismatch, expected, examples)

    labels = sorted(kept["label"].dropna().unique())
    hashed_total = max(int(kept["_fixed"].isna().sum()), 1)
    splits = {}
    for split in SPLITS:
        rows = kept[kept["split"] == split]
        counts = rows["label"].value_counts()
        hashed = int(rows["_fixed"].isna().sum())
        splits[split] = {
            "docs": len(rows),
            "share": round(len(rows) / max(n_out, 1), 4),
            "fixed": len(rows) - hashed,
            "hashed": hashed,
            "hashed_share": round(hashed / hashed_total, 4),
            "labels": {**{lb: int(counts.get(lb, 0)) for lb in labels}, "unlabelled": int(rows["label"].isna().sum())},
        }
    return {
        "docs": {"in": int(sum(counts_in.values())), "out": n_out, "dropped": len(dropped)},
        "dropped": {r: int((dropped["reason"] == r).sum()) for r in DROP_REASONS},
        "dedup": dedup,
        "sources": sources,
        "length_chars": {
            kind: length_quantiles(group["_chars"].to_numpy())
            for kind, group in kept.groupby(kept["kind"].fillna("<none>"), sort=True)
        },
        "lang": langs,
        "splits": splits,
    }


# --------------------------------------------------------------------------------------------
# Runner


def write_table(frame, schema, path: Path) -> None:
    """Write ``frame`` with the explicit ``schema``; no pandas metadata, so bytes depend on data only."""
    table = pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False)
    pq.write_table(table.replace_schema_metadata(None), path, compression="zstd", row_group_size=OUTPUT_ROW_GROUP_ROWS)


def run(params, **_options) -> dict[str, Any]:
    p, paths = params.prepare, params.paths
    started = time.perf_counter()
    raw_dirs = [Path(paths.raw_wiki_dir), Path(paths.raw_news_dir)]
    with atomic_dir(paths.prepared_dir) as tmp:
        if p.engine == "duckdb":
            from pipeline_tasks.dataset.prepare_outofcore import prepare_into
            from pipeline_tasks.executor import executor_params

            rows, stats, inputs, seconds = prepare_into(
                raw_dirs, tmp, p, dropped_schema(), Path(paths.prepared_dir), executor_params(params)
            )
        else:
            frame, inputs = read_raw(raw_dirs)
            read_s = time.perf_counter() - started
            kept, dropped, stats = prepare_documents(frame, p)
            seconds = {"read": round(read_s, 2), "core": round(time.perf_counter() - started - read_s, 2)}
            del frame
            rows = {split: int((kept["split"] == split).sum()) for split in SPLITS}
            for split in SPLITS:
                write_table(kept[kept["split"] == split], prepared_schema(), tmp / f"{split}.parquet")
            write_table(dropped, dropped_schema(), tmp / "dropped.parquet")
        seconds = {"engine": p.engine, **seconds, "total": round(time.perf_counter() - started, 2)}
        write_manifest(tmp, "prepare", p, inputs, extra={"rows": rows, "dropped": stats["dropped"], "seconds": seconds})
    stats_path = Path(paths.prepare_reports_dir) / "stats.json"
    atomic_write_json(stats_path, stats)
    logger.info(
        "prepare: %d docs in, %d out (%s); dropped %s; %.1f s",
        stats["docs"]["in"],
        stats["docs"]["out"],
        rows,
        {k: v for k, v in stats["dropped"].items() if v},
        seconds["total"],
    )
    return {
        "docs_in": stats["docs"]["in"],
        "docs_out": stats["docs"]["out"],
        "splits": rows,
        "dropped": stats["docs"]["dropped"],
        "prepared_dir": str(paths.prepared_dir),
        "stats": str(stats_path),
        "seconds": seconds,
    }
