"""Stage tests of ingest_wiki on the real dump samples (../shared/corpora) and on broken inputs.

Each real sample goes through the core (`ingest_file`); the whole default params section goes
through the CLI exactly as `dvc repro` runs it; the bad inputs go through `run()` to check that
the error names the file and that no partial output is left where downstream would read it.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline_tasks.config import parse_params
from pipeline_tasks.errors import DataError
from pipeline_tasks.ingest import ingest_wiki
from pipeline_tasks.ingest.ingest_wiki import ingest_file, run, worker_pool
from pipeline_tasks.ingest.params import IngestWikiParams, WikiSourceParams

FORBIDDEN = ("{{", "}}", "[[", "]]", "{|", "|}", "<ref", "\r")
GENSIM = "wikipedia_dumps/piskvorky_gensim/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
TINY = "wikipedia_dumps/Zulko_wiki_dump_extractor/tiny_dump.xml.bz2"
JAWIKI_TRUNCATED = "wikipedia_dumps/bad/ssvb_xztextfilter/jawiki-truncated-100k.xml.xz"


@pytest.fixture(scope="module")
def default_sources(repo_root) -> dict[str, dict]:
    """The ingest_wiki sources of the repository's params.yaml, by name."""
    raw = yaml.safe_load((repo_root / "params.yaml").read_text(encoding="utf-8"))
    return {s["name"]: s for s in raw["ingest_wiki"]["sources"]}


def ingest(corpora: Path, tmp_path: Path, spec: dict, workers: int = 1, **cfg) -> tuple[dict, pa.Table]:
    source = WikiSourceParams(**spec)
    params = IngestWikiParams(sources=(source,), **cfg)
    path = corpora / spec["mirror_path"] if "mirror_path" in spec else Path(spec["path"])
    out = tmp_path / f"{source.name}.parquet"
    tmp_path.mkdir(parents=True, exist_ok=True)
    with worker_pool(workers) as pool:
        stats = ingest_file(path, out, source, params, pool, window=2 * workers)
    return stats, pq.read_table(out)


def assert_clean_table(table: pa.Table, source: str) -> None:
    rows = table.to_pylist()
    assert table.column_names == ["id", "kind", "source", "lang", "title", "text", "date", "url"]
    assert len({r["id"] for r in rows}) == len(rows)
    for row in rows:
        assert row["kind"] == "wiki" and row["source"] == source and row["id"].startswith(f"{source}:")
        text = row["text"]
        for token in FORBIDDEN:
            assert token not in text.lower(), f"{row['title']!r}: {token!r} left in the text"
        assert text == text.strip() and "  " not in text and "\n\n\n" not in text


def test_ingest_gensim_dump_keeps_articles_and_drops_redirects(corpora, tmp_path, default_sources):
    stats, table = ingest(corpora, tmp_path, default_sources["enwiki_gensim"])
    assert_clean_table(table, "enwiki_gensim")
    skipped = stats["skipped"]
    assert stats["pages_seen"] == 206 and stats["pages_kept"] + sum(skipped.values()) == 206
    # README: 206 pages, 205 in ns 0, 100 redirects (one of them is the ns-4 page) -> 106 candidates
    assert skipped["namespace"] == 1 and skipped["redirect"] == 99
    assert skipped["disambiguation"] >= 5  # Alien, Ada, Austin (disambiguation), ...
    assert 90 <= stats["pages_kept"] <= 106 and stats["lang"] == "en" and stats["dbname"] == "enwiki"
    rows = {r["title"]: r for r in table.to_pylist()}
    assert "AccessibleComputing" not in rows and "Austin (disambiguation)" not in rows
    anarchism = rows["Anarchism"]
    assert anarchism["url"] == "https://en.wikipedia.org/wiki/Anarchism" and anarchism["lang"] == "en"
    assert anarchism["text"].startswith("Anarchism is a political philosophy")
    assert "\nHistory\n" in anarchism["text"]  # section headings stay as lines
    assert table.schema.field("date").type.tz == "UTC"
    dates = [r["date"] for r in rows.values()]
    assert min(dates).year >= 2003 and max(dates).year == 2016


