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
        if self.arch == "gpt" and self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        check_range(self, ("dropout",), 0, 1)


@dataclasses.dataclass(frozen=True)
class ModelConfig(ModelParams):
    """Everything needed to rebuild a model: the ``model`` params plus the tokenizer's vocab size."""

    vocab_size: int = 512

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {self.vocab_size}")

    @classmethod
    def from_params(cls, params: ModelParams, vocab_size: int) -> ModelConfig:
        return cls(
            **{f.name: getattr(params, f.name) for f in dataclasses.fields(ModelParams)}, vocab_size=int(vocab_size)
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

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
        return self.n_embd // self.n_head


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


# ---------------------------------------------------------------------------------------------
# Model size and compute
# ---------------------------------------------------------------------------------------------

H100_BF16_PEAK_FLOPS = 989e12  # H100/H200 SXM dense bf16 tensor-core peak (no sparsity)


def flops_per_token(config: ModelConfig) -> float:
    """Training FLOPs per token (forward + backward), PaLM appendix B / nanoGPT ``estimate_mfu``.

    ``6·N + 12·L·H·Q·T`` where N counts the weights that take part in a matmul per token (the
    blocks' ``12·L·C²`` for GPT or ``8·L·C²`` for the LSTM's four gates over input and hidden
    state, plus ``V·C`` for the tied output projection; embedding look-ups, norms and biases are
    free), L layers, H heads, Q head dim, T = block_size (attention term, GPT only). nanoGPT uses
    N = all parameters but the position table, which differs only by the norms and biases.
    """
    L, C, V, T = config.n_layer, config.n_embd, config.vocab_size, config.block_size
    if config.arch == "gpt":
        n_matmul = 12 * L * C * C + V * C
        return 6.0 * n_matmul + 12.0 * L * config.n_head * config.head_dim * T
    n_matmul = 8 * L * C * C + V * C
    return 6.0 * n_matmul


def mfu(tokens_per_s: float, config: ModelConfig, peak_flops: float = H100_BF16_PEAK_FLOPS) -> float:
    """Model FLOPs utilization: achieved training FLOP/s over the accelerator's peak."""
    return flops_per_token(config) * tokens_per_s / peak_flops
