"""Stage ``compress``: distil the fine-tuned classifier into a smaller student, prune it, report all of them.

Between ``finetune`` and ``export``. With ``compress.enabled: false`` (the default) it is a
pass-through: ``compress_dir/model.pt`` is a copy of ``finetune_dir/model.pt`` and the graph is
the same either way. With ``compress.enabled: true``:

1. **student alone** (``compress.student_alone``) — the student's shape and initialisation,
   trained on the hard labels of finetune's rows only: the control row of the report;
2. **distilled** — the same student trained on the teacher's soft targets
   (:func:`~pipeline_tasks.train.distill.distillation_loss`) over finetune's labelled rows plus
   ``compress.distill.unlabelled_rows`` news rows of the prepared train split that finetune does
   not use (the teacher labels them); early stopping on val macro-F1;
3. **pruned** (``compress.prune.enabled``) — the distilled student with its least important
   attention heads and MLP neurons removed (:mod:`pipeline_tasks.train.prune`, first-order
   importance on val batches), then a short distillation recovery. The pruned student is
   shipped when pruning is on, else the distilled one.

Every model, teacher included, is exported to int8 ONNX here and measured the way evaluate
measures the served model: accuracy on finetune's test rows (the AG News test set), batch-1 CPU
latency (rounds interleaved between the models, so the ratios are fair), size and parameters.

Inputs: ``finetune_dir/model.pt`` (the teacher), ``tokens_dir/tokenizer.json``,
``prepared_dir/{train,val,test}.parquet``.

Outputs: ``compress_dir/model.pt`` (finetune's checkpoint format plus a ``compression`` block:
what export ships), ``compress_dir/teacher_int8.onnx`` (evaluate's side-by-side reference for the
``max_student_drop`` / ``min_student_speedup`` gates), ``compress_dir/manifest.json``;
``compress_reports_dir/metrics.json`` (DVC metrics), ``table.md`` and ``table.csv`` (one row per
model, the same test rows for all).

Params: section ``compress`` (:class:`~pipeline_tasks.train.params.CompressParams`), plus
``finetune`` (rows, batch sizes, optimiser) and ``seed``. Command: ``python -m pipeline_tasks compress``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from pipeline_tasks import metrics as classification_metrics
from pipeline_tasks.artifacts import atomic_dir, atomic_write_json, atomic_write_text, sha256_file, write_manifest
from pipeline_tasks.dataset.prepared import finetune_rows, unlabelled_news_rows
from pipeline_tasks.errors import DataError
from pipeline_tasks.ship import onnx_tools
from pipeline_tasks.ship.bundle import make_session
from pipeline_tasks.ship.export import classifier_graph, export_onnx
from pipeline_tasks.train import classifier_data, distill, finetune_loop, prune
from pipeline_tasks.train.model import load_classifier, num_parameters
from pipeline_tasks.train.params import CompressParams
from pipeline_tasks.train.training import configure_runtime, resolve_device, seed_everything

logger = logging.getLogger(__name__)

TEACHER_ONNX = "teacher_int8.onnx"
ROWS = ("teacher", "student_alone", "distilled", "pruned")
LATENCY_FEEDS = 64  # real test texts, batch 1, cycled through by the latency runs


# ---------------------------------------------------------------------------------------------
# data


def encode_rows(params, tokenizer, labels: list[str], meta: dict[str, Any]) -> tuple[dict, dict]:
    """``(labelled, distillation)`` data dicts in finetune's layout (``ids``, ``y`` per split).

    ``distillation["train"]`` is finetune's train rows followed by the unlabelled news rows
    (``y = -1``); val and test are finetune's, so every model is selected and scored alike.
    """
    prepared = Path(params.paths.prepared_dir)
    cls_meta = meta["classifier"]
    max_len, cls_id = int(cls_meta["max_len"]), cls_meta.get("cls_id")
    rows = finetune_rows(prepared, params.finetune, params.seed)
    labelled = {
        split: finetune_loop.encode_split(tokenizer, r, labels, max_len, cls_id, prepared / f"{split}.parquet")
        for split, r in rows.items()
    }
    extra = unlabelled_news_rows(
        prepared, params.finetune.dataset.train_sources, compress_params(params).distill.unlabelled_rows, params.seed
    )
    extra_ids = [s for s in classifier_data.encode_texts(tokenizer, extra["text"], max_len, cls_id) if len(s)]
    train = labelled["train"]
    distillation = {
        **labelled,
        "train": {
            "ids": list(train["ids"]) + extra_ids,
            "y": np.concatenate([train["y"], np.full(len(extra_ids), -1, dtype=train["y"].dtype)]),
        },
    }
    logger.info(
        "compress: %d labelled train rows + %d unlabelled news rows (teacher-labelled); val %d, test %d",
        len(train["y"]),
        len(extra_ids),
        len(labelled["val"]["y"]),
        len(labelled["test"]["y"]),
    )
    return labelled, distillation


def training_params(params, *, distilling: bool, epochs: int, max_steps: int):
    """finetune's optimisation params with compress's schedule; distillation rows carry no class labels to weight."""
    cp = compress_params(params)
    changes: dict[str, Any] = {
        "epochs": epochs,
        "max_steps": max_steps,
        "batch_size": cp.distill.batch_size,
        "lr": cp.distill.lr,
        "patience": cp.distill.patience,
        "eval_interval": 0,
    }
    if distilling:
        changes.update(class_weighting="none", sampler="uniform")
    return dataclasses.replace(params.finetune, **changes)


# ---------------------------------------------------------------------------------------------
# scoring and the report


def val_scores(model, val: dict, teacher_pred: np.ndarray, pad_id: int, batch_size: int, device) -> dict[str, float]:
    """Val macro-F1 and agreement with the teacher's val predictions (fp32 PyTorch; test is scored as int8)."""
    pred = finetune_loop.predict(model, val["ids"], pad_id, batch_size, device)
    return {
        "val_macro_f1": classification_metrics.macro_f1(val["y"], pred, model.num_classes),
        "val_agreement_with_teacher": float((pred == teacher_pred).mean()),
    }


