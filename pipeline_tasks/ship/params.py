"""Params sections ``export`` and ``evaluate`` (torch-free, so loading params never imports the ML stack).

:class:`ExportParams` is read by :mod:`pipeline_tasks.ship.export` (and the parity checks in
:mod:`pipeline_tasks.ship.parity`); :class:`EvaluateParams` by :mod:`pipeline_tasks.ship.evaluate`,
with the gate thresholds of :mod:`pipeline_tasks.ship.gates` (pure Python) in ``evaluate.gates``.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from pipeline_tasks.ship.gates import GateThresholds

Variant = Literal["fp32", "int8_dynamic", "int8_static", "fp16"]

DEFAULT_GATES = GateThresholds(
    min_accuracy=0.70,
    min_macro_f1=0.68,
    max_int8_accuracy_drop=0.01,
    max_p95_latency_ms=50.0,
    max_size_mb=50.0,
    max_regression=0.01,
    min_gain_over_baseline=0.0,
    max_student_drop=0.01,
    min_student_speedup=2.0,
)


@dataclasses.dataclass(frozen=True)
class ExportParams:
    exporter: Literal["dynamo", "legacy"] = "dynamo"  # legacy = TorchScript exporter (deprecated)
    opset: int = 18
    default_variant: Variant = "int8_dynamic"  # what predict / serving load by default
    dynamic_per_channel: bool = True
    static_per_channel: bool = True
    static_op_types: tuple[str, ...] = ("MatMul", "Gemm")  # empty = every op ORT can quantize
    calibration_rows: int = 256  # validation texts for the static int8 activation ranges
    calibration_batch_size: int = 16
    parity_rows: int = 256  # validation texts for parity / agreement
    parity_seq_lens: tuple[int, ...] = (8, 32)  # truncation lengths checked besides max_len
    parity_batch_size: int = 32
    fp32_atol: float = 1e-4  # max |logit_onnx - logit_torch|
    min_int8_agreement: float = 0.98  # argmax agreement of the int8 variants with fp32
    min_fp16_agreement: float = 0.98
    export_lm: bool = True
    intra_op_threads: int = 1

    def __post_init__(self) -> None:
        if not 7 <= self.opset <= 23:
            raise ValueError(f"opset must be in [7, 23], got {self.opset}")
        for name in ("calibration_rows", "calibration_batch_size", "parity_rows", "parity_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if any(n < 1 for n in self.parity_seq_lens):
            raise ValueError(f"parity_seq_lens must be >= 1, got {list(self.parity_seq_lens)}")
        for name in ("min_int8_agreement", "min_fp16_agreement"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.fp32_atol <= 0:
            raise ValueError(f"fp32_atol must be > 0, got {self.fp32_atol}")


@dataclasses.dataclass(frozen=True)
class BaselineParams:
    """The n-gram baseline of :mod:`pipeline_tasks.ship.baseline` (TF-IDF + logistic regression)."""

    kind: Literal["tfidf_lr", "none"] = "tfidf_lr"
    ngram_max: int = 2  # word 1..ngram_max-grams
    min_df: int = 2  # n-grams in fewer training rows are dropped
    c_grid: tuple[float, ...] = (4.0, 8.0, 16.0, 32.0)  # inverse regularisation, chosen on val macro-F1
    max_iter: int = 1000

    def __post_init__(self) -> None:
        if self.ngram_max < 1 or self.min_df < 1 or self.max_iter < 1:
            raise ValueError("baseline ngram_max, min_df and max_iter must be >= 1")
        if not self.c_grid or any(c <= 0 for c in self.c_grid):
            raise ValueError(f"baseline c_grid must be positive numbers, got {list(self.c_grid)}")


@dataclasses.dataclass(frozen=True)
class EvaluateParams:
    gates: GateThresholds = DEFAULT_GATES
    baseline: BaselineParams = BaselineParams()
    bootstrap_resamples: int = 1000
    confidence: float = 0.95
    max_test_rows: int = 0  # 0 = every labelled test row
    batch_size: int = 64
    slice_min_rows: int = 30  # smaller slices are counted but get no scores
    time_window: Literal["auto", "month", "year"] = "auto"  # auto: month if the dates span <= 36 months
    latency_runs: int = 200
    latency_warmup: int = 20
    throughput_batch: int = 32
    throughput_runs: int = 20
    intra_op_threads: int = 1  # pinned: comparable latency numbers, less noise
    cuda: Literal["auto", "on", "off"] = "auto"  # auto: time the CUDA EP when torch sees a GPU
    lm_windows: int = 32  # val.bin windows of block_size tokens for the LM bits per byte
    score_torch: bool = True

    def __post_init__(self) -> None:
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")
        for name in (
            "bootstrap_resamples",
            "batch_size",
            "slice_min_rows",
            "latency_runs",
            "throughput_batch",
            "throughput_runs",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_test_rows < 0 or self.latency_warmup < 0 or self.lm_windows < 0 or self.intra_op_threads < 0:
            raise ValueError("max_test_rows, latency_warmup, lm_windows and intra_op_threads must be >= 0")
