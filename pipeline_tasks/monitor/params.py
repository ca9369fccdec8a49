"""Section ``monitor`` of params.yaml: :class:`MonitorParams` and the settings it is made of.

Torch-, pandas- and evidently-free, so that :func:`pipeline_tasks.config.load_params` can check
this section without importing the stage (:mod:`pipeline_tasks.monitor.monitor`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Literal

# the evidently stat tests and embedding drift methods a param may name (evidently 0.7)
NUMERIC_METHODS = (
    "ks",
    "wasserstein",
    "psi",
    "anderson",
    "cramer_von_mises",
    "mannw",
    "ed",
    "t_test",
    "kl_div",
    "jensenshannon",
    "hellinger",
    "emp",
)
CATEGORICAL_METHODS = ("jensenshannon", "chisquare", "psi", "hellinger", "tvd", "kl_div", "z", "g_test")
EMBEDDING_METHODS = ("mmd", "model", "ratio", "distance")


def parse_iso_date(value: str | None, key: str) -> dt.datetime | None:
    """An ISO date as an aware datetime (UTC unless it names a zone); ``None`` stays ``None``."""
    if value is None:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError as exc:
        raise ValueError(f"{key}: {value!r} is not an ISO date (YYYY-MM-DD)") from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def check_date_format(fmt: str) -> None:
    """A strptime format that writes and reads back a day, a month and a year."""
    if not all(code in fmt for code in ("%d", "%m")) and "%b" not in fmt and "%B" not in fmt:
        raise ValueError(f"date_format {fmt!r}: needs a day (%d) and a month (%m, %b or %B), e.g. '%d/%m/%Y'")
    probe = dt.datetime(1987, 4, 3)
    try:
        parsed = dt.datetime.strptime(probe.strftime(fmt), fmt)
    except ValueError as exc:
        raise ValueError(f"date_format {fmt!r} is not a strptime format that reads its own output") from exc
    if parsed.date() != probe.date():
        raise ValueError(f"date_format {fmt!r}: needs a year (%Y or %y)")


@dataclasses.dataclass(frozen=True)
class SliceParams:
    """A set of news rows: exactly one of ``source`` / ``split`` / ``path``, then filters."""

    source: str | None = None  # an ingested news source: paths.raw_news_dir/<source>.parquet
    split: Literal["train", "val", "test"] | None = None  # paths.prepared_dir/<split>.parquet
    path: str | None = None  # a file or folder (relative to the project root)
    sources: tuple[str, ...] = ()  # keep rows whose `source` is listed (empty: all)
    kinds: tuple[str, ...] = ()  # keep rows whose `kind` is listed (empty: all)
    start: str | None = None  # keep date >= start (ISO); rows without a date are dropped
    end: str | None = None  # keep date < end
    max_rows: int | None = None  # seeded random cap after filtering
    # strptime format of text dates (e.g. "%d/%m/%Y"); null: ISO 8601, other forms month first
    # (03/04/1987 is 4 March), and the rows whose day and month could be swapped are counted
    date_format: str | None = None

    def __post_init__(self):
        given = [k for k in ("source", "split", "path") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(f"give exactly one of source, split, path (got {given or 'none'})")
        for key in ("start", "end"):
            parse_iso_date(getattr(self, key), key)
        if self.max_rows is not None and self.max_rows < 1:
            raise ValueError(f"max_rows must be >= 1 or null, got {self.max_rows}")
        if self.date_format is not None:
            check_date_format(self.date_format)


@dataclasses.dataclass(frozen=True)
class WindowParams:
    start: str
    end: str

    def __post_init__(self):
        if parse_iso_date(self.start, "start") >= parse_iso_date(self.end, "end"):
            raise ValueError(f"window start {self.start} must be before end {self.end}")


@dataclasses.dataclass(frozen=True)
class TimelineParams:
    """Monthly windows ``[start, end)`` for drift over time (both null: off)."""

    start: str | None = None
    end: str | None = None
    step_months: int = 1

    def __post_init__(self):
        if (self.start is None) != (self.end is None):
            raise ValueError("timeline: give both start and end, or neither")
        if self.step_months < 1:
            raise ValueError(f"timeline.step_months must be >= 1, got {self.step_months}")
        if self.start and parse_iso_date(self.start, "start") >= parse_iso_date(self.end, "end"):
            raise ValueError(f"timeline start {self.start} must be before end {self.end}")


@dataclasses.dataclass(frozen=True)
class ThresholdParams:
    """Decision table: a signal fires when its value reaches its threshold (null: disabled)."""

    descriptors: float | None = 0.5  # share of descriptor columns whose test fires
    embedding: float | None = 0.015  # evidently embedding drift score (MMD² for mmd, ROC AUC for model)
    prediction: float | None = 0.15  # Jensen-Shannon distance of predicted-class shares
    label: float | None = 0.15  # Jensen-Shannon distance of label shares (labelled batches only)
    bpb: float | None = 0.05  # |relative change| of the LM's mean bits per byte


@dataclasses.dataclass(frozen=True)
class MonitorParams:
    """Section ``monitor`` of params.yaml."""

    reference: SliceParams = SliceParams(split="train", kinds=("news",))
    batch: SliceParams = SliceParams(source="huffpost_v3")
    window_start: str | None = None  # main window of the batch (ISO dates, end exclusive)
    window_end: str | None = None
    windows: tuple[WindowParams, ...] = ()  # extra windows for drift over time
    timeline: TimelineParams = TimelineParams()
    sample_rows: int = 1000  # batch rows per window that go through the model and the tests
    reference_rows: int = 1000  # reference rows that go through the model and the tests
    min_window_rows: int = 30  # smaller windows are reported as skipped
    # permutation null per distance signal: a window's threshold is max(configured, 1 - alpha quantile
    # of the signal over random re-splits of reference + window), so small windows stay quiet (0: off)
    null_permutations: int = 400
    null_alpha: float = 0.005
    oov_max_pieces: int = 2  # a word split into more BPE pieces counts as out of vocabulary
    descriptor_method: str = "ks"  # evidently stat test per descriptor column
    descriptor_threshold: float = 0.05  # its threshold (p-value for ks, distance for wasserstein)
    embedding_method: Literal["mmd", "model", "ratio", "distance"] = "mmd"
    embedding_pca_components: int | None = None
    category_method: str = "jensenshannon"  # predictions and labels
    thresholds: ThresholdParams = ThresholdParams()
    min_signals: int = 1
    variant: str = "fp32"  # classifier variant for embeddings and predictions
    batch_size: int = 64
    intra_op_threads: int = 0  # ORT threads (0: ORT default)
    html_report: bool = True
    report_tsne_rows: int = 500  # rows per side in the report's t-SNE picture of the embeddings (plot only)

    def __post_init__(self):
        for key in ("window_start", "window_end"):
            parse_iso_date(getattr(self, key), key)
        if min(self.sample_rows, self.reference_rows) < 20 or self.min_window_rows < 2:
            raise ValueError("sample_rows and reference_rows must be >= 20 and min_window_rows >= 2")
        if self.null_permutations < 0:
            raise ValueError(f"null_permutations must be >= 0 (0: fixed thresholds), got {self.null_permutations}")
        if not 0 < self.null_alpha < 0.5:
            raise ValueError(f"null_alpha must be in (0, 0.5), got {self.null_alpha}")
        if self.min_signals < 1:
            raise ValueError(f"min_signals must be >= 1, got {self.min_signals}")
        if self.descriptor_method not in NUMERIC_METHODS:
            raise ValueError(f"descriptor_method {self.descriptor_method!r}: expected one of {list(NUMERIC_METHODS)}")
        if self.category_method not in CATEGORICAL_METHODS:
            raise ValueError(f"category_method {self.category_method!r}: expected one of {list(CATEGORICAL_METHODS)}")
        if self.report_tsne_rows < 50:
            raise ValueError(f"report_tsne_rows must be >= 50, got {self.report_tsne_rows}")
        if self.embedding_method not in EMBEDDING_METHODS or self.oov_max_pieces < 1 or self.batch_size < 1:
            raise ValueError("embedding_method must be mmd|model|ratio|distance, oov_max_pieces and batch_size >= 1")
