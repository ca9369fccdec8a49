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

Params: section ``validate`` (:class:`~pipeline_tasks.dataset.params.ValidateParams`).
Command: ``python -m pipeline_tasks validate``.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import great_expectations as gx
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
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


def cross_split_suite(frame, params: ValidateParams, prepare_params) -> tuple[list, dict[str, Any]]:
    """Expectations over all splits, and a description of the split-share check."""
    E = gx.expectations
    exps = [
        E.ExpectColumnValuesToBeUnique(column="id"),
        E.ExpectColumnValuesToBeUnique(column="_text_key", mostly=1.0 - params.max_duplicate_rate),
        E.ExpectColumnPairValuesToBeEqual(column_A="split", column_B="_file_split"),
        E.ExpectColumnValuesToBeInSet(column="_split_mode", value_set=["hash", "fixed"]),
    ]
    hashed = int(frame["_hashed_source"].sum())
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
            "observed": round(float(frame.loc[frame["_hashed_source"], f"_is_{split}"].mean()), 6),
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


def run_suites(datasets: dict[str, tuple[Any, list]], docs_dir: Path) -> dict[str, Any]:
    """Validate each ``name -> (frame, expectations)`` and build Data Docs into ``docs_dir``.

    Returns ``name -> ExpectationSuiteValidationResult``. Uses an ephemeral context (nothing
    persisted but the Data Docs site), no progress bars, no analytics.
    """
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    site = {
        "class_name": "SiteBuilder",
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        # GX requires an absolute base_directory without a project root
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(Path(docs_dir).resolve())},
    }
    context.add_data_docs_site(site_name="lmpipe", site_config=site)
    source = context.data_sources.add_pandas(name="prepared")
    results = {}
    for name, (frame, expectations) in datasets.items():
        batch = source.add_dataframe_asset(name=name).add_batch_definition_whole_dataframe(name=f"{name}_all")
        suite = context.suites.add(gx.ExpectationSuite(name=name))
        for expectation in expectations:
            suite.add_expectation(expectation)
        definition = context.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
        checkpoint = context.checkpoints.add(
            gx.Checkpoint(
                name=f"validate_{name}",
                validation_definitions=[definition],
                actions=[],
                result_format={"result_format": "SUMMARY", "partial_unexpected_count": 10},
            )
        )
        started = time.perf_counter()
        outcome = checkpoint.run(batch_parameters={"dataframe": frame})
        results[name] = next(iter(outcome.run_results.values()))
        logger.info(
            "suite %s: %s (%d rows, %.1f s)",
            name,
            "passed" if results[name].success else "FAILED",
            len(frame),
            time.perf_counter() - started,
        )
    started = time.perf_counter()
    context.build_data_docs(site_names=["lmpipe"])
    localize_data_docs(Path(docs_dir))
    logger.info("data docs built in %.1f s", time.perf_counter() - started)
    return results


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


def run(params, **_options) -> dict[str, Any]:
    vp, pp, paths = params.validate, params.prepare, params.paths
    out_dir, prepared = Path(paths.validate_dir), Path(paths.prepared_dir)
    # never leave an old success behind: if this run crashes there is no summary at all
    (out_dir / SUMMARY_NAME).unlink(missing_ok=True)
    started = time.perf_counter()
    frames, schemas, inputs = {}, {}, {}
    for split in SPLITS:
        path = prepared / f"{split}.parquet"
        frame, schemas[split] = read_split(path)
        frames[split] = add_computed_columns(frame, pp)
        inputs[str(path)] = sha256_file(path)
    rows = {split: len(frame) for split, frame in frames.items()}
    cross = cross_split_frame(frames)
    cross_expectations, shares = cross_split_suite(cross, vp, pp)
    datasets = {split: (frames[split], split_suite(split, vp)) for split in SPLITS}
    datasets["cross_split"] = (cross, cross_expectations)
    datasets["schema"] = (schema_frame(schemas), schema_suite())
    rows.update(cross_split=len(cross), schema=len(datasets["schema"][0]))
    with atomic_dir(out_dir) as tmp:
        results = run_suites(datasets, tmp / DOCS_DIR)
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
