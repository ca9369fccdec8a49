"""Build ``k`` x the default corpus for ``bench/data_scaling.py``, in the sources' own formats.

Copy 0 of every source is the real file's content, unchanged. Each extra copy ``c`` (1 .. k-1)
repeats every document with a new id (and a new title where the format has one), and is one of:

* ``exact`` (share ``EXACT_SHARE``): nothing else changes, so ``prepare`` must drop it as an
  ``exact_duplicate`` (for AG News, whose id is the sha1 of title + body, the title gets ``c``
  trailing dots: a new id, the same normalised key);
* ``near`` (share ``NEAR_SHARE``): one word in a hundred is replaced by a word of the same
  source's vocabulary (texts under a hundred words: their last word), so the 5-word-shingle
  Jaccard stays above ~0.9 and ``prepare`` should drop it as a ``near_duplicate``;
* ``new`` (the rest): ``NEW_WORD_SHARE`` of the words are replaced by words drawn from the same
  source's vocabulary (news bodies also get their sentences shuffled). Only ~0.65^5 ~ 12% of the
  5-word shingles survive, far below the 0.8 threshold, so these are new documents that keep the
  length, script, markup and word statistics of the real ones.

Which copy a document gets is a seeded hash of (source, copy, document index): reruns build the
same bytes. Wiki XML dumps are stream-rewritten (page by page; new ``<id>``, ``<title>``,
``<text bytes=...>``), stay valid MediaWiki export XML in their own encoding (the Bulgarian dump
stays UTF-16) and stay bz2 when they were (``compresslevel=9`` like the real dumps), so
``ingest_wiki`` runs its real streaming path. Words are letter runs (``[^\\W\\d_]{2,}``), so wiki
markup, numbers and entities survive the perturbation.
"""

from __future__ import annotations

import bz2
import csv
import dataclasses
import hashlib
import html
import io
import json
import random
import re
import shutil
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from xml.sax.saxutils import escape as xml_escape
from xml.sax.saxutils import unescape as xml_unescape

EXACT_SHARE = 0.10
NEAR_SHARE = 0.10
NEW_WORD_SHARE = 0.35
ID_STRIDE = 1_000_000_000  # page ids of copy c: id + c * stride (real enwiki ids stay < 1e9)
VOCAB_WORDS = 200_000  # distinct words kept per source (enough variety, bounded memory)
WORD_RE = re.compile(r"(?<!&)[^\W\d_]{2,}")  # letter runs; never an entity name after '&'
SENTENCE_RE = re.compile(r"(?<=[.!?])\s+")
XML_QUOTES = {"&quot;": '"', "&apos;": "'"}
CHUNK_CHARS = 1 << 20


@dataclasses.dataclass
class CopyPlan:
    """How many documents each kind of copy got, per source."""

    counts: Counter = dataclasses.field(default_factory=Counter)

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))


