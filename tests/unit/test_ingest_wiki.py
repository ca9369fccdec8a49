"""Unit tests of ingest_wiki's pure parts: wikitext cleaning, page checks and the streaming readers.

Small inputs written here; the real dump samples are exercised in tests/stages/test_ingest_wiki.py.
"""

from __future__ import annotations

import bz2
import io
import json
import lzma
import random
import zipfile

import pytest

from pipeline_tasks.errors import DataError
from pipeline_tasks.ingest import bz2blocks
from pipeline_tasks.ingest.bz2blocks import ParallelBz2Reader, decode_segment, iter_segments
from pipeline_tasks.ingest.ingest_wiki import CleanOptions, _prefilter, clean_batch, worker_pool
from pipeline_tasks.ingest.params import IngestWikiParams, WikiSourceParams
from pipeline_tasks.ingest.wikidump import (
    RawPage,
    SiteInfo,
    TruncatedInputError,
    iter_jsonl,
    iter_mediawiki,
    iter_wikiextractor,
    iter_wikitext_raw,
    open_decompressed,
)
from pipeline_tasks.ingest.wikitext import (
    clean_wikitext,
    has_forbidden_markup,
    is_disambiguation,
    is_redirect,
    namespace_aliases,
    normalize_plain,
)

CLEANERS = ["fast", "mwparserfromhell"]
FORBIDDEN = ("{{", "}}", "[[", "]]", "{|", "|}", "<ref")


def assert_clean(text: str) -> None:
    for token in FORBIDDEN:
        assert token not in text.lower(), f"{token!r} left in {text!r}"


# ---------------------------------------------------------------------------- cleaning


@pytest.mark.parametrize("cleaner", CLEANERS)
def test_clean_wikitext_removes_nested_templates(cleaner):
    text = "Paris {{lang|fr|{{nowrap|Ville {{small|de}} Paris}}}} is the capital{{citation needed|date=May 2020}}."
    assert clean_wikitext(text, cleaner=cleaner) == "Paris is the capital."


@pytest.mark.parametrize("cleaner", CLEANERS)
def test_clean_wikitext_removes_refs_plain_named_and_self_closing(cleaner):
    text = (
        'Water boils at 100 C.<ref>{{cite book|title=Heat|page=3}}</ref> It freezes at 0 C.<ref name="a"/> '
        "Ice floats<REF NAME=b>Archimedes, ''On floating bodies''</REF> on water.<ref name=\"c\" />\n"
        "==References==\n<references/>\n<references>\n<ref name=d>x</ref>\n</references>"
    )
    out = clean_wikitext(text, cleaner=cleaner)
    assert out.split("\n") == ["Water boils at 100 C. It freezes at 0 C. Ice floats on water.", "References"]
    assert_clean(out)


@pytest.mark.parametrize("cleaner", CLEANERS)
def test_clean_wikitext_removes_tables_including_nested(cleaner):
    text = (
        'Intro line.\n{| class="wikitable"\n|-\n! Year !! Value\n|-\n| 2001 || {{n/a}}\n|-\n|\n'
        "{|\n| inner cell\n|}\n|}\nOutro line."
    )
    out = clean_wikitext(text, cleaner=cleaner)
    assert out.split() == ["Intro", "line.", "Outro", "line."]
    assert_clean(out)


@pytest.mark.parametrize("cleaner", CLEANERS)
def test_clean_wikitext_drops_files_categories_and_interlanguage_links(cleaner):
    text = (
        "[[File:Eiffel.jpg|thumb|left|The [[Eiffel Tower]] at night]]The tower is tall."
        "[[Image:Map.png|200px]]\n[[Category:Towers]]\n[[category:Paris| ]]\n[[de:Eiffelturm]]"
    )
    out = clean_wikitext(text, cleaner=cleaner)
    assert out == "The tower is tall."


def test_clean_wikitext_drops_localized_namespaces_from_siteinfo():
    drop = namespace_aliases({6: "Delwedd", 14: "Categori", 0: "", 2: "Defnyddiwr"})  # Welsh
    text = "[[Delwedd:Map.png|Map of Wales]]Mae Cymru yn wlad, medd [[Defnyddiwr:Ann|Ann]].\n[[Categori:Gwledydd]]"
    assert clean_wikitext(text, drop) == "Mae Cymru yn wlad, medd Ann."
    assert "Map of Wales" in clean_wikitext(text)  # without siteinfo the caption is not known to be a file


