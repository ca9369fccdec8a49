"""Model configuration without torch: the ``model`` params section and compute estimates.

Kept apart from :mod:`pipeline_tasks.train.model` (which imports torch at the top, nanoGPT style) so
that ``load_params()`` — which imports every section's class — stays light and works in the
Airflow image, which has no torch. Everything here is re-exported by ``pipeline_tasks.train.model``;
import it from there.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

ARCHS = ("gpt", "lstm")


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
        for name in ("n_layer", "n_head", "n_embd", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.arch == "gpt" and self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


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
        return cls(**{f.name: getattr(params, f.name) for f in dataclasses.fields(ModelParams)},
                   vocab_size=int(vocab_size))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"model_config has unknown keys {unknown} (known: {sorted(known)}); "
                             "was the checkpoint written by a newer lm-pipeline?")
        return cls(**data)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


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
