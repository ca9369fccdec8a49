"""Stage ``validate``: great-expectations (1.x) suites on every prepared split; a failure stops the DAG.

Inputs: ``paths.prepared_dir/{train,val,test}.parquet`` (the ``prepare`` contract) and the
``prepare`` params that define the split (``salt``, ``val_fraction``, ``test_fraction``).

Suites, defined as code below (thresholds from the ``validate`` params section):

* ``train`` / ``val`` / ``test`` — columns and order, value types, non-null ``id``, ``text``,
  ``kind``, ``source``, ``lang``, ``split``; unique ids; text length bounds and no blank text; the
  ``split`` column equals the file; ``kind`` and ``label`` in their sets (label may be null); ids
  prefixed by their source; news dates within bounds; duplicate rate of the normalised text
  (:func:`pipeline_tasks.dataset.textstats.normalize_key`); mean and max non-letter share; row count.
* ``cross_split`` — all splits together: an id in one split only, no normalised text in two
  splits, every source split either by the id hash (each row in the split its id hashes to with
  the ``prepare`` salt and fractions) or by one fixed split (AG News test), and each split's share
  of the hash-split documents within ``max(split_share_tolerance, split_share_z * binomial sd)``
  of the ``prepare`` fractions.
* ``schema`` — the Arrow type of every column of every file (a small computed table) against
  :func:`pipeline_tasks.dataset.prepared.prepared_schema`.

Outputs (the whole ``paths.validate_dir`` is swapped in atomically): ``data_docs/index.html``
(GX Data Docs built from an ephemeral context with a filesystem site; the scripts, styles and
fonts GX links on CDNs are replaced by the copies in ``datadocs_assets/``, so the report renders
offline), ``summary.json`` (per suite: success, evaluated / successful / failed counts, each
failed expectation with its column and observed value), ``manifest.json``. The report is written even when a suite fails; then the
stage raises :class:`~pipeline_tasks.errors.ValidationFailedError` (exit code 3) so that DVC and
Airflow do not run anything downstream. A stale ``summary.json`` is deleted first, so a crash can
never leave an old "success" behind.

Memory: a split whose pandas frame would exceed ``validate.memory_budget_mb`` (estimated from the
Parquet metadata) is validated chunk by chunk, with the same suites. Column-map expectations add up
their counts and apply ``mostly`` to the totals, row count / max / mean combine exactly (the mean
weighted by rows), and what no chunk can decide alone is decided over the whole data by DuckDB
(memory limited, spilling to a scratch folder): the uniqueness of ids and normalised texts (kept as
128-bit hashes), and the cross-split rows (split mode per source, shares), which then go through
great-expectations in chunks as well. One merged result per suite reaches ``summary.json`` and the
Data Docs. When every split fits, the splits are validated whole, as great-expectations reports them.
tests/stages/test_validate.py runs every failure case both ways.

Params: section ``validate`` (:class:`~pipeline_tasks.dataset.params.ValidateParams`).
Command: ``python -m pipeline_tasks validate``.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import great_expectations as gx
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from great_expectations.core.run_identifier import RunIdentifier
from great_expectations.data_context.types.base import ProgressBarsConfig

from pipeline_tasks.artifacts import atomic_dir, atomic_write_json, sha256_file, write_manifest
from pipeline_tasks.dataset.params import ValidateParams
from pipeline_tasks.dataset.prepared import COLUMNS, SPLITS, hash_split, prepared_schema
from pipeline_tasks.dataset.textstats import char_profile, normalize_key
from pipeline_tasks.errors import DataError, ValidationFailedError

logger = logging.getLogger(__name__)

SUMMARY_NAME = "summary.json"
DOCS_DIR = "data_docs"
# derived columns added to every split frame (prefixed "_" so they never clash with data columns)
COMPUTED = ("_text_key", "_nonletter", "_id_source", "_hash_split")
STRING_COLUMNS = tuple(c for c in COLUMNS if c != "date")

# Data Docs load their scripts, stylesheets and fonts from public CDNs; offline the index's
# validation table (filled in by bootstrap-table's JavaScript) stays empty. The same files, from
# the npm packages of the versions great-expectations links, ship in ASSETS_DIR (sources and
# licences in its README.md) and are copied into every site at VENDOR_DIR.
ASSETS_DIR = Path(__file__).with_name("datadocs_assets")
VENDOR_DIR = "static/vendor"
CDN_ASSETS = {
    "https://code.jquery.com/jquery-3.7.1.min.js": "jquery-3.7.1/dist/jquery.min.js",
    "https://cdnjs.cloudflare.com/ajax/libs/popper.js/1.12.9/umd/popper.min.js": (
        "popper.js-1.12.9/dist/umd/popper.min.js"
    ),
    "https://maxcdn.bootstrapcdn.com/bootstrap/4.3.1/css/bootstrap.min.css": "bootstrap-4.3.1/dist/css/bootstrap.min.css",
    "https://stackpath.bootstrapcdn.com/bootstrap/4.3.1/js/bootstrap.min.js": "bootstrap-4.3.1/dist/js/bootstrap.min.js",
    "https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.css": (
        "bootstrap-table-1.19.1/dist/bootstrap-table.min.css"
    ),
    "https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.js": (
        "bootstrap-table-1.19.1/dist/bootstrap-table.min.js"
    ),
    "https://unpkg.com/bootstrap-table@1.19.1/dist/extensions/filter-control/bootstrap-table-filter-control.min.js": (
        "bootstrap-table-1.19.1/dist/extensions/filter-control/bootstrap-table-filter-control.min.js"
    ),
    # GX links the filter-control stylesheet of 1.19.0 (plain and minified): the 1.19.1 copy serves both
    "https://unpkg.com/bootstrap-table@1.19.0/dist/extensions/filter-control/bootstrap-table-filter-control.css": (
        "bootstrap-table-1.19.1/dist/extensions/filter-control/bootstrap-table-filter-control.min.css"
    ),
    "https://unpkg.com/bootstrap-table@1.19.0/dist/extensions/filter-control/bootstrap-table-filter-control.min.css": (
        "bootstrap-table-1.19.1/dist/extensions/filter-control/bootstrap-table-filter-control.min.css"
    ),
    "https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/css/bootstrap-datepicker.min.css": (
        "bootstrap-datepicker-1.9.0/dist/css/bootstrap-datepicker.min.css"
    ),
    "https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/js/bootstrap-datepicker.min.js": (
        "bootstrap-datepicker-1.9.0/dist/js/bootstrap-datepicker.min.js"
    ),
    "https://cdnjs.cloudflare.com/ajax/libs/font-awesome/6.6.0/css/all.min.css": "fontawesome-free-6.6.0/css/all.min.css",
    "https://cdn.jsdelivr.net/npm/@forevolve/bootstrap-dark@1.1.0/dist/css/bootstrap-prefers-dark.css": (
        "bootstrap-dark-1.1.0/dist/css/bootstrap-prefers-dark.min.css"
    ),
}
_ASSET_TAG = re.compile(r"<(?:script|link)\b[^>]*>", re.IGNORECASE)
# subresource integrity makes the browser fetch in CORS mode, which it refuses for file:// pages;
# the vendored popper and bootstrap files are the very files those hashes name
_SRI_ATTRS = re.compile(r'\s+(?:integrity|crossorigin)="[^"]*"')
# GX's logo from its S3 bucket; every site has the same image in static/images
_GX_LOGO = re.compile(
    r"https://great-expectations-web-assets\.s3\.us-east-2\.amazonaws\.com/(?:logo-long|full_logo_dark)\.png"
    r"(?:\?[^\"')\s]*)?"
)
# vega draws the charts of distribution expectations, which no suite here has: dropped from pages
# that never call it instead of shipping 0.8 MB of JavaScript
_VEGA_SCRIPT = re.compile(r'<script src="https://cdn\.jsdelivr\.net/npm/vega(?:-lite|-embed)?@\d+"></script>\n?')
# GX links the site's own static/ folder one level too shallow from validation pages (the run name
# is a folder of its own): every such link is made relative to the page's real depth
_SITE_STATIC = re.compile(r"""(\b(?:href|src)=["'])(?:\.{1,2}/)*static/""", re.IGNORECASE)
_REMOTE_ASSET = re.compile(r'<(?:script|link|img)\b[^>]*?\b(?:src|href)="((?:https?:)?//[^"]+)"', re.IGNORECASE)


# --------------------------------------------------------------------------------------------
# Data: read the splits and derive the columns the suites check


def read_split(path: Path):
    """``(frame, arrow_schema)`` of one prepared split."""
    if not path.is_file():
        raise DataError(f"{path}: prepared split not found; run `python -m pipeline_tasks prepare` first")
    table = pq.read_table(path)
    return table.to_pandas(), table.schema


def add_computed_columns(frame, prepare_params):
    """Append :data:`COMPUTED` columns (normalised key, non-letter share, id prefix, hashed split)."""
    frame = frame.copy()
    text = frame["text"] if "text" in frame else [None] * len(frame)
    ids = frame["id"] if "id" in frame else [None] * len(frame)
    frame["_text_key"] = [normalize_key(t) if isinstance(t, str) else None for t in text]
    frame["_nonletter"] = [char_profile(t).nonletter_share if isinstance(t, str) else None for t in text]
    frame["_id_source"] = [i.split(":", 1)[0] if isinstance(i, str) else None for i in ids]
    frame["_hash_split"] = [
        hash_split(i, prepare_params.salt, prepare_params.val_fraction, prepare_params.test_fraction)
        if isinstance(i, str)
        else None
        for i in ids
    ]
    return frame


def cross_split_frame(frames: dict[str, Any]):
    """All splits in one frame with ``_hashed_source`` and ``_is_<split>`` indicator columns."""
    cols = ["id", "source", "split", "_text_key", "_hash_split"]
    parts = [f.reindex(columns=cols).assign(_file_split=name) for name, f in frames.items()]
    frame = pd.concat(parts, ignore_index=True)
    source = frame["source"].fillna("<none>")
    matches = (frame["split"] == frame["_hash_split"]) & frame["split"].notna()
    frame["_hashed_source"] = matches.groupby(source).transform("all")
    # a source is split either by the id hash (every row where its id hashes to) or by one fixed
    # split declared at ingest (AG News test); anything else means rows moved between splits
    single = frame.groupby(source)["split"].transform("nunique") == 1
    frame["_split_mode"] = "inconsistent:" + source
    frame.loc[single, "_split_mode"] = "fixed"
    frame.loc[frame["_hashed_source"], "_split_mode"] = "hash"
    for split in SPLITS:
        frame[f"_is_{split}"] = (frame["split"] == split).astype(float)
    return frame


def schema_frame(schemas: dict[str, Any]):
    """One row per (file, expected column): observed vs expected Arrow type."""
    rows = []
    for split, schema in schemas.items():
        for field in prepared_schema():
            observed = "<missing>"
            if field.name in schema.names:
                kind = schema.field(field.name).type
                # Parquet has no second-resolution timestamp: timestamp[s] is stored and read as ms
                if pa.types.is_timestamp(kind) and kind.unit in ("s", "ms") and kind.tz == "UTC":
                    kind = pa.timestamp("s", tz="UTC")
                observed = str(kind)
            # the column name is part of both values so that a failure's observed values name it
            rows.append(
                {
                    "file": f"{split}.parquet",
                    "column": field.name,
                    "arrow_type": f"{split}.{field.name}: {observed}",
                    "expected_type": f"{split}.{field.name}: {field.type}",
                }
            )
    return pd.DataFrame(rows)


def split_share_bounds(expected: float, n: int, tolerance: float, z: float) -> tuple[float, float]:
    """``expected ± max(tolerance, z * sqrt(p (1 - p) / n))`` clipped to [0, 1]."""
    half = max(tolerance, z * math.sqrt(expected * (1 - expected) / max(n, 1)))
    return max(0.0, expected - half), min(1.0, expected + half)


# --------------------------------------------------------------------------------------------
# Suites as code


def split_suite(split: str, params: ValidateParams) -> list:
    """Expectations for one prepared split."""
    E = gx.expectations
    exps = [
        E.ExpectTableColumnsToMatchOrderedList(column_list=[*COLUMNS, *COMPUTED]),
        E.ExpectTableRowCountToBeBetween(min_value=params.min_rows),
        *[E.ExpectColumnValuesToBeOfType(column=c, type_="str") for c in STRING_COLUMNS],
        E.ExpectColumnValuesToBeOfType(column="date", type_="Timestamp"),
        *[E.ExpectColumnValuesToNotBeNull(column=c) for c in ("id", "text", "kind", "source", "lang", "split")],
        E.ExpectColumnValuesToBeUnique(column="id"),
        E.ExpectColumnValueLengthsToBeBetween(
            column="text", min_value=params.text_min_chars, max_value=params.text_max_chars
        ),
        E.ExpectColumnValuesToNotMatchRegex(column="text", regex=r"^\s*$"),
        E.ExpectColumnValuesToBeInSet(column="split", value_set=[split]),
        E.ExpectColumnValuesToBeInSet(column="kind", value_set=list(params.kinds)),
        E.ExpectColumnValuesToBeInSet(column="label", value_set=list(params.labels)),  # nulls are allowed
        E.ExpectColumnPairValuesToBeEqual(column_A="_id_source", column_B="source"),
        E.ExpectColumnValuesToBeBetween(
            column="date",
            min_value=params.date_bound("news_date_min"),
            max_value=params.date_bound("news_date_max"),
            row_condition='kind=="news"',
            condition_parser="pandas",
        ),
        E.ExpectColumnValuesToBeUnique(column="_text_key", mostly=1.0 - params.max_duplicate_rate),
        E.ExpectColumnMeanToBeBetween(column="_nonletter", min_value=0.0, max_value=params.nonletter_share_mean_max),
        E.ExpectColumnMaxToBeBetween(column="_nonletter", min_value=0.0, max_value=params.nonletter_share_max),
    ]
    return exps


def hashed_shares(frame) -> tuple[int, dict[str, float]]:
    """Rows of hash-split sources, and each split's share of them."""
    hashed = frame["_hashed_source"]
    observed = {split: float(frame.loc[hashed, f"_is_{split}"].mean()) for split in SPLITS} if hashed.any() else {}
    return int(hashed.sum()), observed


def cross_split_suite(
    hashed: int, observed: dict[str, float], params: ValidateParams, prepare_params
) -> tuple[list, dict[str, Any]]:
    """Expectations over all splits, and a description of the split-share check (``hashed`` rows of
    hash-split sources, ``observed`` share of each split among them)."""
    E = gx.expectations
    exps = [
        E.ExpectColumnValuesToBeUnique(column="id"),
        E.ExpectColumnValuesToBeUnique(column="_text_key", mostly=1.0 - params.max_duplicate_rate),
        E.ExpectColumnPairValuesToBeEqual(column_A="split", column_B="_file_split"),
        E.ExpectColumnValuesToBeInSet(column="_split_mode", value_set=["hash", "fixed"]),
    ]
    expected = {
        "train": 1.0 - prepare_params.val_fraction - prepare_params.test_fraction,
        "val": prepare_params.val_fraction,
        "test": prepare_params.test_fraction,
    }
    shares: dict[str, Any] = {"checked": hashed > 0, "hashed_rows": hashed}
    if hashed == 0:
        logger.warning("validate: no hash-split source (every source has fixed splits); split shares not checked")
        return exps, shares
    for split in SPLITS:
        low, high = split_share_bounds(expected[split], hashed, params.split_share_tolerance, params.split_share_z)
        shares[split] = {
            "expected": round(expected[split], 6),
            "min": round(low, 6),
            "max": round(high, 6),
            "observed": round(observed[split], 6),
        }
        exps.append(
            E.ExpectColumnMeanToBeBetween(
                column=f"_is_{split}",
                min_value=low,
                max_value=high,
                row_condition="_hashed_source==True",
                condition_parser="pandas",
            )
        )
    return exps, shares


def schema_suite() -> list:
    return [gx.expectations.ExpectColumnPairValuesToBeEqual(column_A="arrow_type", column_B="expected_type")]


# --------------------------------------------------------------------------------------------
# Running the suites with great-expectations and reporting


class Suites:
    """An ephemeral great-expectations context (nothing persisted but the Data Docs site, no progress
    bars, no analytics) that validates named datasets, whole or chunk by chunk, into ``docs_dir``."""

    def __init__(self, docs_dir: Path):
        os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
        self.docs_dir = Path(docs_dir)
        self.context = gx.get_context(mode="ephemeral")
        self.context.variables.progress_bars = ProgressBarsConfig(globally=False)
        site = {
            "class_name": "SiteBuilder",
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            # GX requires an absolute base_directory without a project root
            "store_backend": {
                "class_name": "TupleFilesystemStoreBackend",
                "base_directory": str(self.docs_dir.resolve()),
            },
        }
        self.context.add_data_docs_site(site_name="lmpipe", site_config=site)
        self.source = self.context.data_sources.add_pandas(name="prepared")
        # every chunk of a dataset is stored under the same key; the merged result replaces the last
        self.run_id = RunIdentifier(run_name="validate", run_time=dt.datetime.now(dt.UTC))

    def _checkpoint(self, name: str, expectations: list):
        batch = self.source.add_dataframe_asset(name=name).add_batch_definition_whole_dataframe(name=f"{name}_all")
        suite = self.context.suites.add(gx.ExpectationSuite(name=name))
        for expectation in expectations:
            suite.add_expectation(expectation)
        definition = self.context.validation_definitions.add(
            gx.ValidationDefinition(name=name, data=batch, suite=suite)
        )
        return self.context.checkpoints.add(
            gx.Checkpoint(
                name=f"validate_{name}",
                validation_definitions=[definition],
                actions=[],
                result_format={"result_format": "SUMMARY", "partial_unexpected_count": PARTIAL_UNEXPECTED},
            )
        )

    def validate(self, name: str, frame, expectations: list):
        """One dataset in one frame: great-expectations' result as it is."""
        started = time.perf_counter()
        outcome = self._checkpoint(name, expectations).run(batch_parameters={"dataframe": frame}, run_id=self.run_id)
        result = next(iter(outcome.run_results.values()))
        logger.info(
            "suite %s: %s (%d rows, %.1f s)",
            name,
            "passed" if result.success else "FAILED",
            len(frame),
            time.perf_counter() - started,
        )
        return result

    def validate_chunks(self, name: str, chunks, expectations: list, exact):
        """One dataset chunk by chunk, merged into one result (:func:`merge_chunk_results`).

        ``chunks`` yields ``(frame, weights)``: ``weights`` maps the index of a mean expectation to the
        number of rows its mean is over in that frame. ``exact()``, called once the chunks are read,
        gives the dataset-wide results of the uniqueness expectations (:func:`exact_uniques`), which
        no chunk can decide alone."""
        started = time.perf_counter()
        checkpoint = self._checkpoint(name, expectations)
        parts, weights, rows = [], [], 0
        for frame, frame_weights in chunks:
            outcome = checkpoint.run(batch_parameters={"dataframe": frame}, run_id=self.run_id)
            key, result = next(iter(outcome.run_results.items()))
            parts.append(result)
            weights.append(frame_weights)
            rows += len(frame)
        merged = merge_chunk_results(parts, weights, exact())
        self.context.validation_results_store.set(key, merged)
        logger.info(
            "suite %s: %s (%d rows in %d chunks, %.1f s)",
            name,
            "passed" if merged.success else "FAILED",
            rows,
            len(parts),
            time.perf_counter() - started,
        )
        return merged

    def build_docs(self) -> None:
        started = time.perf_counter()
        self.context.build_data_docs(site_names=["lmpipe"])
        localize_data_docs(self.docs_dir)
        logger.info("data docs built in %.1f s", time.perf_counter() - started)


def run_suites(datasets: dict[str, tuple[Any, list]], docs_dir: Path) -> dict[str, Any]:
    """Validate each ``name -> (frame, expectations)`` and build Data Docs into ``docs_dir``.

    Returns ``name -> ExpectationSuiteValidationResult``."""
    suites = Suites(docs_dir)
    results = {name: suites.validate(name, frame, expectations) for name, (frame, expectations) in datasets.items()}
    suites.build_docs()
    return results


# --------------------------------------------------------------------------------------------
# Splits larger than validate.memory_budget_mb: chunks, merged results, DuckDB for what spans chunks

PARTIAL_UNEXPECTED = 10
# peak memory of a chunk's validation per byte of its Arrow data (measured: pandas object strings,
# the computed columns, GX's metrics over the text, allocator slack)
CHUNK_COST = 32
MIN_CHUNK_ROWS = 1000
_UNIQUE = "expect_column_values_to_be_unique"
_MEAN = "expect_column_mean_to_be_between"
_MAX = "expect_column_max_to_be_between"
_ROW_COUNT = "expect_table_row_count_to_be_between"
_COLUMNS = "expect_table_columns_to_match_ordered_list"


def chunk_rows(path: Path, budget_mb: int) -> tuple[int, int]:
    """``(rows in the split, rows per chunk)`` for ``validate.memory_budget_mb``."""
    if not path.is_file():
        raise DataError(f"{path}: prepared split not found; run `python -m pipeline_tasks prepare` first")
    meta = pq.ParquetFile(path).metadata
    data_bytes = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    per_row = max(data_bytes / max(meta.num_rows, 1), 1.0)
    return meta.num_rows, max(int(budget_mb * 2**20 / CHUNK_COST / per_row), MIN_CHUNK_ROWS)


def iter_split(path: Path, rows: int, max_bytes: int):
    """The split as pandas frames of at most ``rows`` rows and (unless one row is larger)
    ``max_bytes`` of Arrow data, read without pre-buffering. The byte limit matters: a sorted split
    puts a wiki source's long pages together, 15 times the average row."""
    parquet = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)
    pending, size, count = [], 0, 0
    for batch in parquet.iter_batches(batch_size=min(rows, 1024), use_threads=False):
        if pending and (size + batch.nbytes > max_bytes or count + batch.num_rows > rows):
            yield pa.Table.from_batches(pending, schema=parquet.schema_arrow).to_pandas()
            pending, size, count = [], 0, 0
        pending.append(batch)
        size, count = size + batch.nbytes, count + batch.num_rows
    if pending:
        yield pa.Table.from_batches(pending, schema=parquet.schema_arrow).to_pandas()


