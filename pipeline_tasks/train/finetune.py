"""Stage ``finetune``: a news topic classifier on top of the pretrained language model.

Inputs: labelled rows of ``paths.prepared_dir/{train,val,test}.parquet`` (sources chosen by
``finetune.dataset``; default the AG News 20k train subset for train/val and the official 7,600-row
AG News test split for test), ``paths.tokens_dir/tokenizer.json`` and
``paths.pretrain_dir/model.pt`` (skipped with ``--from-scratch``).

Outputs:

* ``paths.finetune_dir/model.pt`` — ``{"model": SequenceClassifier state_dict, "model_config":
  dict, "classifier": {"labels", "pooling", "pad_id", "cls_id", "max_len", "num_classes", ...},
  "from_scratch": bool, ...}`` (load with ``torch.load(weights_only=True)``; the weights are those
  of the best validation macro-F1), ``labels.json``, ``manifest.json``;
* ``paths.finetune_reports_dir/metrics.json`` (DVC metrics: test / val accuracy, macro-F1,
  per-class P/R/F1, a bootstrap CI, best step, train time, from_scratch), ``confusion.csv``
  (``actual,predicted`` per test row: a DVC confusion plot) and ``val_curve.csv`` (``step,
  val_macro_f1, val_acc, train_loss``).

Training: AdamW with linear warm-up and linear or cosine decay, layer-wise learning-rate decay
(``layer_lr_decay`` per block from the top; the head at the base lr), optional frozen
embeddings, gradient clipping, class-weighted cross-entropy or a class-balanced
``WeightedRandomSampler``, early stopping on validation macro-F1. Batches group texts of similar
length (dynamic padding) which roughly halves CPU time on AG News. Seeded and deterministic on
CPU. bf16 autocast on CUDA, and on CPUs with native bf16 (AVX512-BF16 / AMX: 2.4x faster steps
here); the reported val/test scores are always computed in float32, as the exported model runs.

``--from-scratch`` (or ``finetune.from_scratch: true``) trains the same architecture from random
weights and writes to the same paths: a baseline that measures what pretraining is worth.

Params section ``finetune`` (:class:`~pipeline_tasks.train.params.FinetuneParams`), plus ``model`` (architecture when
training from scratch) and ``seed``. Command: ``python -m pipeline_tasks finetune [--from-scratch]``.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from pipeline_tasks.artifacts import sha256_file
from pipeline_tasks.dataset.prepared import finetune_rows
from pipeline_tasks.errors import DataError
from pipeline_tasks.train import classifier_data, finetune_loop
from pipeline_tasks.train.params import FinetuneParams
from pipeline_tasks.train.training import configure_runtime, resolve_device, seed_everything

logger = logging.getLogger(__name__)


def add_arguments(parser) -> None:
    parser.add_argument(
        "--from-scratch",
        action="store_true",
        help="random initial weights instead of models/pretrain/model.pt (baseline run)",
    )


# ---------------------------------------------------------------------------------------------
# runner
# ---------------------------------------------------------------------------------------------


def run(params, from_scratch: bool = False, **_options) -> dict[str, Any]:
    cfg: FinetuneParams = params.finetune
    scratch = bool(from_scratch or cfg.from_scratch)
    paths = params.paths
    device = resolve_device(cfg.device)
    threads, dtype = configure_runtime(
        device, num_threads=cfg.num_threads, deterministic=cfg.deterministic, dtype=cfg.dtype
    )
    seed_everything(params.seed)

    # -- data ---------------------------------------------------------------------------------
    tokenizer_path = Path(paths.tokens_dir) / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise DataError(f"{tokenizer_path} not found; run `python -m pipeline_tasks tokenize` first")
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    pad_id = classifier_data.special_token_id(tokenizer, classifier_data.PAD_TOKEN)
    cls_id = classifier_data.special_token_id(tokenizer, classifier_data.CLS_TOKEN) if cfg.use_cls else None
    prepared = Path(paths.prepared_dir)
    rows = finetune_rows(prepared, cfg, params.seed)
    labels = classifier_data.label_vocabulary(rows["train"]["label"])
    if len(labels) < 2:
        raise DataError(f"{prepared / 'train.parquet'}: only labels {labels} in the training rows; need >= 2 classes")

    # -- model --------------------------------------------------------------------------------
    model_config, init = finetune_loop.backbone_config(params, tokenizer, scratch)
    if cfg.backbone_dropout is not None:
        model_config = dataclasses.replace(model_config, dropout=cfg.backbone_dropout)
    max_len = cfg.max_len
    if model_config.arch == "gpt" and max_len > model_config.block_size:
        logger.warning(
            "finetune.max_len %d > model block_size %d: using %d",
            max_len,
            model_config.block_size,
            model_config.block_size,
        )
        max_len = model_config.block_size
    data = {
        split: finetune_loop.encode_split(tokenizer, r, labels, max_len, cls_id, prepared / f"{split}.parquet")
        for split, r in rows.items()
    }
    logger.info(
        "finetune: %s, %d classes %s; rows train %d / val %d / test %d; max_len %d, pooling %s, "
        "cls %s, device %s (%s), %d threads",
        "from scratch" if scratch else "from pretrained",
        len(labels),
        labels,
        *(len(data[s]["y"]) for s in ("train", "val", "test")),
        max_len,
        cfg.pooling,
        cls_id,
        device,
        str(dtype).replace("torch.", ""),
        threads,
    )
    model = finetune_loop.build_classifier(model_config, init, len(labels), cfg, pad_id).to(device)

    # -- train, then score the best weights -------------------------------------------------------
    ngram_info = None
    if model.ngrams is not None:  # the n-gram expert first: its weights are frozen in best_state
        ngram_info = finetune_loop.train_ngram_expert(model, data, cfg, pad_id, device, params.seed)
    result = finetune_loop.train(model, data, cfg, model_config.n_layer, device, dtype, params.seed)
    model.load_state_dict(result.best_state)
    # reported scores in float32: what export ships (fp32 ONNX and its quantised variants) and
    # what evaluate's PyTorch reference reproduces
    if ngram_info is not None:
        val_pred, test_pred = finetune_loop.predict_with_experts(model, data, cfg, pad_id, device, ngram_info)
    else:
        val_pred = finetune_loop.predict(model, data["val"]["ids"], pad_id, cfg.eval_batch_size, device)
        test_pred = finetune_loop.predict(model, data["test"]["ids"], pad_id, cfg.eval_batch_size, device)
    classifier = {
        "labels": labels,
        "pooling": cfg.pooling,
        "pad_id": int(pad_id),
        "cls_id": None if cls_id is None else int(cls_id),
        "max_len": int(max_len),
        "num_classes": len(labels),
        "train_sources": list(cfg.dataset.train_sources),
        "ngram_buckets": int(cfg.ngram_buckets),
        "ngram_dim": int(cfg.ngram_dim),
    }
    metrics = finetune_loop.build_metrics(
        data, val_pred, test_pred, labels, result, cfg, scratch, model_config, params.seed
    )
    if ngram_info is not None:
        metrics["ngram"] = ngram_info
    inputs = {
        str(p): sha256_file(p) for p in [tokenizer_path, *(prepared / f"{s}.parquet" for s in classifier_data.SPLITS)]
    }
    if not scratch:
        inputs[init["path"]] = init["sha256"]
    finetune_loop.write_outputs(
        params,
        model,
        model_config,
        classifier,
        scratch,
        init,
        metrics,
        result,
        data["test"]["y"],
        test_pred,
        labels,
        inputs,
    )
    return {
        "finetune_dir": paths.finetune_dir,
        "from_scratch": scratch,
        "test_accuracy": round(metrics["test"]["accuracy"], 4),
        "test_macro_f1": round(metrics["test"]["macro_f1"], 4),
        "val_macro_f1": round(metrics["val"]["macro_f1"], 4),
        "best_step": result.best_step,
        "train_seconds": round(result.seconds, 1),
    }
