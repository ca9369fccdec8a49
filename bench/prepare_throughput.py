"""Benchmark: ``prepare`` (merge, filter, exact + MinHash dedup, split) and ``validate`` on ~60k real docs.

Input: ``paths.raw_wiki_dir`` / ``paths.raw_news_dir`` when they hold Parquet (the ingest
outputs), else ``--from-corpora``-style raw files built here from the shared corpora in the
ingest schemas (WikiText-2 paragraphs, 12k zhwiki articles, AG News test + 20k train, HuffPost
v2 + v3, BBC: ~59k docs, ~20 M characters). Everything runs in a temporary directory; the
project's own outputs are never touched.

Measures (wall seconds, one process):

* ``prepare.run`` end to end, with its read / core split from the manifest;
* the near-duplicate step alone: our numpy MinHash + banded LSH walk, against the
  ``datasketch`` baseline (``MinHash.bulk`` + ``LeanMinHash`` + ``MinHashLSH`` query/insert, same
  shingles, same greedy walk; ``--no-baseline`` skips it);
* ``validate.run`` (great-expectations suites + Data Docs) on the prepared splits.

    python bench/prepare_throughput.py            # nice it on a shared machine
    python bench/prepare_throughput.py --no-baseline

Prints a table and writes ``bench/results/prepare_throughput.json``.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import io
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

AG_LABELS = {"1": "world", "2": "sports", "3": "business", "4": "scitech"}
HUFF_LABELS = {
    "WORLD NEWS": "world",
    "SPORTS": "sports",
    "BUSINESS": "business",
    "TECH": "scitech",
    "SCIENCE": "scitech",
}


def build_raw_from_corpora(corpora: Path, out: Path) -> None:
    """Raw Parquet in the ingest schemas, straight from the shared corpora (no ingest stage needed)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline_tasks.dataset.prepared import prepared_schema

    news_schema = pa.schema([f.with_nullable(True) for f in prepared_schema()])
    wiki_schema = pa.schema([f for f in news_schema if f.name not in ("label", "raw_label", "split")])
    utc = dt.UTC

    def write(rows, schema, path):
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)

    rows = []
    for part in ("valid", "test"):
        raw = (corpora / f"wikitext2/DRAGNLabs_LLMHumanModeling/wiki.{part}.raw").read_text().replace("\r\n", "\n")
        title = ""
        for n, line in enumerate(raw.split("\n")):
            line = line.strip()
            if line.startswith("= ") and not line.startswith("= ="):
                title = line.strip("= ")
            elif line and not line.startswith("="):
                rows.append(
                    dict(
                        id=f"wikitext2:{part}-{n}",
                        kind="wiki",
                        source="wikitext2",
                        lang="en",
                        title=title,
                        text=line,
                        date=None,
                        url=None,
                    )
                )
    write(rows, wiki_schema, out / "wiki" / "wikitext2.parquet")
    rows = []
    for f in sorted((corpora / "wikipedia_text/overweightbarracuda_science_fair2324/AA").glob("wiki_*")):
        for m in re.finditer(r'<doc id="(\d+)" url="([^"]+)" title="([^"]*)">\n(.*?)</doc>', f.read_text(), re.S):
            rows.append(
                dict(
                    id=f"zhwiki:{m[1]}",
                    kind="wiki",
                    source="zhwiki",
                    lang="zh",
                    title=m[3],
                    text=m[4].strip(),
                    date=dt.datetime(2023, 9, 1, tzinfo=utc),
                    url=m[2],
                )
            )
    write(rows, wiki_schema, out / "wiki" / "zhwiki.parquet")
    rows = []
    with open(corpora / "ag_news/mhjabreel_CharCnn_Keras/test.csv", newline="", encoding="utf-8") as fh:
        for i, (label, title, body) in enumerate(csv.reader(fh)):
            rows.append(
                dict(
                    id=f"ag_news_test:{i}",
                    kind="news",
                    source="ag_news_test",
                    lang="en",
                    title=title,
                    text=f"{title}\n{body}",
                    label=AG_LABELS[label],
                    raw_label=label,
                    date=None,
                    url=None,
                    split="test",
                )
            )
    write(rows, news_schema, out / "news" / "ag_news_test.parquet")
    rows = []
    with zipfile.ZipFile(corpora / "ag_news/jatin-12-2002_AG_News_Classification/archive.zip") as archive:
        for i, r in enumerate(csv.DictReader(io.TextIOWrapper(archive.open("train.csv"), encoding="utf-8"))):
            rows.append(
                dict(
                    id=f"ag_news_train:{i}",
                    kind="news",
                    source="ag_news_train",
                    lang="en",
                    title=r["title"],
                    text=f"{r['title']}\n{r['description']}",
                    label=AG_LABELS[r["class_index"]],
                    raw_label=r["class_index"],
                    date=None,
                    url=None,
                    split=None,
                )
            )
    write(rows, news_schema, out / "news" / "ag_news_train.parquet")
    rows, seen = [], set()
    for name in (
        "Limpery_MGO/News_Category_Dataset_v3.json",
        "ongraphpythondev_elastic_search/News_Category_Dataset_v2.json",
    ):
        for line in open(corpora / "news_category_dataset" / name, encoding="utf-8"):
            r = json.loads(line)
            doc_id = "huffpost:" + r["link"].rstrip("/").rsplit("/", 1)[-1]
            if doc_id in seen:
                continue
            seen.add(doc_id)
            rows.append(
                dict(
                    id=doc_id,
                    kind="news",
                    source="huffpost",
                    lang="en",
                    title=r["headline"],
                    text=f"{r['headline']}\n{r['short_description']}",
                    label=HUFF_LABELS.get(r["category"]),
                    raw_label=r["category"],
                    date=dt.datetime.fromisoformat(r["date"]).replace(tzinfo=utc),
                    url=r["link"],
                    split=None,
                )
            )
    write(rows, news_schema, out / "news" / "huffpost.parquet")
    rows = []
    for f in sorted((corpora / "bbc_news/dejanbatanjac_bbc-article-classify-bert/bbc").glob("*/*.txt")):
        head, _, body = f.read_bytes().decode("utf-8", "replace").partition("\n")
        rows.append(
            dict(
                id=f"bbc:{f.parent.name}/{f.stem}",
                kind="news",
                source="bbc",
                lang="en",
                title=head.strip(),
                text=f"{head.strip()}\n{body.strip()}",
                raw_label=f.parent.name,
                date=None,
                url=None,
                label={"business": "business", "sport": "sports", "tech": "scitech"}.get(f.parent.name),
                split=None,
            )
        )
    write(rows, news_schema, out / "news" / "bbc.parquet")