def test_ingest_table_markup_sample_removes_every_table(corpora, tmp_path, default_sources):
    stats, table = ingest(corpora, tmp_path, default_sources["enwiki_tables"])
    assert_clean_table(table, "enwiki_tables")
    assert stats["pages_kept"] == 5 and stats["dbname"] is None and stats["lang"] == "en"  # lang from params
    for text in table.column("text").to_pylist():
        assert not any(line.startswith(("|", "!")) for line in text.split("\n"))
        assert "wikitable" not in text and "style=" not in text and "colspan" not in text


def test_ingest_bgwiki_reads_utf16_and_localized_namespaces(corpora, tmp_path, default_sources):
    stats, table = ingest(corpora, tmp_path, default_sources["bgwiki_gensim"])
    assert_clean_table(table, "bgwiki_gensim")
    assert stats["skipped"] == {"namespace": 2} and stats["lang"] == "bg"
    row = table.to_pylist()[0]
    assert row["title"] == "Григориански календар"
    assert (
        row["url"]
        == "https://bg.wikipedia.org/wiki/"
        + "%D0%93%D1%80%D0%B8%D0%B3%D0%BE%D1%80%D0%B8%D0%B0%D0%BD%D1%81%D0%BA%D0%B8_%D0%BA%D0%B0%D0%BB%D0%B5%D0%BD%D0%B4%D0%B0%D1%80"
    )
    assert row["text"].startswith("Григорианският календар")
    assert "Файл:" not in row["text"] and "Категория:" not in row["text"]


def test_ingest_wikipedia2vec_sample_schema_09(corpora, tmp_path, default_sources):
    stats, table = ingest(corpora, tmp_path, default_sources["enwiki_wikipedia2vec"])
    assert_clean_table(table, "enwiki_wikipedia2vec")
    assert stats["skipped"] == {"redirect": 1}
    assert sorted(table.column("title").to_pylist()) == ["Accessibility", "Computer accessibility"]


def test_ingest_tiny_dump_schema_011_without_siteinfo(corpora, tmp_path, default_sources):
    stats, table = ingest(corpora, tmp_path, default_sources["enwiki_tiny_dump"])
    assert_clean_table(table, "enwiki_tiny_dump")
    assert stats["pages_seen"] == 70 and stats["skipped"]["redirect"] == 64 and stats["pages_kept"] <= 6
    assert set(table.column("lang").to_pylist()) == {"en"}
    assert "Abraham Lincoln" in table.column("title").to_pylist()


def test_ingest_ltgwiki_uncompressed_xml_filters_namespaces(corpora, tmp_path, default_sources):
    stats, table = ingest(corpora, tmp_path, default_sources["ltgwiki_smallwiki"])
    assert_clean_table(table, "ltgwiki_smallwiki")
    assert stats["pages_seen"] == 2004 and stats["skipped"]["namespace"] == 2004 - 1050
    assert stats["lang"] == "ltg" and table.num_rows > 300
    assert all(url.startswith("https://ltg.wikipedia.org/wiki/") for url in table.column("url").to_pylist())


@pytest.mark.parametrize("name,articles", [("wikitext2_valid", 60), ("wikitext2_test", 62)])
def test_ingest_wikitext2_raw_splits_articles(corpora, tmp_path, default_sources, name, articles):
    stats, table = ingest(corpora, tmp_path, default_sources[name])
    assert_clean_table(table, name)
    assert stats["pages_seen"] == articles and stats["pages_kept"] >= articles - 2
    for text in table.column("text").to_pylist():
        assert " @-@ " not in text and " = = " not in text
    assert table.column("date").null_count == table.num_rows