def test_clean_wikitext_drops_file_aliases_and_links_with_image_options():
    text = (
        "[[Attēls:Puma.jpg|thumb|250px|]][[Bilde:X.png|200px|Caption]][[Datei:Y.svg|mini|Bild]]Puma concolor "
        "[[wikt:puma|puma]] [[Kategoreja:Dzeivnīki]]."
    )
    assert clean_wikitext(text) == "Puma concolor puma."


def test_clean_wikitext_unclosed_table_loses_only_its_markup_lines():
    text = "Intro.\n{| border=1\n|-\n! Header\n| cell\nProse inside the open table.\n|-\nLast line."
    assert clean_wikitext(text) == "Intro.\nProse inside the open table.\nLast line."


@pytest.mark.parametrize("cleaner", CLEANERS)
def test_clean_wikitext_keeps_heading_text_and_link_text(cleaner):
    text = (
        "'''Anarchism''' is a [[political philosophy]] that rejects [[State (polity)|states]] and "
        "[[hierarchy|hierarchies]]. [[Dog]]s bark.\n\n== History ==\n=== Origins ===\nSee "
        "[https://example.org the archive] and [https://example.org/x]."
    )
    out = clean_wikitext(text, cleaner=cleaner)
    lines = out.split("\n")
    assert lines[0] == "Anarchism is a political philosophy that rejects states and hierarchies. Dogs bark."
    assert "History" in lines and "Origins" in lines
    assert lines[-1].startswith("See the archive and")
    assert "==" not in out and "'''" not in out and "example.org" not in out


def test_clean_wikitext_pipe_trick_shows_the_title_without_parenthesis():
    assert clean_wikitext("See [[Mercury (planet)|]].") == "See Mercury."


@pytest.mark.parametrize("cleaner", CLEANERS)
def test_clean_wikitext_removes_comments_magic_words_and_markup(cleaner):
    text = (
        "__NOTOC__\nA<!-- hidden [[x]] note -->B is ''italic'' and <b>bold</b> and <span style=\"x\">s</span>."
        "<br/>\n* first item\n# second item\n----\nEnd &amp; more&nbsp;text.<!-- never closed"
    )
    out = clean_wikitext(text, cleaner=cleaner)
    assert out.startswith("AB is italic and bold and s.")
    assert "first item" in out and "second item" in out
    assert "NOTOC" not in out and "<" not in out and "----" not in out and "hidden" not in out
    assert out.endswith("End & more text.")


def test_clean_wikitext_normalises_whitespace():
    out = clean_wikitext("  Para  one\t has   spaces .\r\n\r\n\r\n\r\nPara two , here  \n")
    assert out == "Para one has spaces.\n\nPara two, here"


@pytest.mark.parametrize(
    "text",
    [
        "Unclosed {{template with [[link",
        "Stray }} and ]] closers",
        "{| never closed table\n| cell",
        "Broken [[File:x.jpg|thumb|caption",
        "<ref>never closed ref",
        "Mixed {{a|[[b]]}} }} ]] {{ [[",
        "[[[[x]]]] {{{{y}}}} {{{param}}}",
        "A [{{x}}[ tricky ]{{y}}] join",
        "&lt;ref&gt;escaped&lt;/ref&gt; {&#123;x}}",
    ],
)
@pytest.mark.parametrize("cleaner", CLEANERS)
def test_clean_wikitext_never_leaves_forbidden_markup(text, cleaner):
    out = clean_wikitext(text, cleaner=cleaner)
    assert_clean(out)
    assert not has_forbidden_markup(out)


def test_clean_wikitext_fast_and_reference_cleaners_agree_on_an_article():
    text = (
        "{{Infobox person|name=Ada|birth_date={{birth date|1815|12|10}}}}\n'''Ada Lovelace''' "
        "was an English [[mathematician]].<ref>{{cite web|url=x}}</ref>\n\n== Work ==\nShe wrote the "
        "first [[algorithm]] for the [[Analytical Engine]].\n[[Category:1815 births]]"
    )
    assert clean_wikitext(text, cleaner="fast") == clean_wikitext(text, cleaner="mwparserfromhell")


