"""Tiny raw inputs for the prepare / validate stage tests, written in the ingest schemas.

Real text from the shared corpora: WikiText-2 paragraphs and Chinese Wikipedia articles (wiki),
the official AG News test split (fixed split ``test``), the AG News train subset and dated
HuffPost records (news). A few planted rows exercise every drop reason with a known answer:

* ``ag_news_train:planted-exact`` — an AG test row in upper case with extra punctuation and
  spaces (exact duplicate after normalisation: the test row must win);
* ``ag_news_train:planted-near`` — an AG test row with `` (AP)`` appended (near duplicate across
  splits: the fixed test row must stay, the train candidate goes);
* ``wikitext2:planted-near`` — a long WikiText paragraph with one word changed;
* ``huffpost:planted-short`` (too short), ``huffpost:planted-blank`` (punctuation only) and a
  repeated id ``huffpost:planted-dupid``.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import zipfile
from pathlib import Path

AG_TEST = "ag_news/mhjabreel_CharCnn_Keras/test.csv"
AG_ZIP = "ag_news/jatin-12-2002_AG_News_Classification/archive.zip"
HUFFPOST = "news_category_dataset/Limpery_MGO/News_Category_Dataset_v3.json"
WIKITEXT = "wikitext2/DRAGNLabs_LLMHumanModeling/wiki.valid.raw"
BBC = "bbc_news/dejanbatanjac_bbc-article-classify-bert/bbc"
BBC_LABELS = {"business": "business", "sport": "sports", "tech": "scitech"}
ZHWIKI = "wikipedia_text/jastfkjg_Chinese-relation-extraction/wiki_00"
AG_LABELS = {"1": "world", "2": "sports", "3": "business", "4": "scitech"}
HUFF_LABELS = {
    "WORLD NEWS": "world",
    "SPORTS": "sports",
    "BUSINESS": "business",
    "TECH": "scitech",
    "SCIENCE": "scitech",
}


def wiki_schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("id", pa.string()),
            ("kind", pa.string()),
            ("source", pa.string()),
            ("lang", pa.string()),
            ("title", pa.string()),
            ("text", pa.string()),
            ("date", pa.timestamp("s", tz="UTC")),
            ("url", pa.string()),
        ]
    )


def news_schema():
    """The ingest_news schema (docs/ARCHITECTURE.md): like the prepared one, with a nullable split."""
    import pyarrow as pa

    from pipeline_tasks.dataset.prepared import prepared_schema

    return pa.schema([f.with_nullable(True) if f.name == "split" else f for f in prepared_schema()])


def _write(rows: list[dict], schema, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def wikitext_rows(corpora: Path, limit: int = 80) -> list[dict]:
    lines = (corpora / WIKITEXT).read_text(encoding="utf-8").replace("\r\n", "\n").split("\n")
    rows, title = [], ""
    for number, line in enumerate(lines):
        line = line.strip()
        if line.startswith("= ") and not line.startswith("= ="):
            title = line.strip("= ")
        elif line and not line.startswith("="):
            rows.append(
                {
                    "id": f"wikitext2:valid-{number}",
                    "kind": "wiki",
                    "source": "wikitext2",
                    "lang": "en",
                    "title": title,
                    "text": line,
                    "date": None,
                    "url": None,
                }
            )
        if len(rows) >= limit:
            break
    return rows


def zhwiki_rows(corpora: Path, limit: int = 4) -> list[dict]:
    rows = []
    with open(corpora / ZHWIKI, encoding="utf-8") as fh:
        for line in fh:
            doc = json.loads(line)
            rows.append(
                {
                    "id": f"zhwiki:{doc['id']}",
                    "kind": "wiki",
                    "source": "zhwiki",
                    "lang": "zh",
                    "title": doc["title"],
                    "text": doc["text"][:3000],
                    "date": dt.datetime(2019, 2, 1, tzinfo=dt.UTC),
                    "url": doc["url"],
                }
            )
            if len(rows) >= limit:
                break
    return rows


def ag_test_rows(corpora: Path, limit: int = 150) -> list[dict]:
    rows = []
    with open(corpora / AG_TEST, encoding="utf-8", newline="") as fh:
        for i, (label, title, body) in enumerate(csv.reader(fh)):
            rows.append(
                {
                    "id": f"ag_news_test:{i:05d}",
                    "kind": "news",
                    "source": "ag_news_test",
                    "lang": "en",
                    "title": title,
                    "text": f"{title}\n{body.replace(chr(92), ' ')}",
                    "label": AG_LABELS[label],
                    "raw_label": label,
                    "date": None,
                    "url": None,
                    "split": "test",
                }
            )
            if len(rows) >= limit:
                break
    return rows


def ag_train_rows(corpora: Path, limit: int = 150) -> list[dict]:
    rows = []
    with zipfile.ZipFile(corpora / AG_ZIP) as archive:
        reader = csv.DictReader(io.TextIOWrapper(archive.open("train.csv"), encoding="utf-8"))
        for i, row in enumerate(reader):
            rows.append(
                {
                    "id": f"ag_news_train:{i:05d}",
                    "kind": "news",
                    "source": "ag_news_train",
                    "lang": "en",
                    "title": row["title"],
                    "text": f"{row['title']}\n{row['description']}",
                    "label": AG_LABELS[row["class_index"]],
                    "raw_label": row["class_index"],
                    "date": None,
                    "url": None,
                    "split": None,
                }
            )
            if len(rows) >= limit:
                break
    return rows


def huffpost_rows(corpora: Path, limit: int = 100) -> list[dict]:
    rows = []
    with open(corpora / HUFFPOST, encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            slug = rec["link"].rstrip("/").rsplit("/", 1)[-1]
            rows.append(
                {
                    "id": f"huffpost:{slug}",
                    "kind": "news",
                    "source": "huffpost",
                    "lang": "en",
                    "title": rec["headline"],
                    "text": f"{rec['headline']}\n{rec['short_description']}",
                    "label": HUFF_LABELS.get(rec["category"]),
                    "raw_label": rec["category"],
                    "date": dt.datetime.fromisoformat(rec["date"]).replace(tzinfo=dt.UTC),
                    "url": rec["link"],
                    "split": None,
                }
            )
            if len(rows) >= limit:
                break
    return rows


def bbc_rows(corpora: Path, per_class: int = 8) -> list[dict]:
    """BBC articles (a source that "arrives later" in the split-stability test)."""
    root = corpora / BBC
    rows = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in sorted(folder.glob("*.txt"))[:per_class]:
            text = path.read_bytes().decode("utf-8", "replace")
            title, _, body = text.partition("\n")
            rows.append(
                {
                    "id": f"bbc:{folder.name}/{path.stem}",
                    "kind": "news",
                    "source": "bbc",
                    "lang": "en",
                    "title": title.strip(),
                    "text": f"{title.strip()}\n{body.strip()}",
                    "label": BBC_LABELS.get(folder.name),
                    "raw_label": folder.name,
                    "date": None,
                    "url": None,
                    "split": None,
                }
            )
    return rows


def planted_rows(ag_test: list[dict], wiki: list[dict]) -> tuple[list[dict], list[dict]]:
    """(news rows, wiki rows) that must be dropped, see the module docstring."""
    exact_src, near_src = ag_test[0], ag_test[1]
    long_para = max(wiki, key=lambda r: len(r["text"]))
    words = long_para["text"].split(" ")
    words[len(words) // 2] = "zanzibar"
    news = [
        {
            **exact_src,
            "id": "ag_news_train:planted-exact",
            "source": "ag_news_train",
            "split": None,
            "text": "  " + exact_src["text"].upper().replace(" ", "  ") + " !!!",
        },
        {
            **near_src,
            "id": "ag_news_train:planted-near",
            "source": "ag_news_train",
            "split": None,
            "text": near_src["text"] + " (AP)",
        },
        {
            "id": "huffpost:planted-short",
            "kind": "news",
            "source": "huffpost",
            "lang": "en",
            "title": "Short",
            "text": "Short\nToo short to keep.",
            "label": None,
            "raw_label": "X",
            "date": None,
            "url": None,
            "split": None,
        },
        {
            "id": "huffpost:planted-blank",
            "kind": "news",
            "source": "huffpost",
            "lang": "en",
            "title": "",
            "text": "  ... --- !!! ... --- !!! ... --- !!! ... --- !!! ... --- !!! ...  ",
            "label": None,
            "raw_label": "X",
            "date": None,
            "url": None,
            "split": None,
        },
    ]
    wiki_planted = [{**long_para, "id": "wikitext2:planted-near", "text": " ".join(words)}]
    return news, wiki_planted


def write_raw(corpora: Path, root: Path) -> dict[str, Path]:
    """Write ``root/raw/wiki/*.parquet`` and ``root/raw/news/*.parquet``; return the two folders."""
    wiki_dir, news_dir = root / "raw" / "wiki", root / "raw" / "news"
    wiki = wikitext_rows(corpora)
    ag_test = ag_test_rows(corpora)
    news_planted, wiki_planted = planted_rows(ag_test, wiki)
    huffpost = huffpost_rows(corpora)
    dupid = {**huffpost[0], "text": huffpost[1]["text"] + " A different story under a repeated id."}
    _write(wiki + wiki_planted, wiki_schema(), wiki_dir / "wikitext2.parquet")
    _write(zhwiki_rows(corpora), wiki_schema(), wiki_dir / "zhwiki.parquet")
    _write(ag_test, news_schema(), news_dir / "ag_news_test.parquet")
    _write(ag_train_rows(corpora) + news_planted[:2], news_schema(), news_dir / "ag_news_train.parquet")
    _write(huffpost + news_planted[2:] + [dupid], news_schema(), news_dir / "huffpost.parquet")
    return {"raw_wiki_dir": wiki_dir, "raw_news_dir": news_dir}


def project_params(root: Path, raw: dict[str, Path], **sections):
    """Params with every path pointed into ``root`` (tests add/override sections)."""
    from pipeline_tasks.config import parse_params

    paths = {
        "raw_wiki_dir": str(raw["raw_wiki_dir"]),
        "raw_news_dir": str(raw["raw_news_dir"]),
        "prepared_dir": str(root / "prepared"),
        "prepare_reports_dir": str(root / "reports" / "prepare"),
        "validate_dir": str(root / "reports" / "validate"),
    }
    return parse_params({"paths": paths, "prepare": {}, "validate": {}, **sections})