def int8_model(model, meta: dict, path: Path, work: Path, params) -> Path:
    """``model`` as int8-dynamic ONNX at ``path`` (export's graph and quantizer)."""
    fp32 = work / f"{path.stem}_fp32.onnx"
    max_len = int(meta["classifier"]["max_len"])
    seq = min(16, max_len)
    vocab = model.backbone.config.vocab_size
    example = (torch.randint(1, vocab, (2, seq)), torch.ones(2, seq, dtype=torch.long))
    export_onnx(
        classifier_graph(model.eval()),
        example,
        fp32,
        ["input_ids", "attention_mask"],
        ["logits", "pooled"],
        max_len,
        params.export.exporter,
        params.export.opset,
    )
    pre = onnx_tools.preprocess_for_quantization(fp32, work / f"{path.stem}_pre.onnx")
    onnx_tools.quantize_int8_dynamic(pre, path, per_channel=params.export.dynamic_per_channel)
    return path


def onnx_logits(session, seqs: list[np.ndarray], pad_id: int, batch_size: int) -> np.ndarray:
    out = None
    for idx in classifier_data.sorted_batches([len(s) for s in seqs], batch_size):
        ids, mask = classifier_data.pad_batch([seqs[i] for i in idx], pad_id)
        logits = session.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]
        if out is None:
            out = np.zeros((len(seqs), logits.shape[1]), np.float32)
        out[idx] = logits
    return out


def measure(models: dict[str, Any], meta: dict, test: dict, work: Path, params) -> dict[str, dict[str, Any]]:
    """Each model as served: int8 ONNX accuracy on the test rows, paired batch-1 latency, size, parameters."""
    cp = compress_params(params)
    pad_id = int(meta["classifier"]["pad_id"])
    sessions, rows = {}, {}
    for name, model in models.items():
        path = int8_model(model, meta, work / f"{name}_int8.onnx", work, params)
        sessions[name] = make_session(path, "cpu", cp.intra_op_threads)
        logits = onnx_logits(sessions[name], test["ids"], pad_id, params.finetune.eval_batch_size)
        rows[name] = {
            "int8_path": path,
            "pred": logits.argmax(1),
            "params": num_parameters(model),
            "int8_size_mb": onnx_tools.file_mb(path),
            "n_layer": model.backbone.config.n_layer,
            "n_embd": model.backbone.config.n_embd,
            "n_head": model.backbone.config.n_head,
            "mlp_dim": model.backbone.config.mlp_hidden,
        }
    feeds = [
        dict(zip(("input_ids", "attention_mask"), classifier_data.pad_batch([s], pad_id)))
        for s in test["ids"][:LATENCY_FEEDS]
    ]
    runners = {name: (lambda feed, s=s: s.run(["logits"], feed)) for name, s in sessions.items()}
    latency = onnx_tools.paired_latency(runners, feeds, cp.latency_warmup, cp.latency_runs)
    y, k = test["y"], len(meta["classifier"]["labels"])
    for name, row in rows.items():
        row["test_accuracy_int8"] = classification_metrics.accuracy(y, row["pred"])
        row["test_macro_f1_int8"] = classification_metrics.macro_f1(y, row["pred"], k)
        row["test_agreement_with_teacher_int8"] = float((row["pred"] == rows["teacher"]["pred"]).mean())
        row["latency_p50_ms"] = latency[name]["p50_ms"]
        row["latency_p95_ms"] = latency[name]["p95_ms"]
        row["speedup_vs_teacher"] = latency["teacher"]["p50_ms"] / max(latency[name]["p50_ms"], 1e-9)
    return rows


