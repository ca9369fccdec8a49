"""Stage ``export``: ONNX export, int8 / fp16 variants, parity checks against PyTorch, the serving bundle.

Inputs: ``compress_dir/model.pt`` (the classifier to ship: finetune's model, or the student of
``compress``), ``pretrain_dir/model.pt`` (language model),
``tokens_dir/{tokenizer.json,meta.json}``, ``prepared_dir/val.parquet`` (real texts for parity
and int8 calibration).

Outputs: ``bundle_dir/`` (atomic) with

* ``model_fp32.onnx`` — ``(input_ids, attention_mask) int64 [batch, seq] -> logits [batch, classes],
  pooled [batch, hidden]`` (``pooled`` is the classifier's pooled hidden state: the embeddings the
  drift monitor uses), dynamic batch and sequence axes, opset ``export.opset``;
* ``model_int8_dynamic.onnx`` (the default serving variant), ``model_int8_static.onnx`` (QDQ,
  calibrated on validation texts), ``model_fp16.onnx`` (for the CUDA EP, fp32 I/O);
* ``lm_fp32.onnx`` — ``input_ids [batch, seq] -> logits [batch, seq, vocab]`` of the pretrained LM;
* ``tokenizer.json``, ``labels.json``, ``config.json``, ``manifest.json`` (sha256 of every file,
  versions, opset), read back by :mod:`pipeline_tasks.ship.bundle`;

and ``export_reports_dir/parity.json``: fp32 vs PyTorch max-abs differences at several sequence
lengths (with padding), int8/fp16 class agreement and accuracy on validation rows, the LM parity
and causality checks (:mod:`pipeline_tasks.ship.parity`). Any failed check raises
:class:`PipelineError` with the numbers and the bundle is left as it was.

Params: section ``export`` (:class:`~pipeline_tasks.ship.params.ExportParams`).
Command: ``lmpipe export`` (``dvc repro export``).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch
from tokenizers import Tokenizer
from torch.export import Dim

from pipeline_tasks.artifacts import atomic_dir, atomic_write_json, read_json, sha256_file, write_manifest
from pipeline_tasks.dataset.prepared import read_labelled_split
from pipeline_tasks.errors import DataError, PipelineError
from pipeline_tasks.ship import onnx_tools
from pipeline_tasks.ship.bundle import BUNDLE_FORMAT, LM_FILE, VARIANT_FILES, encode_texts, verify_bundle
from pipeline_tasks.ship.params import ExportParams
from pipeline_tasks.ship.parity import check_classifier_parity, check_lm, failures
from pipeline_tasks.train.model import load_classifier, load_lm

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# torch modules -> ONNX graphs


def classifier_graph(classifier):
    """``(input_ids, attention_mask) -> (logits, pooled)`` from the classifier's own methods.

    ``pooled`` is ``SequenceClassifier.pool`` and the logits are ``SequenceClassifier.classify``
    of it (the head, plus the n-gram expert when the model has one), exactly what its
    ``forward`` composes, so the pooling code lives only in ``model.py`` and the backbone runs
    once per call.
    """

    class ClassifierGraph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.classifier = classifier

        def forward(self, input_ids, attention_mask):
            pooled = self.classifier.pool(input_ids, attention_mask)  # (B, C)
            return self.classifier.classify(pooled, input_ids, attention_mask), pooled  # (B, K), (B, C)

    return ClassifierGraph().eval()


def lm_graph(lm):
    class LMGraph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids):
            return self.lm(input_ids)[0]  # (B, T, V)

    return LMGraph().eval()


def export_onnx(
    module,
    example: tuple,
    path: Path,
    input_names: list[str],
    output_names: list[str],
    max_seq: int,
    exporter: str,
    opset: int,
) -> int:
    """Export with dynamic ``batch`` / ``seq`` axes on every input; returns the default-domain opset."""
    for chatty in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "torch._dynamo"):
        logging.getLogger(chatty).setLevel(logging.WARNING)  # per-node INFO lines would bury the stage log
    # "torchvision is not installed. Skipping torchvision::nms" x4 per export: we never use torchvision ops
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    if exporter == "dynamo":
        # torch 2.13: the exporter swaps in a while-loop LSTM/GRU decomposition for dynamic shapes
        # but leaves the op's dispatch cache holding the unrolled one, so a *second* export in the
        # same process silently specializes the sequence length. Start every export clean.
        for op in (torch.ops.aten.lstm.input, torch.ops.aten.gru.input):
            op._dispatch_cache.clear()
        batch, seq = Dim("batch", min=1, max=4096), Dim("seq", min=1, max=max_seq)
        with warnings.catch_warnings():
            # known noise of torch 2.13's exporter (LSTM flat weights, _check_is_size, axis renames)
            for pattern in (".*were assigned during export.*", ".*_check_is_size.*", ".*axis name.*", ".*LeafSpec.*"):
                warnings.filterwarnings("ignore", message=pattern)
            torch.onnx.export(
                module,
                example,
                str(path),
                dynamo=True,
                opset_version=opset,
                external_data=False,
                input_names=input_names,
                output_names=output_names,
                verbose=False,
                dynamic_shapes={name: {0: batch, 1: seq} for name in input_names},
            )
    else:
        axes = {name: {0: "batch", 1: "seq"} for name in input_names}
        axes.update({name: {0: "batch"} for name in output_names})
        torch.onnx.export(
            module,
            example,
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=axes,
        )
    model = onnx.load(str(path))
    for inp in model.graph.input:
        fixed = [d.dim_value for d in inp.type.tensor_type.shape.dim if not d.dim_param]
        if fixed:
            raise PipelineError(
                f"{path.name}: exporter fixed input {inp.name!r} to shape "
                f"{[d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]} "
                "instead of dynamic [batch, seq]; try export.exporter: legacy"
            )
    # the exporter sometimes records the example's length for an output axis that is really
    # dynamic (the LSTM LM's [batch, seq, vocab]); ORT then warns on every other length
    for out in model.graph.output:
        dims = out.type.tensor_type.shape.dim
        for axis, name in ((0, "batch"), (1, "seq"))[: 2 if len(dims) == 3 else 1]:
            dims[axis].Clear()
            dims[axis].dim_param = name
    onnx.save(model, str(path))
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


# ---------------------------------------------------------------------------------------------
# the bundle's files


def write_classifier_variants(
    classifier,
    meta: dict,
    encode,
    calib_texts: list[str],
    files: dict[str, Path],
    work: Path,
    export_params: ExportParams,
) -> int:
    """fp32 export, then int8 dynamic, int8 static QDQ (calibrated on ``calib_texts``) and fp16."""
    labels, max_len = list(meta["classifier"]["labels"]), int(meta["classifier"]["max_len"])
    seq = min(16, max_len)
    example = (torch.randint(1, meta["model_config"]["vocab_size"], (2, seq)), torch.ones(2, seq, dtype=torch.long))
    opset = export_onnx(
        classifier_graph(classifier),
        example,
        files["fp32"],
        ["input_ids", "attention_mask"],
        ["logits", "pooled"],
        max_len,
        export_params.exporter,
        export_params.opset,
    )
    onnx_tools.check_model(files["fp32"])
    onnx_tools.set_metadata(
        files["fp32"],
        {"labels": json.dumps(labels), "max_len": max_len},
        doc="lm-pipeline news topic classifier: logits and pooled embedding",
    )
    logger.info("export: fp32 ONNX written (opset %d), quantizing", opset)
    pre = onnx_tools.preprocess_for_quantization(files["fp32"], work / "pre.onnx")
    onnx_tools.quantize_int8_dynamic(pre, files["int8_dynamic"], per_channel=export_params.dynamic_per_channel)
    reader = onnx_tools.TextCalibrationReader(encode, calib_texts, export_params.calibration_batch_size)
    onnx_tools.quantize_int8_static(
        pre,
        files["int8_static"],
        reader,
        per_channel=export_params.static_per_channel,
        op_types=export_params.static_op_types,
    )
    onnx_tools.convert_fp16(files["fp32"], files["fp16"])
    for variant in ("int8_dynamic", "int8_static", "fp16"):
        onnx_tools.check_model(files[variant])
    return opset


def write_language_model(lm, lm_config: dict, path: Path, export_params: ExportParams) -> None:
    seq = min(16, lm_config["block_size"])
    export_onnx(
        lm_graph(lm),
        (torch.randint(0, lm_config["vocab_size"], (2, seq)),),
        path,
        ["input_ids"],
        ["logits"],
        lm_config["block_size"],
        export_params.exporter,
        export_params.opset,
    )
    onnx_tools.check_model(path)
    onnx_tools.set_metadata(
        path,
        {"block_size": lm_config["block_size"], "vocab_size": lm_config["vocab_size"]},
        doc="lm-pipeline language model: next-token logits",
    )


def bundle_config(
    meta: dict,
    token_meta: dict,
    report: dict,
    files: dict[str, Path],
    lm_config: dict | None,
    opset: int,
    export_params: ExportParams,
) -> dict[str, Any]:
    """``config.json``: everything a server needs besides the files (read by :mod:`pipeline_tasks.ship.bundle`)."""
    cls_meta, checked = meta["classifier"], report["classifier"]["variants"]
    variants = {}
    for v, name in VARIANT_FILES.items():
        variants[v] = {
            "file": name,
            "bytes": files[v].stat().st_size,
            "cpu_runnable": bool(checked[v].get("cpu_runnable", True)),
        }
        if checked[v].get("note"):
            variants[v]["note"] = checked[v]["note"]
    return {
        "format_version": BUNDLE_FORMAT,
        "model_config": meta["model_config"],
        "classifier": cls_meta,
        "from_scratch": meta["from_scratch"],
        "labels": list(cls_meta["labels"]),
        "max_len": int(cls_meta["max_len"]),
        "pad_id": int(cls_meta["pad_id"]),
        "cls_id": cls_meta.get("cls_id"),
        "hidden_size": int(meta["model_config"]["n_embd"]),
        "eot_id": token_meta.get("special_tokens", {}).get("eot"),
        "opset": opset,
        "exporter": export_params.exporter,
        "default_variant": export_params.default_variant,
        "inputs": ["input_ids", "attention_mask"],
        "outputs": ["logits", "pooled"],
        "variants": variants,
        "lm": {"file": LM_FILE, "model_config": lm_config} if lm_config else None,
        # a student of compress: its teacher and the gates' reference (evaluate); None when not compressed
        "compression": meta.get("compression"),
    }


def write_bundle_metadata(
    out: Path,
    tokens_dir: Path,
    labels: list[str],
    config: dict[str, Any],
    inputs: list[Path],
    opset: int,
    export_params: ExportParams,
) -> None:
    """Tokenizer, labels, config and the manifest that hashes them all; then the loader's own check."""
    shutil.copyfile(tokens_dir / "tokenizer.json", out / "tokenizer.json")
    atomic_write_json(out / "labels.json", labels)
    atomic_write_json(out / "config.json", config)
    write_manifest(
        out,
        "export",
        export_params,
        inputs={str(p): sha256_file(p) for p in inputs},
        extra={"opset": opset, "bundle_format": BUNDLE_FORMAT, "default_variant": export_params.default_variant},
    )
    verify_bundle(out)  # the loader's own check, before the bundle is swapped in


