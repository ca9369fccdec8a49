"""Stage ``ingest_news``: news CSV / JSON lines / article folders -> clean, labelled Parquet.

Inputs: every entry of ``ingest_news.sources`` in params.yaml, resolved by
:func:`pipeline_tasks.ingest.sources.resolve_source` (local ``path`` > ``$LMPIPE_DATA_MIRROR/mirror_path``
> ``url`` download) and verified by checksum (file ``sha256``/``sha1``/``md5``, zip
``member_sha256``, folder ``tree_sha256``). Layouts (``format``): ``csv`` (AG News, headerless or
headered, ``columns`` maps the canonical fields ``title, body, label, date, url`` to column
indices or header names; a zip ``member`` is streamed in place), ``jsonl`` (HuffPost; ``columns``
maps fields to keys) and ``folder`` (BBC: ``<label>/<n>.txt``). gzip / bz2 / xz files are
decompressed whatever their name; a zip without ``member`` or a tar is refused with the fix.
Parsing and cleaning live in :mod:`pipeline_tasks.ingest.newsformats`.

Outputs (``paths.raw_news_dir``, swapped in atomically, nothing on failure):

* ``<source>.parquet`` — ``id`` (``<source>:<stable key>``), ``kind``="news", ``source``, ``lang``,
  ``title``, ``text`` (title + "\\n" + body), ``label`` (``world|sports|business|scitech`` or
  null), ``raw_label``, ``date`` (timestamp[s, UTC], null), ``url`` (null), ``split`` (null, or
  the source's fixed split such as AG News ``test``). Schema: :func:`news_schema`.
* ``quarantine/<source>.jsonl`` — one ``{"file", "record", "reason", "detail", "raw"}`` per bad
  record (wrong column count, undecodable bytes, invalid JSON, not an object, missing field,
  empty text, bad date, duplicate key).
* ``stats.json`` (per-source counts, reasons, label counts, date range) and ``manifest.json``.

A source whose bad share exceeds ``max_bad_share`` fails the stage with
:class:`~pipeline_tasks.errors.DataError` (file, share, top reasons, first bad records); its
quarantine is kept as ``failed_quarantine_dir/<source>.jsonl`` (named in the error, removed once
the source passes) since the output folder is discarded. An empty source file fails too. Single
process on purpose: the real sources are a few MB each and parse in seconds; the work is I/O and
regex bound per record, not worth the pickling of a process pool.

Params section: ``ingest_news``. Command: ``python -m pipeline_tasks ingest_news``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from pipeline_tasks.artifacts import atomic_dir, atomic_path, atomic_write_json, sha256_file, write_manifest
from pipeline_tasks.errors import DataError
from pipeline_tasks.ingest import newsformats
from pipeline_tasks.ingest.params import IngestNewsParams, NewsSourceParams
from pipeline_tasks.ingest.sources import open_binary, resolve_source, tree_digest

logger = logging.getLogger(__name__)

STAGE = "ingest_news"
BATCH_ROWS = 10_000


def news_schema():
    """The explicit Arrow schema of ``<source>.parquet`` (see docs/ARCHITECTURE.md)."""
    return pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            pa.field("kind", pa.string(), nullable=False),
            pa.field("source", pa.string(), nullable=False),
            pa.field("lang", pa.string(), nullable=False),
            pa.field("title", pa.string(), nullable=False),
            pa.field("text", pa.string(), nullable=False),
            pa.field("label", pa.string()),
            pa.field("raw_label", pa.string()),
            pa.field("date", pa.timestamp("s", tz="UTC")),
            pa.field("url", pa.string()),
            pa.field("split", pa.string()),
        ]
    )


def read_news_table(path: str | Path):
    """Read a ``<source>.parquet`` back with :func:`news_schema` exactly.

    Parquet has no second-resolution timestamp, so ``date`` is stored (losslessly) as
    milliseconds; casting restores ``timestamp[s, UTC]``.
    """
    return pq.read_table(path).cast(news_schema())


@contextlib.contextmanager
def open_records(spec: NewsSourceParams, path: Path, raw_chars: int):
    """Yield ``(records iterator, info)`` for a resolved source; info gains counts as it is read."""
    info: dict[str, Any] = {"ignored_files": []}
    if spec.format == "folder":
        if not path.is_dir():
            raise DataError(f"{path}: source {spec.name!r} has format folder but this is not a folder")
        files, info["ignored_files"] = newsformats.list_folder_files(path, spec.file_glob)
        if not files:
            raise DataError(
                f"{path}: no article files {spec.file_glob!r} in label sub-folders; is this the {spec.name!r} folder?"
            )
        yield (
            newsformats.read_folder_records(path, files, fallback_encoding=spec.fallback_encoding, raw_chars=raw_chars),
            info,
        )
        return
    if path.is_dir():
        raise DataError(f"{path}: source {spec.name!r} has format {spec.format} but this is a folder")
    display = f"{path}!{spec.member}" if spec.member else str(path)
    with open_binary(path, spec.member, spec.member_sha256) as stream:
        if spec.format == "csv":
            records = newsformats.read_csv_records(
                stream,
                display,
                columns=spec.columns,
                header=spec.header,
                num_columns=spec.num_columns,
                fallback_encoding=spec.fallback_encoding,
                raw_chars=raw_chars,
            )
        else:
            records = newsformats.read_jsonl_records(
                stream, display, columns=spec.columns, fallback_encoding=spec.fallback_encoding, raw_chars=raw_chars
            )
        yield records, info


def ingest_source(spec: NewsSourceParams, path: Path, out_dir: Path, params: IngestNewsParams) -> dict[str, Any]:
    """Read, clean and write one source; returns its stats. Raises DataError above the bad share."""
    opts = newsformats.RowOptions(
        source=spec.name,
        lang=spec.lang,
        label_map=spec.label_map,
        split=spec.split,
        date_format=spec.date_format,
        id_fields=spec.id_fields,
        backslash_breaks=spec.backslash_breaks,
        repair_entities=spec.repair_entities,
    )
    stats = newsformats.SourceStats(spec.name, f"{path}!{spec.member}" if spec.member else str(path))
    (out_dir / "quarantine").mkdir(exist_ok=True)
    quarantine_path = out_dir / "quarantine" / f"{spec.name}.jsonl"
    try:
        with (
            open_records(spec, path, params.max_raw_chars) as (records, info),
            pq.ParquetWriter(out_dir / f"{spec.name}.parquet", news_schema(), compression="zstd") as writer,
            open(quarantine_path, "w", encoding="utf-8") as quarantine,
        ):
            write_records(records, opts, stats, writer, quarantine, params.max_records_per_source)
            stats.ignored_files = info["ignored_files"]
        stats.check(spec.max_bad_share if spec.max_bad_share is not None else params.max_bad_share)
    except newsformats.FileFormatError as exc:
        kept = ""
        if stats.quarantined and quarantine_path.exists():  # the output folder goes: keep what a user must see
            target = keep_failed_quarantine(quarantine_path, Path(params.failed_quarantine_dir))
            kept = f"; the {stats.quarantined} bad records are kept in {target}"
        raise DataError(f"{exc}{kept}") from None
    previous_failure = Path(params.failed_quarantine_dir) / quarantine_path.name
    if previous_failure.exists():
        logger.info("%s: passes now; removing %s kept from a failed run", spec.name, previous_failure)
        previous_failure.unlink()
    if quarantine_path.stat().st_size == 0:
        quarantine_path.unlink()
    if stats.fallback_decoded:
        logger.warning(
            "%s: %d record(s) decoded with fallback_encoding %s: %s",
            spec.name,
            len(stats.fallback_decoded),
            spec.fallback_encoding,
            stats.fallback_decoded[:5],
        )
    return stats.to_dict()


def keep_failed_quarantine(quarantine_path: Path, failed_dir: Path) -> Path:
    """Copy a failed source's quarantine to ``failed_dir`` (atomically) before its run is discarded."""
    target = failed_dir / quarantine_path.name
    with atomic_path(target) as tmp:
        shutil.copyfile(quarantine_path, tmp)
    return target


