"""Reading the raw tables for ``prepare`` (both engines): files, columns, the prepared schema, split
values; and what both engines write (drop reasons, row groups, the dropped table, length quantiles).

Apart from :mod:`pipeline_tasks.dataset.prepare` so that the out-of-core engine shares it without an
import cycle.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline_tasks.dataset.prepared import COLUMNS, REQUIRED_COLUMNS, prepared_schema
from pipeline_tasks.errors import DataError

logger = logging.getLogger(__name__)

SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "dev": "val", "test": "test"}
# rows per row group of the output files: both engines write the same bytes, and readers can stream them
OUTPUT_ROW_GROUP_ROWS = 4096
DROP_REASONS = (
    "missing_id",
    "empty_text",
    "duplicate_id",
    "too_short",
    "too_long",
    "nonletter",
    "exact_duplicate",
    "near_duplicate",
)


def raw_files(dirs: list[Path]) -> list[Path]:
    """Every ``*.parquet`` of ``dirs`` in reading order (folder, then name): the order ties fall back to."""
    files = []
    for directory in dirs:
        if not directory.is_dir():
            raise DataError(
                f"{directory}: raw data folder not found; run the ingest stages first "
                "(python -m pipeline_tasks ingest_wiki / ingest_news)"
            )
        found = sorted(directory.glob("*.parquet"))
        if not found:
            logger.warning("%s: no *.parquet files", directory)
        files.extend(found)
    return files


def check_raw_columns(path: Path, names: list[str]) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; expected the ingest schema in docs/ARCHITECTURE.md")
    extra = sorted(set(names) - set(COLUMNS))
    if extra:
        logger.warning("%s: ignoring unknown column(s) %s", path, extra)


def reading_schema() -> pa.Schema:
    return pa.schema([f.with_nullable(True) for f in prepared_schema()])  # nulls are checked later


def cast_raw(path: Path, table) -> pa.Table:
    """A raw table (or record batch) of ``path`` as :func:`reading_schema`: absent optional columns null."""
    columns = []
    for field in prepared_schema():
        if field.name not in table.column_names:
            columns.append(pa.nulls(table.num_rows, field.type))
            continue
        column = table.column(field.name)
        if field.name == "date" and pa.types.is_timestamp(column.type) and column.type.tz is None:
            column = column.cast(pa.timestamp(column.type.unit, tz="UTC"))  # naive = UTC
        try:
            # safe=False: Parquet stores second timestamps as ms; truncation is intended
            columns.append(column.cast(field.type, safe=False))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise DataError(
                f"{path}: column {field.name!r} of type {column.type} cannot be read as {field.type}: {exc}"
            ) from exc
    return pa.Table.from_arrays(columns, schema=reading_schema())


def fixed_splits(df):
    """Normalised fixed split per row (None where the source declares none); bad values fail."""
    raw = df["split"].where(df["split"].notna(), None)
    cleaned = raw.map(lambda v: None if v is None or not str(v).strip() else str(v).strip().lower())
    mapped = cleaned.map(lambda v: None if v is None else SPLIT_ALIASES.get(v, "?"))
    bad = mapped == "?"
    if bad.any():
        row = df.loc[bad].iloc[0]
        raise DataError(
            f"{row['_file']}: record {row['id']!r}: split {row['split']!r} is not one of "
            f"{sorted(SPLIT_ALIASES)} ({int(bad.sum())} such rows); fix the source's `split`"
        )
    return mapped


def length_quantiles(values) -> dict[str, float]:
    if len(values) == 0:
        return {"p5": 0.0, "p50": 0.0, "p95": 0.0, "mean": 0.0, "max": 0.0}
    p5, p50, p95 = np.percentile(values, [5, 50, 95])
    return {
        "p5": round(float(p5), 1),
        "p50": round(float(p50), 1),
        "p95": round(float(p95), 1),
        "mean": round(float(np.mean(values)), 1),
        "max": float(np.max(values)),
    }


def dropped_schema():
    return pa.schema(
        [
            ("id", pa.string()),
            ("source", pa.string()),
            ("split", pa.string()),
            ("reason", pa.string()),
            ("duplicate_of", pa.string()),
            ("similarity", pa.float64()),
        ]
    )
