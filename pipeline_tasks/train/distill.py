"""Knowledge distillation of the fine-tuned classifier into a smaller student (used by ``compress``).

* :func:`student_config` — the student's shape from ``compress.student`` (default: half the
  teacher's layers, its width);
* :func:`init_student` — a :class:`SequenceClassifier` of that shape whose tensors come from the
  teacher wherever the shapes allow: embeddings, final norm, head, the n-gram expert and its
  mixing weight, and the teacher blocks named by ``layer_map`` (every other one by default, as
  DistilBERT, Sanh et al. 2019). A narrower student keeps only the n-gram expert;
* :func:`distillation_loss` — Hinton et al. (2015): ``alpha · T² · KL(teacher_T || student_T)``
  over every row plus ``(1 - alpha) · CE(student, label)`` over the labelled rows; unlabelled
  rows (label ``-1``) learn from the teacher alone, which is where distillation gets more out
  of the data than the hard labels can.

The n-gram expert is copied and frozen: it is cheap at serving time (two gathers) and already
trained on the hard labels; the student's transformer learns the rest of the teacher's logits.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any

import torch
from torch.nn import functional as F

from pipeline_tasks.config import ConfigError
from pipeline_tasks.train.model import ModelConfig, SequenceClassifier, build_lm
from pipeline_tasks.train.params import StudentParams

logger = logging.getLogger(__name__)

_GPT_BLOCK = re.compile(r"\.h\.(\d+)\.")  # backbone.transformer.h.<i>.*
_LSTM_LAYER = re.compile(r"(\.lstm\.\w+_l)(\d+)$")  # backbone.lstm.weight_ih_l<k>


def student_config(teacher: ModelConfig, student: StudentParams) -> ModelConfig:
    """The student's :class:`ModelConfig`: ``compress.student`` over the teacher's, unpruned."""
    n_embd = student.n_embd or teacher.n_embd
    n_head = student.n_head or (teacher.n_head if n_embd == teacher.n_embd else max(1, teacher.n_head // 2))
    try:
        return dataclasses.replace(
            teacher,
            n_layer=student.n_layer or max(1, teacher.n_layer // 2),
            n_embd=n_embd,
            n_head=n_head,
            attn_head_dim=0,
            mlp_dim=0,
        )
    except ValueError as exc:
        raise ConfigError(f"compress.student: {exc}") from exc


def default_layer_map(teacher_layers: int, student_layers: int) -> list[int]:
    """Evenly spaced teacher blocks, the first included: 4 -> 2 gives [0, 2], 12 -> 6 gives [0, 2, ..., 10]."""
    return [i * teacher_layers // student_layers for i in range(student_layers)]


def layer_map_for(teacher: ModelConfig, student: ModelConfig, params: StudentParams) -> list[int]:
    layer_map = list(params.layer_map) if params.layer_map is not None else None
    if layer_map is None:
        return default_layer_map(teacher.n_layer, student.n_layer)
    if len(layer_map) != student.n_layer or max(layer_map) >= teacher.n_layer:
        raise ConfigError(
            f"compress.student.layer_map {layer_map}: needs {student.n_layer} entries (one per student "
            f"layer), each a teacher layer below {teacher.n_layer}"
        )
    return layer_map


def _teacher_key(name: str, layer_map: list[int]) -> str:
    """The teacher tensor a student tensor starts from (block indices through ``layer_map``)."""
    if match := _GPT_BLOCK.search(name):
        return name.replace(match.group(0), f".h.{layer_map[int(match.group(1))]}.", 1)
    if match := _LSTM_LAYER.search(name):
        return name[: match.start()] + f"{match.group(1)}{layer_map[int(match.group(2))]}"
    return name


def init_student(
    teacher: SequenceClassifier, config: ModelConfig, layer_map: list[int], head_dropout: float
) -> tuple[SequenceClassifier, dict[str, Any]]:
    """``(student, init report)``: tensors copied from the teacher where the shapes agree; n-gram expert frozen."""
    if teacher.backbone.config.arch != config.arch:
        raise ConfigError(f"student arch {config.arch!r} differs from the teacher's {teacher.backbone.config.arch!r}")
    ngram_buckets = teacher.ngrams.buckets if teacher.ngrams is not None else 0
    ngram_dim = teacher.ngram_head.in_features if teacher.ngram_head is not None else 0
    student = SequenceClassifier(
        build_lm(config),
        num_classes=teacher.num_classes,
        pooling=teacher.pooling,
        pad_id=teacher.pad_id,
        dropout=head_dropout,
        ngram_buckets=ngram_buckets,
        ngram_dim=ngram_dim,
    )
    source = teacher.state_dict()
    state = student.state_dict()
    copied = []
    for name, tensor in state.items():
        origin = source.get(_teacher_key(name, layer_map))
        if origin is not None and origin.shape == tensor.shape:
            state[name] = origin.detach().clone()
            copied.append(name)
    student.load_state_dict(state)
    if student.ngrams is not None:
        for p in (*student.ngrams.parameters(), *student.ngram_head.parameters()):
            p.requires_grad_(False)
    report = {
        "layer_map": layer_map if config.n_embd == teacher.backbone.config.n_embd else None,
        "tensors_from_teacher": len(copied),
        "tensors": len(state),
    }
    logger.info(
        "compress: student %d layers x %d wide, %d of %d tensors from the teacher (teacher blocks %s)",
        config.n_layer,
        config.n_embd,
        len(copied),
        len(state),
        report["layer_map"],
    )
    return student, report


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """``alpha·T²·KL(softmax(t/T) || softmax(s/T)) + (1 - alpha)·CE(s, y)``; ``y = -1`` rows: soft part only.

    The ``T²`` keeps the soft gradients' scale independent of the temperature (Hinton et al.),
    so ``alpha`` means the same at any ``T``.
    """
    soft = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=-1),
        F.log_softmax(teacher_logits / temperature, dim=-1),
        reduction="batchmean",
        log_target=True,
    ) * (temperature**2)
    labelled = labels >= 0
    hard = F.cross_entropy(student_logits[labelled], labels[labelled]) if bool(labelled.any()) else soft * 0.0
    return alpha * soft + (1.0 - alpha) * hard


def distillation_loss_fn(teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float, alpha: float):
    """``loss_fn(logits, idx)`` for :func:`finetune_loop.train`: the rows' teacher logits and labels looked up by index."""

    def loss_fn(logits: torch.Tensor, idx) -> torch.Tensor:
        rows = torch.as_tensor(idx, dtype=torch.long)
        return distillation_loss(
            logits, teacher_logits[rows].to(logits.device), labels[rows].to(logits.device), temperature, alpha
        )

    return loss_fn
