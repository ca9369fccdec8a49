"""Wikitext -> clean plain text, and the page checks of ``ingest_wiki`` (redirect, disambiguation).

Pure string functions, no I/O: :func:`clean_wikitext` is what the ``ingest_wiki`` workers run on
every article. Two cleaners produce the same kind of output:

* ``"mwparserfromhell"``: the reference. The whole page is parsed with mwparserfromhell;
  ``<ref>`` and other non-prose tags, tables and file/category links are removed from the tree,
  then ``strip_code``, which on its own keeps ``<ref>`` contents (mwparserfromhell 0.7,
  https://github.com/earwig/mwparserfromhell). Faithful, about 1-2 MB/s of wikitext per core.
* ``"fast"`` (default): linear pre-passes remove what has a clear extent (comments, ``<ref>`` and
  other non-prose tags, templates and tables by brace depth, file/category/interlanguage links by
  bracket depth); regular expressions then unwrap the inline markup (links, bold/italic,
  headings, lists, HTML tags). Only the paragraphs where markup is still left after that (nested
  or unbalanced brackets, unknown tags) are parsed with mwparserfromhell. Tens of MB/s per core.

Both end with the same normalisation: entities decoded, whitespace collapsed (lines stripped, at
most one blank line between paragraphs) and a final scrub, so the text never contains ``{{``,
``}}``, ``[[``, ``]]``, ``{|``, ``|}`` or ``<ref``. Section headings stay, as a line of their own.

Speed notes: every pass costs a scan of the page, so passes run only when a cheap ``in`` test
says they can match, hot loops use ``str.find``, and line-anchored patterns are written as
``\\n...`` (a literal prefix lets the regex engine skip ahead instead of trying every position).
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable

import mwparserfromhell
from mwparserfromhell.nodes import Tag, Template, Wikilink

CLEANERS = ("fast", "mwparserfromhell")

# Namespaces whose links are not prose. The canonical English names work on every wiki; the
# localized names come from the dump's <siteinfo> (see namespace_aliases()).
# <siteinfo> lists one name per namespace, not its aliases (lv "Attēls" for "Fails"), hence the
# aliases of the larger wikis; a link with image options (|thumb, |250px) is a file link anyway.
DEFAULT_DROP_NAMESPACES = frozenset(
    {
        "file",
        "image",
        "media",
        "category",
        "datei",
        "bild",
        "kategorie",
        "fichier",
        "catégorie",
        "archivo",
        "imagen",
        "categoría",
        "immagine",
        "categoria",
        "bestand",
        "afbeelding",
        "categorie",
        "файл",
        "изображение",
        "категория",
        "plik",
        "grafika",
        "kategoria",
        "ficheiro",
        "arquivo",
        "imagem",
        "ファイル",
        "画像",
        "カテゴリ",
        "文件",
        "檔案",
        "图像",
        "圖像",
        "分类",
        "分類",
        "attēls",
        "fails",
        "kategorija",
        "kategoreja",
        "tiedosto",
        "kuva",
        "luokka",
        "fil",
        "kategori",
        "soubor",
        "obrázek",
        "kategória",
        "fájl",
        "kép",
        "dosya",
        "resim",
        "ملف",
        "صورة",
        "تصنيف",
        "קובץ",
        "תמונה",
        "קטגוריה",
    }
)
DROP_NAMESPACE_KEYS = frozenset({-2, 6, 14})  # Media, File, Category
IMAGE_OPTION_RE = re.compile(
    r"\|\s*(?:thumb|thumbnail|frame|frameless|miniatur|mini|upright|right|left|center|"
    r"\d+(?:x\d+)?px)\s*[|\]]",
    re.I,
)

# Tags whose content is not running prose: footnotes, galleries, formulas, code, extensions.
DROP_TAGS = (
    "ref",
    "references",
    "gallery",
    "timeline",
    "imagemap",
    "math",
    "chem",
    "ce",
    "score",
    "graph",
    "mapframe",
    "maplink",
    "templatedata",
    "templatestyles",
    "syntaxhighlight",
    "source",
    "includeonly",
    "hiero",
    "inputbox",
    "categorytree",
    "indicator",
    "section",
)
# Formatting tags: the tag goes, its content stays.
KEEP_CONTENT_TAGS = (
    "b",
    "i",
    "u",
    "s",
    "em",
    "strong",
    "small",
    "big",
    "sub",
    "sup",
    "span",
    "div",
    "p",
    "font",
    "center",
    "blockquote",
    "poem",
    "code",
    "tt",
    "var",
    "abbr",
    "cite",
    "del",
    "ins",
    "mark",
    "q",
    "kbd",
    "samp",
    "nowiki",
    "pre",
    "strike",
    "bdi",
    "dfn",
    "time",
    "data",
    "ruby",
    "rb",
    "rt",
    "rp",
    "rbc",
    "rtc",
    "wbr",
    "hr",
    "li",
    "ul",
    "ol",
    "dl",
    "dt",
    "dd",
    "table",
    "tr",
    "td",
    "th",
    "caption",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "noinclude",
    "onlyinclude",
    "br",
    "langconvert",
)

_DROP = "|".join(DROP_TAGS)
_KEEP = "|".join(KEEP_CONTENT_TAGS)
COMMENT_RE = re.compile(r"<!--.*?(?:-->|\Z)", re.S)
DROP_OPEN_RE = re.compile(rf"<({_DROP})\b(?:[^>/]|/(?!\s*>))*(/\s*)?>", re.I)
DROP_CLOSE_RE = {tag: re.compile(rf"</{tag}\s*>", re.I) for tag in DROP_TAGS}
BR_RE = re.compile(r"<br\b[^>]*>", re.I)
KEEP_TAG_RE = re.compile(rf"</?(?:{_KEEP})\b[^>]*>", re.I)
TABLE_TOKEN_RE = re.compile(r"\n[ \t:]*(\{\||\|\})")
TABLE_LINE_RE = re.compile(r"\n[ \t:]*(?:\{\||\|[-+}]?|!)[^\n]*")
NAMESPACE_LINK_RE = re.compile(r"\[\[[ \t]*([^\[\]|:\n]{1,40}):")
INTERLANGUAGE_PREFIX_RE = re.compile(r"[a-z]{2,3}(?:-[a-z]{2,8})*")
INTERLANGUAGE_RE = re.compile(r"\[\[[a-z]{2,3}(?:-[a-z]{2,8})*:[^\[\]|\n]*\]\]")
PIPE_TRICK_RE = re.compile(r"\[\[:?([^\[\]|\n]*?)(?:[ \t]*\([^\[\]|\n]*\))?\|\]\]")
PIPED_LINK_RE = re.compile(r"\[\[:?[^\[\]|\n]*\|([^\[\]]*)\]\]")
LINK_RE = re.compile(r"\[\[:?([^\[\]|\n]*)\]\]")
EXTERNAL_LINK_RE = re.compile(r"\[(?:https?:|ftp:|//|mailto:|news:|irc:)[^\s\[\]]*(?:[ \t]+([^\[\]\n]*))?\]", re.I)
HEADING_RE = re.compile(r"(\n)[ \t]*={1,6}[ \t]*([^\n=][^\n]*?)[ \t]*=+[ \t]*(?=\n)")
MAGIC_WORD_RE = re.compile(r"__[^\W\da-z_]+__")
LIST_MARKER_RE = re.compile(r"\n[*#:;]+[ \t]*")
RULE_RE = re.compile(r"\n-{4,}[ \t]*(?=\n)")
# Every branch starts with a literal character, so the regex engine can skip ahead to candidates.
LEFTOVER_RE = re.compile(r"\[(?:[\[\]{}]|https?:|//)|\][\[\]{}]|\{[\[\]{}|]|\}[\[\]{}]|\|\}|<[A-Za-z/][^<>\n]*>")
FORBIDDEN_RE = re.compile(r"\{\{|\}\}|\[\[|\]\]|\{\||\|\}|<\s*/?\s*ref\b[^>]*>?", re.I)
EMPTY_PARENS_RE = re.compile(r"\([ ,;:]*\)")
MULTI_SPACE_RE = re.compile(r"  +")
BLANK_LINES_RE = re.compile(r"\n\n\n+")

# "#REDIRECT" magic word in the languages of the larger wikis (dumps also mark redirects with a
# <redirect/> element, which is checked first).
REDIRECT_RE = re.compile(
    r"\s*#\s*(?:redirect|weiterleitung|redirection|redirección|redireccion|rinvia|rinvio|"
    r"doorverwijzing|перенаправление|перенапр|пренасочване|виж|przekieruj|patrz|redirecionamento|"
    r"転送|リダイレクト|重定向|đổi|yönlendirme|omdirigering|ohjaus|átirányítás|přesměruj|"
    r"pāradresācija|peradresavimas|تحويل|הפניה)\s*:?\s*\[\[",
    re.I,
)
DISAMBIGUATION_TEMPLATE_RE = re.compile(
    r"\{\{\s*(?:template\s*:\s*)?(?:[^{}|\n]*\bdisambig[a-z]*\b[^{}|\n]*|[^{}|\n]*\bdisambiguation\b[^{}|\n]*|"
    r"dab|disamb|hndis|geodis|numberdis|mathdab|hndab|shipindex|"
    r"begriffsklärung|homonymie|desambiguación|desambiguação|disambigua|dp|"
    r"неоднозначность|многозначность|пояснение|ujednoznacznienie|aimai|曖昧さ回避|消歧义|消歧義|"
    r"täsmennyssivu|förgreningssida|flertydig|rozcestník|egyért)\s*(?:\||\}\})",
    re.I,
)
DISAMBIGUATION_TITLE_RE = re.compile(
    r"\((?:disambiguation|begriffsklärung|homonymie|desambiguación|desambiguação|disambigua|"
    r"значения|пояснение|ujednoznacznienie|曖昧さ回避|消歧义)\)\s*$",
    re.I,
)


def is_redirect(text: str) -> bool:
    """True when the wikitext starts with a redirect magic word (``#REDIRECT [[...]]``)."""
    return text.lstrip()[:1] == "#" and REDIRECT_RE.match(text) is not None


def is_disambiguation(title: str, text: str = "") -> bool:
    """True for disambiguation pages: a ``(disambiguation)`` title or a disambiguation template."""
    return DISAMBIGUATION_TITLE_RE.search(title) is not None or (
        "{{" in text and DISAMBIGUATION_TEMPLATE_RE.search(text) is not None
    )


def namespace_aliases(names: dict[int, str]) -> frozenset[str]:
    """Link prefixes to drop, lower-cased: the canonical ones plus a wiki's localized Media/File/Category."""
    local = {name.strip().lower().replace("_", " ") for key, name in names.items() if key in DROP_NAMESPACE_KEYS}
    return DEFAULT_DROP_NAMESPACES | {n for n in local if n}


def _remove_drop_tags(text: str) -> str:
    """Remove non-prose tags with their content: ``<ref name=a/>``, ``<ref>..</ref>``, ``<math>..</math>``.

    An opening tag that is never closed is removed alone (its text stays).
    """
    out, pos = [], 0
    while match := DROP_OPEN_RE.search(text, pos):
        out.append(text[pos : match.start()])
        pos = match.end()
        if match.group(2) is None:  # not self-closing: skip to the matching close tag
            close = DROP_CLOSE_RE[match.group(1).lower()].search(text, pos)
            if close:
                pos = close.end()
    out.append(text[pos:])
    return "".join(out)


def _remove_templates(text: str) -> str:
    """Remove every outermost ``{{ ... }}`` span, counting brace depth.

    A ``{{`` that is never closed stays as text (the final scrub drops the bare token), so a stray
    opener cannot swallow the rest of an article.
    """
    find = text.find
    out, depth, last, start = [], 0, 0, 0
    opener, closer = find("{{"), find("}}")
    while closer != -1:
        if opener != -1 and opener < closer:
            if depth == 0:
                start = opener
            depth += 1
            opener = find("{{", opener + 2)
            continue
        if depth:
            depth -= 1
            if depth == 0:
                out.append(text[last:start])
                last = closer + 2
        after = closer + 2
        closer = find("}}", after)
        if opener != -1 and opener < after:  # "{{}}}"-like overlap: re-sync the opener
            opener = find("{{", after)
    out.append(text[last:])
    return "".join(out)


def _remove_tables(text: str) -> str:
    """Remove ``{| ... |}`` tables, nested ones included; the markers count only at a line start."""
    text = f"\n{text}"
    out, depth, last, start = [], 0, 0, 0
    for match in TABLE_TOKEN_RE.finditer(text):
        if match.group(1) == "{|":
            if depth == 0:
                start = match.start()
            depth += 1
        elif depth:
            depth -= 1
            if depth == 0:
                out.append(text[last : start + 1])  # keep the newline that anchored the match
                last = match.end()
    if depth:  # never closed: MediaWiki closes it at the end of the page; drop its markup lines only
        out.append(text[last:start])
        out.append(TABLE_LINE_RE.sub("", text[start:]))
    else:
        out.append(text[last:])
    return "".join(out)[1:]


def _link_end(text: str, start: int) -> int:
    """Index just past the ``]]`` that closes the ``[[`` at ``start`` (nested links counted), or -1."""
    depth, pos = 0, start
    while True:
        opener, closer = text.find("[[", pos), text.find("]]", pos)
        if closer == -1:
            return -1
        if opener != -1 and opener < closer:
            depth, pos = depth + 1, opener + 2
        else:
            depth, pos = depth - 1, closer + 2
            if depth == 0:
                return pos


def _remove_namespace_links(text: str, drop: frozenset[str]) -> str:
    """Drop ``[[File:...]]``-style links whole, caption and nested links included."""
    out, last = [], 0
    for match in NAMESPACE_LINK_RE.finditer(text):
        if match.start() < last:
            continue
        prefix = match.group(1).strip()
        known = prefix.lower().replace("_", " ") in drop
        if not known and INTERLANGUAGE_PREFIX_RE.fullmatch(prefix):  # [[de:...]]: one regex pass later
            continue
        end = _link_end(text, match.start())
        if end == -1:  # unclosed: leave it to the scrub
            break
        if not known and not IMAGE_OPTION_RE.search(text, match.end(), end):
            continue
        out.append(text[last : match.start()])
        last = end
    out.append(text[last:])
    return "".join(out)


def strip_structures(text: str, drop_namespaces: frozenset[str] = DEFAULT_DROP_NAMESPACES) -> str:
    """Pre-passes: comments, non-prose tags, templates, tables, file/category/interlanguage links.

    Non-prose tags go before templates: ``<math>`` may hold unbalanced braces.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if "<!--" in text:
        text = COMMENT_RE.sub("", text)
    if "<" in text:
        text = _remove_drop_tags(text)
    if "{{" in text:
        text = _remove_templates(text)
    if "{|" in text:
        text = _remove_tables(text)
    if "[[" in text:
        text = _remove_namespace_links(text, drop_namespaces)
        text = INTERLANGUAGE_RE.sub("", text)
    return text


def _keep_group(pattern: re.Pattern, text: str) -> str:
    """``pattern.sub(r"\1\2...", text)`` without a Python call per match.

    On Python 3.11 a ``\1`` template is expanded in Python for every match; split() returns
    [text, groups..., text, groups..., ...] in C, and unmatched groups are None.
    """
    return "".join(filter(None, pattern.split(text)))


def _unwrap_inline(text: str) -> str:
    """Regex pass over the inline markup left after :func:`strip_structures`."""
    text = f"\n{text}\n"  # frame with newlines so line-anchored patterns need no ^/$ scan
    if "[[" in text:
        if "|]]" in text:
            text = _keep_group(PIPE_TRICK_RE, text)
        text = _keep_group(PIPED_LINK_RE, text)
        text = _keep_group(LINK_RE, text)
    if "[" in text:
        text = _keep_group(EXTERNAL_LINK_RE, text)
    if "\n=" in text or "\n =" in text:
        text = _keep_group(HEADING_RE, text)
    if "''" in text:  # bold-italic (5 quotes), bold (3), italic (2); a 4th quote is a literal one
        text = text.replace("'" * 5, "").replace("'" * 3, "").replace("'" * 2, "")
    if "<" in text:
        text = BR_RE.sub(" ", text)
        text = KEEP_TAG_RE.sub("", text)
    if "__" in text:
        text = MAGIC_WORD_RE.sub("", text)
    text = LIST_MARKER_RE.sub("\n", text)
    if "\n----" in text:
        text = RULE_RE.sub("\n", text)
    return text[1:-1]


def _mwparser_strip(text: str, drop_namespaces: frozenset[str]) -> str:
    """mwparserfromhell: drop non-prose tags, tables and file/category links, then strip_code."""

    def prune(code) -> None:
        kept = []
        for node in code.nodes:
            if isinstance(node, Template):
                continue
            if isinstance(node, Tag):
                if str(node.tag).strip().lower() in DROP_TAGS or node.wiki_markup == "{|":
                    continue
                if node.contents is not None:
                    prune(node.contents)
            elif isinstance(node, Wikilink):
                prefix, colon, _ = str(node.title).partition(":")
                if colon and prefix.strip().lower().replace("_", " ") in drop_namespaces:
                    continue
                if node.text is None and INTERLANGUAGE_RE.fullmatch(str(node)):
                    continue
                if node.text is not None:
                    prune(node.text)
            elif hasattr(node, "title") and hasattr(node.title, "nodes"):  # Heading, ExternalLink
                prune(node.title)
            kept.append(node)
        code.nodes = kept

    # Walking the tree once is linear; Wikicode.remove() searches the whole tree per call.
    code = mwparserfromhell.parse(text)
    prune(code)
    return code.strip_code(normalize=True, collapse=True)


def _has_leftover(text: str) -> bool:
    """Markup the regex pass cannot have left on purpose (that paragraph goes to mwparserfromhell)."""
    return LEFTOVER_RE.search(text) is not None


def has_forbidden_markup(text: str) -> bool:
    """True when ``text`` still holds a token the output contract forbids (``{{``, ``[[``, ``<ref`` ...)."""
    return FORBIDDEN_RE.search(text) is not None


def normalize_text(text: str) -> str:
    """Decode entities, scrub leftover markup tokens and collapse whitespace."""
    if "&" in text:
        text = html.unescape(text)
    while has_forbidden_markup(text):  # a removal can join two halves into a new token: repeat
        text = FORBIDDEN_RE.sub("", text)
    if "__" in text:
        text = MAGIC_WORD_RE.sub("", text)
    if "(" in text:  # "()" left where a pronunciation or convert template was
        text = EMPTY_PARENS_RE.sub("", text)
    if "<" in text:  # formatting tags mwparserfromhell left as text (e.g. <font size=+1>)
        text = KEEP_TAG_RE.sub("", BR_RE.sub(" ", text))
    # str.replace and literal-prefix patterns only: a class such as [^\S\n]+ that matches every
    # single space costs more than all the markup passes together.
    text = text.replace("\t", " ").replace("\xa0", " ").replace("\r", "")
    if "  " in text:
        text = MULTI_SPACE_RE.sub(" ", text)
    text = text.replace(" \n", "\n").replace("\n ", "\n").replace(" ,", ",").replace(" .", ".")
    if "\n\n\n" in text:
        text = BLANK_LINES_RE.sub("\n\n", text)
    return text.strip()


def clean_wikitext(text: str, drop_namespaces: Iterable[str] = DEFAULT_DROP_NAMESPACES, cleaner: str = "fast") -> str:
    """Plain text of one article's wikitext (the two cleaners are described in the module docstring)."""
    drop = drop_namespaces if isinstance(drop_namespaces, frozenset) else frozenset(drop_namespaces)
    if cleaner == "mwparserfromhell":
        # mwparserfromhell keeps an unclosed <!-- as text; MediaWiki hides the rest of the page.
        return normalize_text(_mwparser_strip(COMMENT_RE.sub("", text.replace("\r\n", "\n")), drop))
    if cleaner != "fast":
        raise ValueError(f"cleaner must be one of {CLEANERS}, got {cleaner!r}")
    stripped = strip_structures(text, drop)
    plain = _unwrap_inline(stripped)
    if _has_leftover(plain):
        # Parse only what is needed: the paragraphs the regex pass could not finish.
        paragraphs = []
        for paragraph in stripped.split("\n\n"):
            fast = _unwrap_inline(paragraph)
            paragraphs.append(_mwparser_strip(paragraph, drop) if _has_leftover(fast) else fast)
        plain = "\n\n".join(paragraphs)
    return normalize_text(plain)


def normalize_plain(text: str) -> str:
    """Already-plain sources (WikiExtractor, JSON lines, WikiText): the same normalisation and scrub."""
    return normalize_text(text.replace("\r\n", "\n"))