def _within(value, kwargs: dict[str, Any]) -> bool:
    low, high = kwargs.get("min_value"), kwargs.get("max_value")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    return bool((low is None or value >= low) and (high is None or value <= high))


def _map_result(parts: list[dict], mostly: float | None) -> tuple[bool, dict[str, Any]]:
    """A column-map expectation over all chunks: counts summed, examples from the first chunks."""
    element = int(sum(p.get("element_count", 0) for p in parts))
    missing = int(sum(p.get("missing_count", 0) for p in parts))
    unexpected = int(sum(p.get("unexpected_count", 0) for p in parts))
    examples = [v for p in parts for v in p.get("partial_unexpected_list", [])][:PARTIAL_UNEXPECTED]
    return _map_success(element - missing, unexpected, mostly), _map_counts(element, missing, unexpected, examples)


def _map_success(nonmissing: int, unexpected: int, mostly: float | None) -> bool:
    if mostly is None:
        return unexpected == 0
    return bool(nonmissing == 0 or 1 - unexpected / nonmissing >= mostly)


def _map_counts(element: int, missing: int, unexpected: int, examples: list) -> dict[str, Any]:
    nonmissing = element - missing
    return {
        "element_count": element,
        "unexpected_count": unexpected,
        "unexpected_percent": 100 * unexpected / nonmissing if nonmissing else None,
        "partial_unexpected_list": examples,
        "missing_count": missing,
        "missing_percent": 100 * missing / element if element else None,
        "unexpected_percent_total": 100 * unexpected / element if element else None,
        "unexpected_percent_nonmissing": 100 * unexpected / nonmissing if nonmissing else None,
    }


