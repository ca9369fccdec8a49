"""Parity checks of the exported ONNX graphs against PyTorch (used by ``export``; results in parity.json).

* classifier fp32 vs PyTorch: max-abs logit (and pooled) difference on real validation texts
  truncated to several sequence lengths, in batches that mix lengths (right padding), plus a
  single-row batch and a batch pairing the shortest with the longest text;
* int8 dynamic / int8 static / fp16 vs fp32: argmax agreement, max-abs difference, accuracy and
  accuracy drop on the same rows at ``max_len`` (fp16 only if the CPU execution provider runs it);
* LM fp32 vs PyTorch on ``tokens_dir/val.bin`` windows at two lengths, and causality: changing
  the tokens from position k on must leave the logits of positions < k unchanged (and must
  change the logits from k on, so the check cannot pass on a graph that ignores its input).

:func:`failures` turns the report into the list of broken bars (empty = pass).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline_tasks.errors import DataError
from pipeline_tasks.ship.bundle import BundleError, encode_texts, make_session
from pipeline_tasks.ship.onnx_tools import compare_outputs
from pipeline_tasks.ship.params import ExportParams

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class _ClassifierRunner:
    """The PyTorch classifier and the ONNX sessions side by side, on the same encoded batches."""

    classifier: Any
    graph: Any  # the export wrapper: its second output is ``pooled``
    tokenizer: Any
    sessions: dict[str, Any]
    pad_id: int
    cls_id: int | None

    def encode(self, texts: list[str], max_len: int):
        return encode_texts(self.tokenizer, texts, max_len, self.pad_id, self.cls_id)

    def torch_outputs(self, input_ids, mask):
        with torch.no_grad():
            ids, m = torch.from_numpy(input_ids), torch.from_numpy(mask)
            logits = self.classifier(ids, m).numpy()  # the real model, not the export wrapper
            pooled = self.graph(ids, m)[1].numpy()
        return logits, pooled

    def onnx_outputs(self, variant: str, input_ids, mask):
        out = self.sessions[variant].run(["logits", "pooled"], {"input_ids": input_ids, "attention_mask": mask})
        return out[0].astype(np.float32), out[1].astype(np.float32)


def _padded_rows(mask) -> int:
    return int((mask.sum(1) < mask.shape[1]).sum())


def _cpu_sessions(files: dict[str, Path], intra_op_threads: int) -> tuple[dict[str, Any], dict[str, str]]:
    """A CPU session per variant; fp16 may be refused by the CPU EP, which is recorded as a note."""
    sessions, notes = {}, {}
    for variant, path in files.items():
        try:
            sessions[variant] = make_session(path, "cpu", intra_op_threads)
        except (BundleError, RuntimeError, ValueError) as exc:  # ORT raises RuntimeError subclasses
            if variant != "fp16":
                raise
            notes[variant] = f"not checked on this machine: CPU EP cannot run fp16 graph ({str(exc)[:200]})"
            logger.warning("export: fp16 %s", notes[variant])
    return sessions, notes


def _fp32_parity_at_length(runner: _ClassifierRunner, texts: list[str], length: int, batch_size: int) -> dict:
    """fp32 vs torch with every text truncated to ``length`` (batches mix lengths: shorter rows are right-padded)."""
    diffs, pooled_diff, padded = [], 0.0, 0
    for i in range(0, len(texts), batch_size):
        ids, mask = runner.encode(texts[i : i + batch_size], length)
        ref_logits, ref_pooled = runner.torch_outputs(ids, mask)
        logits, pooled = runner.onnx_outputs("fp32", ids, mask)
        diffs.append(np.abs(ref_logits - logits).max())
        pooled_diff = max(pooled_diff, float(np.abs(ref_pooled - pooled).max()))
        padded += _padded_rows(mask)
    return {
        "max_abs_diff": float(max(diffs)),
        "pooled_max_abs_diff": pooled_diff,
        "rows": len(texts),
        "padded_rows": padded,
    }


def _fp32_parity_edge_batches(runner: _ClassifierRunner, texts: list[str], max_len: int) -> dict[str, dict]:
    """fp32 vs torch on a single-row batch and on the shortest text padded to the longest."""
    lengths_tok = [len(e.ids) for e in runner.tokenizer.encode_batch(texts, add_special_tokens=False)]
    special = {
        "single_row": [texts[0]],
        "shortest_with_longest": [texts[int(np.argmin(lengths_tok))], texts[int(np.argmax(lengths_tok))]],
    }
    out = {}
    for name, batch in special.items():
        ids, mask = runner.encode(batch, max_len)
        ref_logits, _ = runner.torch_outputs(ids, mask)
        diff = float(np.abs(ref_logits - runner.onnx_outputs("fp32", ids, mask)[0]).max())
        out[name] = {"max_abs_diff": diff, "shape": list(ids.shape), "padded_rows": _padded_rows(mask)}
    return out


def _logits_at_max_len(
    runner: _ClassifierRunner, texts: list[str], max_len: int, batch_size: int
) -> dict[str, np.ndarray]:
    """``{"torch": logits, variant: logits, ...}`` over every text at the serving length."""
    outputs = {"torch": [], **{v: [] for v in runner.sessions}}
    for i in range(0, len(texts), batch_size):
        ids, mask = runner.encode(texts[i : i + batch_size], max_len)
        outputs["torch"].append(runner.torch_outputs(ids, mask)[0])
        for variant in runner.sessions:
            outputs[variant].append(runner.onnx_outputs(variant, ids, mask)[0])
    return {k: np.concatenate(v) for k, v in outputs.items()}


def check_classifier_parity(
    classifier, graph, files: dict[str, Path], tokenizer, frame, cls_meta: dict, export_params: ExportParams
) -> dict:
    """fp32 vs PyTorch (logits and ``pooled``) at several lengths, then every variant vs fp32 at ``max_len``.

    ``graph`` is the exported wrapper around ``classifier``
    (:func:`pipeline_tasks.ship.export.classifier_graph`); its ``pooled`` output is compared too.
    """
    max_len = int(cls_meta["max_len"])
    texts, y = frame["text"].tolist(), frame["label_idx"].to_numpy()
    bs = export_params.parity_batch_size
    sessions, notes = _cpu_sessions(files, export_params.intra_op_threads)
    runner = _ClassifierRunner(classifier, graph, tokenizer, sessions, int(cls_meta["pad_id"]), cls_meta.get("cls_id"))

    lengths = sorted({min(L, max_len) for L in export_params.parity_seq_lens} | {max_len})
    per_length = {str(L): _fp32_parity_at_length(runner, texts, L, bs) for L in lengths}
    worst_pooled = max([0.0] + [entry["pooled_max_abs_diff"] for entry in per_length.values()])
    per_length.update(_fp32_parity_edge_batches(runner, texts, max_len))
    worst_logits = max([0.0] + [entry["max_abs_diff"] for entry in per_length.values()])

    logits = _logits_at_max_len(runner, texts, max_len, bs)
    acc = {k: float((v.argmax(1) == y).mean()) for k, v in logits.items()}
    variants = {}
    for variant in files:
        if variant not in logits:
            variants[variant] = {"checked": False, "cpu_runnable": False, "note": notes.get(variant)}
            continue
        cmp = compare_outputs(logits["fp32"], logits[variant])
        variants[variant] = {
            "checked": True,
            "cpu_runnable": True,
            "agreement": cmp["agreement"],
            "max_abs_diff_vs_fp32": cmp["max_abs_diff"],
            "accuracy": acc[variant],
            "accuracy_drop_vs_fp32": acc["fp32"] - acc[variant],
            "bytes": files[variant].stat().st_size,
        }
    return {
        "fp32_max_abs_diff": worst_logits,
        "fp32_pooled_max_abs_diff": worst_pooled,
        "seq_lens": per_length,
        "torch_accuracy": acc["torch"],
        "rows": len(texts),
        "variants": variants,
    }


def check_lm(lm, path: Path, tokens_dir: Path, token_meta: dict, export_params: ExportParams) -> dict:
    """LM fp32 vs PyTorch on ``val.bin`` windows, and causality of the exported graph."""
    val_bin = Path(tokens_dir) / "val.bin"
    if not val_bin.is_file():
        raise DataError(f"{val_bin} not found: run `lmpipe tokenize` first")
    tokens = np.memmap(val_bin, dtype=np.dtype(token_meta.get("dtype", "uint16")), mode="r")
    block = int(lm.config.block_size)
    session = make_session(path, "cpu", export_params.intra_op_threads)
    rng = np.random.default_rng(0)

    def windows(length, count):
        length = min(length, block, len(tokens) - 1)
        starts = np.linspace(0, len(tokens) - length - 1, count).astype(np.int64)
        return np.stack([np.asarray(tokens[s : s + length], dtype=np.int64) for s in starts])

    parity = {}
    for length in sorted({8, block}):
        x = windows(length, 4)
        with torch.no_grad():
            ref = lm(torch.from_numpy(x))[0].numpy()
        got = session.run(["logits"], {"input_ids": x})[0]
        parity[str(x.shape[1])] = float(np.abs(ref - got).max())

    x = windows(min(block, 64), 2)
    k = x.shape[1] // 2
    changed = x.copy()
    changed[:, k:] = rng.integers(0, lm.config.vocab_size, size=changed[:, k:].shape)
    a = session.run(["logits"], {"input_ids": x})[0]
    b = session.run(["logits"], {"input_ids": changed})[0]
    return {
        "max_abs_diff": max(parity.values()),
        "seq_lens": parity,
        "causality": {
            "changed_from": int(k),
            "seq_len": int(x.shape[1]),
            "max_change_before": float(np.abs(a[:, :k] - b[:, :k]).max()),
            "max_change_after": float(np.abs(a[:, k:] - b[:, k:]).max()),
        },
    }


def _agreement_bar(variant: str, export_params: ExportParams) -> float:
    return export_params.min_fp16_agreement if variant == "fp16" else export_params.min_int8_agreement


def failures(report: dict[str, Any], export_params: ExportParams) -> list[str]:
    """Every broken bar as a readable sentence with the numbers."""
    problems = []
    clf, atol = report["classifier"], export_params.fp32_atol
    if clf["fp32_max_abs_diff"] > atol or clf["fp32_pooled_max_abs_diff"] > atol:
        worst = max(clf["seq_lens"].items(), key=lambda kv: kv[1]["max_abs_diff"])
        problems.append(
            f"fp32 ONNX differs from PyTorch: max |logit diff| {clf['fp32_max_abs_diff']:.3g}, "
            f"pooled {clf['fp32_pooled_max_abs_diff']:.3g} (worst at {worst[0]}) > atol {atol:g}"
        )
    gated = {"int8_dynamic", export_params.default_variant} - {"fp32"}
    for variant in sorted(gated):
        info = clf["variants"][variant]
        bar = _agreement_bar(variant, export_params)
        if not info["checked"]:
            if variant == export_params.default_variant:
                problems.append(f"default variant {variant} could not be checked on CPU: {info.get('note')}")
            continue
        if info["agreement"] < bar:
            problems.append(
                f"{variant} agrees with fp32 on {info['agreement']:.2%} of {clf['rows']} validation rows "
                f"< {bar:.0%} (accuracy drop {info['accuracy_drop_vs_fp32']:+.4f})"
            )
    for variant, info in clf["variants"].items():
        bar = _agreement_bar(variant, export_params)
        if variant not in gated and info.get("checked") and variant != "fp32" and info["agreement"] < bar:
            logger.warning(
                "export: %s agrees with fp32 on only %.2f%% of rows (not the serving variant, recorded)",
                variant,
                100 * info["agreement"],
            )
    lm = report.get("lm")
    if lm:
        if lm["max_abs_diff"] > atol:
            problems.append(f"LM ONNX differs from PyTorch: max |logit diff| {lm['max_abs_diff']:.3g} > {atol:g}")
        causal = lm["causality"]
        if causal["max_change_before"] > atol:
            problems.append(
                f"LM ONNX is not causal: changing tokens >= {causal['changed_from']} moved earlier logits "
                f"by {causal['max_change_before']:.3g}"
            )
        if causal["max_change_after"] <= atol:
            problems.append("LM ONNX ignores its input: changing tokens did not change later logits")
    return problems
