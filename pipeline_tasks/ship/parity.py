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

import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def _torch_outputs(classifier, graph, input_ids, mask):
    import torch

    with torch.no_grad():
        ids, m = torch.from_numpy(input_ids), torch.from_numpy(mask)
        logits = classifier(ids, m).numpy()  # the real model, not the export wrapper
        pooled = graph(ids, m)[1].numpy()
    return logits, pooled


def check_classifier_parity(classifier, files: dict[str, Path], tokenizer, frame, cls_meta: dict, ep) -> dict:
    import numpy as np

    from pipeline_tasks.ship.bundle import BundleError, encode_texts, make_session
    from pipeline_tasks.ship.export import classifier_graph
    from pipeline_tasks.ship.onnx_tools import compare_outputs

    graph = classifier_graph(classifier)
    max_len, pad_id, cls_id = int(cls_meta["max_len"]), int(cls_meta["pad_id"]), cls_meta.get("cls_id")
    texts, y = frame["text"].tolist(), frame["label_idx"].to_numpy()
    bs = ep.parity_batch_size
    sessions, notes = {}, {}
    for variant, path in files.items():
        try:
            sessions[variant] = make_session(path, "cpu", ep.intra_op_threads)
        except (BundleError, RuntimeError, ValueError) as exc:  # ORT raises RuntimeError subclasses
            if variant != "fp16":
                raise
            notes[variant] = f"not checked on this machine: CPU EP cannot run fp16 graph ({str(exc)[:200]})"
            logger.warning("export: fp16 %s", notes[variant])

    def run(variant, ids, mask):
        out = sessions[variant].run(["logits", "pooled"], {"input_ids": ids, "attention_mask": mask})
        return out[0].astype(np.float32), out[1].astype(np.float32)

    # fp32 vs torch at several lengths (batches mix lengths: rows shorter than L are right-padded)
    lengths = sorted({min(L, max_len) for L in ep.parity_seq_lens} | {max_len})
    per_length, worst_logits, worst_pooled = {}, 0.0, 0.0
    for L in lengths:
        diffs, pooled_diff, padded = [], 0.0, 0
        for i in range(0, len(texts), bs):
            ids, mask = encode_texts(tokenizer, texts[i: i + bs], L, pad_id, cls_id)
            ref_logits, ref_pooled = _torch_outputs(classifier, graph, ids, mask)
            logits, pooled = run("fp32", ids, mask)
            diffs.append(np.abs(ref_logits - logits).max())
            pooled_diff = max(pooled_diff, float(np.abs(ref_pooled - pooled).max()))
            padded += int((mask.sum(1) < mask.shape[1]).sum())
        per_length[str(L)] = {"max_abs_diff": float(max(diffs)), "pooled_max_abs_diff": pooled_diff,
                              "rows": len(texts), "padded_rows": padded}
        worst_logits, worst_pooled = max(worst_logits, float(max(diffs))), max(worst_pooled, pooled_diff)

    lengths_tok = [len(e.ids) for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    special = {"single_row": [texts[0]],
               "shortest_with_longest": [texts[int(np.argmin(lengths_tok))], texts[int(np.argmax(lengths_tok))]]}
    for name, batch in special.items():
        ids, mask = encode_texts(tokenizer, batch, max_len, pad_id, cls_id)
        ref_logits, _ = _torch_outputs(classifier, graph, ids, mask)
        diff = float(np.abs(ref_logits - run("fp32", ids, mask)[0]).max())
        per_length[name] = {"max_abs_diff": diff, "shape": list(ids.shape),
                            "padded_rows": int((mask.sum(1) < mask.shape[1]).sum())}
        worst_logits = max(worst_logits, diff)

    # every variant vs fp32 (and torch) at the serving length
    outputs = {"torch": [], **{v: [] for v in sessions}}
    for i in range(0, len(texts), bs):
        ids, mask = encode_texts(tokenizer, texts[i: i + bs], max_len, pad_id, cls_id)
        outputs["torch"].append(_torch_outputs(classifier, graph, ids, mask)[0])
        for variant in sessions:
            outputs[variant].append(run(variant, ids, mask)[0])
    logits = {k: np.concatenate(v) for k, v in outputs.items()}
    acc = {k: float((v.argmax(1) == y).mean()) for k, v in logits.items()}
    variants = {}
    for variant in files:
        if variant not in logits:
            variants[variant] = {"checked": False, "cpu_runnable": False, "note": notes.get(variant)}
            continue
        cmp = compare_outputs(logits["fp32"], logits[variant])
        variants[variant] = {"checked": True, "cpu_runnable": True, "agreement": cmp["agreement"],
                             "max_abs_diff_vs_fp32": cmp["max_abs_diff"], "accuracy": acc[variant],
                             "accuracy_drop_vs_fp32": acc["fp32"] - acc[variant],
                             "bytes": files[variant].stat().st_size}
    return {"fp32_max_abs_diff": worst_logits, "fp32_pooled_max_abs_diff": worst_pooled,
            "seq_lens": per_length, "torch_accuracy": acc["torch"], "rows": len(texts), "variants": variants}


def check_lm(lm, path: Path, tokens_dir: Path, token_meta: dict, ep) -> dict:
    import numpy as np
    import torch

    from pipeline_tasks.ship.bundle import make_session
    from pipeline_tasks.errors import DataError

    val_bin = Path(tokens_dir) / "val.bin"
    if not val_bin.is_file():
        raise DataError(f"{val_bin} not found: run `lmpipe tokenize` first")
    tokens = np.memmap(val_bin, dtype=np.dtype(token_meta.get("dtype", "uint16")), mode="r")
    block = int(lm.config.block_size)
    session = make_session(path, "cpu", ep.intra_op_threads)
    rng = np.random.default_rng(0)

    def windows(length, count):
        length = min(length, block, len(tokens) - 1)
        starts = np.linspace(0, len(tokens) - length - 1, count).astype(np.int64)
        return np.stack([np.asarray(tokens[s: s + length], dtype=np.int64) for s in starts])

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
    return {"max_abs_diff": max(parity.values()), "seq_lens": parity,
            "causality": {"changed_from": int(k), "seq_len": int(x.shape[1]),
                          "max_change_before": float(np.abs(a[:, :k] - b[:, :k]).max()),
                          "max_change_after": float(np.abs(a[:, k:] - b[:, k:]).max())}}


def failures(report: dict[str, Any], ep) -> list[str]:
    """Every broken bar as a readable sentence with the numbers."""
    problems = []
    clf = report["classifier"]
    if clf["fp32_max_abs_diff"] > ep.fp32_atol or clf["fp32_pooled_max_abs_diff"] > ep.fp32_atol:
        worst = max(clf["seq_lens"].items(), key=lambda kv: kv[1]["max_abs_diff"])
        problems.append(f"fp32 ONNX differs from PyTorch: max |logit diff| {clf['fp32_max_abs_diff']:.3g}, "
                        f"pooled {clf['fp32_pooled_max_abs_diff']:.3g} (worst at {worst[0]}) > atol {ep.fp32_atol:g}")
    gated = {"int8_dynamic", ep.default_variant} - {"fp32"}
    for variant in sorted(gated):
        info = clf["variants"][variant]
        bar = ep.min_fp16_agreement if variant == "fp16" else ep.min_int8_agreement
        if not info["checked"]:
            if variant == ep.default_variant:
                problems.append(f"default variant {variant} could not be checked on CPU: {info.get('note')}")
            continue
        if info["agreement"] < bar:
            problems.append(f"{variant} agrees with fp32 on {info['agreement']:.2%} of {clf['rows']} validation rows "
                            f"< {bar:.0%} (accuracy drop {info['accuracy_drop_vs_fp32']:+.4f})")
    for variant, info in clf["variants"].items():
        bar = ep.min_fp16_agreement if variant == "fp16" else ep.min_int8_agreement
        if variant not in gated and info.get("checked") and variant != "fp32" and info["agreement"] < bar:
            logger.warning("export: %s agrees with fp32 on only %.2f%% of rows (not the serving variant, recorded)",
                           variant, 100 * info["agreement"])
    lm = report.get("lm")
    if lm:
        if lm["max_abs_diff"] > ep.fp32_atol:
            problems.append(f"LM ONNX differs from PyTorch: max |logit diff| {lm['max_abs_diff']:.3g} > {ep.fp32_atol:g}")
        causal = lm["causality"]
        if causal["max_change_before"] > ep.fp32_atol:
            problems.append(f"LM ONNX is not causal: changing tokens >= {causal['changed_from']} moved earlier logits "
                            f"by {causal['max_change_before']:.3g}")
        if causal["max_change_after"] <= ep.fp32_atol:
            problems.append("LM ONNX ignores its input: changing tokens did not change later logits")
    return problems
