"""Raw news tables of any size for the memory tests of ``prepare``, in the ingest schema.

Documents are seeded random word sequences (a 20,000-word vocabulary, ~2 KB each), so they are
distinct; one in ten is an exact copy of an earlier one (other id, upper-cased), one in ten a near
copy (one word in a hundred replaced), so both dedup stages have work at every size. Written in
row groups of 512 rows, as ingest writes them, so a reader can stream them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

WORDS_PER_DOC = 300


def vocabulary(rng: np.random.Generator, size: int = 20_000) -> np.ndarray:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    lengths = rng.integers(3, 10, size)
    return np.array(["".join(rng.choice(letters, n)) for n in lengths])


def write_raw_news(folder: Path, text_mb: float, seed: int = 0, file_rows: int = 20_000) -> int:
    """Write about ``text_mb`` MB of text as ``folder/synthetic-*.parquet``; return the row count."""
    rng = np.random.default_rng(seed)
    vocab = vocabulary(rng)
    folder.mkdir(parents=True, exist_ok=True)
    total_rows = max(int(text_mb * 2**20 / (WORDS_PER_DOC * 7.5)), 10)
    written, part = 0, 0
    previous: list[str] = []
    while written < total_rows:
        n = min(file_rows, total_rows - written)
        texts = []
        for i in range(n):
            kind = rng.random()
            if previous and kind < 0.1:
                texts.append(previous[rng.integers(len(previous))].upper())
            elif previous and kind < 0.2:
                words = previous[rng.integers(len(previous))].split()
                for k in rng.integers(0, len(words), max(len(words) // 100, 1)):
                    words[k] = vocab[rng.integers(len(vocab))]
                texts.append(" ".join(words))
            else:
                texts.append(" ".join(vocab[rng.integers(0, len(vocab), WORDS_PER_DOC)]))
        previous = texts[-2000:]
        ids = [f"synthetic:{written + i:09d}" for i in range(n)]
        table = pa.table(
            {
                "id": ids,
                "kind": ["news"] * n,
                "source": ["synthetic"] * n,
                "lang": ["en"] * n,
                "title": [f"Synthetic {written + i}" for i in range(n)],
                "text": texts,
            }
        )
        pq.write_table(table, folder / f"synthetic-{part:04d}.parquet", row_group_size=512)
        written += n
        part += 1
    return written
