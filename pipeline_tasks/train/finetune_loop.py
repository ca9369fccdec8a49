"""Training loop, inference and outputs of the ``finetune`` stage (torch; imported by ``finetune.run``).

Split from :mod:`pipeline_tasks.train.finetune` so the stage module stays a short runner. Pieces:

* :func:`layer_index`, :func:`param_groups`, :func:`configure_optimizer`, :func:`lr_at` — layer-wise
  lr decay, AdamW groups (no weight decay on vectors and embeddings) and the warm-up +
  linear/cosine schedule;
* :func:`backbone_config`, :func:`build_classifier` — pretrained (``torch.load(weights_only=True)``)
  or randomly initialised backbone inside a :class:`SequenceClassifier`;
* :func:`train` — one straight loop (nanoGPT style) with early stopping on validation macro-F1;
* :func:`predict` — batched argmax in length order (little padding), original order restored;
* :func:`build_metrics`, :func:`write_outputs` — the metrics dict and the atomic outputs.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import logging
import math
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from pipeline_tasks import metrics as classification_metrics
from pipeline_tasks.artifacts import atomic_dir, atomic_write_json, atomic_write_text, sha256_file, write_manifest
from pipeline_tasks.errors import DataError, PipelineError
from pipeline_tasks.train import classifier_data
from pipeline_tasks.train.model import ModelConfig, SequenceClassifier, build_lm, read_lm_checkpoint
from pipeline_tasks.train.training import autocast_context, format_duration, log_step

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# optimisation
# ---------------------------------------------------------------------------------------------


NGRAM_PREFIXES = ("ngrams.", "ngram_head.")


def layer_index(name: str, n_layer: int) -> int:
    """Depth of a classifier parameter: 0 embeddings, 1..n_layer blocks, n_layer + 1 final norm and head."""
    if name.startswith("head.") or ".ln_f." in name:
        return n_layer + 1
    if match := re.search(r"\.h\.(\d+)\.", name):  # GPT blocks: backbone.transformer.h.<i>.*
        return int(match.group(1)) + 1
    if match := re.search(r"\.lstm\.\w+_l(\d+)$", name):  # nn.LSTM: weight_ih_l<k>, bias_hh_l<k>
        return int(match.group(1)) + 1
    if re.search(r"\.(wte|wpe|lm_head)\.", name):
        return 0
    raise ValueError(f"cannot place parameter {name!r} in a layer for layer-wise lr decay")


def param_groups(
    model: torch.nn.Module, weight_decay: float, layer_lr_decay: float, n_layer: int
) -> list[dict[str, Any]]:
    """AdamW groups with ``lr_scale = decay^(n_layer + 1 - depth)`` (head and final norm: 1).

    Weight decay only on matrices above the embeddings (biases, norm gains and the token table
    are not shrunk, as in BERT/nanoGPT finetuning). Frozen parameters are left out.
    """
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():  # named_parameters yields a tied weight once
        if not p.requires_grad or name.startswith(NGRAM_PREFIXES):  # trained apart: train_ngram_expert
            continue
        depth = layer_index(name, n_layer)
        scale = layer_lr_decay ** (n_layer + 1 - depth)
        decay = weight_decay if p.dim() >= 2 and depth != 0 else 0.0
        groups.setdefault((scale, decay), []).append(p)
    return [{"params": ps, "lr_scale": s, "weight_decay": d} for (s, d), ps in sorted(groups.items())]


def freeze_embeddings(model: torch.nn.Module, n_layer: int) -> int:
    """Stop gradients into the token/position tables; returns the number of frozen weights."""
    frozen = 0
    for name, p in model.named_parameters():
        if not name.startswith(NGRAM_PREFIXES) and layer_index(name, n_layer) == 0:
            p.requires_grad_(False)
            frozen += p.numel()
    return frozen


def lr_at(step: int, total: int, cfg) -> float:
    """Base lr at ``step`` (0-based): linear warm-up, then linear or cosine decay to ``min_lr_ratio·lr``."""
    warmup = max(1, round(cfg.warmup_ratio * total))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = cfg.min_lr_ratio * cfg.lr
    if cfg.schedule == "cosine":
        return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - floor)
    return floor + (1.0 - progress) * (cfg.lr - floor)


# ---------------------------------------------------------------------------------------------
# data and model
# ---------------------------------------------------------------------------------------------


def encode_split(
    tokenizer, rows: dict[str, list], labels: list[str], max_len: int, cls_id: int | None, where: Path
) -> dict[str, Any]:
    ids = classifier_data.encode_texts(tokenizer, rows["text"], max_len, cls_id)
    empty = [rows["id"][i] for i, s in enumerate(ids) if len(s) == 0]
    if empty:
        raise DataError(f"{where}: {len(empty)} texts encode to no tokens (first id {empty[0]!r})")
    return {
        "ids": ids,
        "y": classifier_data.labels_to_ids(rows["label"], labels, str(where)),
        "row_id": rows["id"],
        "source": rows["source"],
    }


def backbone_config(params, tokenizer, scratch: bool):
    """``(ModelConfig, init)``: the pretrained checkpoint's config and weights, or ``params.model``."""
    vocab = tokenizer.get_vocab_size()
    if scratch:
        return ModelConfig.from_params(params.model, vocab), {"kind": "scratch"}
    path = Path(params.paths.pretrain_dir) / "model.pt"
    config, state, pretrain_step = read_lm_checkpoint(
        path,
        "run `python -m pipeline_tasks pretrain` first, or train the classifier without pretraining "
        "with `finetune --from-scratch`",
    )
    if config.vocab_size != vocab:
        raise DataError(
            f"{path}: vocab_size {config.vocab_size} differs from the tokenizer's {vocab}; the "
            "tokenizer was retrained after pretraining: re-run pretrain (dvc repro does)"
        )
    wanted = ModelConfig.from_params(params.model, vocab)
    if wanted != config:
        logger.warning(
            "pretrained model_config %s differs from params.model %s: using the checkpoint's "
            "(re-run pretrain to apply the params)",
            config.to_dict(),
            wanted.to_dict(),
        )
    return config, {
        "kind": "pretrained",
        "path": str(path),
        "sha256": sha256_file(path),
        "state": state,
        "pretrain_step": pretrain_step,
    }


