"""Unit tests of the news parsing / cleaning core (pipeline_tasks.ingest.newsformats) and its params."""

from __future__ import annotations

import datetime as dt
import io

import pytest

from pipeline_tasks.config import ConfigError, load_params, parse_params
from pipeline_tasks.ingest import newsformats as nf
from pipeline_tasks.ingest.params import IngestNewsParams, NewsSourceParams

UTC = dt.UTC


# ---------------------------------------------------------------------------------------------
# cleaning
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "raw, expected",
    [
        ("&lt;b&gt;Bold&lt;/b&gt; move", "Bold move"),
        ("Tom &amp; Jerry", "Tom & Jerry"),
        ("double &amp;lt;i&amp;gt;escaped&amp;lt;/i&amp;gt;", "double escaped"),
        ('line<br/>break and <a href="x">link</a>', "line break and link"),
        ("<script>var x = 1;</script>kept <!-- note -->text", "kept text"),
        ("Texas Instruments Inc. &lt;TXN.N&gt; rose", "Texas Instruments Inc. <TXN.N> rose"),  # ticker, not a tag
        ("if a < b and c > d", "if a < b and c > d"),
        ("ﬁnance ＡＢＣ", "finance ABC"),  # NFKC: ligature and full-width letters
        ("  many\t spaces\n\nand\u00a0nbsp ", "many spaces and nbsp"),
        ("zero\u200bwidth\x07bell", "zero width bell"),
    ],
)
def test_clean_text_strips_html_normalises_and_collapses(raw, expected):
    assert nf.clean_text(raw) == expected


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Bush doesn #39;t agree", "Bush doesn't agree"),
        ("America #39;s top diplomat", "America's top diplomat"),
        ("Johnson  amp; Johnson", "Johnson & Johnson"),
        ("said  quot;no quot; today", 'said "no" today'),
        ("the  #36;10 million prize", "the $10 million prize"),
        ("Sony #146;s player", "Sony’s player"),  # cp1252 numeric reference, as browsers read it
        (" quot;It hurt quot;", '"It hurt"'),
        ("champ; and lamp;", "champ; and lamp;"),  # a word ending in 'amp;' is not an entity
    ],
)
def test_clean_text_repairs_ag_news_entities_that_lost_their_ampersand(raw, expected):
    assert nf.clean_text(raw, repair_entities=True) == expected


def test_clean_text_ag_backslash_breaks_keep_the_next_letter():
    raw = r"A second\team of rocketeers for the \$10M prize\\Next paragraph about social\network"
    assert nf.clean_text(raw, backslash_breaks=True) == (
        "A second team of rocketeers for the $10M prize Next paragraph about social network"
    )
    assert nf.clean_text(r"a\b") == r"a\b"  # other sources keep backslashes


def test_clean_text_multiline_keeps_paragraphs_one_per_line():
    body = "\nFirst  paragraph.\n\n\n  Second\tparagraph.  \n"
    assert nf.clean_text(body, multiline=True) == "First paragraph.\nSecond paragraph."
    assert nf.clean_text(body) == "First paragraph. Second paragraph."


# ---------------------------------------------------------------------------------------------
# fields
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "value, fmt, expected",
    [
        ("2022-09-23", None, dt.datetime(2022, 9, 23, tzinfo=UTC)),
        (" 2018-05-01 ", None, dt.datetime(2018, 5, 1, tzinfo=UTC)),
        ("2022-09-23T10:30:00Z", None, dt.datetime(2022, 9, 23, 10, 30, tzinfo=UTC)),
        ("2022-09-23T12:30:00+02:00", None, dt.datetime(2022, 9, 23, 10, 30, tzinfo=UTC)),
        ("23/09/2022", "%d/%m/%Y", dt.datetime(2022, 9, 23, tzinfo=UTC)),
        ("Fri, 23 Sep 2022 10:30:00 +0000", "%a, %d %b %Y %H:%M:%S %z", dt.datetime(2022, 9, 23, 10, 30, tzinfo=UTC)),
    ],
)
def test_parse_date_iso_and_declared_format_to_utc(value, fmt, expected):
    got = nf.parse_date(value, fmt)
    assert got == expected and got.utcoffset() == dt.timedelta(0)