def duplicate_result(element: int, missing: int, unexpected: int, examples: list, mostly: float | None) -> dict:
    """The result of a uniqueness expectation computed over the whole dataset (see
    :func:`duplicate_counts`): ``unexpected`` rows are those whose value occurs more than once."""
    return {
        "success": _map_success(element - missing, unexpected, mostly),
        "result": _map_counts(element, missing, unexpected, examples),
    }


def expectation_key(config) -> str:
    """An expectation's identity across chunk results: its type and arguments."""
    kwargs = {k: v for k, v in config.kwargs.items() if k != "batch_id"}
    return f"{config.type}:{json.dumps(kwargs, sort_keys=True, default=str)}"


def merge_chunk_results(parts: list, weights: list[dict[str, int]], exact: dict[str, dict]):
    """One suite result from the results of its chunks.

    Column-map expectations (values in a set, of a type, between bounds, not null, ...) sum their
    counts and apply ``mostly`` to the totals; the row count is the sum, the max the max, the mean the
    mean weighted by the rows each chunk's mean is over; column lists must match in every chunk.
    Uniqueness is not decided per chunk: ``exact[key]`` is its result over the whole dataset.
    Expectations are matched by :func:`expectation_key` (GX does not keep the suite's order)."""
    merged = copy.deepcopy(parts[0])
    by_key = [{expectation_key(r.expectation_config): r for r in p.results} for p in parts]
    for i, first in enumerate(merged.results):
        kind, kwargs = first.expectation_config.type, first.expectation_config.kwargs
        key = expectation_key(first.expectation_config)
        results = [results_of_part[key] for results_of_part in by_key]
        raised = next((r for r in results if (r.exception_info or {}).get("raised_exception")), None)
        if raised is not None:
            merged.results[i] = copy.deepcopy(raised)
            continue
        if kind == _UNIQUE:
            first.success, first.result = exact[key]["success"], exact[key]["result"]
        elif kind == _COLUMNS:
            first.success = all(r.success for r in results)
        elif kind in (_ROW_COUNT, _MAX, _MEAN):
            values = [r.result.get("observed_value") for r in results]
            if kind == _ROW_COUNT:
                observed = sum(values)
            elif kind == _MAX:
                observed = max((v for v in values if v is not None), default=None)
            else:
                pairs = [(v, w.get(key, 0)) for v, w in zip(values, weights) if w.get(key, 0)]
                total = sum(w for _, w in pairs)
                observed = sum(v * w for v, w in pairs) / total if total else None
            first.result = {"observed_value": observed.item() if hasattr(observed, "item") else observed}
            first.success = _within(observed, kwargs)
        else:
            first.success, first.result = _map_result([r.result for r in results], kwargs.get("mostly"))
    evaluated = len(merged.results)
    successful = sum(bool(r.success) for r in merged.results)
    merged.success = successful == evaluated
    merged.statistics.update(
        evaluated_expectations=evaluated,
        successful_expectations=successful,
        unsuccessful_expectations=evaluated - successful,
        success_percent=100 * successful / evaluated if evaluated else None,
    )
    return merged