def test_clean_wikitext_rejects_unknown_cleaner():
    with pytest.raises(ValueError, match="cleaner"):
        clean_wikitext("x", cleaner="regex")


# ---------------------------------------------------------------------------- page checks


@pytest.mark.parametrize(
    "text",
    [
        "#REDIRECT [[Computer accessibility]]",
        "#redirect[[X]]",
        "  #Redirect: [[X]]",
        "#WEITERLEITUNG [[Ziel]]",
        "#перенаправление [[Цел]]",
        "#REDIRECTION [[Cible]]",
    ],
)
def test_is_redirect_detects_magic_words_any_case_and_language(text):
    assert is_redirect(text)


@pytest.mark.parametrize("text", ["# a numbered list item", "Redirect is also a word.", "#REDIRECT without link"])
def test_is_redirect_ignores_ordinary_text(text):
    assert not is_redirect(text)


@pytest.mark.parametrize(
    "title,text",
    [
        ("Mercury", "'''Mercury''' may refer to:\n* [[Mercury (planet)]]\n{{disambiguation}}"),
        ("Aa", "{{Disambiguation|geo}}"),
        ("Aa River", "{{geodis}}"),
        ("Smith", "{{hndis|name=Smith}}"),
        ("Foo", "{{dab}}"),
        ("Bar", "{{Disambig}}"),
        ("Baz", "{{Airport disambiguation}}"),
        ("Austin (disambiguation)", "no template at all"),
        ("Bank (Begriffsklärung)", ""),
        ("Paris", "{{Begriffsklärung}}"),
        ("Лев", "{{пояснение}}"),
    ],
)
def test_is_disambiguation_detects_templates_and_titles(title, text):
    assert is_disambiguation(title, text)


@pytest.mark.parametrize(
    "title,text",
    [
        ("Mercury (planet)", "{{About|the planet|other uses|Mercury (disambiguation)}} '''Mercury''' is a planet."),
        ("Dab radio", "{{Infobox}} DAB radio {{dablink|x}}"),
        ("Disambiguation (linguistics)", "{{lang|en}}"),
    ],
)
def test_is_disambiguation_ignores_hatnotes_and_articles(title, text):
    assert not is_disambiguation(title, text)


def _page(**kw):
    base = dict(page_id="1", title="T", ns=0, redirect=False, timestamp=None, text="Some text " * 30)
    return RawPage(**{**base, **kw})


def test_prefilter_counts_namespace_redirect_and_oversize():
    cfg = IngestWikiParams(max_page_bytes=1000)
    assert _prefilter(_page(ns=4), cfg, True)[0] == "namespace"
    assert _prefilter(_page(redirect=True), cfg, True)[0] == "redirect"
    assert _prefilter(_page(text="#REDIRECT [[X]]"), cfg, True)[0] == "redirect"
    assert _prefilter(_page(text="#REDIRECT [[X]]"), cfg, False)[0] is None  # plain text has no magic words
    assert _prefilter(_page(text="é" * 600), cfg, True)[0] == "too_large"  # 1200 UTF-8 bytes
    assert _prefilter(_page(text="e" * 600), cfg, True)[0] is None
    reason, cut = _prefilter(_page(text="é" * 600), IngestWikiParams(max_page_bytes=1001, on_oversize="truncate"), True)
    assert reason == "truncated" and cut.text == "é" * 500
    assert _prefilter(_page(ns=14), IngestWikiParams(namespaces=(0, 14)), True)[0] is None


def test_clean_batch_counts_disambiguation_and_short_pages_in_order():
    opts = CleanOptions(min_chars=20)
    items = [
        ("Ada", "'''Ada''' was a mathematician and writer."),
        None,
        ("Ada (disambiguation)", "x"),
        ("Stub", "Tiny.{{stub}}"),
        ("Dab", "Words words words words. {{dab}}"),
    ]
    out = clean_batch(opts, items)
    assert out == [
        (None, "Ada was a mathematician and writer."),
        None,
        ("disambiguation", ""),
        ("too_short", ""),
        ("disambiguation", ""),
    ]