def copy_kind(source: str, copy: int, index: int) -> str:
    if copy == 0:
        return "original"
    digest = hashlib.blake2b(f"{source}:{copy}:{index}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2**64
    return "exact" if u < EXACT_SHARE else "near" if u < EXACT_SHARE + NEAR_SHARE else "new"


def rng_for(source: str, copy: int, index: int) -> random.Random:
    return random.Random(f"{source}:{copy}:{index}")


def collect_vocab(texts: Iterator[str]) -> list[str]:
    seen: dict[str, None] = {}
    for text in texts:
        for word in WORD_RE.findall(text):
            if len(seen) >= VOCAB_WORDS:
                return list(seen)
            seen.setdefault(word)
    return list(seen) or ["lorem", "ipsum"]


def replace_words(text: str, rng: random.Random, vocab: list[str], share: float) -> str:
    return WORD_RE.sub(lambda m: rng.choice(vocab) if rng.random() < share else m.group(0), text)


def perturb_near(text: str, rng: random.Random, vocab: list[str]) -> str:
    matches = list(WORD_RE.finditer(text))
    if not matches:
        return text + " " + rng.choice(vocab)
    # A changed word touches up to 5 shingles; in a short text only the last word keeps J >= 0.8.
    picks = {len(matches) - 1} if len(matches) < 100 else set(rng.sample(range(len(matches)), len(matches) // 100))
    parts, last = [], 0
    for i, match in enumerate(matches):
        if i in picks:
            parts += [text[last : match.start()], rng.choice(vocab)]
            last = match.end()
    return "".join(parts) + text[last:]


def perturb(text: str, kind: str, rng: random.Random, vocab: list[str], shuffle: bool = False) -> str:
    if kind in ("original", "exact"):
        return text
    if kind == "near":
        return perturb_near(text, rng, vocab)
    if shuffle:
        sentences = SENTENCE_RE.split(text)
        rng.shuffle(sentences)
        text = " ".join(sentences)
    return replace_words(text, rng, vocab, NEW_WORD_SHARE)


def new_title(title: str, copy: int) -> str:
    """``Foo (disambiguation)`` -> ``Foo ~2 (disambiguation)``: keeps title-based rules working."""
    match = re.fullmatch(r"(.*?)( \([^()]*\))?", title, re.DOTALL)
    return f"{match.group(1)} ~{copy}{match.group(2) or ''}"


# --------------------------------------------------------------------------------------------
# MediaWiki XML (bz2 or plain, UTF-8 or UTF-16)


def _xml_encoding(path: Path) -> tuple[Callable, str]:
    with open(path, "rb") as fh:
        compressed = fh.read(3) == b"BZh"
    opener = bz2.open if compressed else open
    with opener(path, "rb") as fh:
        head = fh.read(2)
    return opener, "utf-16" if head in (b"\xff\xfe", b"\xfe\xff") else "utf-8"


def _xml_parts(path: Path) -> Iterator[tuple[str, str]]:
    """Stream ``("header" | "gap" | "page" | "footer", text)``; one page in memory at a time."""
    opener, encoding = _xml_encoding(path)
    with opener(path, "rt", encoding=encoding, newline="") as fh:
        buf, started = "", False
        while True:
            chunk = fh.read(CHUNK_CHARS)
            buf += chunk
            if not started:
                start = buf.find("<page>")
                if start < 0 and chunk:
                    continue
                start = len(buf) if start < 0 else start
                yield "header", buf[:start]
                buf, started = buf[start:], True
            while True:
                start, end = buf.find("<page>"), buf.find("</page>")
                if start < 0 or end < 0:
                    break
                end += len("</page>")
                yield "gap", buf[:start]
                yield "page", buf[start:end]
                buf = buf[end:]
            if not chunk:
                break
        yield "footer", buf


def _rewrite_page(page: str, copy: int, kind: str, rng: random.Random, vocab: list[str]) -> str:
    page = re.sub(r"<id>(\d+)</id>", lambda m: f"<id>{int(m.group(1)) + copy * ID_STRIDE}</id>", page, count=1)
    page = re.sub(
        r"<title>(.*?)</title>",
        lambda m: f"<title>{xml_escape(new_title(xml_unescape(m.group(1), XML_QUOTES), copy))}</title>",
        page,
        count=1,
        flags=re.DOTALL,
    )
    match = re.search(r"(<text\b[^>]*>)(.*?)(</text>)", page, re.DOTALL)
    if match is None or kind == "exact":
        return page
    text = perturb(xml_unescape(match.group(2), XML_QUOTES), kind, rng, vocab)
    opening = re.sub(r'bytes="\d+"', f'bytes="{len(text.encode("utf-8"))}"', match.group(1))
    return page[: match.start()] + opening + xml_escape(text) + match.group(3) + page[match.end() :]


def write_mediawiki(src: Path, dst: Path, k: int, name: str, plan: CopyPlan) -> None:
    opener, encoding = _xml_encoding(src)
    vocab = collect_vocab(text for part, text in _xml_parts(src) if part == "page")
    # bz2's text wrapper leaves out the UTF-16 BOM: write it ourselves (the source is LE with a BOM).
    out_encoding, bom = ("utf-16-le", "\ufeff") if encoding == "utf-16" else (encoding, "")
    writer = bz2.open(dst, "wt", encoding=out_encoding, newline="", compresslevel=9)
    if opener is open:
        writer = open(dst, "w", encoding=out_encoding, newline="")
    with writer as out:
        out.write(bom)
        footer = ""
        for copy in range(k):
            index = 0
            for part, text in _xml_parts(src):
                if part == "header":
                    if copy == 0:
                        out.write(text)
                elif part == "footer":
                    footer = text
                elif part == "gap":
                    out.write(text)
                else:
                    kind = copy_kind(name, copy, index)
                    plan.counts[kind] += 1
                    if copy:
                        text = _rewrite_page(text, copy, kind, rng_for(name, copy, index), vocab)
                    out.write(text)
                    index += 1
        out.write(footer)


# --------------------------------------------------------------------------------------------
# Plain-text Wikipedia: WikiText raw and WikiExtractor <doc> blocks


def write_wikitext_raw(src: Path, dst: Path, k: int, name: str, plan: CopyPlan) -> None:
    from pipeline_tasks.ingest.wikidump import WIKITEXT_TITLE_RE  # the reader's own article rule

    with open(src, encoding="utf-8", newline="") as fh:  # keeps the CRLF line ends
        lines = list(fh)
    starts = [i for i, line in enumerate(lines) if WIKITEXT_TITLE_RE.fullmatch(line.strip())]
    preamble, articles = lines[: starts[0]], [lines[a:b] for a, b in zip(starts, starts[1:] + [len(lines)])]
    vocab = collect_vocab("".join(a[1:]) for a in articles)
    with open(dst, "w", encoding="utf-8", newline="") as out:
        out.writelines(preamble)
        for copy in range(k):
            for index, article in enumerate(articles):
                kind = copy_kind(name, copy, index)
                plan.counts[kind] += 1
                if copy == 0:
                    out.writelines(article)
                    continue
                title = WIKITEXT_TITLE_RE.fullmatch(article[0].strip()).group(1)
                out.write(article[0].replace(title, new_title(title, copy), 1))
                out.write(perturb("".join(article[1:]), kind, rng_for(name, copy, index), vocab))


def _wikiextractor_docs(src: Path) -> list[list[str]]:
    docs, current = [], None
    for line in src.read_text(encoding="utf-8").splitlines(keepends=True):
        if current is None and line.startswith("<doc"):
            current = [line]
        elif current is not None:
            current.append(line)
            if line.strip() == "</doc>":
                docs.append(current)
                current = None
    return docs


def write_wikiextractor(src: Path, dst: Path, k: int, name: str, plan: CopyPlan) -> None:
    docs = _wikiextractor_docs(src)
    vocab = collect_vocab("".join(d[2:-1]) for d in docs)
    with open(dst, "w", encoding="utf-8", newline="") as out:
        for copy in range(k):
            for index, doc in enumerate(docs):
                kind = copy_kind(name, copy, index)
                plan.counts[kind] += 1
                if copy == 0:
                    out.writelines(doc)
                    continue
                attrs = dict(re.findall(r'(\w+)="([^"]*)"', doc[0]))
                title = new_title(html.unescape(attrs.get("title", "")), copy)
                opening = re.sub(r'id="([^"]*)"', lambda m: f'id="{m.group(1)}-{copy}"', doc[0], count=1)
                opening = re.sub(r'title="[^"]*"', f'title="{html.escape(title)}"', opening, count=1)
                body = doc[1:-1]
                if body and html.unescape(body[0].strip()) == html.unescape(attrs.get("title", "")):
                    body = [html.escape(title, quote=False) + "\n"] + body[1:]  # the reader drops it again
                rest = perturb("".join(body[1:]), kind, rng_for(name, copy, index), vocab)
                out.write(opening + "".join(body[:1]) + rest + doc[-1])


# --------------------------------------------------------------------------------------------
# News: CSV (optionally inside a zip), JSON lines, one-file-per-article folders


def _field_index(columns: dict, header: list[str] | None, key: str) -> int | None:
    if key not in columns:
        return None
    value = columns[key]
    return value if isinstance(value, int) else header.index(value)


def write_news_csv(src: Path, dst: Path, k: int, name: str, plan: CopyPlan, spec: dict) -> None:
    member = spec.get("member")
    if member:
        with zipfile.ZipFile(src) as archive:
            raw = archive.read(member).decode("utf-8")
    else:
        raw = src.read_text(encoding="utf-8")
    rows = list(csv.reader(io.StringIO(raw, newline="")))
    header = rows.pop(0) if spec.get("header") else None
    title_at = _field_index(spec["columns"], header, "title")
    body_at = _field_index(spec["columns"], header, "body")
    vocab = collect_vocab(row[body_at] for row in rows)
    text = io.StringIO(newline="")
    quoting = csv.QUOTE_MINIMAL if header else csv.QUOTE_ALL  # as the originals are quoted
    writer = csv.writer(text, quoting=quoting, lineterminator="\n")
    if header:
        writer.writerow(header)
    for copy in range(k):
        for index, row in enumerate(rows):
            kind = copy_kind(name, copy, index)
            plan.counts[kind] += 1
            row = list(row)
            rng = rng_for(name, copy, index)
            if kind == "exact":
                row[title_at] = row[title_at] + " " + "." * copy  # new sha1 id, same normalised key
            elif kind != "original":
                row[body_at] = perturb(row[body_at], kind, rng, vocab, shuffle=True)
                if kind == "new":
                    row[title_at] = replace_words(row[title_at], rng, vocab, NEW_WORD_SHARE)
                row[title_at] = row[title_at] + " " + "." * copy  # a near copy's last word may repeat
            writer.writerow(row)
    if member:
        with zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.writestr(member, text.getvalue().encode("utf-8"))
    else:
        dst.write_text(text.getvalue(), encoding="utf-8", newline="")


def write_news_jsonl(src: Path, dst: Path, k: int, name: str, plan: CopyPlan, spec: dict) -> None:
    columns = spec["columns"]
    with open(src, encoding="utf-8", newline="") as fh:
        original = fh.read()
    records = [json.loads(line) for line in original.split("\n") if line.strip()]
    title_key, body_key, url_key = columns.get("title"), columns.get("body"), columns.get("url")
    vocab = collect_vocab(f"{r.get(title_key, '')} {r.get(body_key, '')}" for r in records)
    plan.counts["original"] += len(records)
    with open(dst, "w", encoding="utf-8", newline="") as out:
        out.write(original)  # copy 0 byte for byte
        if k > 1 and not original.endswith("\n"):
            out.write("\n")
        for copy in range(1, k):
            for index, record in enumerate(records):
                kind = copy_kind(name, copy, index)
                plan.counts[kind] += 1
                record = dict(record)
                if copy:
                    rng = rng_for(name, copy, index)
                    record[url_key] = f"{record.get(url_key) or ''}#copy{copy}"  # the id field
                    if kind == "near" and record.get(body_key):
                        record[body_key] = perturb(record[body_key], kind, rng, vocab)
                    elif kind == "near":
                        record[title_key] = perturb(record.get(title_key) or "", kind, rng, vocab)
                    elif kind == "new":
                        record[title_key] = replace_words(record.get(title_key) or "", rng, vocab, NEW_WORD_SHARE)
                        record[body_key] = perturb(record.get(body_key) or "", kind, rng, vocab, shuffle=True)
                out.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_news_folder(src: Path, dst: Path, k: int, name: str, plan: CopyPlan, spec: dict) -> None:
    shutil.copytree(src, dst)
    files = sorted(p for p in src.glob(f"*/{spec.get('file_glob', '*.txt')}") if p.is_file())
    fallback = spec.get("fallback_encoding") or "utf-8"
    vocab = collect_vocab(p.read_bytes().decode("utf-8", errors="ignore") for p in files)
    plan.counts["original"] += len(files)
    for copy in range(1, k):
        for index, path in enumerate(files):
            kind = copy_kind(name, copy, index)
            plan.counts[kind] += 1
            target = dst / path.parent.name / f"{path.stem}_c{copy}{path.suffix}"  # the id: relative path
            if kind == "exact":
                shutil.copyfile(path, target)
                continue
            data = path.read_bytes()
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                text = data.decode(fallback)
            target.write_text(perturb(text, kind, rng_for(name, copy, index), vocab, shuffle=True), encoding="utf-8")


# --------------------------------------------------------------------------------------------


WIKI_WRITERS = {
    "mediawiki_xml": write_mediawiki,
    "wikitext_raw": write_wikitext_raw,
    "wikiextractor": write_wikiextractor,
}
NEWS_WRITERS = {"csv": write_news_csv, "jsonl": write_news_jsonl, "folder": write_news_folder}


def scale_source(spec: dict, src: Path, out_dir: Path, k: int, stage: str) -> tuple[Path, dict[str, int]]:
    """Write ``k`` x the source ``spec`` (resolved to ``src``) under ``out_dir``; returns (path, plan)."""
    plan = CopyPlan()
    dst = out_dir / spec["name"] / src.name
    dst.parent.mkdir(parents=True, exist_ok=True)
    if stage == "ingest_wiki":
        WIKI_WRITERS[spec.get("format", "mediawiki_xml")](src, dst, k, spec["name"], plan)
    else:
        NEWS_WRITERS[spec["format"]](src, dst, k, spec["name"], plan, spec)
    return dst, plan.as_dict()