def localize_page(html: str, to_root: str) -> str:
    """One Data Docs page with its CDN assets pointed at the site's vendored copies.

    ``to_root`` is the relative path from the page's folder to the site root (``.``, ``../..``).
    """

    def local_tag(match: re.Match) -> str:
        tag = match.group(0)
        for url, local in CDN_ASSETS.items():
            if f'"{url}"' in tag:
                return _SRI_ATTRS.sub("", tag.replace(f'"{url}"', f'"{to_root}/{VENDOR_DIR}/{local}"'))
        return tag

    html = _SITE_STATIC.sub(lambda match: f"{match.group(1)}{to_root}/static/", html)
    html = _ASSET_TAG.sub(local_tag, html)
    html = _GX_LOGO.sub(f"{to_root}/static/images/logo-long.png", html)
    return html if "vegaEmbed" in html else _VEGA_SCRIPT.sub("", html)


def localize_data_docs(docs_dir: Path) -> None:
    """Copy the vendored web assets into a built Data Docs site and link every page to them."""
    shutil.copytree(ASSETS_DIR, docs_dir / VENDOR_DIR, dirs_exist_ok=True)
    remote: set[str] = set()
    for page in docs_dir.rglob("*.html"):
        to_root = Path(os.path.relpath(docs_dir, page.parent)).as_posix()
        html = localize_page(page.read_text(encoding="utf-8"), to_root)
        page.write_text(html, encoding="utf-8")
        remote.update(_REMOTE_ASSET.findall(html))
    for stylesheet in (docs_dir / "static" / "styles").glob("*.css"):  # GX's own: its dark-mode logo
        to_root = Path(os.path.relpath(docs_dir, stylesheet.parent)).as_posix()
        css = stylesheet.read_text(encoding="utf-8")
        stylesheet.write_text(_GX_LOGO.sub(f"{to_root}/static/images/logo-long.png", css), encoding="utf-8")
    if remote:
        logger.warning(
            "data docs: %d assets still load from the network (a great-expectations upgrade may link new "
            "ones: add them to CDN_ASSETS): %s",
            len(remote),
            ", ".join(sorted(remote)),
        )