def test_ingest_wikiextractor_shard(corpora, tmp_path, default_sources):
    stats, table = ingest(corpora, tmp_path, default_sources["enwiki_wikiextractor"])
    assert_clean_table(table, "enwiki_wikiextractor")
    assert stats["pages_seen"] == 111
    rows = {r["title"]: r for r in table.to_pylist()}
    assert rows["Anarchism"]["text"].startswith("Anarchism is a political philosophy")
    assert rows["Anarchism"]["id"] == "enwiki_wikiextractor:12"


def test_ingest_same_output_for_every_compression_and_multistream(corpora, tmp_path):
    xml = bz2.decompress((corpora / TINY).read_bytes())
    starts = [i for i in range(len(xml)) if xml.startswith(b"<page>", i)][::10]
    cuts = [0, *starts[1:], len(xml)]
    variants = {
        "multistream.xml.bz2": b"".join(bz2.compress(xml[a:b]) for a, b in zip(cuts, cuts[1:])),
        "dump.dat": lzma.compress(xml),  # xz content behind a misleading name: detected by magic bytes
        "dump.xml.gz": gzip.compress(xml),
        "dump.xml": xml,
    }
    _, reference = ingest(corpora, tmp_path, {"name": "ref", "mirror_path": TINY, "lang": "en"})
    for file_name, data in variants.items():
        (tmp_path / file_name).write_bytes(data)
        for workers, decoder in ((1, "thread"), (2, "thread"), (2, "pool")):  # pool: bz2 blocks in the workers
            _, table = ingest(
                corpora,
                tmp_path,
                {"name": "v", "path": str(tmp_path / file_name), "lang": "en"},
                workers=workers,
                bz2_decoder=decoder,
            )
            assert table.column("text").to_pylist() == reference.column("text").to_pylist(), (file_name, decoder)


def test_ingest_output_is_identical_with_a_worker_pool(corpora, tmp_path, default_sources):
    spec = default_sources["enwiki_tables"]
    _, serial = ingest(corpora, tmp_path / "a", spec, workers=1, batch_pages=2)
    _, pooled = ingest(corpora, tmp_path / "b", spec, workers=2, batch_pages=2)
    assert serial.equals(pooled)


@pytest.mark.skipif(
    os.environ.get("CI") == "true", reason="wall-clock limit is unreliable on a loaded 2-core CI machine"
)
def test_ingest_page_over_time_limit_is_skipped_in_worker(tmp_path):
    slow = " ".join(f"[[Link {i}|text {i}]] ''word''" for i in range(50_000))
    pages = "".join(
        f"<page><title>{t}</title><ns>0</ns><id>{i}</id><revision><timestamp>2020-01-01T00:00:00Z"
        f"</timestamp><text>{body}</text></revision></page>"
        for i, (t, body) in enumerate([("A", "First page text."), ("Slow", slow), ("B", "Last page.")])
    )
    dump = tmp_path / "slow.xml"
    dump.write_text(f"<mediawiki>{pages}</mediawiki>", encoding="utf-8")
    stats, table = ingest(
        Path("/"),
        tmp_path,
        {"name": "slow", "path": str(dump)},
        workers=2,
        cleaner="mwparserfromhell",
        page_timeout_s=0.3,
        min_chars=1,
    )
    assert stats["skipped"] == {"parse_timeout": 1}
    assert table.column("title").to_pylist() == ["A", "B"]


def test_ingest_oversize_pages_skipped_or_truncated(corpora, tmp_path):
    spec = {"name": "g", "mirror_path": GENSIM}
    skipped, table_skip = ingest(corpora, tmp_path / "s", spec, max_page_bytes=60_000)
    cut, table_cut = ingest(corpora, tmp_path / "t", spec, max_page_bytes=60_000, on_oversize="truncate")
    assert skipped["skipped"]["too_large"] == cut["pages_truncated"] > 10
    assert table_cut.num_rows == table_skip.num_rows + cut["pages_truncated"]
    assert max(len(t.encode()) for t in table_cut.column("text").to_pylist()) <= 60_000
    assert_clean_table(table_cut, "g")