TABLE_COLUMNS = (
    ("model", "model"),
    ("shape", "layers x width, heads, MLP"),
    ("params", "parameters"),
    ("int8_size_mb", "int8 MB"),
    ("latency_p50_ms", "p50 ms"),
    ("latency_p95_ms", "p95 ms"),
    ("speedup_vs_teacher", "speed-up"),
    ("test_accuracy_int8", "test accuracy (int8)"),
    ("test_macro_f1_int8", "test macro-F1 (int8)"),
    ("val_agreement_with_teacher", "val agreement with teacher"),
)


def _cell(key: str, row: dict[str, Any]) -> str:
    if key == "shape":
        return f"{row['n_layer']} x {row['n_embd']}, {row['n_head']}, {row['mlp_dim']}"
    value = row.get(key)
    if value is None:
        return "-"
    if key == "params":
        return f"{value / 1e6:.2f} M"
    if key == "speedup_vs_teacher":
        return f"{value:.2f}x"
    if key.endswith("_ms") or key.endswith("_mb"):
        return f"{value:.2f}"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def table_markdown(rows: list[dict[str, Any]], n_test: int) -> str:
    head = "| " + " | ".join(title for _, title in TABLE_COLUMNS) + " |"
    rule = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(TABLE_COLUMNS))) + "|"
    body = ["| " + " | ".join(_cell(key, row) for key, _ in TABLE_COLUMNS) + " |" for row in rows]
    note = (
        f"\n{n_test} test rows (finetune's test set), the same for every model; latency is batch 1 on CPU "
        "with one intra-op thread, int8 dynamic ONNX, runs interleaved between the models.\n"
    )
    return "\n".join([head, rule, *body]) + "\n" + note


def table_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    keys = [k for k, _ in TABLE_COLUMNS if k != "shape"] + ["n_layer", "n_embd", "n_head", "mlp_dim"]
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(keys)
    writer.writerows([[row.get(k) for k in keys] for row in rows])
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# the stage


def _checkpoint(model, meta: dict, compression: dict[str, Any] | None) -> dict[str, Any]:
    checkpoint = {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model_config": model.backbone.config.to_dict(),
        "classifier": meta["classifier"],
        "from_scratch": meta["from_scratch"],
    }
    if compression is not None:
        checkpoint["compression"] = compression
    return checkpoint


def pass_through(params, teacher_pt: Path) -> dict[str, Any]:
    """``compress.enabled: false``: export gets the fine-tuned checkpoint unchanged."""
    paths = params.paths
    with atomic_dir(paths.compress_dir) as out:
        shutil.copyfile(teacher_pt, out / "model.pt")
        write_manifest(
            out,
            "compress",
            {"compress": compress_params(params)},
            {str(teacher_pt): sha256_file(teacher_pt)},
            {"enabled": False},
        )
    with atomic_dir(paths.compress_reports_dir) as rep:
        atomic_write_json(rep / "metrics.json", {"enabled": False, "shipped": "teacher"})
        atomic_write_text(rep / "table.md", "compress.enabled is false: the fine-tuned model is exported unchanged.\n")
        atomic_write_text(rep / "table.csv", table_csv([]))  # the declared plot: the header, no models
    logger.info("compress: disabled, %s passes through to export", teacher_pt)
    return {"enabled": False, "shipped": "teacher", "compress_dir": paths.compress_dir}


