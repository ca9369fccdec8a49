"""ONNX / ONNX Runtime helpers shared by ``export``, ``evaluate`` and ``bench/onnx_latency.py`` (no torch).

* quantization: :func:`quantize_int8_dynamic` (weights int8, activations quantized on the fly),
  :func:`quantize_int8_static` (QDQ with activation ranges calibrated on real validation texts
  through :class:`TextCalibrationReader`), both after ``quant_pre_process``;
* :func:`convert_fp16` for the CUDA execution provider (``onnxruntime.transformers.float16``,
  which ships with onnxruntime: onnxconverter-common is not a dependency), inputs/outputs kept fp32;
* :func:`compare_outputs` (max-abs difference and class agreement) used by every parity check;
* :func:`latency_stats` / :func:`throughput` for the timing numbers in evaluate and the bench,
  :func:`paired_latency` for side-by-side ratios (student vs teacher).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from onnxruntime.transformers.float16 import convert_float_to_float16

from pipeline_tasks.errors import PipelineError

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# quantization and fp16


@contextlib.contextmanager
def quiet_root_logger(level: int = logging.WARNING):
    """onnxruntime.quantization logs one INFO line per tensor on the *root* logger; mute that while it runs."""
    root = logging.getLogger()
    previous = root.level
    root.setLevel(max(level, previous))
    try:
        yield
    finally:
        root.setLevel(previous)


def preprocess_for_quantization(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """``quant_pre_process``: ORT graph optimisation + shape inference, as ORT recommends before quantizing.

    Symbolic shape inference can fail on some exporter outputs; then we retry without it (the
    onnx shape inference still runs) rather than give up on quantization.
    """
    with quiet_root_logger():
        try:
            quant_pre_process(str(src), str(dst))
        except Exception as exc:  # noqa: BLE001 - any inference failure has the same fallback
            logger.warning("quant_pre_process with symbolic shapes failed (%s); retrying without", exc)
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
    return Path(dst)


def quantize_int8_dynamic(pre: str | os.PathLike, dst: str | os.PathLike, per_channel: bool = True) -> Path:
    """int8 weights, dynamically quantized activations (MatMul/Gemm/LSTM/Gather... where ORT supports it)."""
    with quiet_root_logger():
        quantize_dynamic(str(pre), str(dst), weight_type=QuantType.QInt8, per_channel=per_channel)
    return Path(dst)


class TextCalibrationReader:
    """``CalibrationDataReader`` over encoded real texts: one feed dict per batch, then ``None``."""

    def __init__(self, encode: Callable[[Sequence[str]], tuple[Any, Any]], texts: Sequence[str], batch_size: int):
        self._batches = [encode(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]
        self._iter = iter(self._batches)

    def get_next(self):
        batch = next(self._iter, None)
        return None if batch is None else {"input_ids": batch[0], "attention_mask": batch[1]}

    def rewind(self) -> None:
        self._iter = iter(self._batches)

    def __len__(self) -> int:
        return len(self._batches)


def quantize_int8_static(
    pre: str | os.PathLike,
    dst: str | os.PathLike,
    reader: TextCalibrationReader,
    per_channel: bool = True,
    op_types: Sequence[str] = (),
) -> Path:
    """QDQ int8 (weights and activations) with MinMax ranges from ``reader``.

    ``op_types`` limits what is quantized (``MatMul``, ``Gemm`` only is usually more accurate for
    transformers: LayerNorm / Softmax / GELU stay fp32); empty = every supported op.
    """

    class _Reader(CalibrationDataReader):  # ORT checks isinstance
        def get_next(self):
            return reader.get_next()

    with quiet_root_logger():
        quantize_static(
            str(pre),
            str(dst),
            _Reader(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            per_channel=per_channel,
            op_types_to_quantize=list(op_types) or None,
        )
    return Path(dst)


def convert_fp16(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """fp16 weights and compute, fp32 inputs/outputs (``keep_io_types``) so callers do not change."""
    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(model, str(dst))
    return Path(dst)


def set_metadata(path: str | os.PathLike, props: dict[str, str], doc: str | None = None) -> None:
    """Write ``metadata_props`` (labels, max_len, ...) into an ONNX file; quantizers copy them on.

    Also drops the exporter's per-node debug metadata (FX node text, module paths, stack traces:
    ~1.5 kB a node, and local source paths have no place in a shipped artifact).
    """
    model = onnx.load(str(path))
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del model.metadata_props[:]
    for key, value in sorted(props.items()):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, str(value)
    if doc:
        model.doc_string = doc
    onnx.save(model, str(path))


def check_model(path: str | os.PathLike) -> None:
    """``onnx.checker.check_model`` with full shape inference; raises with the file name."""
    try:
        onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise PipelineError(f"{Path(path).name}: onnx.checker failed: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# comparisons and timing


def compare_outputs(reference, candidate) -> dict[str, float]:
    """Max-abs / mean-abs difference of two logit arrays and their argmax agreement."""
    reference = np.asarray(reference, dtype=np.float64)
    candidate = np.asarray(candidate, dtype=np.float64)
    if reference.shape != candidate.shape:
        raise ValueError(f"shape mismatch {reference.shape} vs {candidate.shape}")
    diff = np.abs(reference - candidate)
    return {
        "max_abs_diff": float(diff.max()) if diff.size else 0.0,
        "mean_abs_diff": float(diff.mean()) if diff.size else 0.0,
        "agreement": float((reference.argmax(-1) == candidate.argmax(-1)).mean()) if diff.size else 1.0,
        "n": int(reference.shape[0]),
    }


def latency_stats(fn: Callable[[Any], Any], feeds: Sequence[Any], warmup: int, runs: int) -> dict[str, float]:
    """p50/p95/mean milliseconds of ``fn(feed)``, cycling through ``feeds`` (real inputs, real lengths)."""
    for i in range(warmup):
        fn(feeds[i % len(feeds)])
    times = np.empty(runs)
    for i in range(runs):
        start = time.perf_counter()
        fn(feeds[i % len(feeds)])
        times[i] = time.perf_counter() - start
    times *= 1000.0
    return {
        "p50_ms": float(np.percentile(times, 50)),
        "p95_ms": float(np.percentile(times, 95)),
        "mean_ms": float(times.mean()),
        "runs": int(runs),
    }


def paired_latency(
    fns: dict[str, Callable[[Any], Any]], feeds: Sequence[Any], warmup: int, runs: int, rounds: int = 5
) -> dict[str, dict[str, float]]:
    """:func:`latency_stats` of several models measured side by side, for their ratios.

    The runs of each model are split into ``rounds`` that alternate between the models, so a
    change of the machine's state during the measurement (clock, another process) falls on all
    of them alike instead of on whichever model happened to run last.
    """
    for fn in fns.values():
        for i in range(warmup):
            fn(feeds[i % len(feeds)])
    times: dict[str, list[float]] = {name: [] for name in fns}
    per_round = max(1, -(-runs // rounds))
    for r in range(rounds):
        for name, fn in fns.items():
            for i in range(r * per_round, min(runs, (r + 1) * per_round)):
                start = time.perf_counter()
                fn(feeds[i % len(feeds)])
                times[name].append(time.perf_counter() - start)
    out = {}
    for name, seconds in times.items():
        ms = np.asarray(seconds) * 1000.0
        out[name] = {
            "p50_ms": float(np.percentile(ms, 50)),
            "p95_ms": float(np.percentile(ms, 95)),
            "mean_ms": float(ms.mean()),
            "runs": len(ms),
        }
    return out


def throughput(
    fn: Callable[[Any], Any], feeds: Sequence[Any], rows_per_feed: Sequence[int], warmup: int, runs: int
) -> float:
    """Rows per second over ``runs`` calls of ``fn`` on batched ``feeds``."""
    for i in range(warmup):
        fn(feeds[i % len(feeds)])
    rows = 0
    start = time.perf_counter()
    for i in range(runs):
        fn(feeds[i % len(feeds)])
        rows += rows_per_feed[i % len(feeds)]
    return float(rows / max(time.perf_counter() - start, 1e-9))


def file_mb(path: str | os.PathLike) -> float:
    return Path(path).stat().st_size / 1e6
