"""Pure text helpers shared by ``prepare`` and ``validate``: dedup keys and character profiles.

* :func:`normalize_key` — the text used as a deduplication key: NFKC, casefold, every Unicode
  punctuation (P*) and symbol (S*) character replaced by a space, whitespace collapsed. Only the
  key is normalised; the stored text stays exactly as ingested.
* :func:`char_profile` — how many letters of each script (Latin, Cyrillic, CJK, other) and how
  many non-space / non-letter characters a text has, computed with one numpy lookup over the
  code points (about 0.25 s for 20 M characters) instead of a Python loop per character.

No I/O, no params: numpy is the only dependency. The code point tables are built on first use,
not at import.
"""

from __future__ import annotations

import functools
import unicodedata
from typing import NamedTuple

import numpy as np

# Scripts we can tell apart cheaply; anything else that is a letter counts as "other".
SCRIPTS = ("latin", "cyrillic", "cjk", "other")
_CLASS_OTHER_CHAR, _CLASS_SPACE = 0, 1
_CLASS_OF_SCRIPT = {name: 2 + i for i, name in enumerate(SCRIPTS)}  # 2..5

# Code point ranges (inclusive) per script. Only letters inside them count for that script.
_SCRIPT_RANGES = {
    "latin": [(0x0041, 0x024F), (0x1E00, 0x1EFF), (0x2C60, 0x2C7F), (0xA720, 0xA7FF), (0xFF21, 0xFF5A)],
    "cyrillic": [(0x0400, 0x052F), (0x1C80, 0x1C8F), (0x2DE0, 0x2DFF), (0xA640, 0xA69F)],
    # Han (+ extensions and compatibility), kana and Hangul: all written without word spaces
    "cjk": [
        (0x1100, 0x11FF),
        (0x3040, 0x30FF),
        (0x3130, 0x318F),
        (0x31F0, 0x31FF),
        (0x3400, 0x4DBF),
        (0x4E00, 0x9FFF),
        (0xAC00, 0xD7AF),
        (0xF900, 0xFAFF),
        (0xFF66, 0xFF9F),
        (0x20000, 0x3134F),
    ],
}


class CharProfile(NamedTuple):
    chars: int  # all characters
    nonspace: int  # characters that are not whitespace
    letters: int  # str.isalpha() characters
    latin: int
    cyrillic: int
    cjk: int
    other: int  # letters of any other script

    @property
    def nonletter_share(self) -> float:
        """Share of non-whitespace characters that are not letters (digits, punctuation, symbols)."""
        return (self.nonspace - self.letters) / self.nonspace if self.nonspace else 1.0

    def dominant_script(self) -> str | None:
        """The script with the most letters, or None for a text without letters."""
        if not self.letters:
            return None
        counts = {s: getattr(self, s) for s in SCRIPTS}
        return max(SCRIPTS, key=lambda s: (counts[s], -SCRIPTS.index(s)))

    def cjk_share(self) -> float:
        return self.cjk / self.letters if self.letters else 0.0


@functools.lru_cache(maxsize=1)
def _class_table():
    """uint8 class per code point: 0 other, 1 whitespace, 2.. letter of script SCRIPTS[i-2]."""
    table = np.zeros(0x110000, dtype=np.uint8)
    alpha = np.fromiter((chr(c).isalpha() for c in range(0x110000)), dtype=bool, count=0x110000)
    table[alpha] = _CLASS_OF_SCRIPT["other"]
    for script, ranges in _SCRIPT_RANGES.items():
        for lo, hi in ranges:
            span = slice(lo, hi + 1)
            table[span][alpha[span]] = _CLASS_OF_SCRIPT[script]
    space = np.fromiter((chr(c).isspace() for c in range(0x110000)), dtype=bool, count=0x110000)
    table[space] = _CLASS_SPACE
    return table


def char_profile(text: str) -> CharProfile:
    """Character counts by class for ``text`` (see :class:`CharProfile`)."""
    if not text:
        return CharProfile(0, 0, 0, 0, 0, 0, 0)
    # surrogatepass: lone surrogates from bad sources must not crash the profile
    codepoints = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    counts = np.bincount(_class_table()[codepoints], minlength=2 + len(SCRIPTS))
    script_counts = [int(n) for n in counts[2:]]
    return CharProfile(len(text), len(text) - int(counts[_CLASS_SPACE]), sum(script_counts), *script_counts)


@functools.lru_cache(maxsize=1)
def _punct_table() -> dict[int, str]:
    # str.translate with a dict is ~10x faster than a regex char class that spans all planes
    return {c: " " for c in range(0x110000) if unicodedata.category(chr(c))[0] in "PS"}


def normalize_key(text: str) -> str:
    """Deduplication key: NFKC, casefold, punctuation and symbols -> space, whitespace collapsed."""
    if not text:
        return ""
    folded = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(folded.translate(_punct_table()).split())
