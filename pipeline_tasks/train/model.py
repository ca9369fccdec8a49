"""The language models (GPT decoder and LSTM) and the sequence classifier built on top of them.

One readable file in the spirit of nanoGPT's ``model.py``: a dataclass config, a shape comment on
every reshape. Two backbones share one interface, so pretrain, finetune and export never branch
on the architecture:

* ``forward(idx, targets=None, *, last_only=False) -> (logits, loss)`` — next-token logits
  ``(B, T, V)`` (``(B, 1, V)`` with ``last_only``); with ``targets`` the mean cross-entropy
  (positions with target ``-1`` are ignored) and no logits: :class:`ChunkedLMLoss` never
  builds the ``(B, T, V)`` tensor, which makes CPU training steps faster than nanoGPT's.
* ``hidden_states(idx, attention_mask=None) -> (B, T, C)`` — final-normed hidden states.

Params section ``model`` (:class:`ModelParams`, defined torch-free in
:mod:`pipeline_tasks.train.params` so that loading params never imports torch); the vocabulary
size is not a param, it comes from the tokenizer: ``ModelConfig.from_params(params.model, V)``. The config travels in
every checkpoint as ``config.to_dict()`` and comes back with ``ModelConfig.from_dict``.

Checkpoints: :func:`load_lm` (pretrain ``model.pt``) and :func:`load_classifier` (finetune
``model.pt``) are the one loader per kind, used by export, evaluate and the benches; both read
with ``torch.load(weights_only=True)`` and accept ``torch.compile``'d weights (``_orig_mod.`` keys).

Padding: both backbones are causal (GPT attends only to earlier positions, the LSTM reads left
to right), so with *right* padding the states of the real tokens never see the pads and no
attention mask is needed inside the backbone. :class:`SequenceClassifier` uses the mask only to
pool: the state of the last real token (``last``) or the mean over real tokens (``mean``).

ONNX: every reshape takes its sizes from ``x.size()`` at run time and attention goes through
``F.scaled_dot_product_attention(is_causal=True)``, so ``torch.onnx.export(dynamo=True)`` (and
the legacy exporter) give graphs with dynamic batch and sequence axes.

Quick check: ``python -c "from pipeline_tasks.train.model import *; print(build_lm(ModelConfig(vocab_size=512)))"``
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
from torch.nn import functional as F

from pipeline_tasks.errors import DataError
from pipeline_tasks.train.params import (  # re-exported for code that already imports torch
    ARCHS,
    H100_BF16_PEAK_FLOPS,
    ModelConfig,
    ModelParams,
    flops_per_token,
    mfu,
)

__all__ = [
    "ARCHS",
    "H100_BF16_PEAK_FLOPS",
    "ModelConfig",
    "ModelParams",
    "flops_per_token",
    "mfu",
    "GPT",
    "LSTMLM",
    "HashedNgramBag",
    "SequenceClassifier",
    "build_lm",
    "generate",
    "load_classifier",
    "load_lm",
    "num_parameters",
]


# ---------------------------------------------------------------------------------------------
# GPT decoder (pre-norm, tied embeddings, learned positions), after nanoGPT
# ---------------------------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head, self.head_dim, self.dropout = config.n_head, config.head_dim, config.dropout
        self.attn_dim = config.attn_dim  # n_embd, or less once heads are pruned
        self.c_attn = nn.Linear(config.n_embd, 3 * self.attn_dim, bias=config.bias)  # fused q, k, v
        self.c_proj = nn.Linear(self.attn_dim, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        B, T, _ = x.size()  # run-time sizes: keeps ONNX batch/seq axes dynamic
        q, k, v = self.c_attn(x).split(self.attn_dim, dim=2)  # 3 x (B, T, A)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        # flash / memory-efficient kernels on CUDA, a causal softmax(QK^T/sqrt(hs))V elsewhere
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, self.attn_dim)  # (B, T, A): heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.mlp_hidden, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(config.mlp_hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class ChunkedLMLoss(torch.autograd.Function):
    """Mean next-token cross-entropy of ``h @ W.T`` without the ``(N, V)`` logits in memory.

    Why by hand: the output layer is ~40 % of this model's FLOPs, and the plain path
    (``lm_head`` then ``F.cross_entropy``) writes and re-reads several ``N x V`` fp32 tensors per
    step (logits, log-softmax, its gradient: 64 MB each at 2,048 tokens x 8,192 vocab). On a CPU
    that memory traffic, and the page faults of allocations that large, cost as much as the
    matmuls. Here rows go through in chunks that stay in cache: each chunk's logits, softmax and
    gradient (``softmax - onehot``) are computed in the forward pass, and its contributions to
    ``dL/dh`` and ``dL/dW`` are kept; backward only scales them. Same FLOPs as autograd, same
    loss to rounding (tested against ``F.cross_entropy``). Matmuls run in the autocast dtype
    when autocast is on; the softmax and the ``dL/dW`` accumulator are fp32. Targets ``-1`` are
    ignored, as in ``F.cross_entropy(ignore_index=-1)``.
    """

    CHUNK_ROWS = 256

    @staticmethod
    def forward(ctx, h, weight, targets, grad_enabled: bool):
        n = h.size(0)
        acc = torch.promote_types(h.dtype, torch.float32)  # fp32 softmax and sums (fp64 stays fp64)
        valid = targets != -1
        count = valid.sum().clamp(min=1).to(acc)
        # forward runs without grad mode: the caller says whether a backward will follow (not in eval)
        needs_grad = grad_enabled and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        grad_h = torch.empty(h.shape, dtype=acc, device=h.device) if needs_grad else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if needs_grad else None
        total = torch.zeros((), dtype=acc, device=h.device)
        for start in range(0, n, ChunkedLMLoss.CHUNK_ROWS):
            rows = slice(start, min(start + ChunkedLMLoss.CHUNK_ROWS, n))
            hc, tc, vc = h[rows], targets[rows].clamp(min=0), valid[rows]
            logits = F.linear(hc, weight).to(acc)  # (S, V): matmul in the autocast dtype
            logz = torch.logsumexp(logits, dim=-1)  # (S,)
            picked = logits.gather(1, tc.unsqueeze(1)).squeeze(1)  # (S,)
            total += ((logz - picked) * vc).sum()
            if needs_grad:
                probs = torch.exp_(logits.sub_(logz.unsqueeze(1)))  # softmax, in place: one (S, V) buffer
                probs.scatter_add_(1, tc.unsqueeze(1), torch.full_like(picked, -1.0).unsqueeze(1))
                probs.mul_((vc.to(acc) / count).unsqueeze(1))  # d(mean loss)/d(logits)
                grad_logits = probs.to(hc.dtype)  # back to the matmul dtype (a no-op in fp32)
                grad_h[rows] = F.linear(grad_logits, weight.t())  # (S, C)
                grad_w += grad_logits.t().mm(hc.to(grad_logits.dtype)).to(acc)  # (V, C)
        if needs_grad:
            ctx.save_for_backward(grad_h, grad_w)
            ctx.input_dtypes = (h.dtype, weight.dtype)
        return total / count

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * grad_loss).to(ctx.input_dtypes[0]), (grad_w * grad_loss).to(ctx.input_dtypes[1]), None, None


class _LMHeadMixin:
    """``forward`` shared by both backbones: logits from the tied head, optional loss."""

    def forward(self, idx, targets=None, *, last_only: bool = False):
        """``(logits, loss)``; with ``targets`` the loss comes from :class:`ChunkedLMLoss` and logits are ``None``."""
        h = self.hidden_states(idx)  # (B, T, C)
        if targets is not None:
            flat, targets = h.reshape(-1, h.size(-1)), targets.reshape(-1)  # (B·T, C), (B·T,)
            if torch.compiler.is_compiling():  # inductor fuses the plain loss better than it traces the chunks
                return None, F.cross_entropy(self.lm_head(flat), targets, ignore_index=-1)
            loss = ChunkedLMLoss.apply(flat, self.lm_head.weight, targets, torch.is_grad_enabled())
            return None, loss
        if last_only:  # generation needs only the next-token distribution: skip (T-1)·V·C FLOPs
            h = h[:, -1:, :]  # (B, 1, C)
        return self.lm_head(h), None


class GPT(_LMHeadMixin, nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying (Press & Wolf 2017): one V x C table for input and output
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(_init_weights)
        # scaled init of the residual projections (GPT-2): std / sqrt(2·L) keeps the variance of
        # the residual stream from growing with depth (2·L branches add into it)
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


# ---------------------------------------------------------------------------------------------
# LSTM language model (same interface; a strong small baseline and a cheap CPU model)
# ---------------------------------------------------------------------------------------------


class LSTMLM(_LMHeadMixin, nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        # hidden size = n_embd so the output can be tied to the embedding table
        self.lstm = nn.LSTM(
            config.n_embd,
            config.n_embd,
            num_layers=config.n_layer,
            batch_first=True,
            dropout=config.dropout if config.n_layer > 1 else 0.0,
            bias=True,
        )
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.02)
        for name, p in self.lstm.named_parameters():
            if name.startswith("bias"):
                # forget-gate bias 1 (Jozefowicz et al. 2015): remember by default early on;
                # gates are ordered (input, forget, cell, output) and b_ih + b_hh add up: 0.5 each
                nn.init.zeros_(p)
                n = config.n_embd
                p.data[n : 2 * n].fill_(0.5)
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


def _state_dict(checkpoint: dict[str, Any]) -> dict[str, Any]:
    # torch.compile wraps modules: strip its prefix so compiled and eager checkpoints both load
    return {k.removeprefix("_orig_mod."): v for k, v in checkpoint["model"].items()}


def read_lm_checkpoint(path: str | Path, missing_hint: str) -> tuple[ModelConfig, dict[str, Any], int]:
    """``(model config, weights, step)`` of the pretrain checkpoint ``pretrain_dir/model.pt``.

    The one reader of that file (export, evaluate and finetune's backbone all come here).
    ``torch.load(weights_only=True)``: a checkpoint cannot run pickled code.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} not found: {missing_hint}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    try:
        config = ModelConfig.from_dict(dict(checkpoint["model_config"]))
        state = _state_dict(checkpoint)
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path}: not a pretrain checkpoint this code can load ({exc}); re-run pretrain") from exc
    return config, state, int(checkpoint.get("step", -1))