def write_records(
    records, opts: newsformats.RowOptions, stats: newsformats.SourceStats, writer, quarantine, limit: int | None = None
) -> None:
    """Clean each record into ``writer`` (in batches) or a quarantine line; counts go to ``stats``."""
    seen = newsformats.SeenKeys()  # 16 bytes per record: ids of a 10 M-row source fit
    batch: list[dict[str, Any]] = []
    for record in tqdm(records, desc=opts.source, unit=" rec", disable=None):
        try:
            row = newsformats.build_row(record, opts)
            if row["id"] in seen:  # ids must be unique; the same key twice is a duplicate record
                raise newsformats.RecordError(
                    "duplicate_key", f"id {row['id']} already seen (same {', '.join(opts.id_fields)})"
                )
        except newsformats.RecordError as exc:
            stats.add_bad(record, exc)
            quarantine.write(
                json.dumps(
                    {
                        "file": record.file,
                        "record": record.record,
                        "reason": exc.reason,
                        "detail": exc.detail,
                        "raw": record.raw,
                    },
                    ensure_ascii=False,
                )
                + "\n"
            )
            continue
        seen.add(row["id"])
        stats.add_good(row, record)
        batch.append(row)
        if len(batch) >= BATCH_ROWS:
            writer.write_table(pa.Table.from_pylist(batch, schema=writer.schema))
            batch.clear()
            logger.info("%s: %d records kept so far", opts.source, stats.kept)
        if limit and stats.kept >= limit:
            stats.truncated = True
            break
    if batch:
        writer.write_table(pa.Table.from_pylist(batch, schema=writer.schema))


def run(params, **_options) -> dict[str, Any]:
    """Ingest every news source into ``paths.raw_news_dir`` (atomically, all or nothing)."""
    section: IngestNewsParams = params.ingest_news
    out = Path(params.paths.raw_news_dir)
    root = Path(params.source).resolve().parent if getattr(params, "source", None) else Path.cwd()
    resolved = {
        spec.name: resolve_source(spec, params.paths.downloads_dir, root, section.download) for spec in section.sources
    }
    summary: dict[str, Any] = {}
    with atomic_dir(out) as tmp:
        for spec in section.sources:
            logger.info("%s: reading %s (%s)", spec.name, resolved[spec.name], spec.format)
            summary[spec.name] = ingest_source(spec, resolved[spec.name], tmp, section)
            logger.info(
                "%s: kept %d, quarantined %d %s",
                spec.name,
                summary[spec.name]["kept"],
                summary[spec.name]["quarantined"],
                summary[spec.name]["reasons"] or "",
            )
        totals = {key: sum(s[key] for s in summary.values()) for key in ("records", "kept", "quarantined")}
        atomic_write_json(tmp / "stats.json", {"sources": summary, "totals": totals})
        inputs = {name: sha256_file(p) if p.is_file() else f"tree:{tree_digest(p)}" for name, p in resolved.items()}
        write_manifest(tmp, STAGE, section, inputs=inputs)
    return {"out_dir": str(out), **totals, "sources": {n: s["kept"] for n, s in summary.items()}}