def test_clean_batch_skips_a_page_over_the_time_limit():
    # mwparserfromhell needs seconds for ~2 MB of links; the (wall-clock) alarm interrupts it at 0.3 s.
    slow = " ".join(f"[[Link {i}|text {i}]] ''word''" for i in range(50_000))
    opts = CleanOptions(cleaner="mwparserfromhell", min_chars=1, timeout_s=0.3)
    out = clean_batch(opts, [("Slow", slow), ("Fast", "Short page text.")])
    assert out[0] == ("parse_timeout", "")
    assert out[1] == (None, "Short page text.")


def test_ingest_params_reject_bad_values():
    with pytest.raises(ValueError, match="duplicate"):
        IngestWikiParams(sources=(WikiSourceParams(name="a", path="x"), WikiSourceParams(name="a", path="y")))
    with pytest.raises(ValueError, match="name"):
        WikiSourceParams(name="../evil", path="x")
    with pytest.raises(ValueError):
        WikiSourceParams(name="a", url="https://example.org/x.bz2")  # a url needs a checksum
    assert WikiSourceParams(name="a", mirror_path="m", sha256="a" * 64).checksums() == {"sha256": "a" * 64}


# ---------------------------------------------------------------------------- XML reader

SITEINFO = """<siteinfo><sitename>Wikipedia</sitename><dbname>{db}</dbname>
  <namespaces><namespace key="0" case="first-letter" /><namespace key="6" case="first-letter">Fichier</namespace>
  <namespace key="14" case="first-letter">Catégorie</namespace></namespaces></siteinfo>"""
PAGE = """<page><title>{title}</title><ns>{ns}</ns><id>{id}</id>{redirect}
  <revision><id>99</id><timestamp>2020-01-02T03:04:05Z</timestamp><contributor><id>7</id></contributor>
  <text bytes="10" xml:space="preserve">{text}</text></revision></page>"""


def make_dump(version: str = "0.10", siteinfo: bool = True, db: str = "frwiki", pages=None) -> str:
    pages = pages or [
        dict(title="Paris", ns=0, id=5, redirect="", text="'''Paris''' est une ville."),
        dict(title="Lutèce", ns=0, id=6, redirect='<redirect title="Paris" />', text="#REDIRECTION [[Paris]]"),
        dict(title="Catégorie:Villes", ns=14, id=7, redirect="", text="Liste"),
    ]
    xmlns = f' xmlns="http://www.mediawiki.org/xml/export-{version}/" version="{version}"' if version else ""
    body = "".join(PAGE.format(**p) for p in pages)
    return f'<mediawiki{xmlns} xml:lang="fr">{SITEINFO.format(db=db) if siteinfo else ""}{body}</mediawiki>'


@pytest.mark.parametrize("version", ["0.9", "0.10", "0.11", ""])
@pytest.mark.parametrize("siteinfo", [True, False])
def test_iter_mediawiki_reads_any_schema_version_with_or_without_siteinfo(version, siteinfo):
    records = list(iter_mediawiki(io.BytesIO(make_dump(version, siteinfo).encode()), "dump.xml"))
    infos = [r for r in records if isinstance(r, SiteInfo)]
    pages = [r for r in records if isinstance(r, RawPage)]
    assert len(infos) == int(siteinfo)
    if siteinfo:
        assert infos[0].lang == "fr" and infos[0].namespaces[6] == "Fichier"
    assert [(p.page_id, p.title, p.ns, p.redirect) for p in pages] == [
        ("5", "Paris", 0, False),
        ("6", "Lutèce", 0, True),
        ("7", "Catégorie:Villes", 14, False),
    ]
    assert pages[0].timestamp == "2020-01-02T03:04:05Z" and pages[0].text == "'''Paris''' est une ville."


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be", "utf-8-sig"])
def test_iter_mediawiki_reads_utf16_and_utf8_with_bom(encoding):
    bom = {"utf-16-le": b"\xff\xfe", "utf-16-be": b"\xfe\xff", "utf-8-sig": b""}[encoding]
    data = bom + make_dump(db="bgwiki").replace("Paris", "Париж").encode(encoding)
    pages = [r for r in iter_mediawiki(io.BytesIO(data), "bg.xml") if isinstance(r, RawPage)]
    assert pages[0].title == "Париж"


