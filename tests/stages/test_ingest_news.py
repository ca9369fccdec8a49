"""Stage tests of ``ingest_news``: the real corpora through the CLI, and bad inputs written here."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline_tasks.config import parse_params
from pipeline_tasks.errors import DataError, SourceError
from pipeline_tasks.ingest.ingest_news import news_schema, read_news_table, run
from pipeline_tasks.ingest.sources import tree_digest

LABELS = ["business", "scitech", "sports", "world"]


# ---------------------------------------------------------------------------------------------
# the real corpora, default params, through `python -m pipeline_tasks ingest_news`
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_out(corpora, repo_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("news") / "raw_news"
    env = {**os.environ, "LMPIPE_DATA_MIRROR": str(corpora)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline_tasks",
            "ingest_news",
            "-S",
            f"paths.raw_news_dir={out}",
            "-S",
            f"paths.downloads_dir={out.parent / 'downloads'}",
        ],
        cwd=repo_root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["quarantined"] == 0 and summary["kept"] == summary["records"]
    return out


def rows(out: Path, source: str) -> list[dict]:
    return read_news_table(out / f"{source}.parquet").to_pylist()


def stats(out: Path) -> dict:
    return json.loads((out / "stats.json").read_text())["sources"]


def test_ingest_news_real_outputs_have_exact_schema_stats_and_manifest(real_out):
    names = ["ag_news_test", "ag_news_train", "bbc", "huffpost_v2", "huffpost_v3"]
    assert sorted(p.stem for p in real_out.glob("*.parquet")) == names
    for name in names:
        stored = pq.read_schema(real_out / f"{name}.parquet")
        assert stored.names == news_schema().names
        assert str(stored.field("date").type.tz) == "UTC"
        assert read_news_table(real_out / f"{name}.parquet").schema == news_schema()
    assert list((real_out / "quarantine").iterdir()) == []
    manifest = json.loads((real_out / "manifest.json").read_text())
    assert manifest["stage"] == "ingest_news" and set(manifest["inputs"]) == set(names)
    assert manifest["inputs"]["huffpost_v3"] == "2ccd587afdd6cb7bcf2c1dfbd04199278c0405fbda4ac57bec170403a8f12073"
    assert "bbc.parquet" in manifest["outputs"]


def test_ingest_news_real_ag_train_subset_is_balanced_and_clean(real_out):
    data = rows(real_out, "ag_news_train")
    assert len(data) == 20_000 == len({r["id"] for r in data})
    assert stats(real_out)["ag_news_train"]["labels"] == dict.fromkeys(LABELS, 5_000)
    assert {r["split"] for r in data} == {None} and {r["kind"] for r in data} == {"news"}
    assert all(r["text"].startswith(r["title"] + "\n") for r in data)
    for artefact in ("#39;", "quot;", "&lt;", "&amp;", "\\", "<b>", "  "):
        assert not [r["id"] for r in data if artefact in r["text"]], artefact
    assert any("'s " in r["text"] for r in data)  # " #39;s" became "'s"


def test_ingest_news_real_ag_test_is_the_fixed_test_split(real_out):
    data = rows(real_out, "ag_news_test")
    assert len(data) == 7_600
    assert {r["split"] for r in data} == {"test"}
    assert stats(real_out)["ag_news_test"]["labels"] == dict.fromkeys(LABELS, 1_900)
    first = next(r for r in data if r["title"].startswith("The Race is On"))
    assert "A second team of rocketeers" in first["text"] and "$10 million" in first["text"]


def test_ingest_news_real_bbc_folder_all_articles_with_latin1_fallback(real_out):
    data = {r["id"]: r for r in rows(real_out, "bbc")}
    assert len(data) == 2_225
    s = stats(real_out)["bbc"]
    assert s["ignored_files"] == ["README.TXT"] and s["fallback_decoded"] == ["sport/199.txt"]
    assert s["labels"] == {"business": 510, "null": 803, "scitech": 401, "sports": 511}
    assert s["unmapped_raw_labels"] == {"politics": 417, "entertainment": 386}
    mutu = data["bbc:sport/199.txt"]
    assert mutu["title"] == "Chelsea sack Mutu" and "£15.8m" in mutu["text"]
    assert mutu["label"] == "sports" and mutu["url"] is None and mutu["date"] is None


def test_ingest_news_real_huffpost_v3_dates_labels_and_urls(real_out):
    data = rows(real_out, "huffpost_v3")
    assert len(data) == 9_999
    dates = [r["date"] for r in data]
    assert None not in dates
    assert min(dates).isoformat()[:10] == "2018-05-01" and max(dates).isoformat()[:10] == "2022-09-23"
    assert len({(d.year, d.month) for d in dates}) == 53
    assert all(r["url"].startswith("https://www.huff") for r in data) and len({r["url"] for r in data}) == 9_999
    by_raw = {}
    for r in data:
        by_raw.setdefault(r["raw_label"], set()).add(r["label"])
    assert by_raw["WORLD NEWS"] == {"world"} and by_raw["SPORTS"] == {"sports"}
    assert by_raw["MONEY"] == {"business"} and by_raw["SCIENCE"] == {"scitech"}
    assert by_raw["POLITICS"] == {None} and by_raw["U.S. NEWS"] == {None}
    assert len(rows(real_out, "huffpost_v2")) == 4_782


# ---------------------------------------------------------------------------------------------
# bad inputs, written by the tests
# ---------------------------------------------------------------------------------------------
AG = {
    "format": "csv",
    "columns": {"label": 0, "title": 1, "body": 2},
    "label_map": {"1": "world", "2": "sports"},
    "repair_entities": True,
    "backslash_breaks": True,
}
HUFF = {
    "format": "jsonl",
    "label_map": {"SPORTS": "sports"},
    "id_fields": ["url"],
    "columns": {"title": "headline", "body": "short_description", "label": "category", "date": "date", "url": "link"},
}


def make_params(tmp_path: Path, sources: list[dict], **section):
    return parse_params(
        {
            "paths": {"raw_news_dir": str(tmp_path / "out"), "downloads_dir": str(tmp_path / "downloads")},
            "ingest_news": {"sources": sources, **section},
        }
    )


def ag_lines(n: int, start: int = 0) -> bytes:
    return b"".join(
        f'"{1 + i % 2}","Title {i}","Body of article {i} #39;s &lt;b&gt;news&lt;/b&gt;"\n'.encode()
        for i in range(start, start + n)
    )


def huff_line(i: int, date: str = "2022-01-02", category: str = "SPORTS") -> str:
    return json.dumps(
        {
            "link": f"https://example.org/{i}",
            "headline": f"Headline {i}",
            "category": category,
            "short_description": f"Story {i}",
            "authors": "A",
            "date": date,
        }
    )


def quarantine(tmp_path: Path, source: str) -> list[dict]:
    path = tmp_path / "out" / "quarantine" / f"{source}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_ingest_news_quarantines_bad_rows_under_threshold(tmp_path):
    bad = b'"1","too","many","columns"\n"2","caf\xe9 \xff","invalid utf-8"\n'
    (tmp_path / "ag.csv").write_bytes(ag_lines(20) + bad + ag_lines(20, start=20))
    result = run(make_params(tmp_path, [{"name": "ag", "path": str(tmp_path / "ag.csv"), **AG}]))
    assert (result["kept"], result["quarantined"]) == (40, 2)
    s = json.loads((tmp_path / "out" / "stats.json").read_text())["sources"]["ag"]
    assert s["reasons"] == {"wrong_column_count": 1, "undecodable": 1}
    assert s["bad_share"] == pytest.approx(2 / 42, abs=1e-6)
    q = quarantine(tmp_path, "ag")
    assert [(e["record"], e["reason"]) for e in q] == [(21, "wrong_column_count"), (22, "undecodable")]
    assert all(e["file"] == str(tmp_path / "ag.csv") for e in q)
    assert r"caf\xe9 \xff" in q[1]["raw"] and set(q[0]) == {"file", "record", "reason", "detail", "raw"}
    table = read_news_table(tmp_path / "out" / "ag.parquet").to_pylist()
    assert len(table) == 40 and table[0]["text"] == "Title 0\nBody of article 0's news"


def test_ingest_news_fails_above_threshold_and_leaves_no_partial_output(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the failed source's quarantine is kept under ./reports
    (tmp_path / "good.csv").write_bytes(ag_lines(30))
    bad = b'"1","x"\n"2","caf\xe9","y"\n"1","a","b","c"\n'
    (tmp_path / "bad.csv").write_bytes(ag_lines(10) + bad)
    old = tmp_path / "out"
    old.mkdir()
    (old / "previous.parquet").write_text("the last good run")
    params = make_params(
        tmp_path,
        [
            {"name": "good", "path": str(tmp_path / "good.csv"), **AG},
            {"name": "bad", "path": str(tmp_path / "bad.csv"), **AG},
        ],
    )
    with pytest.raises(DataError) as err:
        run(params)
    message = str(err.value)
    assert str(tmp_path / "bad.csv") in message and "3 of 13" in message and "23.08%" in message
    assert "wrong_column_count 2, undecodable 1" in message and "max_bad_share" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.csv", "good.csv", "out", "reports"]  # no temp dir
    assert [p.name for p in old.iterdir()] == ["previous.parquet"]  # the old output is untouched


def test_ingest_news_per_source_max_bad_share_overrides_section(tmp_path):
    (tmp_path / "bad.csv").write_bytes(ag_lines(10) + b'"1","x"\n')
    run(make_params(tmp_path, [{"name": "bad", "path": str(tmp_path / "bad.csv"), "max_bad_share": 0.2, **AG}]))
    assert quarantine(tmp_path, "bad")[0]["reason"] == "wrong_column_count"


def test_ingest_news_quarantines_json_that_is_not_json_or_not_an_object(tmp_path):
    lines = [huff_line(i) for i in range(40)]
    lines[5] = '{"link": "https://example.org/5", "headline": "cut off'
    lines[9] = '"just a string"'
    (tmp_path / "h.json").write_text("\n".join(lines))  # no trailing newline
    run(make_params(tmp_path, [{"name": "h", "path": str(tmp_path / "h.json"), **HUFF}], max_bad_share=0.06))
    reasons = [(e["record"], e["reason"]) for e in quarantine(tmp_path, "h")]
    assert reasons == [(6, "invalid_json"), (10, "not_an_object")]
    assert len(read_news_table(tmp_path / "out" / "h.parquet")) == 38


def test_ingest_news_quarantines_unparsable_date_and_missing_field(tmp_path):
    lines = [huff_line(i) for i in range(50)]
    lines[3] = huff_line(3, date="2022-02-30")
    lines[7] = json.dumps(
        {"link": "https://example.org/7", "headline": "No date key", "category": "SPORTS", "short_description": ""}
    )
    (tmp_path / "h.json").write_text("\n".join(lines) + "\n")
    run(make_params(tmp_path, [{"name": "h", "path": str(tmp_path / "h.json"), **HUFF}]))
    q = quarantine(tmp_path, "h")
    assert [(e["record"], e["reason"]) for e in q] == [(4, "bad_date"), (8, "missing_field")]
    assert "2022-02-30" in q[0]["detail"] and q[1]["detail"] == "date"
    table = read_news_table(tmp_path / "out" / "h.parquet")
    assert table.num_rows == 48 and table.schema.field("date").type.unit == "s"


def test_ingest_news_empty_file_is_a_clear_error(tmp_path):
    (tmp_path / "empty.csv").write_bytes(b"")
    with pytest.raises(DataError, match=rf"{tmp_path / 'empty.csv'}: no records \(the file is empty"):
        run(make_params(tmp_path, [{"name": "empty", "path": str(tmp_path / "empty.csv"), **AG}]))
    assert not (tmp_path / "out").exists()


def test_ingest_news_headered_csv_member_streamed_from_zip(tmp_path):
    member = (
        b"class_index,title,description\n"
        + b"".join(f'{1 + i % 2},Title {i},"Body, {i}"\n'.encode() for i in range(12))
        + b'2,Title 0,"Body, 0"\n'
    )
    archive = tmp_path / "archive.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("train.csv", member)
    source = {
        "name": "kaggle",
        "path": str(archive),
        "member": "train.csv",
        "header": True,
        "sha256": hashlib.sha256(archive.read_bytes()).hexdigest(),
        "member_sha256": hashlib.sha256(member).hexdigest(),
        "max_bad_share": 0.1,
        **AG,
        "columns": {"label": "class_index", "title": "title", "body": "description"},
    }
    run(make_params(tmp_path, [source]))
    table = read_news_table(tmp_path / "out" / "kaggle.parquet").to_pylist()
    assert len(table) == 12 and table[1] == {**table[1], "label": "sports", "text": "Title 1\nBody, 1"}
    (dup,) = quarantine(tmp_path, "kaggle")  # the repeated row: same title+body, same id
    assert (dup["reason"], dup["record"], dup["file"]) == ("duplicate_key", 14, f"{archive}!train.csv")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["archive.zip", "out"]  # nothing extracted
    with pytest.raises(SourceError, match="member sha256 mismatch"):
        run(make_params(tmp_path, [{**source, "member_sha256": "0" * 64}]))


def test_ingest_news_max_records_per_source_gives_a_quick_run(tmp_path):
    (tmp_path / "ag.csv").write_bytes(ag_lines(50))
    result = run(
        make_params(tmp_path, [{"name": "ag", "path": str(tmp_path / "ag.csv"), **AG}], max_records_per_source=7)
    )
    assert result["kept"] == 7
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["sources"]["ag"]["truncated"] is True


def test_ingest_news_folder_source_verified_by_tree_digest_and_latin1_quarantined(tmp_path):
    root = tmp_path / "bbc"
    for label in ("sport", "tech"):
        (root / label).mkdir(parents=True)
        for i in range(15):
            (root / label / f"{i:03d}.txt").write_text(f"{label} headline {i}\n\nBody {i}.\n\nMore {i}.\n")
    (root / "sport" / "199.txt").write_bytes(b"Chelsea sack Mutu\n\nA \xa315.8m signing.\n")
    (root / "README.TXT").write_text("not an article")
    source = {
        "name": "bbc",
        "path": str(root),
        "format": "folder",
        "tree_sha256": tree_digest(root),
        "label_map": {"sport": "sports", "tech": "scitech"},
    }
    run(make_params(tmp_path, [source]))
    (entry,) = quarantine(tmp_path, "bbc")
    assert (entry["file"], entry["reason"], entry["record"]) == (str(root / "sport" / "199.txt"), "undecodable", None)
    assert r"\xa315.8m" in entry["raw"]
    table = read_news_table(tmp_path / "out" / "bbc.parquet").to_pylist()
    assert len(table) == 30 and table[0]["text"] == "sport headline 0\nBody 0.\nMore 0."
    assert table[0]["id"] == "bbc:sport/000.txt" and table[0]["label"] == "sports"
    run(make_params(tmp_path, [{**source, "fallback_encoding": "iso-8859-1"}]))
    mutu = [r for r in read_news_table(tmp_path / "out" / "bbc.parquet").to_pylist() if r["id"] == "bbc:sport/199.txt"]
    assert mutu[0]["text"] == "Chelsea sack Mutu\nA £15.8m signing."
    (root / "tech" / "000.txt").write_text("tampered")
    with pytest.raises(SourceError, match="tree_sha256"):
        run(make_params(tmp_path, [source]))


# ---------------------------------------------------------------------------------------------
# archives and compression recognised by their content, not their name
# ---------------------------------------------------------------------------------------------
def test_ingest_news_zip_without_member_is_named_as_an_archive_even_with_a_lax_threshold(tmp_path):
    archive = tmp_path / "ag_news.csv"  # a zip saved under a CSV name
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("train.csv", ag_lines(30))
        zf.writestr("test.csv", ag_lines(5))
    with pytest.raises(SourceError) as err:
        run(make_params(tmp_path, [{"name": "ag", "path": str(archive), **AG}], max_bad_share=1.0))
    message = str(err.value)
    assert f"{archive}: this is a zip archive: set member" in message and "train.csv, test.csv" in message
    assert not (tmp_path / "out").exists()


def test_ingest_news_compressed_csv_is_read_whatever_its_name(tmp_path):
    (tmp_path / "gzip_named.csv").write_bytes(gzip.compress(ag_lines(12)))
    (tmp_path / "bz2_named.csv").write_bytes(bz2.compress(ag_lines(12)))
    (tmp_path / "plain_named.csv.gz").write_bytes(ag_lines(12))  # not compressed after all
    sources = [
        {"name": name.split(".")[0], "path": str(tmp_path / name), **AG}
        for name in ("gzip_named.csv", "bz2_named.csv", "plain_named.csv.gz")
    ]
    result = run(make_params(tmp_path, sources))
    assert result["sources"] == {"gzip_named": 12, "bz2_named": 12, "plain_named": 12} and result["quarantined"] == 0


def test_ingest_news_tar_archive_is_refused_with_a_hint(tmp_path):
    member = tmp_path / "train.csv"
    member.write_bytes(ag_lines(12))
    archive = tmp_path / "ag_news.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(member, arcname="train.csv")
    with pytest.raises(SourceError, match=rf"{archive}: this is a tar archive.*extract"):
        run(make_params(tmp_path, [{"name": "ag", "path": str(archive), **AG}], max_bad_share=1.0))


# ---------------------------------------------------------------------------------------------
# a source over the bad-record threshold keeps its quarantine for inspection
# ---------------------------------------------------------------------------------------------
def test_cli_source_over_threshold_keeps_its_quarantine_under_reports_and_names_it(tmp_path, repo_root):
    bad = b'"1","x"\n"2","caf\xe9","y"\n"1","a","b","c"\n'
    (tmp_path / "bad.csv").write_bytes(ag_lines(10) + bad)
    params = {
        "paths": {"raw_news_dir": "data/raw/news", "downloads_dir": "data/downloads"},
        "ingest_news": {"sources": [{"name": "bad", "path": "bad.csv", **AG}]},
    }
    (tmp_path / "params.yaml").write_text(json.dumps(params))
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline_tasks", "ingest_news"],
        cwd=tmp_path,  # relative paths in params.yaml are relative to the project root
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    kept = Path("reports") / "ingest_news" / "quarantine" / "bad.jsonl"
    assert f"the 3 bad records are kept in {kept}" in proc.stderr
    entries = [json.loads(line) for line in (tmp_path / kept).read_text().splitlines()]
    assert [(e["record"], e["reason"]) for e in entries] == [
        (11, "wrong_column_count"),
        (12, "undecodable"),
        (13, "wrong_column_count"),
    ]
    assert not (tmp_path / "data" / "raw").exists() or list((tmp_path / "data" / "raw").iterdir()) == []
    # the source fixed: it passes, and the quarantine kept from its failed run goes
    (tmp_path / "bad.csv").write_bytes(ag_lines(10))
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline_tasks", "ingest_news"], cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (tmp_path / kept).exists()
