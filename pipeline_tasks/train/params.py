"""Params of the train family without torch: the ``model``, ``pretrain`` and ``finetune`` sections
and compute estimates.

Kept apart from :mod:`pipeline_tasks.train.model` (which imports torch at the top, nanoGPT style) so
that ``load_params()`` — which imports every section's class — stays light and works in the
Airflow image, which has no torch. :mod:`pipeline_tasks.train.model` re-exports the model names
(``ModelConfig``, ``flops_per_token``, ...) for code that already imports torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, Literal

ARCHS = ("gpt", "lstm")


def check_range(section: Any, names: Iterable[str], low: float, high: float | None = None) -> None:
    """``ValueError`` naming the field unless ``low <= value`` (and ``value < high``); ``None`` is unset."""
    for name in names:
        value = getattr(section, name)
        if value is not None and (value < low or (high is not None and value >= high)):
            bounds = f">= {low}" if high is None else f"in [{low}, {high})"
            raise ValueError(f"{name} must be {bounds}, got {value}")


@dataclasses.dataclass(frozen=True)
class ModelParams:
    """Params section ``model``: the architecture, without the vocabulary size."""

    arch: Literal["gpt", "lstm"] = "gpt"
    n_layer: int = 4
    n_head: int = 4  # GPT only
    n_embd: int = 256  # model width; the LSTM's hidden size too (its output is tied to the embedding)
    block_size: int = 128  # context length in tokens
    dropout: float = 0.0
    bias: bool = False  # biases in Linear and LayerNorm (False: a bit better and faster, as in nanoGPT)

    def __post_init__(self) -> None:
        check_range(self, ("n_layer", "n_head", "n_embd", "block_size"), 1)
        if self.arch == "gpt" and self.n_embd % self.n_head and not getattr(self, "attn_head_dim", 0):
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        check_range(self, ("dropout",), 0, 1)


@dataclasses.dataclass(frozen=True)
class ModelConfig(ModelParams):
    """Everything needed to rebuild a model: the ``model`` params plus the tokenizer's vocab size."""

    vocab_size: int = 512
    # set by structured pruning (train/prune.py), 0 otherwise: heads keep their width when some are
    # removed (attention is n_head x attn_head_dim wide, not n_embd), and the MLP gets narrower
    attn_head_dim: int = 0  # 0: n_embd // n_head
    mlp_dim: int = 0  # 0: 4 * n_embd

    PRUNED_FIELDS = ("attn_head_dim", "mlp_dim")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {self.vocab_size}")
        check_range(self, self.PRUNED_FIELDS, 0)

    @classmethod
    def from_params(cls, params: ModelParams, vocab_size: int) -> ModelConfig:
        return cls(
            **{f.name: getattr(params, f.name) for f in dataclasses.fields(ModelParams)}, vocab_size=int(vocab_size)
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for checkpoints; the pruning fields only when set, so unpruned configs read as before."""
        data = dataclasses.asdict(self)
        return {k: v for k, v in data.items() if k not in self.PRUNED_FIELDS or v}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"model_config has unknown keys {unknown} (known: {sorted(known)}); "
                "was the checkpoint written by a newer lm-pipeline?"
            )
        return cls(**data)

    @property
    def head_dim(self) -> int:
        return self.attn_head_dim or self.n_embd // self.n_head

    @property
    def attn_dim(self) -> int:
        """Width of q, k, v and of the attention output: n_embd unless heads were pruned."""
        return self.n_head * self.head_dim

    @property
    def mlp_hidden(self) -> int:
        return self.mlp_dim or 4 * self.n_embd


@dataclasses.dataclass(frozen=True)
class PretrainParams:
    """Params section ``pretrain``: device, optimisation, evaluation and checkpoint cadence."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # autocast: bf16 on CUDA and native-bf16 CPUs
    compile: bool = False  # torch.compile the model (CUDA: ~1.3-2x faster after a compile warm-up)
    # topology (see pipeline_tasks.topology): 1 x 1 trains in-process; more processes run under
    # torchrun on this machine, or as a Kubeflow Trainer TrainJob of `nodes` pods under the kubernetes
    # runner and KFP. The global batch (tokens_per_step) is the same whatever the topology.
    nodes: int = 1
    procs_per_node: int = 1
    dist_timeout_s: int = 600  # a collective waiting longer than this for a vanished peer fails the run
    num_threads: int = 0  # CPU intra-op threads per process (0: cores / local processes)
    deterministic: bool = True  # deterministic kernels: bit-exact resume on CPU (slower on CUDA)
    max_steps: int = 300  # optimizer steps
    micro_batch_size: int = 16  # sequences per forward/backward
    tokens_per_step: int = 4096  # tokens per optimizer step over all ranks (gradient accumulation)
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global grad norm (0: off)
    eval_interval: int = 50  # optimizer steps between evaluations (and at the last step)
    eval_batches: int = 8  # micro-batches of fixed val windows per evaluation
    patience: int = 0  # stop after this many evaluations without improvement (0: never)
    min_delta: float = 0.0  # an improvement must lower val loss by more than this
    checkpoint_interval: int = 50  # optimizer steps between checkpoints (and at the end)
    keep_last: int = 2  # checkpoints kept per run
    resume: bool = True  # resume from the newest valid checkpoint of the same run
    log_interval: int = 10

    def __post_init__(self) -> None:
        check_range(
            self,
            (
                "max_steps",
                "micro_batch_size",
                "tokens_per_step",
                "eval_interval",
                "eval_batches",
                "checkpoint_interval",
                "keep_last",
                "log_interval",
                "nodes",
                "procs_per_node",
                "dist_timeout_s",
            ),
            1,
        )
        if not 0 < self.min_lr <= self.lr:
            raise ValueError(f"need 0 < min_lr <= lr, got min_lr={self.min_lr}, lr={self.lr}")
        check_range(self, ("warmup_steps", "patience", "grad_clip", "num_threads"), 0)
        check_range(self, ("beta1", "beta2"), 0, 1)


@dataclasses.dataclass(frozen=True)
class DatasetParams:
    """Which prepared sources hold the labelled examples (``finetune.dataset``)."""

    train_sources: tuple[str, ...] = ("ag_news_train",)  # rows of train.parquet / val.parquet
    test_sources: tuple[str, ...] = ("ag_news_test",)  # rows of test.parquet; () = every labelled source


@dataclasses.dataclass(frozen=True)
class FinetuneParams:
    """Params section ``finetune``: the topic classifier on top of the pretrained model."""

    dataset: DatasetParams = DatasetParams()
    from_scratch: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # autocast: auto = bf16 on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX), else float32
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    num_threads: int = 0
    deterministic: bool = True
    max_len: int = 96  # tokens incl. the trailing <|cls|>; clamped to the GPT block_size
    pooling: Literal["last", "mean"] = "last"
    use_cls: bool = True  # append <|cls|>: with "last" pooling its state summarises the text
    head_dropout: float = 0.1
    # dropout inside the backbone while fine-tuning (null: the pretrained config's, 0 by default);
    # 18k labelled rows overfit a 5M-parameter model within two epochs without it
    backbone_dropout: float | None = None
    epochs: int = 3
    max_steps: int = 0  # 0: epochs decide
    max_train_rows: int = 0  # 0: all (a cap for quick runs)
    batch_size: int = 32
    eval_batch_size: int = 128
    lr: float = 1.0e-3
    min_lr_ratio: float = 0.0
    schedule: Literal["linear", "cosine"] = "linear"
    warmup_ratio: float = 0.06
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0
    layer_lr_decay: float = 1.0  # lr x decay^(depth from the top); 1.0 = off
    freeze_embeddings: bool = False
    class_weighting: Literal["none", "inverse_freq", "sqrt_inverse_freq"] = "none"
    sampler: Literal["uniform", "weighted"] = "uniform"
    label_smoothing: float = 0.0
    eval_interval: int = 0  # steps between validations; 0 = once per epoch
    patience: int = 3  # validations without improvement before stopping; 0 = off
    min_delta: float = 0.0
    log_interval: int = 50
    bootstrap_resamples: int = 1000
    # a second expert beside the transformer: a bag of hashed token uni+bigrams (model.HashedNgramBag)
    # trained alone first, then mixed into the logits with the weight val likes best; 0 buckets = off
    ngram_buckets: int = 0
    ngram_dim: int = 0
    ngram_lr: float = 1.0e-2
    ngram_epochs: int = 2
    ngram_weights: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)  # mixing weights tried on val

    def __post_init__(self) -> None:
        check_range(self, ("max_len",), 2)
        check_range(self, ("ngram_buckets", "ngram_dim"), 0)
        check_range(self, ("ngram_epochs",), 1)
        if not self.ngram_weights or any(w < 0 for w in self.ngram_weights):
            raise ValueError(f"ngram_weights must be non-negative numbers, got {list(self.ngram_weights)}")
        if (self.ngram_buckets > 0) != (self.ngram_dim > 0):
            raise ValueError(f"ngram_buckets and ngram_dim go together, got {self.ngram_buckets} and {self.ngram_dim}")
        if self.ngram_lr <= 0:
            raise ValueError(f"ngram_lr must be > 0, got {self.ngram_lr}")
        check_range(self, ("epochs", "batch_size", "eval_batch_size", "log_interval"), 1)
        check_range(
            self, ("max_steps", "max_train_rows", "num_threads", "eval_interval", "patience", "bootstrap_resamples"), 0
        )
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        check_range(self, ("min_lr_ratio", "warmup_ratio", "head_dropout", "label_smoothing", "backbone_dropout"), 0, 1)
        if not 0.0 < self.layer_lr_decay <= 1.0:
            raise ValueError(f"layer_lr_decay must be in (0, 1], got {self.layer_lr_decay}")
        if self.class_weighting != "none" and self.sampler == "weighted":
            raise ValueError("use class_weighting or sampler: weighted, not both (that corrects twice)")