def datasketch_baseline(keys, cjk, params) -> tuple[float, int]:
    """The same greedy near-dup walk with datasketch objects (sha1 per shingle)."""
    from datasketch import LeanMinHash, MinHash, MinHashLSH

    from pipeline_tasks.dataset.dedup import shingles

    started = time.perf_counter()
    sets = [
        sorted(
            " ".join(s).encode() if isinstance(s, tuple) else s.encode()
            for s in shingles(k, params.shingle_words, params.shingle_chars, c)
        )
        for k, c in zip(keys, cjk)
    ]
    lsh = MinHashLSH(threshold=params.near_dup_threshold, num_perm=params.num_perm)
    kept, dropped = {}, 0
    for start in range(0, len(sets), 2048):
        batch = sets[start : start + 2048]
        hashed = MinHash.bulk([s or [b""] for s in batch], num_perm=params.num_perm, seed=params.minhash_seed)
        for offset, (members, m) in enumerate(zip(batch, hashed)):
            if not members:
                continue
            m = LeanMinHash(m)
            if any(m.jaccard(kept[c]) >= params.near_dup_threshold for c in lsh.query(m)):
                dropped += 1
                continue
            lsh.insert(start + offset, m, check_duplication=False)
            kept[start + offset] = m
    return time.perf_counter() - started, dropped


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--corpora", default=os.environ.get("LMPIPE_DATA_MIRROR", str(ROOT.parent / "shared" / "corpora"))
    )
    parser.add_argument("--no-baseline", action="store_true", help="skip the datasketch comparison")
    parser.add_argument("--from-corpora", action="store_true", help="ignore data/raw, build raw files from corpora")
    args = parser.parse_args()

    from pipeline_tasks.config import load_params, parse_params
    from pipeline_tasks.dataset import dedup, prepare, validate
    from pipeline_tasks.dataset.textstats import char_profile, normalize_key

    project = load_params(ROOT / "params.yaml")
    work = Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    raw_wiki, raw_news = ROOT / project.paths.raw_wiki_dir, ROOT / project.paths.raw_news_dir
    if args.from_corpora or not (list(raw_wiki.glob("*.parquet")) and list(raw_news.glob("*.parquet"))):
        print(f"building raw inputs from {args.corpora} ...", flush=True)
        build_raw_from_corpora(Path(args.corpora), work / "raw")
        raw_wiki, raw_news, origin = work / "raw" / "wiki", work / "raw" / "news", "corpora"
    else:
        origin = "data/raw"
    plain = project.to_dict()
    plain["paths"].update(
        raw_wiki_dir=str(raw_wiki),
        raw_news_dir=str(raw_news),
        prepared_dir=str(work / "prepared"),
        prepare_reports_dir=str(work / "reports" / "prepare"),
        validate_dir=str(work / "validate"),
    )
    params = parse_params({k: plain[k] for k in ("paths", "seed", "prepare", "validate")})

    started = time.perf_counter()
    result = prepare.run(params)
    prepare_s = time.perf_counter() - started
    manifest = json.loads((work / "prepared" / "manifest.json").read_text())
    stats = json.loads((work / "reports" / "prepare" / "stats.json").read_text())

    frame, _ = prepare.read_raw([raw_wiki, raw_news])
    chars = int(frame["text"].fillna("").str.len().sum())
    keys = [normalize_key(t) if isinstance(t, str) else "" for t in frame["text"]]
    cjk = [char_profile(t or "").cjk_share() >= params.prepare.cjk_min_share for t in frame["text"]]
    p = params.prepare
    t0 = time.perf_counter()
    hashes = [dedup.shingle_hashes(k, p.shingle_words, p.shingle_chars, c) for k, c in zip(keys, cjk)]
    found = dedup.find_near_duplicates(hashes, p.near_dup_threshold, p.num_perm, p.minhash_seed, progress=False)
    ours_s = time.perf_counter() - t0
    baseline = datasketch_baseline(keys, cjk, p) if not args.no_baseline else (None, None)

    started = time.perf_counter()
    try:
        validate.run(params)
        valid = True
    except Exception as exc:  # the benchmark reports a failed suite instead of crashing
        print(f"validate failed: {exc}", file=sys.stderr)
        valid = False
    validate_s = time.perf_counter() - started

    rows = [
        ("docs in", f"{len(frame):,}"),
        ("characters", f"{chars:,}"),
        ("docs out", f"{result['docs_out']:,}"),
        ("prepare total (s)", f"{prepare_s:.1f}"),
        ("  read (s)", f"{manifest['seconds']['read']:.1f}"),
        ("  core (s)", f"{manifest['seconds']['core']:.1f}"),
        ("near-dup, numpy MinHash (s)", f"{ours_s:.1f} ({len(found)} dropped, all docs)"),
        (
            "near-dup, datasketch (s)",
            "skipped" if baseline[0] is None else f"{baseline[0]:.1f} ({baseline[1]} dropped, all docs)",
        ),
        ("validate total (s)", f"{validate_s:.1f} ({'passed' if valid else 'FAILED'})"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"\nprepare/validate benchmark ({origin}, {os.cpu_count()} cores)")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    report = {
        "created_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "input": origin,
        "docs_in": len(frame),
        "chars": chars,
        "docs_out": result["docs_out"],
        "prepare_s": round(prepare_s, 2),
        "prepare_phases_s": manifest["seconds"],
        "near_dup_numpy_s": round(ours_s, 2),
        "near_dup_numpy_dropped": len(found),
        "near_dup_datasketch_s": None if baseline[0] is None else round(baseline[0], 2),
        "near_dup_datasketch_dropped": baseline[1],
        "validate_s": round(validate_s, 2),
        "validate_passed": valid,
        "stats": stats,
    }
    out = ROOT / "bench" / "results" / "prepare_throughput.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