def test_ingest_max_pages_and_min_chars(corpora, tmp_path):
    stats, table = ingest(corpora, tmp_path, {"name": "g", "mirror_path": GENSIM}, max_pages=5)
    assert table.num_rows == stats["pages_kept"] == 5 and stats["pages_seen"] < 206
    long_only, _ = ingest(corpora, tmp_path, {"name": "g", "mirror_path": GENSIM}, min_chars=20_000)
    assert 0 < long_only["pages_kept"] < 98 and long_only["skipped"]["too_short"] > 0


def test_ingest_memory_does_not_grow_with_the_dump_size(corpora, tmp_path, monkeypatch):
    monkeypatch.setattr(ingest_wiki, "ROW_GROUP_CHARS", 500_000)  # flush row groups often
    xml = bz2.decompress((corpora / GENSIM).read_bytes())  # 6.1 MB
    first, last = xml.index(b"<page>"), xml.rindex(b"</page>") + len(b"</page>")
    for k in (1, 3):  # the same dump with its pages repeated k times
        (tmp_path / f"x{k}.xml").write_bytes(xml[:first] + xml[first:last] * k + xml[last:])

    def traced_peak(k: int) -> int:
        tracemalloc.start()
        try:
            ingest(corpora, tmp_path, {"name": "g", "path": str(tmp_path / f"x{k}.xml")}, batch_pages=4)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    ingest(corpora, tmp_path, {"name": "g", "path": str(tmp_path / "x1.xml")}, batch_pages=4)  # warm imports
    peak1, peak3 = traced_peak(1), traced_peak(3)
    assert peak3 < 1.5 * peak1, f"peak grew from {peak1} to {peak3} bytes with 3x the pages"
    assert peak3 < len(xml) * 3 / 4, f"peak {peak3} bytes for {len(xml) * 3} bytes of XML"


# ---------------------------------------------------------------------------- run() and errors


def stage_params(tmp_path: Path, sources: list[dict], **cfg):
    cfg = {"workers": 1, **cfg}
    return parse_params(
        {
            "paths": {"raw_wiki_dir": str(tmp_path / "raw" / "wiki"), "downloads_dir": str(tmp_path / "downloads")},
            "ingest_wiki": {"sources": sources, **cfg},
        }
    )


