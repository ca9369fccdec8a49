"""The language models (GPT decoder and LSTM) and the sequence classifier built on top of them.

One readable file in the spirit of nanoGPT's ``model.py``: a dataclass config, a shape comment on
every reshape. Two backbones share one interface, so pretrain, finetune and export never branch
on the architecture:

* ``forward(idx, targets=None, *, last_only=False) -> (logits, loss)`` — next-token logits
  ``(B, T, V)`` (``(B, 1, V)`` with ``last_only``), and the mean cross-entropy when ``targets``
  is given (positions with target ``-1`` are ignored).
* ``hidden_states(idx, attention_mask=None) -> (B, T, C)`` — final-normed hidden states.

Params section ``model`` (:class:`ModelParams`); the vocabulary size is not a param, it comes
from the tokenizer: ``ModelConfig.from_params(params.model, vocab_size)``. The config travels in
every checkpoint as ``config.to_dict()`` and comes back with ``ModelConfig.from_dict``.

Padding: both backbones are causal (GPT attends only to earlier positions, the LSTM reads left
to right), so with *right* padding the states of the real tokens never see the pads and no
attention mask is needed inside the backbone. :class:`SequenceClassifier` uses the mask only to
pool: the state of the last real token (``last``) or the mean over real tokens (``mean``).

ONNX: every reshape takes its sizes from ``x.size()`` at run time and attention goes through
``F.scaled_dot_product_attention(is_causal=True)``, so ``torch.onnx.export(dynamo=True)`` (and
the legacy exporter) give graphs with dynamic batch and sequence axes.

Quick check: ``python -c "from pipeline_tasks.model import *; print(build_lm(ModelConfig(vocab_size=512)))"``
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

# torch is imported lazily below the config classes would be nicer, but the nn.Module classes
# need it at class-definition time; pipeline_tasks.config imports this module only through
# ModelParams, so we keep torch out of that path with a module-level __getattr__ trick? No:
# simpler and explicit — the params loader imports this module, so torch is imported inside a
# guarded block and the classes are defined only when torch is available.
try:  # pragma: no branch - torch is present in the tasks image and on the GPU machine
    import torch
    import torch.nn as nn
    from torch.nn import functional as F
except ModuleNotFoundError:  # the Airflow image parses params.yaml without torch
    torch = None  # type: ignore[assignment]

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


def num_parameters(model: Any, exclude_embeddings: bool = False) -> int:
    """Unique parameters (tied weights counted once).

    ``exclude_embeddings=True`` drops every ``nn.Embedding`` (token and position tables): the
    "non-embedding" N of Kaplan et al. (2020). The tied token table still computes the output
    logits, which :func:`flops_per_token` accounts for separately.
    """
    seen: set[int] = set()
    skip: set[int] = set()
    if exclude_embeddings:
        skip = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    total = 0
    for p in model.parameters():
        if id(p) in seen or id(p) in skip:
            continue
        seen.add(id(p))
        total += p.numel()
    return total


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


if torch is not None:

    # -----------------------------------------------------------------------------------------
    # GPT decoder (pre-norm, tied embeddings, learned positions), after nanoGPT
    # -----------------------------------------------------------------------------------------

    class LayerNorm(nn.Module):
        """LayerNorm with an optional bias (torch's has none-or-both before 2.1 semantics)."""

        def __init__(self, ndim: int, bias: bool):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(ndim))
            self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

        def forward(self, x):
            return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)

    class CausalSelfAttention(nn.Module):
        def __init__(self, config: ModelConfig):
            super().__init__()
            self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout
            self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # fused q, k, v
            self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
            self.resid_dropout = nn.Dropout(config.dropout)

        def forward(self, x):
            B, T, C = x.size()  # run-time sizes: keeps ONNX batch/seq axes dynamic
            q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # 3 x (B, T, C)
            q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
            k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
            v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
            # flash / memory-efficient kernels on CUDA, a causal softmax(QK^T/sqrt(hs))V elsewhere
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                               is_causal=True)  # (B, nh, T, hs)
            y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side
            return self.resid_dropout(self.c_proj(y))

    class MLP(nn.Module):
        def __init__(self, config: ModelConfig):
            super().__init__()
            self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
            self.gelu = nn.GELU()
            self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
            self.dropout = nn.Dropout(config.dropout)

        def forward(self, x):
            return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))

    class Block(nn.Module):
        def __init__(self, config: ModelConfig):
            super().__init__()
            self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
            self.attn = CausalSelfAttention(config)
            self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
            self.mlp = MLP(config)

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))

    class _LMHeadMixin:
        """``forward`` shared by both backbones: logits from the tied head, optional loss."""

        def forward(self, idx, targets=None, *, last_only: bool = False):
            h = self.hidden_states(idx)  # (B, T, C)
            if targets is not None:
                logits = self.lm_head(h)  # (B, T, V)
                loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
                return logits, loss
            if last_only:  # generation needs only the next-token distribution: skip (T-1)·V·C FLOPs
                h = h[:, -1:, :]  # (B, 1, C)
            return self.lm_head(h), None

    class GPT(_LMHeadMixin, nn.Module):
        def __init__(self, config: ModelConfig):
            super().__init__()
            self.config = config
            self.transformer = nn.ModuleDict(dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=LayerNorm(config.n_embd, bias=config.bias),
            ))
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
            # weight tying (Press & Wolf 2017): one V x C table for input and output
            self.transformer.wte.weight = self.lm_head.weight
            self.apply(_init_weights)
            # scaled init of the residual projections (GPT-2): the residual stream's variance
            # stays ~constant with depth because each of the 2·L branches adds 1/(2L) of it
            for name, p in self.named_parameters():
                if name.endswith("c_proj.weight"):
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

        def hidden_states(self, idx, attention_mask=None):
            """Final-normed states ``(B, T, C)``; ``attention_mask`` is unused (causal, right padding)."""
            t = idx.size(1)
            if not torch.compiler.is_compiling() and not torch.jit.is_tracing() and t > self.config.block_size:
                raise ValueError(f"sequence of length {t} is longer than block_size {self.config.block_size}")
            pos = torch.arange(0, t, dtype=torch.long, device=idx.device)  # (T,)
            x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
            for block in self.transformer.h:
                x = block(x)
            return self.transformer.ln_f(x)  # (B, T, C)

    # -----------------------------------------------------------------------------------------
    # LSTM language model (same interface; a strong small baseline and a cheap CPU model)
    # -----------------------------------------------------------------------------------------

    class LSTMLM(_LMHeadMixin, nn.Module):
        def __init__(self, config: ModelConfig):
            super().__init__()
            self.config = config
            self.wte = nn.Embedding(config.vocab_size, config.n_embd)
            self.drop = nn.Dropout(config.dropout)
            # hidden size = n_embd so the output can be tied to the embedding table
            self.lstm = nn.LSTM(config.n_embd, config.n_embd, num_layers=config.n_layer, batch_first=True,
                                dropout=config.dropout if config.n_layer > 1 else 0.0, bias=True)
            self.ln_f = LayerNorm(config.n_embd, bias=config.bias)
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
            self.wte.weight = self.lm_head.weight
            nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.02)
            for name, p in self.lstm.named_parameters():
                if name.startswith("bias"):
                    # forget-gate bias 1 (Jozefowicz et al. 2015): remember by default early on;
                    # gates are ordered (input, forget, cell, output) and b_ih + b_hh both add in
                    nn.init.zeros_(p)
                    n = config.n_embd
                    p.data[n:2 * n].fill_(0.5)
                # weights keep torch's U(-1/sqrt(C), 1/sqrt(C)) init

        def hidden_states(self, idx, attention_mask=None):
            """Final-normed states ``(B, T, C)``; the LSTM reads left to right, so right pads are harmless."""
            x = self.drop(self.wte(idx))  # (B, T, C)
            x, _ = self.lstm(x)  # (B, T, C), zero initial state
            return self.ln_f(self.drop(x))  # (B, T, C)

    def _init_weights(module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def build_lm(config: ModelConfig) -> nn.Module:
        """A freshly initialised language model for ``config.arch``."""
        if config.arch == "gpt":
            return GPT(config)
        if config.arch == "lstm":
            return LSTMLM(config)
        raise ValueError(f"unknown model arch {config.arch!r} (expected one of {ARCHS})")

    @torch.no_grad()
    def generate(model: nn.Module, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator=None):
        """Sample ``max_new_tokens`` continuations of ``idx`` (B, T) -> (B, T + max_new_tokens)."""
        block_size = model.config.block_size
        for _ in range(max_new_tokens):
            context = idx[:, -block_size:]  # (B, <=block_size): crop to the context window
            logits, _ = model(context, last_only=True)  # (B, 1, V)
            logits = logits[:, -1, :] / max(temperature, 1e-6)  # (B, V)
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]  # (B, 1)
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = F.softmax(logits, dim=-1)
            idx = torch.cat([idx, torch.multinomial(probs, 1, generator=generator)], dim=1)
        return idx

    # -----------------------------------------------------------------------------------------
    # Sequence classification on top of either backbone (finetune, export)
    # -----------------------------------------------------------------------------------------

    class SequenceClassifier(nn.Module):
        """Pooled backbone states -> dropout -> Linear(C, num_classes).

        ``pooling="last"``: the state of the last real token, found from the mask (right padding
        assumed: index ``attention_mask.sum(1) - 1``, a gather, so ONNX keeps it dynamic); with a
        causal backbone that state has read the whole text. ``pooling="mean"``: the mean of the
        states of the real tokens.
        """

        def __init__(self, backbone: nn.Module, num_classes: int, pooling: Literal["last", "mean"] = "last",
                     pad_id: int = 0, dropout: float = 0.1):
            super().__init__()
            if pooling not in ("last", "mean"):
                raise ValueError(f"pooling must be 'last' or 'mean', got {pooling!r}")
            if num_classes < 2:
                raise ValueError(f"num_classes must be >= 2, got {num_classes}")
            self.backbone, self.pooling, self.pad_id = backbone, pooling, int(pad_id)
            self.num_classes = int(num_classes)
            self.dropout = nn.Dropout(dropout)
            self.head = nn.Linear(backbone.config.n_embd, num_classes)
            nn.init.normal_(self.head.weight, mean=0.0, std=0.02)
            nn.init.zeros_(self.head.bias)

        def forward(self, input_ids, attention_mask=None):
            if attention_mask is None:
                attention_mask = (input_ids != self.pad_id).long()
            h = self.backbone.hidden_states(input_ids, attention_mask)  # (B, T, C)
            if self.pooling == "last":
                last = (attention_mask.sum(dim=1) - 1).clamp(min=0).long()  # (B,): right padding
                index = last.view(-1, 1, 1).expand(-1, 1, h.size(2))  # (B, 1, C)
                pooled = h.gather(1, index).squeeze(1)  # (B, C)
            else:
                mask = attention_mask.to(h.dtype).unsqueeze(-1)  # (B, T, 1)
                pooled = (h * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)  # (B, C)
            return self.head(self.dropout(pooled))  # (B, num_classes)