# ---------------------------------------------------------------------------------------------
# the stage


def require_tokenizer(tokens_dir: Path) -> None:
    for required in (tokens_dir / "tokenizer.json", tokens_dir / "meta.json"):
        if not required.is_file():
            raise DataError(f"{required} not found: run `lmpipe tokenize` first")


def split_validation_texts(prepared_dir: Path, labels: list[str], export_params: ExportParams, seed: int):
    """``(parity rows, calibration texts)`` from one seeded sample of the validation split."""
    rows = export_params.parity_rows + export_params.calibration_rows
    val = read_labelled_split(prepared_dir, "val", labels=labels, kinds=("news",), max_rows=rows, seed=seed).to_pandas()
    texts = val["text"].tolist()
    parity_frame = val.iloc[: export_params.parity_rows]
    calib_texts = texts[export_params.parity_rows :] or texts  # disjoint when val is big enough
    return parity_frame, calib_texts[: export_params.calibration_rows]


def record_parity(report: dict[str, Any], parity_path: Path, export_params: ExportParams) -> None:
    """Write ``parity.json`` with the verdict; raise (bundle untouched) when a check failed."""
    report["failures"] = failures(report, export_params)
    report["passed"] = not report["failures"]
    atomic_write_json(parity_path, report)
    if report["failures"]:
        raise PipelineError(
            f"export parity failed (bundle not updated; details in {parity_path}): " + "; ".join(report["failures"])
        )