def _train_student(student, data, train_params, device, dtype, seed, loss_fn=None):
    result = finetune_loop.train(
        student, data, train_params, student.backbone.config.n_layer, device, dtype, seed, loss_fn=loss_fn
    )
    student.load_state_dict(result.best_state)
    return {
        "steps": result.steps,
        "best_step": result.best_step,
        "best_val_macro_f1": result.best_val_macro_f1,
        "seconds": round(result.seconds, 2),
        "stop_reason": result.stop_reason,
        "curve": result.curve,
    }


def train_students(params, teacher, labelled: dict, distillation: dict, soft: np.ndarray, device, dtype):
    """``(models, training reports, init report, prune report)``: teacher, student alone, distilled, pruned."""
    cp = compress_params(params)
    ft = params.finetune
    config = distill.student_config(teacher.backbone.config, cp.student)
    layer_map = distill.layer_map_for(teacher.backbone.config, config, cp.student)
    models: dict[str, Any] = {"teacher": teacher}
    training: dict[str, Any] = {}
    if cp.student_alone:
        seed_everything(params.seed)
        alone, _ = distill.init_student(teacher, config, layer_map, ft.head_dropout)
        alone_params = training_params(
            params, distilling=False, epochs=cp.distill.epochs, max_steps=cp.distill.max_steps
        )
        # finetune's recipe: the transformer learns alone, then the frozen n-gram expert is mixed back
        # in with the teacher's weight (trained on the mix, the expert's near-perfect fit of the
        # training rows leaves the transformer little gradient: the default run's student alone fell to
        # val macro-F1 0.80 and test accuracy 0.78 that way, against 0.90 and 0.90 with this recipe)
        mixing = None if alone.ngrams is None else float(alone.ngram_weight)
        if mixing is not None:
            alone.ngram_weight.fill_(0.0)
        training["student_alone"] = _train_student(alone.to(device), labelled, alone_params, device, dtype, params.seed)
        if mixing is not None:
            alone.ngram_weight.fill_(mixing)
        models["student_alone"] = alone

    seed_everything(params.seed)
    student, init_report = distill.init_student(teacher, config, layer_map, ft.head_dropout)
    loss_fn = distill.distillation_loss_fn(
        torch.from_numpy(soft), torch.from_numpy(distillation["train"]["y"]), cp.distill.temperature, cp.distill.alpha
    )
    distill_params = training_params(params, distilling=True, epochs=cp.distill.epochs, max_steps=cp.distill.max_steps)
    training["distilled"] = _train_student(
        student.to(device), distillation, distill_params, device, dtype, params.seed, loss_fn
    )
    models["distilled"] = student

    prune_report = None
    if cp.prune.enabled:
        heads, neurons = prune.importance(
            student, labelled["val"]["ids"], labelled["val"]["y"], ft.eval_batch_size, cp.prune.importance_batches
        )
        keep_heads, keep_neurons = prune.kept_counts(
            config.n_head, config.mlp_hidden, cp.prune.head_sparsity, cp.prune.mlp_sparsity
        )
        pruned, prune_report = prune.prune(student, heads, neurons, keep_heads, keep_neurons)
        recovery = training_params(
            params, distilling=True, epochs=cp.prune.recovery_epochs, max_steps=cp.prune.recovery_max_steps
        )
        seed_everything(params.seed)
        training["pruned"] = _train_student(
            pruned.to(device), distillation, recovery, device, dtype, params.seed, loss_fn
        )
        models["pruned"] = pruned
    return models, training, init_report, prune_report


def compress_params(params) -> CompressParams:
    """The ``compress`` section; a params.yaml from before the stage existed means the defaults (disabled)."""
    return getattr(params, "compress", None) or CompressParams()


