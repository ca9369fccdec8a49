"""Prepared splits on disk: the contract between ``prepare`` and everything that reads its output.

Layout (``paths.prepared_dir``): ``{train,val,test}.parquet`` with the columns :data:`COLUMNS`
in that order and the explicit Arrow schema :func:`prepared_schema` (``id``, ``kind``,
``source``, ``lang``, ``text`` and ``split`` never null; ``label`` null for unlabelled rows),
sorted by id. A document's split is fixed at ingest (AG News test -> ``test``) or else
:func:`hash_split` of its id, so it never moves when new data arrives; ``validate`` re-checks
both rules.

Readers: ``validate`` and ``tokenize`` read whole splits; the classifier stages read labelled
rows with :func:`read_labelled_split` only, so that finetune, export, evaluate and the benches
agree on what a labelled row is.

Only pyarrow and numpy are needed (no pandas, no torch).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline_tasks.errors import DataError

SPLITS = ("train", "val", "test")
COLUMNS = ("id", "kind", "source", "lang", "title", "text", "label", "raw_label", "date", "url", "split")
REQUIRED_COLUMNS = ("id", "kind", "source", "lang", "text")
LABELLED_COLUMNS = ("id", "source", "text", "label")  # what every reader of labelled rows needs


def prepared_schema() -> pa.Schema:
    """Explicit Arrow schema of ``{train,val,test}.parquet`` (the union of the ingest schemas)."""
    string_fields = [
        pa.field(name, pa.string(), nullable=name not in REQUIRED_COLUMNS + ("split",)) for name in COLUMNS
    ]
    fields = [f if f.name != "date" else pa.field("date", pa.timestamp("s", tz="UTC")) for f in string_fields]
    return pa.schema(fields)


def hash_unit(doc_id: str, salt: str) -> float:
    """Stable uniform number in [0, 1) for a document id (first 64 bits of sha1)."""
    digest = hashlib.sha1(f"{salt}:{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def hash_split(doc_id: str, salt: str, val_fraction: float, test_fraction: float) -> str:
    """Split of a document without a fixed split: depends on its id and the salt only."""
    u = hash_unit(doc_id, salt)
    return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"


def read_labelled_split(
    prepared_dir: str | os.PathLike,
    split: str,
    *,
    labels: Sequence[str] | None = None,
    sources: Sequence[str] | None = None,
    kinds: Sequence[str] | None = None,
    max_rows: int = 0,
    seed: int = 0,
) -> pa.Table:
    """Rows of ``prepared_dir/<split>.parquet`` with a non-null ``label``, in file order.

    Each filter that is given (``None`` or empty: all) keeps the rows whose ``label`` is one of
    ``labels``, whose ``source`` is one of ``sources``, whose ``kind`` is one of ``kinds``. Every
    column of the file is returned, plus ``label_idx`` (int64 position of the label in
    ``labels``) when ``labels`` is given. ``max_rows > 0`` keeps a seeded random sample of that
    many rows, in sampled order, so that export's parity and calibration rows cover every source
    and class rather than the head of the file. Callers take ``.to_pydict()`` or ``.to_pandas()``.

    The pipeline scores its classifier on two different test sets, on purpose:

    * finetune's **"AG News test"**: ``sources=finetune.dataset.test_sources`` (``ag_news_test``,
      the official AG News test set; 7,597 rows after prepare's dedup), so that finetune's
      score compares with published AG News results;
    * evaluate's **"all labelled test rows"**: ``labels=<the bundle's labels>, kinds=("news",)``,
      every labelled news row of every source (8,715 rows: AG News test plus the hash-split
      test share of the other news sources); the quality gates and the model card use these.

    Raises :class:`DataError` naming the file when it or a column is missing, when a selected row
    has blank text (prepare drops those and validate rejects them), or when no row is selected.
    """
    path = Path(prepared_dir) / f"{split}.parquet"
    if not path.is_file():
        raise DataError(f"{path}: prepared split not found; run `python -m pipeline_tasks prepare` first")
    schema_names = pq.read_schema(path).names
    missing = [c for c in (*LABELLED_COLUMNS, *(("kind",) if kinds else ())) if c not in schema_names]
    if missing:
        raise DataError(
            f"{path}: columns {missing} missing (have {schema_names}); "
            "was it written by an older prepare? re-run prepare"
        )
    table = pq.read_table(path)
    keep = pc.is_valid(table["label"])
    for column, allowed in (("label", labels), ("source", sources), ("kind", kinds)):
        if allowed:
            keep = pc.and_(keep, pc.is_in(table[column], value_set=pa.array(list(allowed), type=pa.string())))
    table = table.filter(keep)
    blank = [i for i, text in enumerate(table["text"].to_pylist()) if not text or not text.strip()]
    if blank:
        first = table["id"][blank[0]].as_py()
        raise DataError(
            f"{path}: {len(blank)} labelled rows have empty text (first id {first!r}); prepare should have dropped them"
        )
    if not table.num_rows:
        kind = f" {'/'.join(kinds)}" if kinds else ""
        where = (f" from sources {list(sources)}" if sources else "") + (
            f" with a label in {list(labels)}" if labels else ""
        )
        raise DataError(
            f"{path}: no labelled{kind} rows{where}; check the sources (finetune.dataset) and labels "
            "against ingest_news.sources (names and label maps)"
        )
    if 0 < max_rows < table.num_rows:
        # RandomState, not default_rng: the draw of pandas' DataFrame.sample(random_state=seed), so
        # export and evaluate kept their sampled rows when this reader replaced the pandas one
        table = table.take(np.random.RandomState(seed).choice(table.num_rows, size=max_rows, replace=False))
    if labels:
        label_idx = pc.index_in(table["label"], value_set=pa.array(list(labels), type=pa.string()))
        table = table.append_column("label_idx", label_idx.cast(pa.int64()))
    return table


def finetune_rows(prepared: str | os.PathLike, cfg: Any, seed: int) -> dict[str, dict[str, list]]:
    """Labelled rows per split of the classifier: the sources ``cfg.dataset`` (params ``finetune``) selects.

    Train is capped at ``max_train_rows`` by a seeded sample. finetune trains on these rows and
    evaluate's n-gram baseline on the very same ones.
    """
    rows = {
        "train": read_labelled_split(prepared, "train", sources=cfg.dataset.train_sources).to_pydict(),
        "val": read_labelled_split(prepared, "val", sources=cfg.dataset.train_sources).to_pydict(),
        "test": read_labelled_split(prepared, "test", sources=cfg.dataset.test_sources).to_pydict(),
    }
    if cfg.max_train_rows and len(rows["train"]["id"]) > cfg.max_train_rows:
        picked = np.random.default_rng(seed).choice(len(rows["train"]["id"]), cfg.max_train_rows, replace=False)
        keep = sorted(picked.tolist())
        rows["train"] = {k: [v[i] for i in keep] for k, v in rows["train"].items()}
    return rows


def unlabelled_news_rows(
    prepared: str | os.PathLike, exclude_sources: Sequence[str], max_rows: int, seed: int
) -> dict[str, list]:
    """News rows of ``train.parquet`` outside ``exclude_sources``, labels ignored (``compress`` lets the teacher label them).

    A seeded sample of ``max_rows`` (0: none), in file order. Only the train split: val and test
    rows must stay unseen by every model that is scored on them.
    """
    if max_rows <= 0:
        return {"id": [], "text": [], "source": []}
    path = Path(prepared) / "train.parquet"
    if not path.is_file():
        raise DataError(f"{path}: prepared split not found; run `python -m pipeline_tasks prepare` first")
    table = pq.read_table(path, columns=["id", "text", "source", "kind"])
    keep = pc.equal(table["kind"], "news")
    if exclude_sources:
        excluded = pa.array(list(exclude_sources), type=pa.string())
        keep = pc.and_(keep, pc.invert(pc.is_in(table["source"], value_set=excluded)))
    table = table.filter(keep)
    if table.num_rows > max_rows:
        picked = np.sort(np.random.default_rng(seed).choice(table.num_rows, size=max_rows, replace=False))
        table = table.take(picked)
    return table.select(["id", "text", "source"]).to_pydict()