@pytest.mark.parametrize("value, fmt", [("2022-13-45", None), ("yesterday", None), ("2022-09-23", "%d/%m/%Y")])
def test_parse_date_rejects_unparsable(value, fmt):
    with pytest.raises(ValueError):
        nf.parse_date(value, fmt)


def test_map_label_maps_known_and_keeps_unknown_raw():
    label_map = {"1": "world", "WORLD NEWS": "world"}
    assert nf.map_label("1", label_map) == ("world", "1")
    assert nf.map_label(" WORLD NEWS ", label_map) == ("world", "WORLD NEWS")
    assert nf.map_label("COMEDY", label_map) == (None, "COMEDY")
    assert nf.map_label("", label_map) == (None, None)
    assert nf.map_label(None, label_map) == (None, None)


def test_stable_key_depends_on_values_not_position():
    assert nf.stable_key(["t", "d"]) == nf.stable_key(["t", "d"])
    assert nf.stable_key(["t", "d"]) != nf.stable_key(["td", ""])  # separator matters
    assert len(nf.stable_key(["x"])) == 40


# ---------------------------------------------------------------------------------------------
# readers
# ---------------------------------------------------------------------------------------------
AG_COLUMNS = {"label": 0, "title": 1, "body": 2}


def csv_records(data: bytes, **kwargs):
    kwargs.setdefault("columns", AG_COLUMNS)
    kwargs.setdefault("header", False)
    return list(nf.read_csv_records(io.BytesIO(data), "f.csv", **kwargs))


def test_read_csv_headerless_quoted_with_multiline_field_and_record_numbers():
    data = b'"3","Title one","Body ""quoted"""\n"4","Two","line a\nline b"\n\n"1","Three","c"'
    recs = csv_records(data)
    assert [r.record for r in recs] == [1, 2, 5]
    assert recs[0].fields == {"label": "3", "title": "Title one", "body": 'Body "quoted"'}
    assert recs[1].fields["body"] == "line a\nline b"
    assert all(r.error is None for r in recs)


def test_read_csv_headered_maps_columns_by_name_and_strips_bom():
    data = b'\xef\xbb\xbfdescription,class_index,title\n"d, with comma",2,T\n'
    recs = csv_records(data, header=True, columns={"label": "class_index", "title": "title", "body": "description"})
    assert len(recs) == 1 and recs[0].record == 2
    assert recs[0].fields == {"label": "2", "title": "T", "body": "d, with comma"}


def test_read_csv_header_without_mapped_column_is_a_file_error():
    with pytest.raises(nf.FileFormatError, match=r"lacks mapped column.*description"):
        csv_records(
            b"class,title,desc\n1,a,b\n",
            header=True,
            columns={"label": "class", "title": "title", "body": "description"},
        )


def test_read_csv_flags_wrong_column_count_and_invalid_utf8_per_record():
    data = b'"1","ok","fine"\n"2","too","many","cols"\n"3","caf\xe9","latin-1 byte"\n"4","ok2","fine"\n'
    recs = csv_records(data)
    assert [(r.record, r.error.reason if r.error else None) for r in recs] == [
        (1, None),
        (2, "wrong_column_count"),
        (3, "undecodable"),
        (4, None),
    ]
    assert r"\xe9" in recs[2].raw  # the bad byte is shown, not lost
    fixed = csv_records(data, fallback_encoding="cp1252")
    assert fixed[2].error is None and fixed[2].fields["title"] == "café" and fixed[2].fallback_decoded


def test_read_csv_unterminated_quote_is_one_bad_record():
    recs = csv_records(b'"1","a","b"\n"2","never closed,"x"\n')
    assert recs[0].error is None
    assert recs[-1].error is not None and recs[-1].error.reason == "csv_error" and recs[-1].record == 2


def jsonl_records(data: bytes, **kwargs):
    columns = {"title": "headline", "body": "short_description", "label": "category", "date": "date", "url": "link"}
    return list(nf.read_jsonl_records(io.BytesIO(data), "f.json", columns=columns, **kwargs))