def test_site_info_lang_from_dbname():
    assert SiteInfo("enwiki", {}).lang == "en"
    assert SiteInfo("zh_yuewiki", {}).lang == "zh-yue"
    assert SiteInfo("enwiktionary", {}).lang is None and SiteInfo(None, {}).lang is None


BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>
<mediawiki><page><title>&lol3;</title><ns>0</ns><id>1</id><revision><text>x</text></revision></page></mediawiki>"""
EXTERNAL_ENTITY = """<?xml version="1.0"?>
<!DOCTYPE mediawiki [<!ENTITY secret SYSTEM "file:///etc/passwd">]>
<mediawiki><page><title>&secret;</title><ns>0</ns><id>1</id><revision><text>x</text></revision></page></mediawiki>"""


@pytest.mark.parametrize("doc", [BILLION_LAUGHS, EXTERNAL_ENTITY], ids=["billion_laughs", "external_entity"])
def test_iter_mediawiki_refuses_entity_declarations(doc):
    with pytest.raises(DataError, match=r"bomb\.xml: refused to parse.*billion laughs"):
        list(iter_mediawiki(io.BytesIO(doc.encode()), "bomb.xml"))


def test_iter_mediawiki_truncated_xml_names_file_position_and_last_page():
    data = make_dump().encode()
    cut = data[: data.index(b"<page>", data.index(b"<page>") + 1) + 40]  # inside the second page
    with pytest.raises(
        TruncatedInputError,
        match=r"cut\.xml: XML ends early .* line \d+, column \d+; "
        r"last complete page: id 5 'Paris'",
    ):
        list(iter_mediawiki(io.BytesIO(cut), "cut.xml"))


def test_iter_mediawiki_rejects_other_xml_and_empty_documents():
    with pytest.raises(DataError, match=r"other\.xml: root element is <rss>"):
        list(iter_mediawiki(io.BytesIO(b"<rss><channel/></rss>"), "other.xml"))
    with pytest.raises(DataError, match=r"blank\.xml: no XML content"):
        list(iter_mediawiki(io.BytesIO(b"   \n"), "blank.xml"))


def test_iter_mediawiki_reads_concatenated_bz2_streams():
    text = make_dump(version="0.11").encode()
    cut = text.index(b"<page>", text.index(b"<page>") + 1)
    multistream = bz2.compress(text[:cut]) + bz2.compress(text[cut:])  # how -multistream dumps are built
    pages = [r for r in iter_mediawiki(bz2.BZ2File(io.BytesIO(multistream)), "m.xml.bz2") if isinstance(r, RawPage)]
    assert [p.page_id for p in pages] == ["5", "6", "7"]


def test_iter_mediawiki_keeps_at_most_max_text_chars_of_a_page_and_flags_it_oversize():
    pages = [
        dict(title="Huge", ns=0, id=1, redirect="", text="x" * 5_000 + " &lt;b&gt;" * 100),
        dict(title="Exact", ns=0, id=2, redirect="", text="é" * 1_000),
        dict(title="Small", ns=0, id=3, redirect="", text="'''Small''' page."),
    ]
    data = make_dump(pages=pages).encode()
    huge, exact, small = [r for r in iter_mediawiki(io.BytesIO(data), "d.xml", 1_000) if isinstance(r, RawPage)]
    assert (huge.title, huge.oversize, huge.text) == ("Huge", True, "x" * 1_000)
    assert (exact.oversize, exact.text) == (False, "é" * 1_000)  # at the cap in chars: _prefilter checks bytes
    assert (small.oversize, small.text, small.timestamp) == (False, "'''Small''' page.", "2020-01-02T03:04:05Z")
    uncapped = [r for r in iter_mediawiki(io.BytesIO(data), "d.xml") if isinstance(r, RawPage)]
    assert len(uncapped[0].text) == 5_000 + 400 and not uncapped[0].oversize


def test_iter_mediawiki_keeps_the_text_around_unescaped_markup_in_a_text_element():
    data = make_dump(pages=[dict(title="A", ns=0, id=1, redirect="", text="Before <ref>note</ref> after.")])
    (page,) = [r for r in iter_mediawiki(io.BytesIO(data.encode()), "d.xml") if isinstance(r, RawPage)]
    assert (page.title, page.text, page.timestamp) == ("A", "Before note after.", "2020-01-02T03:04:05Z")


def test_prefilter_skips_or_truncates_a_page_the_reader_flagged_oversize():
    flagged = _page(text="a" * 1_000, oversize=True)  # the reader stopped at 1000 chars of a longer text
    assert _prefilter(flagged, IngestWikiParams(max_page_bytes=1_000), True)[0] == "too_large"
    reason, cut = _prefilter(flagged, IngestWikiParams(max_page_bytes=1_000, on_oversize="truncate"), True)
    assert reason == "truncated" and cut.text == "a" * 1_000


# ---------------------------------------------------------------------------- plain-text readers


def test_iter_wikitext_raw_splits_articles_and_normalises_crlf():
    raw = (
        " \r\n = Homarus gammarus = \r\n \r\n Homarus gammarus , known as the European lobster , is a "
        "crustacean of 0 @.@ 7 – 2 @.@ 2 kg . \r\n \r\n = = Description = = \r\n \r\n It is blue @-@ black . "
        "\r\n = = = Size = = = \r\n Large . \r\n = Second article = \r\n Body text . \r\n"
    )
    pages = list(iter_wikitext_raw(io.BytesIO(raw.encode()), "wiki.valid.raw"))
    assert [p.title for p in pages] == ["Homarus gammarus", "Second article"]
    text = normalize_plain(pages[0].text)
    assert "\r" not in text and "@" not in text
    assert text.split("\n") == [
        "Homarus gammarus, known as the European lobster, is a crustacean of 0.7 – 2.2 kg.",
        "",
        "Description",
        "",
        "It is blue-black.",
        "",
        "Size",
        "Large.",
    ]


def test_iter_wikiextractor_reads_doc_blocks_and_drops_the_title_line():
    data = (
        '<doc id="12" url="https://en.wikipedia.org/wiki?curid=12" title="Anarchism &amp; co">\n'
        "Anarchism &amp; co\n\nAnarchism is a philosophy.\n</doc>\n"
        '<doc id="25" url="u" title="Autism">\nAutism\n\nText.\n</doc>\n'
    )
    pages = list(iter_wikiextractor(io.BytesIO(data.encode()), "wiki_00"))
    assert [(p.page_id, p.title) for p in pages] == [("12", "Anarchism & co"), ("25", "Autism")]
    assert pages[0].text.strip() == "Anarchism is a philosophy."
    with pytest.raises(TruncatedInputError, match=r"wiki_01: <doc> opened at line 1 \(id 3\) is never closed"):
        list(iter_wikiextractor(io.BytesIO(b'<doc id="3" url="u" title="T">\ntext\n'), "wiki_01"))


def test_iter_jsonl_reads_records_and_names_a_bad_line():
    good = json.dumps({"id": "9", "url": "u", "title": "数学", "text": "数学是研究数量的学科。"}, ensure_ascii=False)
    pages = list(iter_jsonl(io.BytesIO(f"{good}\n\n{good}\n".encode()), "wiki.jsonl"))
    assert len(pages) == 2 and pages[0].title == "数学" and pages[0].url == "u"
    with pytest.raises(DataError, match=r"wiki\.jsonl:2: invalid JSON"):
        list(iter_jsonl(io.BytesIO(f"{good}\n{{broken\n".encode()), "wiki.jsonl"))
    with pytest.raises(DataError, match=r"wiki\.jsonl:1: expected a JSON object, got list"):
        list(iter_jsonl(io.BytesIO(b'["not", "an object"]\n'), "wiki.jsonl"))
    with pytest.raises(DataError, match=r"wiki\.jsonl:1: expected an object with a string 'text'"):
        list(iter_jsonl(io.BytesIO(b'{"title": "no text"}\n'), "wiki.jsonl"))


# ---------------------------------------------------------------------------- parallel bz2


@pytest.fixture(scope="module")
def pool():
    with worker_pool(2) as workers:
        yield workers


def _text(n_bytes: int) -> bytes:
    """Deterministic text that bzip2 cannot shrink to nothing (several 100 kB blocks at level 1)."""
    rng = random.Random(7)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(5000)]
    out, size = [], 0
    while size < n_bytes:
        word = rng.choice(words)
        out.append(word)
        size += len(word) + 1
    return " ".join(out).encode()[:n_bytes]


def _read_all(reader) -> bytes:
    chunks = []
    while chunk := reader.read(16384):
        chunks.append(chunk)
    return b"".join(chunks)


def test_bz2_blocks_split_and_decode_equal_bz2_module(tmp_path):
    data = _text(450_000)
    for level, expected_blocks in ((1, 5), (9, 1)):
        path = tmp_path / f"l{level}.bz2"
        path.write_bytes(bz2.compress(data, level))
        with open(path, "rb") as fh:
            segments = list(iter_segments(fh, read_size=4096))  # small reads: blocks span many reads
        assert len(segments) == expected_blocks
        assert b"".join(decode_segment(s) for s in segments) == data


def test_parallel_bz2_reader_handles_multistream_and_truncation(tmp_path, pool):
    data = _text(700_000)
    multistream = b"".join(bz2.compress(data[i : i + 150_000], 1) for i in range(0, len(data), 150_000))
    (tmp_path / "m.bz2").write_bytes(multistream)
    assert _read_all(ParallelBz2Reader(tmp_path / "m.bz2", pool)) == data
    single = bz2.compress(data, 1)
    (tmp_path / "cut.bz2").write_bytes(single[: len(single) * 2 // 3])
    reader = ParallelBz2Reader(tmp_path / "cut.bz2", pool)
    got = []
    with pytest.raises(EOFError, match="ended inside a bzip2 block"):
        while chunk := reader.read(16384):
            got.append(chunk)
    assert 0 < len(b"".join(got)) < len(data) and data.startswith(b"".join(got))  # complete blocks first


def test_parallel_bz2_reader_rejoins_a_block_split_by_a_false_magic(tmp_path, pool, monkeypatch):
    data = _text(300_000)
    (tmp_path / "x.bz2").write_bytes(bz2.compress(data, 1))
    real = bz2blocks.iter_segments

    def with_false_split(fh, *args, **kwargs):
        for i, seg in enumerate(real(fh, *args, **kwargs)):
            if i == 1:  # as if the 48-bit magic had occurred by chance in the middle of this block
                mid = (seg.first + seg.end) // 2
                yield bz2blocks.Segment(seg.data[: (mid + 7) // 8 - seg.base], seg.base, seg.first, mid)
                yield bz2blocks.Segment(seg.data[mid // 8 - seg.base :], mid // 8, mid, seg.end)
            else:
                yield seg

    monkeypatch.setattr(bz2blocks, "iter_segments", with_false_split)
    assert _read_all(bz2blocks.ParallelBz2Reader(tmp_path / "x.bz2", pool)) == data


@pytest.mark.parametrize(
    "name, make",
    [
        ("multi.bz2", lambda d: bz2.compress(d[:70_000]) + bz2.compress(d[70_000:])),
        ("garbage.bz2", lambda d: bz2.compress(d) + b"\0\0\0trailing garbage"),
        ("multi.xz", lambda d: lzma.compress(d[:1000]) + lzma.compress(d[1000:])),
    ],
)
def test_open_decompressed_reads_concatenated_streams(tmp_path, name, make):
    data = bytes(range(256)) * 300 + "é wiki text ".encode() * 5000
    (tmp_path / name).write_bytes(make(data))
    with open_decompressed(tmp_path / name) as stream:
        assert b"".join(iter(lambda: stream.read(4096), b"")) == data


def test_open_decompressed_cut_stream_raises_eof(tmp_path):
    whole = bz2.compress(bytes(range(256)) * 4000)
    (tmp_path / "cut.bz2").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(EOFError, match="end-of-stream marker"):
        with open_decompressed(tmp_path / "cut.bz2") as stream:
            b"".join(iter(lambda: stream.read(4096), b""))


def test_open_decompressed_refuses_a_zip_archive_by_content(tmp_path):
    dump = tmp_path / "enwiki.xml"  # a zip whatever its name says
    with zipfile.ZipFile(dump, "w") as zf:
        zf.writestr("enwiki.xml", make_dump())
    with pytest.raises(DataError, match=r"enwiki\.xml: this is a zip archive; extract the dump"):
        open_decompressed(dump)