def test_run_writes_parquet_stats_and_manifest(corpora, tmp_path, mirror_env):
    params = stage_params(
        tmp_path,
        [
            {
                "name": "w2v",
                "mirror_path": "wikipedia_dumps/wikipedia2vec_wikipedia2vec/enwiki-pages-articles-sample.xml.bz2",
                "sha256": "c6d24282b7bd5176408f7ae41c997f942a67c9ce4bf3495766ff884935af6886",
            }
        ],
    )
    result = run(params)
    out = tmp_path / "raw" / "wiki"
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "stats.json", "w2v.parquet"]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["sources"]["w2v"]["pages_kept"] == 2 == result["pages_kept"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "ingest_wiki" and manifest["inputs"]["w2v"].startswith("c6d24282")
    assert set(manifest["outputs"]) == {"stats.json", "w2v.parquet"}


def _bad_sources(corpora: Path, tmp_path: Path) -> dict[str, tuple[Path, str]]:
    gensim = (corpora / GENSIM).read_bytes()
    half = tmp_path / "enwiki-half.xml.bz2"
    half.write_bytes(gensim[: len(gensim) // 2])
    bomb = tmp_path / "bomb.xml"
    bomb.write_text(
        '<?xml version="1.0"?>\n<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 '
        '"&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">]>\n<mediawiki><page><title>&lol2;</title>'
        "<ns>0</ns><id>1</id><revision><text>x</text></revision></page></mediawiki>"
    )
    empty = tmp_path / "empty.xml.bz2"
    empty.write_bytes(b"")
    return {
        "truncated_bz2": (half, r"enwiki-half\.xml\.bz2: the compressed stream is truncated .*last complete page"),
        "truncated_xml": (
            corpora / JAWIKI_TRUNCATED,
            r"jawiki-truncated-100k\.xml\.xz: XML ends early .*line 100001.*last complete page: id 452",
        ),
        "entity_bomb": (bomb, r"bomb\.xml: refused to parse"),
        "empty": (empty, r"empty\.xml\.bz2: empty file"),
    }


@pytest.mark.parametrize(
    "case,workers",
    [
        ("truncated_bz2", 1),
        ("truncated_bz2", 2),
        ("truncated_xml", 1),
        ("truncated_xml", 2),
        ("entity_bomb", 1),
        ("empty", 1),
    ],
)
def test_run_bad_input_fails_naming_the_file_and_keeps_previous_output(corpora, tmp_path, case, workers):
    path, message = _bad_sources(corpora, tmp_path)[case]
    out = tmp_path / "raw" / "wiki"
    out.mkdir(parents=True)
    (out / "old.parquet").write_bytes(b"previous run")
    params = stage_params(
        tmp_path,
        [{"name": "good", "mirror_path": TINY, "path": str(corpora / TINY)}, {"name": "bad", "path": str(path)}],
        workers=workers,
        bz2_decoder="pool",
    )
    with pytest.raises(DataError, match=message):
        run(params)
    assert [p.name for p in out.iterdir()] == ["old.parquet"]
    assert (out / "old.parquet").read_bytes() == b"previous run"
    assert [p.name for p in out.parent.iterdir()] == ["wiki"]  # no temporary folder left behind


def test_run_bad_input_leaves_no_output_dir_when_there_was_none(corpora, tmp_path):
    path, message = _bad_sources(corpora, tmp_path)["truncated_xml"]
    with pytest.raises(DataError, match=message):
        run(stage_params(tmp_path, [{"name": "bad", "path": str(path)}]))
    assert list((tmp_path / "raw").iterdir()) == []


@pytest.mark.parametrize(
    "case,seen,workers", [("truncated_xml", 238, 1), ("truncated_bz2", None, 1), ("truncated_bz2", None, 2)]
)
def test_run_keep_complete_pages_of_a_truncated_dump(corpora, tmp_path, case, seen, workers):
    path, _ = _bad_sources(corpora, tmp_path)[case]
    run(
        stage_params(
            tmp_path,
            [{"name": "cut", "path": str(path)}],
            on_truncated="keep_complete_pages",
            workers=workers,
            bz2_decoder="pool",
        )
    )
    stats = json.loads((tmp_path / "raw" / "wiki" / "stats.json").read_text())["sources"]["cut"]
    assert stats["truncated_input"] and stats["pages_kept"] > 10
    if seen:
        assert stats["pages_seen"] == seen  # the 238 complete pages of the jawiki sample
        assert stats["lang"] == "ja"
    table = pq.read_table(tmp_path / "raw" / "wiki" / "cut.parquet")
    assert_clean_table(table, "cut")


def test_cli_runs_the_default_params_from_the_repo_root(repo_root, corpora, tmp_path):
    out = tmp_path / "wiki"
    env = {**os.environ, "LMPIPE_DATA_MIRROR": str(corpora)}
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline_tasks", "ingest_wiki", "-S", f"paths.raw_wiki_dir={out}"],
        cwd=repo_root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    stats = json.loads((out / "stats.json").read_text())
    names = {
        "enwiki_gensim",
        "enwiki_tables",
        "bgwiki_gensim",
        "enwiki_wikipedia2vec",
        "enwiki_tiny_dump",
        "ltgwiki_smallwiki",
        "wikitext2_valid",
        "wikitext2_test",
        "enwiki_wikiextractor",
    }
    assert set(stats["sources"]) == names and summary["pages_kept"] == stats["totals"]["pages_kept"] > 800
    for name in names:
        assert_clean_table(pq.read_table(out / f"{name}.parquet"), name)


def test_cli_bad_source_exits_1_with_the_file_in_the_message(repo_root, corpora, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(
        yaml.safe_dump(
            {
                "paths": {"raw_wiki_dir": str(tmp_path / "wiki")},
                "ingest_wiki": {"sources": [{"name": "bad", "path": str(corpora / JAWIKI_TRUNCATED)}]},
            }
        )
    )
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline_tasks", "ingest_wiki", "--params", str(params)],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "jawiki-truncated-100k.xml.xz: XML ends early" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "wiki").exists()


# The child reports its peak RSS after imports (pyarrow, the readers) and after the stage, so the
# difference is what the stage itself held, C buffers (expat, bz2) included.
PEAK_RSS_SCRIPT = """
import json, resource, sys
from pipeline_tasks import cli
from pipeline_tasks.ingest import ingest_wiki
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
code = cli.main(["ingest_wiki", "--params", sys.argv[1]])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"code": code, "grew_bytes": (after - before) * 1024}))
"""


def _peak_rss_growth(repo_root: Path, tmp_path: Path, dump: Path) -> tuple[int, dict]:
    """(bytes the peak RSS grew while ``ingest_wiki`` read ``dump``, its stats + titles kept), in a new process."""
    out = tmp_path / f"wiki-{dump.stem}"
    params = tmp_path / f"params-{dump.stem}.yaml"
    source = {"name": "dump", "path": str(dump)}
    section = {"workers": 1, "max_page_bytes": 1 << 20, "min_chars": 10, "sources": [source]}
    params.write_text(
        yaml.safe_dump({"paths": {"raw_wiki_dir": str(out), "downloads_dir": str(tmp_path)}, "ingest_wiki": section})
    )
    proc = subprocess.run(
        [sys.executable, "-c", PEAK_RSS_SCRIPT, str(params)],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {}
    assert report.get("code") == 0, proc.stderr[-3000:]
    stats = json.loads((out / "stats.json").read_text())["sources"]["dump"]
    return report["grew_bytes"], {**stats, "titles": pq.read_table(out / "dump.parquet").column("title").to_pylist()}


def test_cli_memory_is_bounded_by_max_page_bytes_not_by_a_huge_page(repo_root, tmp_path):
    small_page = (
        b"<page><title>Small</title><ns>0</ns><id>2</id><revision><text>"
        + b"An ordinary article that is kept. " * 5
        + b"</text></revision></page></mediawiki>"
    )
    head = b"<mediawiki><page><title>Huge</title><ns>0</ns><id>1</id><revision><text>"
    page_bytes = 300 << 20
    compressor = bz2.BZ2Compressor()
    parts = [compressor.compress(head)]
    chunk = b"a" * (1 << 20)  # one letter repeated: 300 MB of page text compress to a few hundred bytes
    parts += [compressor.compress(chunk) for _ in range(page_bytes // len(chunk))]
    parts += [compressor.compress(b"</text></revision></page>" + small_page), compressor.flush()]
    hostile = tmp_path / "hostile.xml.bz2"
    hostile.write_bytes(b"".join(parts))
    control = tmp_path / "control.xml.bz2"  # the same dump with a 1 KB page: the stage's own overhead
    control.write_bytes(bz2.compress(head + b"a" * 1000 + b"</text></revision></page>" + small_page))
    assert hostile.stat().st_size < 10_000

    grew, stats = _peak_rss_growth(repo_root, tmp_path, hostile)
    grew_control, _ = _peak_rss_growth(repo_root, tmp_path, control)
    assert stats["pages_seen"] == 2 and stats["skipped"] == {"too_large": 1} and stats["titles"] == ["Small"]
    # before the cap was applied while streaming, the page cost ~600 MB (its text twice over)
    assert grew - grew_control < page_bytes / 10, f"peak RSS grew by {grew} bytes, {grew_control} for the control"