def build_classifier(config, init: dict[str, Any], num_classes: int, cfg, pad_id: int):
    backbone = build_lm(config)
    if init.get("state") is not None:
        backbone.load_state_dict(init["state"])  # strict: a partial load would silently train from noise
    return SequenceClassifier(
        backbone,
        num_classes,
        pooling=cfg.pooling,
        pad_id=pad_id,
        dropout=cfg.head_dropout,
        ngram_buckets=cfg.ngram_buckets,
        ngram_dim=cfg.ngram_dim,
    )


@torch.no_grad()
def predict(
    model,
    seqs: list[np.ndarray],
    pad_id: int,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> np.ndarray:
    """Argmax class per sequence, in input order."""
    return classifier_logits(model, seqs, pad_id, batch_size, device, dtype).argmax(1)


@torch.no_grad()
def classifier_logits(
    model,
    seqs: list[np.ndarray],
    pad_id: int,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> np.ndarray:
    """Logits ``(N, num_classes)`` per sequence in input order, float32 numpy."""
    was_training = model.training
    model.eval()
    out = np.empty((len(seqs), model.num_classes), dtype=np.float32)
    for idx in classifier_data.sorted_batches([len(s) for s in seqs], batch_size):
        ids, mask = classifier_data.pad_batch([seqs[i] for i in idx], pad_id)
        with autocast_context(device, dtype):
            logits = model(torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device))
        out[idx] = logits.float().cpu().numpy()
    model.train(was_training)
    return out


# ---------------------------------------------------------------------------------------------
# the n-gram expert (trained alone, then mixed in with the weight val prefers)
# ---------------------------------------------------------------------------------------------


def train_ngram_expert(model, data: dict[str, dict], cfg, pad_id: int, device: torch.device, seed: int) -> dict:
    """Train ``model.ngrams`` + ``model.ngram_head`` alone on the train rows, then freeze them.

    AdamW at ``ngram_lr`` with linear decay over ``ngram_epochs``, no weight decay (AdamW would
    shrink every table row each step, including the rows of n-grams a batch does not contain),
    plain cross-entropy, float32. Its val accuracy alone is returned for the report.
    """
    start = time.perf_counter()
    params = [*model.ngrams.parameters(), *model.ngram_head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=cfg.ngram_lr, weight_decay=0.0)
    ids, y = data["train"]["ids"], data["train"]["y"]
    rng = np.random.default_rng(seed + 1)
    batches = [rng.permutation(len(y)) for _ in range(cfg.ngram_epochs)]
    total = cfg.ngram_epochs * math.ceil(len(y) / cfg.batch_size)
    step = 0
    for order in batches:
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            x, mask = classifier_data.pad_batch([ids[j] for j in idx], pad_id)
            x, mask = torch.from_numpy(x).to(device), torch.from_numpy(mask).to(device)
            for group in optimizer.param_groups:
                group["lr"] = cfg.ngram_lr * (1.0 - step / total)
            loss = F.cross_entropy(model.ngram_logits(x, mask), torch.from_numpy(y[idx]).to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    for p in params:
        p.requires_grad_(False)
    val_pred = expert_logits(model, data["val"]["ids"], pad_id, cfg.eval_batch_size, device)[1].argmax(1)
    info = {
        "buckets": cfg.ngram_buckets,
        "dim": cfg.ngram_dim,
        "steps": step,
        "seconds": time.perf_counter() - start,
        "val_accuracy_alone": classification_metrics.accuracy(data["val"]["y"], val_pred),
    }
    logger.info(
        "finetune: n-gram expert (%d buckets x %d) %d steps in %.1f s, val accuracy alone %.4f",
        cfg.ngram_buckets,
        cfg.ngram_dim,
        step,
        info["seconds"],
        info["val_accuracy_alone"],
    )
    return info


@torch.no_grad()
def expert_logits(model, seqs: list[np.ndarray], pad_id: int, batch_size: int, device: torch.device):
    """``(transformer logits, n-gram logits)`` per sequence in input order, float32 numpy."""
    was_training = model.training
    model.eval()
    out = np.zeros((2, len(seqs), model.num_classes), dtype=np.float32)
    for idx in classifier_data.sorted_batches([len(s) for s in seqs], batch_size):
        x, mask = (torch.from_numpy(a).to(device) for a in classifier_data.pad_batch([seqs[i] for i in idx], pad_id))
        out[0, idx] = model.transformer_logits(x, mask).float().cpu().numpy()
        out[1, idx] = model.ngram_logits(x, mask).float().cpu().numpy()
    model.train(was_training)
    return out[0], out[1]


def choose_ngram_weight(model, val_logits: tuple[np.ndarray, np.ndarray], y: np.ndarray, weights) -> dict:
    """Set ``model.ngram_weight`` to the entry of ``weights`` with the best val macro-F1.

    ``val_logits`` are :func:`expert_logits` of the val rows. Ties go to the smaller weight
    (the transformer alone when 0 ties).
    """
    transformer, ngram = val_logits
    table = []
    for weight in sorted(weights):
        pred = (transformer + weight * ngram).argmax(1)
        table.append(
            {
                "weight": weight,
                "val_accuracy": classification_metrics.accuracy(y, pred),
                "val_macro_f1": classification_metrics.macro_f1(y, pred, model.num_classes),
            }
        )
    best = max(table, key=lambda row: row["val_macro_f1"])  # max keeps the first (smallest) of ties
    model.ngram_weight.fill_(best["weight"])
    alone = {
        name: classification_metrics.macro_f1(y, logits.argmax(1), model.num_classes)
        for name, logits in (("transformer", transformer), ("ngram", ngram))
    }
    logger.info(
        "finetune: n-gram weight %g: val macro-F1 %.4f (transformer alone %.4f, n-gram expert alone %.4f)",
        best["weight"],
        best["val_macro_f1"],
        alone["transformer"],
        alone["ngram"],
    )
    return {
        "weight": best["weight"],
        "grid": table,
        "val_macro_f1_transformer_alone": alone["transformer"],
        "val_macro_f1_ngram_alone": alone["ngram"],
    }


def predict_with_experts(model, data: dict[str, dict], cfg, pad_id: int, device: torch.device, info: dict):
    """``(val_pred, test_pred)`` of the mixed model after choosing its weight on val.

    One pass per split gives both experts' logits: the mix, and each expert alone on test
    (``info``: what pretraining adds over the n-gram expert, for the report).
    """
    logits = {
        split: expert_logits(model, data[split]["ids"], pad_id, cfg.eval_batch_size, device)
        for split in ("val", "test")
    }
    info.update(choose_ngram_weight(model, logits["val"], data["val"]["y"], cfg.ngram_weights))
    weight = float(model.ngram_weight)
    test_y = data["test"]["y"]
    info["test_accuracy_transformer_alone"] = classification_metrics.accuracy(test_y, logits["test"][0].argmax(1))
    info["test_accuracy_ngram_alone"] = classification_metrics.accuracy(test_y, logits["test"][1].argmax(1))
    return tuple((t + weight * n).argmax(1) for t, n in (logits["val"], logits["test"]))


# ---------------------------------------------------------------------------------------------
# training loop
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainResult:
    best_state: dict[str, torch.Tensor]
    best_step: int = 0
    best_epoch: int = 0
    best_val_macro_f1: float = -1.0
    steps: int = 0
    total_steps: int = 0
    epochs: float = 0.0
    examples: int = 0
    seconds: float = 0.0
    final_loss: float = float("nan")
    stop_reason: str = "max_steps"
    curve: list[dict[str, float]] = dataclasses.field(default_factory=list)


def train(
    model,
    data: dict[str, dict],
    cfg,
    n_layer: int,
    device: torch.device,
    dtype: torch.dtype,
    seed: int,
    loss_fn=None,
) -> TrainResult:
    """Train ``model`` on ``data["train"]``, keeping the weights of the best val macro-F1.

    ``loss_fn(logits, idx)`` replaces the cross-entropy on ``data["train"]["y"]`` (``idx``: the
    batch's row indices): compress distils through it, with the teacher's logits per row.
    """
    train_ids, y = data["train"]["ids"], data["train"]["y"]
    n, bs = len(y), cfg.batch_size
    lengths = np.array([len(s) for s in train_ids])
    steps_per_epoch = math.ceil(n / bs)
    total = cfg.epochs * steps_per_epoch if not cfg.max_steps else min(cfg.max_steps, cfg.epochs * steps_per_epoch)
    eval_every = cfg.eval_interval or steps_per_epoch

    optimizer = configure_optimizer(model, cfg, n_layer, device)
    loss_weight = _loss_weight(y, model.num_classes, cfg.class_weighting, device)
    rng = np.random.default_rng(seed)
    sampler_gen = torch.Generator().manual_seed(seed)
    sample_w = (
        torch.as_tensor(classifier_data.sample_weights(y, model.num_classes)) if cfg.sampler == "weighted" else None
    )

    result = TrainResult(best_state=copy.deepcopy(model.state_dict()), total_steps=total)
    logger.info(
        "finetune: %d steps (%d / epoch, batch %d), eval every %d steps, patience %d",
        total,
        steps_per_epoch,
        bs,
        eval_every,
        cfg.patience,
    )
    model.train()
    step, bad_evals, run_loss, run_n, seen = 0, 0, 0.0, 0, 0
    t_start = t_log = time.perf_counter()
    seen_at_log = 0
    bar = tqdm(total=total, desc="finetune", unit="step", disable=None)
    stop = False
    for epoch in range(cfg.epochs):
        for idx in _epoch_batches(lengths, bs, rng, sample_w, sampler_gen):
            if step >= total:
                break
            lr = lr_at(step, total, cfg)
            loss = _train_batch(
                model, optimizer, data["train"], idx, lr, loss_weight, cfg, device, dtype, step, loss_fn
            )
            step += 1
            seen += len(idx)
            run_loss += loss * len(idx)
            run_n += len(idx)
            bar.update(1)
            if step % cfg.log_interval == 0 or step == total:
                now = time.perf_counter()
                rate = (seen - seen_at_log) / max(now - t_log, 1e-9)
                log_step(
                    logger,
                    step,
                    total,
                    run_loss / max(run_n, 1),
                    lr,
                    throughput=f"{rate:.0f} ex/s",
                    seconds_per_step=bs / max(rate, 1e-9),
                    detail=f"epoch {epoch + 1}",
                )
                t_log, seen_at_log = now, seen
            if step % eval_every == 0 or step == total:
                _evaluate(model, data["val"], cfg, device, dtype, step, epoch, run_loss / max(run_n, 1), result)
                bad_evals = 0 if result.best_step == step else bad_evals + 1
                run_loss, run_n = 0.0, 0
                if cfg.patience and bad_evals >= cfg.patience:
                    result.stop_reason = f"early_stopping (no val macro-F1 gain in {bad_evals} evaluations)"
                    stop = True
                t_log, seen_at_log = time.perf_counter(), seen  # eval time is not training throughput
            if stop:
                break
        if stop or step >= total:
            break
    bar.close()
    result.steps, result.examples = step, seen
    result.epochs = round(seen / n, 3)
    result.seconds = time.perf_counter() - t_start
    result.final_loss = result.curve[-1]["train_loss"] if result.curve else float("nan")
    logger.info(
        "finetune: %d steps in %s, best val macro-F1 %.4f at step %d (%s)",
        step,
        format_duration(result.seconds),
        result.best_val_macro_f1,
        result.best_step,
        result.stop_reason,
    )
    return result


def configure_optimizer(model: torch.nn.Module, cfg, n_layer: int, device: torch.device) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`, after freezing the embeddings when ``cfg.freeze_embeddings``."""
    if cfg.freeze_embeddings:
        logger.info("finetune: %d embedding weights frozen", freeze_embeddings(model, n_layer))
    extra = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay, cfg.layer_lr_decay, n_layer),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        **extra,
    )


def _loss_weight(y: np.ndarray, num_classes: int, scheme: str, device: torch.device) -> torch.Tensor | None:
    weights = classifier_data.class_weights(y, num_classes, scheme)
    if weights is None:
        return None
    logger.info("finetune: class weights %s", np.round(weights, 3).tolist())
    return torch.tensor(weights, dtype=torch.float32, device=device)


def _epoch_batches(
    lengths: np.ndarray,
    batch_size: int,
    rng: np.random.Generator,
    sample_w: torch.Tensor | None,
    sampler_gen: torch.Generator,
) -> list[np.ndarray]:
    """One epoch of length-bucketed batches; with ``sample_w`` a class-balanced draw with replacement first."""
    order = None
    if sample_w is not None:
        sampler = torch.utils.data.WeightedRandomSampler(
            sample_w, len(lengths), replacement=True, generator=sampler_gen
        )
        order = np.fromiter(iter(sampler), dtype=np.int64, count=len(lengths))
    return classifier_data.length_bucketed_batches(lengths, batch_size, rng, order=order)


def _train_batch(
    model,
    optimizer,
    split: dict[str, Any],
    idx: np.ndarray,
    lr: float,
    loss_weight,
    cfg,
    device: torch.device,
    dtype: torch.dtype,
    step: int,
    loss_fn=None,
) -> float:
    """One optimizer step on the examples ``idx``; returns the batch's mean loss."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
    ids, mask = classifier_data.pad_batch([split["ids"][i] for i in idx], model.pad_id)
    x, m = torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)
    with autocast_context(device, dtype):
        logits = model(x, m)  # (B, num_classes)
    if loss_fn is not None:
        loss = loss_fn(logits.float(), idx)
    else:
        target = torch.from_numpy(split["y"][idx]).to(device)
        loss = F.cross_entropy(logits.float(), target, weight=loss_weight, label_smoothing=cfg.label_smoothing)
    if not torch.isfinite(loss):
        raise PipelineError(
            f"finetune: loss is {loss.item()} at step {step}; lower finetune.lr (now {cfg.lr}) or enable grad_clip"
        )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    return loss.item()


def _evaluate(
    model, val: dict[str, Any], cfg, device, dtype, step: int, epoch: int, train_loss: float, result: TrainResult
) -> None:
    """Score val, append to the curve and keep a CPU copy of the weights when macro-F1 improved."""
    pred = predict(model, val["ids"], model.pad_id, cfg.eval_batch_size, device, dtype)
    f1 = classification_metrics.macro_f1(val["y"], pred, model.num_classes)
    acc = classification_metrics.accuracy(val["y"], pred)
    result.curve.append(
        {
            "step": step,
            "epoch": epoch + 1,
            "val_macro_f1": round(f1, 6),
            "val_acc": round(acc, 6),
            "train_loss": round(train_loss, 6),
        }
    )
    improved = f1 > result.best_val_macro_f1 + cfg.min_delta
    if improved:
        result.best_val_macro_f1, result.best_step, result.best_epoch = f1, step, epoch + 1
        result.best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    logger.info(
        "eval step %d | val macro-F1 %.4f | val acc %.4f | train loss %.4f%s",
        step,
        f1,
        acc,
        train_loss,
        " (best)" if improved else "",
    )


# ---------------------------------------------------------------------------------------------
# metrics and outputs
# ---------------------------------------------------------------------------------------------


def build_metrics(
    data, val_pred, test_pred, labels, result: TrainResult, cfg, scratch: bool, model_config, seed: int
) -> dict[str, Any]:
    test = classification_metrics.classification_report(data["test"]["y"], test_pred, labels)
    if cfg.bootstrap_resamples:
        low, high = classification_metrics.bootstrap_ci(
            data["test"]["y"], test_pred, classification_metrics.accuracy, cfg.bootstrap_resamples, 0.95, seed
        )
        test["accuracy_ci95"] = [round(low, 6), round(high, 6)]
    val = classification_metrics.classification_report(data["val"]["y"], val_pred, labels)
    return {
        "test": test,
        "val": val,
        "best": {
            "step": result.best_step,
            "epoch": result.best_epoch,
            "val_macro_f1": round(result.best_val_macro_f1, 6),
        },
        "train": {
            "steps": result.steps,
            "total_steps": result.total_steps,
            "epochs": result.epochs,
            "examples": result.examples,
            "rows": len(data["train"]["y"]),
            "seconds": round(result.seconds, 2),
            "examples_per_s": round(result.examples / max(result.seconds, 1e-9), 1),
            "final_loss": result.final_loss,
            "stop_reason": result.stop_reason,
        },
        "from_scratch": scratch,
        "arch": model_config.arch,
        "labels": labels,
    }


def _csv_text(header: list[str], rows) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def write_outputs(
    params,
    model,
    model_config,
    classifier: dict[str, Any],
    scratch: bool,
    init: dict[str, Any],
    metrics: dict[str, Any],
    result: TrainResult,
    y_test,
    test_pred,
    labels,
    inputs: dict[str, str],
) -> None:
    paths = params.paths
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_dir(paths.finetune_dir) as out:
        torch.save(
            {
                "model": state,
                "model_config": model_config.to_dict(),
                "classifier": classifier,
                "from_scratch": scratch,
                "init": init["kind"],
                "pretrain_step": init.get("pretrain_step"),
                "best_step": result.best_step,
                "val_macro_f1": metrics["val"]["macro_f1"],
                "test_accuracy": metrics["test"]["accuracy"],
            },
            out / "model.pt",
        )
        atomic_write_json(out / "labels.json", labels)
        write_manifest(
            out,
            "finetune",
            {"finetune": params.finetune, "model": params.model, "seed": params.seed},
            inputs,
            extra={"from_scratch": scratch, "test_accuracy": metrics["test"]["accuracy"]},
        )
    with atomic_dir(paths.finetune_reports_dir) as rep:
        atomic_write_json(rep / "metrics.json", metrics)
        atomic_write_text(
            rep / "confusion.csv",
            _csv_text(["actual", "predicted"], classification_metrics.confusion_rows(y_test, test_pred, labels)),
        )
        curve_cols = ["step", "epoch", "val_macro_f1", "val_acc", "train_loss"]
        atomic_write_text(
            rep / "val_curve.csv", _csv_text(curve_cols, ([r[c] for c in curve_cols] for r in result.curve))
        )