@dataclasses.dataclass(frozen=True)
class StudentParams:
    """The distilled student's shape (``compress.student``); ``None`` takes the teacher's (``n_layer``: half)."""

    n_layer: int | None = None  # None: half the teacher's layers (at least 1)
    n_embd: int | None = None  # None: the teacher's width (its embeddings and blocks initialise the student)
    n_head: int | None = None  # None: the teacher's
    # teacher block copied into each student block (None: evenly spaced, every other one at half depth,
    # as DistilBERT); only used when the widths match
    layer_map: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        check_range(self, ("n_layer", "n_embd", "n_head"), 1)
        if self.layer_map is not None and any(i < 0 for i in self.layer_map):
            raise ValueError(f"layer_map holds teacher layer indices (>= 0), got {list(self.layer_map)}")


@dataclasses.dataclass(frozen=True)
class DistillParams:
    """Knowledge distillation (``compress.distill``): soft targets of the teacher, Hinton et al. (2015)."""

    temperature: float = 2.0  # softens both distributions; the soft loss is scaled by T^2
    alpha: float = 0.9  # weight of the soft-target loss; 1 - alpha on the hard labels of the labelled rows
    # prepared news rows outside finetune's training rows, labelled by the teacher only (0: labelled rows only)
    unlabelled_rows: int = 20000
    epochs: int = 2
    max_steps: int = 0  # 0: epochs decide
    batch_size: int = 64
    lr: float = 1.0e-3
    patience: int = 2  # validations (one per epoch) without val macro-F1 gain before stopping

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        check_range(self, ("epochs", "batch_size"), 1)
        check_range(self, ("unlabelled_rows", "max_steps", "patience"), 0)