def _plain(value: Any, max_chars: int = 200) -> Any:
    """numpy scalars -> Python, timestamps -> ISO strings, long texts cut (for JSON and messages)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v, max_chars) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v, max_chars) for k, v in value.items()}
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            value = value.item()  # numpy scalar
        except (ValueError, TypeError, AttributeError):
            pass
    if isinstance(value, (dt.datetime, dt.date)) or type(value).__name__ == "Timestamp":
        return value.isoformat()
    if isinstance(value, str) and len(value) > max_chars:
        return value[:max_chars] + "…"
    return value


def describe_failure(result) -> dict[str, Any]:
    """A failed expectation as plain JSON: type, column(s), bounds, observed value, examples."""
    config = result.expectation_config
    kwargs = {k: v for k, v in config.kwargs.items() if k not in ("batch_id",) and v is not None}
    details = result.result or {}
    failure: dict[str, Any] = {"expectation": config.type, "kwargs": kwargs}
    column = kwargs.get("column") or " / ".join(str(kwargs[k]) for k in ("column_A", "column_B") if k in kwargs)
    failure["column"] = column or None
    if "observed_value" in details:
        failure["observed_value"] = details["observed_value"]
    for key in ("element_count", "unexpected_count", "unexpected_percent", "partial_unexpected_list"):
        if key in details:
            failure[key] = details[key]
    info = result.exception_info or {}
    if info.get("raised_exception"):
        failure["exception"] = str(info.get("exception_message"))
    return _plain(failure)


def failure_line(suite: str, failure: dict[str, Any]) -> str:
    """One readable line per failed expectation for the error message and the log."""
    where = f"({failure['column']})" if failure.get("column") else ""
    if "exception" in failure:
        observed = f"error: {failure['exception']}"
    elif "unexpected_count" in failure:
        examples = failure.get("partial_unexpected_list") or []
        examples = [_plain(e, 60) for e in examples[:3]]
        observed = (
            f"{failure['unexpected_count']} unexpected of {failure.get('element_count')} "
            f"({failure.get('unexpected_percent') or 0:.2f}%), e.g. {examples!r}"
        )
    else:
        observed = f"observed {failure.get('observed_value')!r}"
    bounds = {
        k: failure["kwargs"][k]
        for k in ("min_value", "max_value", "value_set", "column_list", "mostly")
        if k in failure["kwargs"]
    }
    return (
        f"{suite}: {failure['expectation']}{where} {observed}; expected {bounds}"
        if bounds
        else f"{suite}: {failure['expectation']}{where} {observed}"
    )


def summarize(results: dict[str, Any], rows: dict[str, int], shares: dict[str, Any]) -> dict[str, Any]:
    """The JSON written to ``summary.json`` (counts first, failed expectations with observed values)."""
    suites, evaluated, successful = {}, 0, 0
    for name, result in results.items():
        stats = result.statistics
        failures = [describe_failure(r) for r in result.results if not r.success]
        suites[name] = {
            "success": bool(result.success),
            "rows": rows.get(name, 0),
            "evaluated": int(stats["evaluated_expectations"]),
            "successful": int(stats["successful_expectations"]),
            "failed": int(stats["unsuccessful_expectations"]),
            "failures": failures,
        }
        evaluated += suites[name]["evaluated"]
        successful += suites[name]["successful"]
    return {
        "success": all(s["success"] for s in suites.values()),
        "evaluated": evaluated,
        "successful": successful,
        "failed": evaluated - successful,
        "suites": suites,
        "split_shares": shares,
        "data_docs": f"{DOCS_DIR}/index.html",
    }


def validate_in_memory(suites: Suites, prepared: Path, vp: ValidateParams, pp):
    """Every split (and all of them together) as one frame: (results, rows, shares, schemas, inputs)."""
    frames, schemas, inputs = {}, {}, {}
    for split in SPLITS:
        path = prepared / f"{split}.parquet"
        frame, schemas[split] = read_split(path)
        frames[split] = add_computed_columns(frame, pp)
        inputs[str(path)] = sha256_file(path)
    rows = {split: len(frame) for split, frame in frames.items()}
    cross = cross_split_frame(frames)
    cross_expectations, shares = cross_split_suite(*hashed_shares(cross), vp, pp)
    results = {split: suites.validate(split, frames[split], split_suite(split, vp)) for split in SPLITS}
    results["cross_split"] = suites.validate("cross_split", cross, cross_expectations)
    rows["cross_split"] = len(cross)
    return results, rows, shares, schemas, inputs


def mean_weights(frame, expectations: list) -> dict[int, int]:
    """For each mean expectation (by :func:`expectation_key`): the rows of ``frame`` its mean is over."""
    weights = {}
    for expectation in expectations:
        if isinstance(expectation, gx.expectations.ExpectColumnMeanToBeBetween):
            # GX 1.x wraps a pandas row_condition string as {"type": "pass_through", "pass_through_filter": ...}
            condition = expectation.configuration.kwargs.get("row_condition")
            if isinstance(condition, dict):
                condition = condition.get("pass_through_filter")
            rows = frame.query(condition) if condition else frame
            weights[expectation_key(expectation.configuration)] = int(rows[expectation.column].notna().sum())
    return weights


KEYS_SCHEMA = pa.schema(
    [
        ("_file_split", pa.string()),
        ("id", pa.string()),
        ("source", pa.string()),
        ("split", pa.string()),
        ("_text_key", pa.string()),  # blake2b-128 of the normalised text, hex: the text itself is too big
        ("_hash_split", pa.string()),
    ]
)


def hash_text_keys(frame) -> None:
    """Replace ``_text_key`` (the whole normalised text) by its blake2b-128 hex digest: in chunks only
    uniqueness is checked on it, by DuckDB over all chunks, and the text would double the chunk."""
    frame["_text_key"] = [
        hashlib.blake2b(k.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest() if isinstance(k, str) else None
        for k in frame["_text_key"]
    ]


def keys_table(frame, split: str) -> pa.Table:
    """The columns of a chunk that the checks across chunks and splits need (no text)."""
    columns = {
        "_file_split": [split] * len(frame),
        "id": frame["id"] if "id" in frame else None,
        "source": frame["source"] if "source" in frame else None,
        "split": frame["split"] if "split" in frame else None,
        "_text_key": frame["_text_key"],
        "_hash_split": frame["_hash_split"],
    }
    arrays = [
        pa.nulls(len(frame), pa.string())
        if values is None
        else pa.array([v if isinstance(v, str) else None for v in values], pa.string())
        for values in columns.values()
    ]
    return pa.Table.from_arrays(arrays, schema=KEYS_SCHEMA)


def duplicate_counts(con, relation: str, column: str) -> tuple[int, int, int, list]:
    """(rows, rows with a null ``column``, rows whose value occurs more than once, up to 10 such values)."""
    ((rows, missing),) = con.sql(f"SELECT count(*), count(*) - count({column}) FROM {relation}").fetchall()
    ((unexpected, examples),) = con.sql(
        f"""WITH d AS (SELECT {column} AS v, count(*) AS n FROM {relation} WHERE {column} IS NOT NULL
                       GROUP BY 1 HAVING count(*) > 1)
            SELECT coalesce(sum(n), 0)::BIGINT, (SELECT list(v) FROM (SELECT v FROM d ORDER BY v LIMIT {PARTIAL_UNEXPECTED}))
            FROM d"""
    ).fetchall()
    return int(rows), int(missing), int(unexpected), list(examples or [])


def exact_uniques(con, relation: str, expectations: list) -> dict[int, dict]:
    """The uniqueness expectations (by :func:`expectation_key`) decided over the whole ``relation``."""
    out = {}
    for expectation in expectations:
        if isinstance(expectation, gx.expectations.ExpectColumnValuesToBeUnique):
            rows, missing, unexpected, examples = duplicate_counts(con, relation, expectation.column)
            out[expectation_key(expectation.configuration)] = duplicate_result(
                rows, missing, unexpected, examples, expectation.mostly
            )
    return out


def _cross_query(relation: str) -> str:
    """The cross-split frame of :func:`cross_split_frame`, in SQL over the keys of every split."""
    indicators = ", ".join(f"coalesce(k.split = '{s}', false)::DOUBLE AS _is_{s}" for s in SPLITS)
    return f"""
        WITH k AS (SELECT *, coalesce(source, '<none>') AS _source FROM {relation}),
        m AS (
            SELECT _source, bool_and(coalesce(split = _hash_split, false)) AS hashed,
                   count(DISTINCT split) = 1 AS single
            FROM k GROUP BY _source
        )
        SELECT k.id, k.source, k.split, k._text_key, k._hash_split, k._file_split,
               m.hashed AS _hashed_source,
               CASE WHEN m.hashed THEN 'hash' WHEN m.single THEN 'fixed' ELSE 'inconsistent:' || k._source END
                   AS _split_mode,
               {indicators}
        FROM k JOIN m USING (_source)"""


def validate_in_chunks(suites: Suites, prepared: Path, vp: ValidateParams, pp, scratch: Path):
    """Every suite with memory bounded by ``validate.memory_budget_mb``: returns (results, rows, shares,
    schemas, inputs). Chunks of each split go through great-expectations; the keys of each chunk go to
    a Parquet file, over which DuckDB (memory limited, spilling to ``scratch``) decides uniqueness and
    builds the cross-split rows, which go through great-expectations in chunks too."""
    import duckdb

    con = duckdb.connect(str(scratch / "keys.duckdb"))
    con.execute(f"SET memory_limit = '{max(vp.memory_budget_mb // 2, 8)}MB'")
    con.execute(f"SET temp_directory = '{scratch / 'spill'}'")
    con.execute("SET threads = 1")
    results, rows, schemas, inputs, keys_files = {}, {}, {}, {}, []
    try:
        for split in SPLITS:
            path = prepared / f"{split}.parquet"
            total, per_chunk = chunk_rows(path, vp.memory_budget_mb)
            schemas[split] = pq.ParquetFile(path).schema_arrow
            expectations = split_suite(split, vp)
            keys_file = scratch / f"keys-{split}.parquet"
            keys_files.append(keys_file)

            def chunks(path=path, per_chunk=per_chunk, keys_file=keys_file, split=split, expectations=expectations):
                with pq.ParquetWriter(keys_file, KEYS_SCHEMA) as writer:
                    for frame in iter_split(path, per_chunk, vp.memory_budget_mb * 2**20 // CHUNK_COST):
                        frame = add_computed_columns(frame, pp)
                        hash_text_keys(frame)
                        writer.write_table(keys_table(frame, split))
                        yield frame, mean_weights(frame, expectations)

            relation = f"read_parquet('{keys_file}')"
            results[split] = suites.validate_chunks(
                split, chunks(), expectations, lambda relation=relation, e=expectations: exact_uniques(con, relation, e)
            )
            rows[split] = total
            inputs[str(path)] = sha256_file(path)
        relation = "read_parquet([" + ", ".join(f"'{f}'" for f in keys_files) + "])"
        cross_sql = _cross_query(relation)
        ((hashed, *shares),) = con.sql(
            "SELECT count(*) FILTER (_hashed_source), "
            + ", ".join(f"avg(_is_{s}) FILTER (_hashed_source)" for s in SPLITS)
            + f" FROM ({cross_sql})"
        ).fetchall()
        observed = dict(zip(SPLITS, shares)) if hashed else {}
        cross_expectations, split_shares = cross_split_suite(int(hashed), observed, vp, pp)
        cross_rows = max(int(vp.memory_budget_mb * 2**20 / CHUNK_COST / 256), MIN_CHUNK_ROWS)

        def cross_chunks():
            reader = con.sql(cross_sql).to_arrow_reader(cross_rows)
            for batch in reader:
                frame = pa.Table.from_batches([batch]).to_pandas()
                yield frame, mean_weights(frame, cross_expectations)

        results["cross_split"] = suites.validate_chunks(
            "cross_split",
            cross_chunks(),
            cross_expectations,
            lambda: exact_uniques(con, f"({cross_sql})", cross_expectations),
        )
        rows["cross_split"] = sum(rows[s] for s in SPLITS)
    finally:
        con.close()
    return results, rows, split_shares, schemas, inputs


def run(params, **_options) -> dict[str, Any]:
    vp, pp, paths = params.validate, params.prepare, params.paths
    out_dir, prepared = Path(paths.validate_dir), Path(paths.prepared_dir)
    # never leave an old success behind: if this run crashes there is no summary at all
    (out_dir / SUMMARY_NAME).unlink(missing_ok=True)
    started = time.perf_counter()
    sizes = {split: chunk_rows(prepared / f"{split}.parquet", vp.memory_budget_mb) for split in SPLITS}
    chunked = any(total > per_chunk for total, per_chunk in sizes.values())
    with atomic_dir(out_dir) as tmp:
        suites = Suites(tmp / DOCS_DIR)
        if chunked:
            logger.info(
                "validate: in chunks of %s rows (validate.memory_budget_mb %d)",
                {split: per_chunk for split, (_, per_chunk) in sizes.items()},
                vp.memory_budget_mb,
            )
            scratch = Path(tempfile.mkdtemp(prefix=".validate-scratch-", dir=out_dir.parent))
            try:
                results, rows, shares, schemas, inputs = validate_in_chunks(suites, prepared, vp, pp, scratch)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        else:
            results, rows, shares, schemas, inputs = validate_in_memory(suites, prepared, vp, pp)
        results["schema"] = suites.validate("schema", schema_frame(schemas), schema_suite())
        rows["schema"] = len(prepared_schema()) * len(schemas)
        suites.build_docs()
        summary = summarize(results, rows, shares)
        seconds = round(time.perf_counter() - started, 2)  # manifest only: metrics must not churn
        atomic_write_json(tmp / SUMMARY_NAME, summary)
        write_manifest(
            tmp,
            "validate",
            vp,
            inputs,
            extra={
                "success": summary["success"],
                "rows": rows,
                "seconds": seconds,
                "prepare_split": {"salt": pp.salt, "val_fraction": pp.val_fraction, "test_fraction": pp.test_fraction},
            },
        )
    logger.info(
        "validate: %d/%d expectations passed; report %s",
        summary["successful"],
        summary["evaluated"],
        out_dir / DOCS_DIR / "index.html",
    )
    if not summary["success"]:
        lines = [failure_line(name, f) for name, s in summary["suites"].items() for f in s["failures"]]
        for line in lines:
            logger.error("failed: %s", line)
        shown = "\n  - ".join(lines[:25]) + (f"\n  ... {len(lines) - 25} more" if len(lines) > 25 else "")
        raise ValidationFailedError(
            f"{summary['failed']} of {summary['evaluated']} expectations failed on {prepared} "
            f"(report: {out_dir / DOCS_DIR / 'index.html'}, {out_dir / SUMMARY_NAME}):\n  - {shown}"
        )
    return {
        "success": True,
        "evaluated": summary["evaluated"],
        "rows": rows,
        "summary": str(out_dir / SUMMARY_NAME),
        "data_docs": str(out_dir / DOCS_DIR / "index.html"),
        "seconds": seconds,
    }
