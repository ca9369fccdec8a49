"""Tiny real inputs for the tokenize / pretrain stage tests (shared by those test files only).

``write_prepared(corpora, out_dir)`` builds ``{train,val,test}.parquet`` in the prepared schema
(docs/ARCHITECTURE.md) from real text: WikiText-2 articles (wiki), AG News rows (news, labelled)
and Chinese Wikipedia JSON lines (wiki, lang zh). ``write_params(tmp, **sections)`` writes a
params file whose paths all point into ``tmp``.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import re
from pathlib import Path

import yaml

AG_LABELS = {"1": "world", "2": "sports", "3": "business", "4": "scitech"}


def _wikitext_articles(path: Path, limit: int) -> list[tuple[str, str]]:
    text = path.read_text(encoding="utf-8").replace("\r\n", "\n")
    parts = re.split(r"^ = ([^=].*?) = \n", text, flags=re.M)
    articles = [(parts[i].strip(), parts[i + 1].strip()) for i in range(1, len(parts) - 1, 2)]
    return [a for a in articles if a[1]][:limit]


def prepared_rows(corpora: Path, n_wiki: int = 24, n_news: int = 300, n_zh: int = 6) -> list[dict]:
    rows = []
    when = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    for i, (title, body) in enumerate(
        _wikitext_articles(corpora / "wikitext2/DRAGNLabs_LLMHumanModeling/wiki.valid.raw", n_wiki)
    ):
        rows.append(
            dict(
                id=f"wikitext2:{i}",
                kind="wiki",
                source="wikitext2",
                lang="en",
                title=title,
                text=body[:20_000],
                label=None,
                raw_label=None,
                date=when,
                url=None,
                split=None,
            )
        )
    with open(corpora / "ag_news/mhjabreel_CharCnn_Keras/test.csv", newline="", encoding="utf-8") as fh:
        for i, (label, title, desc) in enumerate(csv.reader(fh)):
            if i >= n_news:
                break
            rows.append(
                dict(
                    id=f"ag_news:{i}",
                    kind="news",
                    source="ag_news",
                    lang="en",
                    title=title,
                    text=f"{title}\n{desc}",
                    label=AG_LABELS[label],
                    raw_label=label,
                    date=None,
                    url=None,
                    split="test",
                )
            )
    with open(corpora / "wikipedia_text/jastfkjg_Chinese-relation-extraction/wiki_00", encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if i >= n_zh:
                break
            doc = json.loads(line)
            rows.append(
                dict(
                    id=f"zhwiki:{doc['id']}",
                    kind="wiki",
                    source="zhwiki",
                    lang="zh",
                    title=doc["title"],
                    text=doc["text"][:8_000],
                    label=None,
                    raw_label=None,
                    date=when,
                    url=doc.get("url"),
                    split=None,
                )
            )
    return rows


def write_prepared(corpora: Path, out_dir: Path, **sizes) -> dict[str, int]:
    """Deterministic 80/10/10 split of :func:`prepared_rows` into the three Parquet files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            ("id", pa.string()),
            ("kind", pa.string()),
            ("source", pa.string()),
            ("lang", pa.string()),
            ("title", pa.string()),
            ("text", pa.string()),
            ("label", pa.string()),
            ("raw_label", pa.string()),
            ("date", pa.timestamp("s", tz="UTC")),
            ("url", pa.string()),
            ("split", pa.string()),
        ]
    )
    rows = prepared_rows(corpora, **sizes)
    splits = {"train": [], "val": [], "test": []}
    for i, row in enumerate(rows):
        splits["val" if i % 10 == 3 else "test" if i % 10 == 7 else "train"].append(row)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, split_rows in splits.items():
        pq.write_table(pa.Table.from_pylist(split_rows, schema=schema), out_dir / f"{name}.parquet")
    return {name: len(r) for name, r in splits.items()}


def write_params(tmp: Path, **sections) -> Path:
    """A params file with every path under ``tmp`` plus the given sections."""
    import dataclasses

    from pipeline_tasks.config import PathsParams

    paths = {f.name: str(tmp / getattr(PathsParams(), f.name)) for f in dataclasses.fields(PathsParams)}
    doc = {"project": "lm-pipeline-test", "seed": 1337, "paths": paths, **sections}
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path