@dataclasses.dataclass(frozen=True)
class PruneParams:
    """Structured pruning of the distilled student (``compress.prune``): whole heads and MLP neurons."""

    enabled: bool = True
    head_sparsity: float = 0.5  # share of attention heads removed in every block (at least one stays)
    mlp_sparsity: float = 0.5  # share of MLP neurons removed in every block
    importance_batches: int = 16  # val batches for the first-order (Taylor) importance of heads and neurons
    recovery_epochs: int = 1  # distillation epochs after pruning
    recovery_max_steps: int = 0  # 0: recovery_epochs decide

    def __post_init__(self) -> None:
        check_range(self, ("head_sparsity", "mlp_sparsity"), 0, 1)
        check_range(self, ("importance_batches", "recovery_epochs"), 1)
        check_range(self, ("recovery_max_steps",), 0)


@dataclasses.dataclass(frozen=True)
class CompressParams:
    """Params section ``compress``: distillation and structured pruning between finetune and export."""

    enabled: bool = False  # false: the fine-tuned model passes through unchanged
    student: StudentParams = StudentParams()
    distill: DistillParams = DistillParams()
    prune: PruneParams = PruneParams()
    # also train the student on hard labels only (same shape, same init): the report's control row
    student_alone: bool = True
    latency_runs: int = 200  # batch-1 int8 latency per model in the report (interleaved rounds)
    latency_warmup: int = 20
    intra_op_threads: int = 1

    def __post_init__(self) -> None:
        check_range(self, ("latency_runs", "intra_op_threads"), 1)
        check_range(self, ("latency_warmup",), 0)


# ---------------------------------------------------------------------------------------------
# Model size and compute
# ---------------------------------------------------------------------------------------------

H100_BF16_PEAK_FLOPS = 989e12  # H100/H200 SXM dense bf16 tensor-core peak (no sparsity)


def flops_per_token(config: ModelConfig) -> float:
    """Training FLOPs per token (forward + backward), PaLM appendix B / nanoGPT ``estimate_mfu``.

    ``6·N + 12·L·H·Q·T`` where N counts the weights that take part in a matmul per token (the
    blocks' ``L·(4·C·A + 2·C·M)`` for GPT, ``12·L·C²`` unpruned (attention width A = C, MLP M = 4·C) or ``8·L·C²`` for the LSTM's four gates over input and hidden
    state, plus ``V·C`` for the tied output projection; embedding look-ups, norms and biases are
    free), L layers, H heads, Q head dim, T = block_size (attention term, GPT only). nanoGPT uses
    N = all parameters but the position table, which differs only by the norms and biases.
    """
    L, C, V, T = config.n_layer, config.n_embd, config.vocab_size, config.block_size
    if config.arch == "gpt":
        n_matmul = L * (4 * C * config.attn_dim + 2 * C * config.mlp_hidden) + V * C
        return 6.0 * n_matmul + 12.0 * L * config.n_head * config.head_dim * T
    n_matmul = 8 * L * C * C + V * C
    return 6.0 * n_matmul


def mfu(tokens_per_s: float, config: ModelConfig, peak_flops: float = H100_BF16_PEAK_FLOPS) -> float:
    """Model FLOPs utilization: achieved training FLOP/s over the accelerator's peak."""
    return flops_per_token(config) * tokens_per_s / peak_flops