def export_summary(bundle_dir, opset: int, report: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    variants = report["classifier"]["variants"]
    return {
        "bundle_dir": str(bundle_dir),
        "opset": opset,
        "fp32_max_abs_diff": report["classifier"]["fp32_max_abs_diff"],
        "int8_dynamic_agreement": variants["int8_dynamic"].get("agreement"),
        "int8_static_agreement": variants["int8_static"].get("agreement"),
        "sizes_mb": {v: round(info["bytes"] / 1e6, 3) for v, info in config["variants"].items()},
    }


def run(params, **_options) -> dict[str, Any]:
    export_params: ExportParams = params.export
    paths = params.paths
    # compress's output: the fine-tuned model itself, or its student when compress.enabled
    finetune_pt, pretrain_pt = Path(paths.compress_dir) / "model.pt", Path(paths.pretrain_dir) / "model.pt"
    tokens_dir, val_path = Path(paths.tokens_dir), Path(paths.prepared_dir) / "val.parquet"
    require_tokenizer(tokens_dir)
    torch.manual_seed(params.seed)
    classifier, meta = load_classifier(finetune_pt)
    cls_meta = meta["classifier"]
    labels, max_len = list(cls_meta["labels"]), int(cls_meta["max_len"])
    tokenizer = Tokenizer.from_file(str(tokens_dir / "tokenizer.json"))
    token_meta = read_json(tokens_dir / "meta.json")
    parity_frame, calib_texts = split_validation_texts(Path(paths.prepared_dir), labels, export_params, params.seed)
    logger.info(
        "export: %s classifier (%d labels, max_len %d), %d parity rows, %d calibration rows",
        meta["model_config"]["arch"],
        len(labels),
        max_len,
        len(parity_frame),
        len(calib_texts),
    )

    def encode(texts):
        return encode_texts(tokenizer, texts, max_len, int(cls_meta["pad_id"]), cls_meta.get("cls_id"))

    report: dict[str, Any] = {"labels": labels, "max_len": max_len, "exporter": export_params.exporter}
    with tempfile.TemporaryDirectory(prefix="lmpipe-export-") as work, atomic_dir(paths.bundle_dir) as out:
        files = {v: out / name for v, name in VARIANT_FILES.items()}
        opset = write_classifier_variants(classifier, meta, encode, calib_texts, files, Path(work), export_params)
        report["classifier"] = check_classifier_parity(
            classifier, classifier_graph(classifier), files, tokenizer, parity_frame, cls_meta, export_params
        )
        lm_config = None
        if export_params.export_lm:
            lm, lm_config = load_lm(pretrain_pt)
            write_language_model(lm, lm_config, out / LM_FILE, export_params)
            report["lm"] = check_lm(lm, out / LM_FILE, tokens_dir, token_meta, export_params)
        record_parity(report, Path(paths.export_reports_dir) / "parity.json", export_params)
        config = bundle_config(meta, token_meta, report, files, lm_config, opset, export_params)
        inputs = [finetune_pt, tokens_dir / "tokenizer.json", val_path]
        inputs += [pretrain_pt] if export_params.export_lm else []
        write_bundle_metadata(out, tokens_dir, labels, config, inputs, opset, export_params)
    summary = export_summary(paths.bundle_dir, opset, report, config)
    logger.info("export: bundle %s ready: %s", paths.bundle_dir, json.dumps(summary))
    return summary