def test_read_jsonl_any_key_order_and_last_line_without_newline():
    data = (
        b'{"link": "u1", "headline": "H1", "category": "TECH", "short_description": "S1", "date": "2022-01-02"}\n'
        b"\n"
        b'{"category": "SPORTS", "headline": "H2", "authors": "", "link": "u2", "short_description": null, '
        b'"date": "2021-03-04"}'
    )
    recs = jsonl_records(data)
    assert [r.record for r in recs] == [1, 3]
    assert recs[1].fields == {"title": "H2", "body": "", "label": "SPORTS", "date": "2021-03-04", "url": "u2"}


@pytest.mark.parametrize(
    "line, reason",
    [
        (b'{"headline": "broken', "invalid_json"),
        (b'["a", "list"]', "not_an_object"),
        (b'{"headline": "H", "category": "X", "date": "2020-01-01", "link": "u"}', "missing_field"),
        (b'{"headline": ["H"], "short_description": "", "category": "X", "date": "", "link": "u"}', "bad_value"),
        (b'{"headline": "caf\xe9", "short_description": "", "category": "X", "date": "", "link": "u"}', "undecodable"),
    ],
)
def test_read_jsonl_bad_lines_carry_reason(line, reason):
    (rec,) = jsonl_records(line + b"\n")
    assert rec.fields is None and rec.error.reason == reason and rec.record == 1


def test_read_folder_ignores_root_files_and_uses_folder_label(tmp_path):
    (tmp_path / "README.TXT").write_text("about the data")
    (tmp_path / "sport").mkdir()
    (tmp_path / "sport" / "001.txt").write_text("Headline here\n\nFirst para.\n\nSecond para.\n")
    (tmp_path / "sport" / "002.txt").write_bytes(b"Caf\xe9 wins\n\nLatin-1 body \xa315m.\n")
    (tmp_path / "sport" / "notes.md").write_text("not an article")
    files, ignored = nf.list_folder_files(tmp_path, "*.txt")
    assert [f.name for f in files] == ["001.txt", "002.txt"]
    assert ignored == ["README.TXT", "sport/notes.md"]
    strict = list(nf.read_folder_records(tmp_path, files))
    assert strict[0].fields == {"title": "Headline here", "body": "\nFirst para.\n\nSecond para.\n", "label": "sport"}
    assert strict[0].key == "sport/001.txt" and strict[0].record is None
    assert strict[1].error.reason == "undecodable"
    latin = list(nf.read_folder_records(tmp_path, files, fallback_encoding="iso-8859-1"))[1]
    assert latin.fields["title"] == "Café wins" and "£15m" in latin.fields["body"] and latin.fallback_decoded


# ---------------------------------------------------------------------------------------------
# rows
# ---------------------------------------------------------------------------------------------
OPTS = nf.RowOptions(
    source="ag",
    lang="en",
    label_map={"1": "world"},
    split="test",
    id_fields=("title", "body"),
    backslash_breaks=True,
    repair_entities=True,
)


def raw_record(**fields):
    return nf.RawRecord("f.csv", 7, "raw", fields=fields)


def test_build_row_composes_text_label_and_stable_id():
    row = nf.build_row(raw_record(label="1", title="Bush #39;s plan", body="A\\B  &lt;b&gt;c&lt;/b&gt;"), OPTS)
    assert row["title"] == "Bush's plan"
    assert row["text"] == "Bush's plan\nA B c"
    assert (row["label"], row["raw_label"], row["split"]) == ("world", "1", "test")
    assert (row["kind"], row["lang"]) == ("news", "en")
    assert row["id"] == "ag:" + nf.stable_key(["Bush #39;s plan", "A\\B  &lt;b&gt;c&lt;/b&gt;"])
    assert row["date"] is None and row["url"] is None


def test_build_row_unknown_label_is_null_with_raw_kept_and_body_optional():
    row = nf.build_row(raw_record(label="9", title="Only a title", body="   "), OPTS)
    assert (row["label"], row["raw_label"]) == (None, "9")
    assert row["text"] == "Only a title"