def load_lm(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """``(language model in eval mode, model config dict)`` from ``pretrain_dir/model.pt``."""
    config, state, _ = read_lm_checkpoint(path, "run `lmpipe pretrain` first, or set export.export_lm: false")
    model = build_lm(config)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise DataError(f"{path}: not a pretrain checkpoint this code can load ({exc})") from exc
    return model.eval(), config.to_dict()


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


@torch.no_grad()
def generate(
    model: nn.Module, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None, generator=None
):
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


# ---------------------------------------------------------------------------------------------
# Sequence classification on top of either backbone (finetune, export)
# ---------------------------------------------------------------------------------------------


class HashedNgramBag(nn.Module):
    """Mean embedding of a text's token unigrams and hashed token bigrams (fastText's bag of n-grams).

    Beside the transformer it gives the classifier the cheap lexical evidence an n-gram model
    uses (Joulin et al. 2016), in the same graph.
    Bigram ``(a, b)`` of neighbouring real tokens lands in bucket ``(a * 1000003 + b) mod
    buckets``: an odd multiplier spreads the pairs over the table, collisions are rare for the
    10^5 distinct pairs of a news corpus. Integer ops only (Mul, Add, Mod, Gather), so ONNX keeps
    it; int8 dynamic quantization shrinks the tables 4x.
    """

    PAIR_MULTIPLIER = 1000003

    def __init__(self, vocab_size: int, buckets: int, dim: int):
        super().__init__()
        self.buckets = int(buckets)
        self.unigram = nn.Embedding(vocab_size, dim)
        self.bigram = nn.Embedding(self.buckets, dim)
        nn.init.normal_(self.unigram.weight, mean=0.0, std=0.02)
        nn.init.normal_(self.bigram.weight, mean=0.0, std=0.02)

    def forward(self, input_ids, attention_mask):
        mask = attention_mask.to(self.unigram.weight.dtype)  # (B, T)
        pair_mask = mask[:, :-1] * mask[:, 1:]  # (B, T-1): both tokens real
        pairs = (input_ids[:, :-1] * self.PAIR_MULTIPLIER + input_ids[:, 1:]) % self.buckets  # (B, T-1)
        total = (self.unigram(input_ids) * mask.unsqueeze(-1)).sum(1) + (
            self.bigram(pairs) * pair_mask.unsqueeze(-1)
        ).sum(1)  # (B, D)
        return total / (mask.sum(1) + pair_mask.sum(1)).clamp(min=1.0).unsqueeze(-1)  # (B, D)


class SequenceClassifier(nn.Module):
    """Pooled backbone states -> dropout -> Linear(C, num_classes), plus an optional n-gram expert.

    ``pooling="last"``: the state of the last real token, found from the mask (right padding
    assumed: index ``attention_mask.sum(1) - 1``, a gather, so ONNX keeps it dynamic); with a
    causal backbone that state has read the whole text. ``pooling="mean"``: the mean of the
    states of the real tokens.

    ``ngram_buckets > 0`` adds a second expert: a :class:`HashedNgramBag` of width ``ngram_dim``
    with its own linear head, whose logits are added with weight ``ngram_weight`` (a buffer, so
    it travels in the state dict and in the ONNX graph). finetune trains the two experts
    separately and picks the weight on val: trained jointly, the bag fits the training rows
    first and starves the transformer of gradient (val macro-F1 0.890 vs 0.896 alone, and the
    separately trained pair reaches 0.900; docs/RESULTS.md).
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        pooling: Literal["last", "mean"] = "last",
        pad_id: int = 0,
        dropout: float = 0.1,
        ngram_buckets: int = 0,
        ngram_dim: int = 0,
    ):
        super().__init__()
        if pooling not in ("last", "mean"):
            raise ValueError(f"pooling must be 'last' or 'mean', got {pooling!r}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if (ngram_buckets > 0) != (ngram_dim > 0):
            raise ValueError(f"ngram_buckets and ngram_dim go together, got {ngram_buckets} and {ngram_dim}")
        self.backbone, self.pooling, self.pad_id = backbone, pooling, int(pad_id)
        self.num_classes = int(num_classes)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(backbone.config.n_embd, num_classes)
        nn.init.normal_(self.head.weight, mean=0.0, std=0.02)
        nn.init.zeros_(self.head.bias)
        self.ngrams = self.ngram_head = None
        if ngram_buckets:
            self.ngrams = HashedNgramBag(backbone.config.vocab_size, ngram_buckets, ngram_dim)
            self.ngram_head = nn.Linear(ngram_dim, num_classes)
            self.register_buffer("ngram_weight", torch.zeros(()))

    def pool(self, input_ids, attention_mask):
        """The text's embedding ``(B, C)``: what the transformer's head reads (and monitor embeds)."""
        h = self.backbone.hidden_states(input_ids, attention_mask)  # (B, T, C)
        if self.pooling == "last":
            last = (attention_mask.sum(dim=1) - 1).clamp(min=0).long()  # (B,): right padding
            index = last.view(-1, 1, 1).expand(-1, 1, h.size(2))  # (B, 1, C)
            return h.gather(1, index).squeeze(1)  # (B, C)
        mask = attention_mask.to(h.dtype).unsqueeze(-1)  # (B, T, 1)
        return (h * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)  # (B, C)

    def classify(self, pooled, input_ids, attention_mask):
        """Logits ``(B, num_classes)`` from the pooled states (+ the weighted n-gram expert)."""
        logits = self.head(self.dropout(pooled))
        if self.ngrams is not None:
            logits = logits + self.ngram_weight * self.ngram_logits(input_ids, attention_mask).to(logits.dtype)
        return logits

    def transformer_logits(self, input_ids, attention_mask):
        return self.head(self.dropout(self.pool(input_ids, attention_mask)))  # (B, num_classes)

    def ngram_logits(self, input_ids, attention_mask):
        return self.ngram_head(self.ngrams(input_ids, attention_mask))  # (B, num_classes)

    def forward(self, input_ids, attention_mask=None):
        if attention_mask is None:
            attention_mask = (input_ids != self.pad_id).long()
        return self.classify(self.pool(input_ids, attention_mask), input_ids, attention_mask)


def load_classifier(path: str | Path) -> tuple[SequenceClassifier, dict[str, Any]]:
    """``(classifier in eval mode, checkpoint metadata)`` from ``finetune_dir/model.pt``.

    The metadata holds ``model_config``, ``classifier`` (labels, pooling, pad/cls ids, max_len),
    ``from_scratch`` and ``compression`` (what ``compress`` did; ``None`` for finetune's own model); ``torch.load(weights_only=True)`` as for :func:`load_lm`.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} not found: run `lmpipe finetune` first (or `dvc repro finetune`)")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    try:
        config = ModelConfig.from_dict(dict(checkpoint["model_config"]))
        meta = dict(checkpoint["classifier"])
        labels = list(meta["labels"])
        model = SequenceClassifier(
            build_lm(config),
            num_classes=len(labels),
            pooling=meta["pooling"],
            pad_id=int(meta["pad_id"]),
            ngram_buckets=int(meta.get("ngram_buckets", 0)),
            ngram_dim=int(meta.get("ngram_dim", 0)),
        )
        model.load_state_dict(_state_dict(checkpoint))
    except (KeyError, RuntimeError, ValueError) as exc:
        raise DataError(f"{path}: not a finetune checkpoint this code can load ({exc}); re-run finetune") from exc
    meta.setdefault("num_classes", len(labels))
    meta.setdefault("cls_id", None)
    return model.eval(), {
        "model_config": config.to_dict(),
        "classifier": meta,
        "from_scratch": bool(checkpoint.get("from_scratch", False)),
        "compression": checkpoint.get("compression"),  # set by compress for a student, else None
    }
