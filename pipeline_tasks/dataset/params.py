"""Params sections ``prepare``, ``validate`` and ``tokenize``: typed, frozen, checked on load.

Kept apart from the stage modules so that loading params.yaml imports only the standard library
(the stages import pandas, pyarrow, great-expectations and tokenizers at the top).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import types
from typing import Literal

Script = Literal["latin", "cyrillic", "cjk", "other"]
DEFAULT_LANG_SCRIPTS = {
    "en": "latin",
    "de": "latin",
    "fr": "latin",
    "bg": "cyrillic",
    "ru": "cyrillic",
    "uk": "cyrillic",
    "zh": "cjk",
    "ja": "cjk",
    "ko": "cjk",
}
BYTE_ALPHABET = 256  # byte-level BPE: every byte is a base token


@dataclasses.dataclass(frozen=True)
class PrepareParams:
    """Section ``prepare`` of params.yaml: filters, split fractions and near-duplicate detection."""

    min_chars: int = 40
    max_chars: int = 200_000
    max_nonletter_share: float | None = 0.5  # null disables the filter
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    salt: str = "lm-pipeline-split-v1"  # changing it reshuffles every hashed document
    near_dup: bool = True
    near_dup_threshold: float = 0.8  # estimated Jaccard of shingle sets
    num_perm: int = 128
    shingle_words: int = 5
    shingle_chars: int = 5  # CJK text (no word spaces)
    minhash_seed: int = 1
    cjk_min_share: float = 0.5  # share of CJK letters above which a text is shingled by characters
    lang_scripts: dict[str, Script] = dataclasses.field(
        default_factory=lambda: types.MappingProxyType(dict(DEFAULT_LANG_SCRIPTS))
    )
    # duckdb: streamed in batches, joins and sorts spill to disk, memory bounded by memory_budget_mb;
    # pandas: everything in one frame (memory grows with the corpus); both keep the same documents
    engine: Literal["duckdb", "pandas"] = "duckdb"
    memory_budget_mb: int = 1024  # working memory of the duckdb engine, above the interpreter's own
    spill_dir: str | None = None  # scratch for the duckdb engine (null: beside paths.prepared_dir)
    workers: int = 0  # processes for the duckdb engine's per-document pass (0: one per core)

    def __post_init__(self):
        if self.engine not in ("duckdb", "pandas"):
            raise ValueError(f"engine must be duckdb or pandas, got {self.engine!r}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0 (0: one per core), got {self.workers}")
        if self.memory_budget_mb < 64:
            raise ValueError(f"memory_budget_mb must be >= 64, got {self.memory_budget_mb}")
        if not 0 < self.min_chars <= self.max_chars:
            raise ValueError(f"need 0 < min_chars <= max_chars, got {self.min_chars} and {self.max_chars}")
        if self.max_nonletter_share is not None and not 0 < self.max_nonletter_share <= 1:
            raise ValueError(f"max_nonletter_share must be in (0, 1] or null, got {self.max_nonletter_share}")
        if min(self.val_fraction, self.test_fraction) < 0 or self.val_fraction + self.test_fraction >= 1:
            raise ValueError(
                "val_fraction and test_fraction must be >= 0 and sum to < 1 "
                f"(got {self.val_fraction} + {self.test_fraction})"
            )
        if not 0 < self.near_dup_threshold <= 1:
            raise ValueError(f"near_dup_threshold must be in (0, 1], got {self.near_dup_threshold}")
        if self.num_perm < 16 or self.shingle_words < 1 or self.shingle_chars < 1:
            raise ValueError("num_perm must be >= 16 and shingle sizes >= 1")
        if not self.salt:
            raise ValueError("salt must be a non-empty string")


@dataclasses.dataclass(frozen=True)
class ValidateParams:
    """Section ``validate`` of params.yaml: the thresholds of the great-expectations suites."""

    text_min_chars: int = 40  # keep <= prepare.min_chars
    text_max_chars: int = 200_000  # keep >= prepare.max_chars
    labels: tuple[str, ...] = ("world", "sports", "business", "scitech")
    kinds: tuple[str, ...] = ("wiki", "news")
    news_date_min: str = "1990-01-01"
    news_date_max: str = "2030-12-31"
    nonletter_share_mean_max: float = 0.2
    nonletter_share_max: float = 0.5
    max_duplicate_rate: float = 0.0  # share of rows whose normalised text is not unique
    split_share_tolerance: float = 0.01  # absolute, on the share of hash-split documents
    split_share_z: float = 4.0  # widen the tolerance to z binomial standard deviations on small data
    min_rows: int = 1  # per split
    # pandas frames for great-expectations: a split larger than this is validated chunk by chunk
    memory_budget_mb: int = 1024

    def __post_init__(self):
        if self.memory_budget_mb < 16:
            raise ValueError(f"memory_budget_mb must be >= 16, got {self.memory_budget_mb}")
        if not 0 <= self.text_min_chars <= self.text_max_chars:
            raise ValueError("need 0 <= text_min_chars <= text_max_chars")
        for name in ("news_date_min", "news_date_max"):
            try:
                dt.date.fromisoformat(getattr(self, name))
            except ValueError as exc:
                raise ValueError(
                    f"{name}: expected an ISO date like '2004-01-31' "
                    f"(quote it in params.yaml), got {getattr(self, name)!r}"
                ) from exc
        if not 0 <= self.max_duplicate_rate < 1:
            raise ValueError("max_duplicate_rate must be in [0, 1)")
        if self.split_share_tolerance < 0 or self.split_share_z < 0 or self.min_rows < 0:
            raise ValueError("split_share_tolerance, split_share_z and min_rows must be >= 0")

    def date_bound(self, name: str) -> dt.datetime:
        return dt.datetime.combine(dt.date.fromisoformat(getattr(self, name)), dt.time(), dt.UTC)


@dataclasses.dataclass(frozen=True)
class TokenizeParams:
    """Section ``tokenize`` of params.yaml: the byte-level BPE and which documents it encodes."""

    vocab_size: int = 8192  # including the 256 byte tokens and the special tokens
    min_frequency: int = 2  # a pair must occur this often in the training sample to be merged
    eot_token: str = "<|endoftext|>"  # document boundary in the shards
    pad_token: str = "<|pad|>"  # finetune pads with it (right padding)
    cls_token: str = "<|cls|>"  # optional classification token for finetune
    kinds: tuple[str, ...] = ("wiki", "news")  # which prepared rows form the LM corpus
    # tokenizer training sample cap in UTF-8 bytes (0 = whole train split): the BPE trainer's word
    # table grows with its input, and a 1 GiB sample trains an 8k-50k vocabulary
    train_max_bytes: int = 1 << 30
    batch_size: int = 1024  # documents per encode_batch call

    def __post_init__(self) -> None:
        specials = self.special_tokens
        if len(set(specials)) != len(specials) or not all(specials):
            raise ValueError(f"eot_token, pad_token and cls_token must be distinct and non-empty, got {specials}")
        if self.vocab_size < BYTE_ALPHABET + len(specials) + 1:
            raise ValueError(
                f"vocab_size must be > {BYTE_ALPHABET + len(specials)} "
                f"(256 byte tokens + {len(specials)} special tokens), got {self.vocab_size}"
            )
        if self.vocab_size > 1 << 32:
            raise ValueError(f"vocab_size must fit in uint32, got {self.vocab_size}")
        if self.min_frequency < 1 or self.batch_size < 1 or self.train_max_bytes < 0:
            raise ValueError("min_frequency and batch_size must be >= 1 and train_max_bytes >= 0")
        if not self.kinds:
            raise ValueError("kinds must name at least one kind of document (wiki, news)")

    @property
    def special_tokens(self) -> tuple[str, ...]:
        return (self.eot_token, self.pad_token, self.cls_token)