def test_build_row_empty_text_and_bad_date_raise_record_errors():
    with pytest.raises(nf.RecordError) as err:
        nf.build_row(raw_record(label="1", title=" <br> ", body="&nbsp;"), OPTS)
    assert err.value.reason == "empty_text"
    with pytest.raises(nf.RecordError) as err:
        nf.build_row(raw_record(label="1", title="t", body="b", date="2022-02-30"), OPTS)
    assert err.value.reason == "bad_date" and "2022-02-30" in err.value.detail


def test_build_row_uses_layout_key_and_parses_date():
    rec = nf.RawRecord(
        "sport/1.txt",
        None,
        "raw",
        fields={"title": "T", "body": "B", "label": "x", "date": "2020-02-29", "url": " http://u "},
        key="sport/1.txt",
    )
    row = nf.build_row(rec, nf.RowOptions(source="bbc", lang="en", label_map={}))
    assert row["id"] == "bbc:sport/1.txt"
    assert row["date"] == dt.datetime(2020, 2, 29, tzinfo=UTC) and row["url"] == "http://u"


def test_source_stats_check_names_file_share_and_top_reasons():
    stats = nf.SourceStats("s", "/data/s.csv")
    for i in range(8):
        stats.add_good({"label": "world", "raw_label": "1", "date": None}, raw_record())
    for i, reason in enumerate(["wrong_column_count", "wrong_column_count", "undecodable"]):
        stats.add_bad(nf.RawRecord("/data/s.csv", 10 + i, "x"), nf.RecordError(reason, "detail"))
    stats.check(0.5)
    with pytest.raises(nf.FileFormatError) as err:
        stats.check(0.05)
    message = str(err.value)
    assert "/data/s.csv" in message and "3 of 11" in message and "27.27%" in message
    assert "wrong_column_count 2, undecodable 1" in message and "record 10" in message
    with pytest.raises(nf.FileFormatError, match="no records"):
        nf.SourceStats("e", "/data/empty.csv").check(0.05)


# ---------------------------------------------------------------------------------------------
# params
# ---------------------------------------------------------------------------------------------
def news_section(**source_overrides):
    source = {
        "name": "ag",
        "path": "x.csv",
        "format": "csv",
        "columns": {"label": 0, "title": 1, "body": 2},
        "label_map": {"1": "world"},
        **source_overrides,
    }
    return {"ingest_news": {"sources": [source]}}


def test_params_accept_a_valid_source():
    params = parse_params(news_section())
    assert isinstance(params.ingest_news, IngestNewsParams)
    assert isinstance(params.ingest_news.sources[0], NewsSourceParams)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"label_map": {"1": "politics"}}, "not canonical"),
        ({"columns": {"label": "class", "title": "title"}}, "column indices"),
        ({"header": True}, "column / key names"),
        ({"columns": {"label": 0, "headline": 1}}, "columns must map"),
        ({"id_fields": ["url"]}, "id_fields"),
        ({"fallback_encoding": "klingon-8"}, "unknown fallback_encoding"),
        ({"name": "Bad Name"}, "name must match"),
        ({"format": "folder"}, "takes no columns"),
        ({"split": "holdout"}, "expected one of"),
        ({"colums": {}}, "unknown key"),
    ],
)
def test_params_reject_bad_source_settings(override, message):
    with pytest.raises(ConfigError, match=message):
        parse_params(news_section(**override))


def test_params_reject_duplicate_source_names():
    raw = news_section()
    raw["ingest_news"]["sources"].append(dict(raw["ingest_news"]["sources"][0]))
    with pytest.raises(ConfigError, match="duplicate source names"):
        parse_params(raw)


def test_repo_params_define_the_five_default_news_sources(repo_root):
    section = load_params(repo_root / "params.yaml").ingest_news
    by_name = {s.name: s for s in section.sources}
    assert set(by_name) == {"ag_news_train", "ag_news_test", "bbc", "huffpost_v3", "huffpost_v2"}
    assert by_name["ag_news_train"].member == "train.csv" and by_name["ag_news_test"].split == "test"
    assert by_name["bbc"].tree_sha256 and by_name["huffpost_v3"].label_map["THE WORLDPOST"] == "world"
    assert all(s.lang == "en" and (s.sha256 or s.tree_sha256) for s in section.sources)