def run(params, **_options) -> dict[str, Any]:
    cp = compress_params(params)
    paths = params.paths
    teacher_pt = Path(paths.finetune_dir) / "model.pt"
    if not teacher_pt.is_file():
        raise DataError(f"{teacher_pt} not found: run `python -m pipeline_tasks finetune` first")
    if not cp.enabled:
        return pass_through(params, teacher_pt)

    started = time.perf_counter()
    ft = params.finetune
    device = resolve_device(ft.device)
    threads, dtype = configure_runtime(
        device, num_threads=ft.num_threads, deterministic=ft.deterministic, dtype=ft.dtype
    )
    seed_everything(params.seed)
    teacher, meta = load_classifier(teacher_pt)
    teacher = teacher.to(device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    labels = list(meta["classifier"]["labels"])
    tokenizer_path = Path(paths.tokens_dir) / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise DataError(f"{tokenizer_path} not found; run `python -m pipeline_tasks tokenize` first")
    labelled, distillation = encode_rows(params, Tokenizer.from_file(str(tokenizer_path)), labels, meta)
    pad_id, eval_bs = teacher.pad_id, ft.eval_batch_size

    t0 = time.perf_counter()
    # soft targets in the training autocast dtype (bf16 where native: half the time; the targets
    # are softened by the temperature anyway); the teacher's own predictions below in fp32
    soft = finetune_loop.classifier_logits(teacher, distillation["train"]["ids"], pad_id, eval_bs, device, dtype)
    teacher_val = finetune_loop.predict(teacher, labelled["val"]["ids"], pad_id, eval_bs, device)
    logger.info("compress: teacher logits for %d rows in %.1f s", len(soft), time.perf_counter() - t0)

    models, training, init_report, prune_report = train_students(
        params, teacher, labelled, distillation, soft, device, dtype
    )
    shipped = "pruned" if "pruned" in models else "distilled"
    teacher_config = teacher.backbone.config

    for name, model in models.items():
        model.to("cpu").eval()
    scores = {
        name: val_scores(model, labelled["val"], teacher_val, pad_id, eval_bs, torch.device("cpu"))
        for name, model in models.items()
    }
    with tempfile.TemporaryDirectory(prefix="lmpipe-compress-") as work:
        measured = measure(models, meta, labelled["test"], Path(work), params)
        rows = []
        for name in ROWS:
            if name in measured:
                row = {k: v for k, v in measured[name].items() if k not in ("pred", "int8_path")}
                rows.append({"model": name, **row, **scores[name]})
        by_name = {row["model"]: row for row in rows}
        compression = {
            "enabled": True,
            "method": "distilled+pruned" if shipped == "pruned" else "distilled",
            "shipped": shipped,
            "teacher_sha256": sha256_file(teacher_pt),
            "teacher_onnx": TEACHER_ONNX,
            "teacher_config": teacher_config.to_dict(),
            "teacher_params": by_name["teacher"]["params"],
            "student_params": by_name[shipped]["params"],
            "teacher_test_accuracy_int8": by_name["teacher"]["test_accuracy_int8"],
            "student_test_accuracy_int8": by_name[shipped]["test_accuracy_int8"],
            "speedup_vs_teacher": by_name[shipped]["speedup_vs_teacher"],
            "distill": dataclasses.asdict(cp.distill),
            "prune": dataclasses.asdict(cp.prune) if cp.prune.enabled else None,
        }
        with atomic_dir(paths.compress_dir) as out:
            shutil.copyfile(measured["teacher"]["int8_path"], out / TEACHER_ONNX)
            compression["teacher_onnx_sha256"] = sha256_file(out / TEACHER_ONNX)
            torch.save(_checkpoint(models[shipped], meta, compression), out / "model.pt")
            write_manifest(
                out,
                "compress",
                {"compress": cp, "finetune": params.finetune, "seed": params.seed},
                {str(teacher_pt): compression["teacher_sha256"]},
                {"enabled": True, "shipped": shipped},
            )
    n_test = len(labelled["test"]["y"])
    metrics = {
        "enabled": True,
        "shipped": shipped,
        "n_test": n_test,
        "unlabelled_rows": int((distillation["train"]["y"] < 0).sum()),
        "rows": rows,
        "init": init_report,
        "prune": prune_report,
        "training": training,
        "seconds": round(time.perf_counter() - started, 1),
        "threads": threads,
    }
    with atomic_dir(paths.compress_reports_dir) as rep:
        atomic_write_json(rep / "metrics.json", metrics)
        atomic_write_text(rep / "table.md", table_markdown(rows, n_test))
        atomic_write_text(rep / "table.csv", table_csv(rows))
    logger.info("compress: shipped %s\n%s", shipped, table_markdown(rows, n_test))
    return {
        "enabled": True,
        "shipped": shipped,
        "student_test_accuracy_int8": round(by_name[shipped]["test_accuracy_int8"], 4),
        "teacher_test_accuracy_int8": round(by_name["teacher"]["test_accuracy_int8"], 4),
        "speedup_vs_teacher": round(by_name[shipped]["speedup_vs_teacher"], 2),
        "seconds": metrics["seconds"],
    }
