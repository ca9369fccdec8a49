"""Structured pruning of a GPT classifier: whole attention heads and MLP neurons (used by ``compress``).

Importance is the first-order Taylor estimate of the loss change when a group of weights is
removed (Molchanov et al. 2019): ``(Σ_{w ∈ group} w · ∂L/∂w)²`` per batch, summed over val
batches. A head's group is its rows of the fused q/k/v projection and its columns of the output
projection; a neuron's is its row of ``c_fc`` and its column of the MLP's ``c_proj`` (biases
included when the model has them).

Every block keeps the same number of heads and of neurons (its most important ones), so the
pruned model is an ordinary :class:`SequenceClassifier` whose config says its shape
(``n_head`` fewer heads of unchanged ``attn_head_dim``, ``mlp_dim`` neurons): the matrices are
physically smaller and ONNX and int8 inherit the speed.

Why by hand: ``torch.nn.utils.prune`` masks weights (the zeros stay in full-size matrices, so
nothing gets faster), and slicing the rows and columns of our own four projections is short;
a general pruning library would have to rediscover the head structure of the fused q/k/v matrix.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from pipeline_tasks.config import ConfigError
from pipeline_tasks.train import classifier_data
from pipeline_tasks.train.model import SequenceClassifier, build_lm

logger = logging.getLogger(__name__)


def _blocks(model: SequenceClassifier):
    if model.backbone.config.arch != "gpt":
        raise ConfigError(
            "compress.prune removes attention heads and MLP neurons: it needs a GPT model "
            f"(model.arch is {model.backbone.config.arch!r}); set compress.prune.enabled: false"
        )
    return model.backbone.transformer.h


def _group_sums(block, n_head: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``Σ w·∂L/∂w`` per head ``(n_head,)`` and per MLP neuron ``(mlp_dim,)`` of one block's current grads."""
    attn, mlp = block.attn, block.mlp

    def wg(layer):
        return layer.weight * layer.weight.grad

    heads = wg(attn.c_attn).view(3, n_head, head_dim, -1).sum(dim=(0, 2, 3))  # q, k, v rows of each head
    heads = heads + wg(attn.c_proj).view(-1, n_head, head_dim).sum(dim=(0, 2))  # output columns of each head
    neurons = wg(mlp.c_fc).sum(dim=1) + wg(mlp.c_proj).sum(dim=0)  # (M,)
    if attn.c_attn.bias is not None:
        heads = heads + (attn.c_attn.bias * attn.c_attn.bias.grad).view(3, n_head, head_dim).sum(dim=(0, 2))
    if mlp.c_fc.bias is not None:
        neurons = neurons + mlp.c_fc.bias * mlp.c_fc.bias.grad
    return heads, neurons


def importance(
    model: SequenceClassifier, seqs: list[np.ndarray], labels: np.ndarray, batch_size: int, max_batches: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(head scores (L, H), neuron scores (L, M))`` from ``max_batches`` labelled batches (eval mode, fp32)."""
    blocks = _blocks(model)
    config = model.backbone.config
    heads = torch.zeros(config.n_layer, config.n_head, dtype=torch.float64)
    neurons = torch.zeros(config.n_layer, config.mlp_hidden, dtype=torch.float64)
    was_training = model.training
    model.eval()  # no dropout: the scores describe the model that will be served
    device = next(model.parameters()).device
    for n, idx in enumerate(classifier_data.sorted_batches([len(s) for s in seqs], batch_size)):
        if n >= max_batches:
            break
        ids, mask = classifier_data.pad_batch([seqs[i] for i in idx], model.pad_id)
        model.zero_grad(set_to_none=False)
        logits = model(torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device))
        F.cross_entropy(logits.float(), torch.from_numpy(labels[idx]).to(device)).backward()
        with torch.no_grad():
            for layer, block in enumerate(blocks):
                h, m = _group_sums(block, config.n_head, config.head_dim)
                heads[layer] += h.double().cpu() ** 2
                neurons[layer] += m.double().cpu() ** 2
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return heads.numpy(), neurons.numpy()


def kept_counts(n_head: int, mlp_dim: int, head_sparsity: float, mlp_sparsity: float) -> tuple[int, int]:
    """Heads and neurons each block keeps: at least one of each."""
    return max(1, round(n_head * (1.0 - head_sparsity))), max(1, round(mlp_dim * (1.0 - mlp_sparsity)))


def _top(scores: np.ndarray, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` highest scores, in ascending index order (ties: the lower index)."""
    order = np.argsort(-scores, kind="stable")[:keep]
    return torch.as_tensor(np.sort(order), dtype=torch.long)


def prune(
    model: SequenceClassifier, head_scores: np.ndarray, neuron_scores: np.ndarray, keep_heads: int, keep_neurons: int
) -> tuple[SequenceClassifier, dict[str, Any]]:
    """A new, physically smaller classifier keeping each block's most important heads and neurons."""
    blocks = _blocks(model)
    config = model.backbone.config
    hs = config.head_dim
    pruned_config = dataclasses.replace(config, n_head=keep_heads, attn_head_dim=hs, mlp_dim=keep_neurons)
    pruned = SequenceClassifier(
        build_lm(pruned_config),
        num_classes=model.num_classes,
        pooling=model.pooling,
        pad_id=model.pad_id,
        dropout=model.dropout.p,
        ngram_buckets=model.ngrams.buckets if model.ngrams is not None else 0,
        ngram_dim=model.ngram_head.in_features if model.ngram_head is not None else 0,
    )
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    kept: dict[str, list[list[int]]] = {"heads": [], "neurons": []}
    for layer, block in enumerate(blocks):
        heads, neurons = _top(head_scores[layer], keep_heads), _top(neuron_scores[layer], keep_neurons)
        kept["heads"].append(heads.tolist())
        kept["neurons"].append(neurons.tolist())
        # columns (within q, k and v alike) of the kept heads: head h owns [h·hs, (h+1)·hs)
        head_cols = (heads.view(-1, 1) * hs + torch.arange(hs)).reshape(-1)  # (keep·hs,)
        qkv_rows = torch.cat([head_cols + part * config.attn_dim for part in range(3)])  # (3·keep·hs,)
        prefix = f"backbone.transformer.h.{layer}."
        attn, mlp = block.attn, block.mlp
        state[prefix + "attn.c_attn.weight"] = attn.c_attn.weight.detach()[qkv_rows].clone()
        state[prefix + "attn.c_proj.weight"] = attn.c_proj.weight.detach()[:, head_cols].clone()
        state[prefix + "mlp.c_fc.weight"] = mlp.c_fc.weight.detach()[neurons].clone()
        state[prefix + "mlp.c_proj.weight"] = mlp.c_proj.weight.detach()[:, neurons].clone()
        if attn.c_attn.bias is not None:
            state[prefix + "attn.c_attn.bias"] = attn.c_attn.bias.detach()[qkv_rows].clone()
        if mlp.c_fc.bias is not None:
            state[prefix + "mlp.c_fc.bias"] = mlp.c_fc.bias.detach()[neurons].clone()
    pruned.load_state_dict(state)
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    for name, p in pruned.named_parameters():  # a frozen expert stays frozen
        p.requires_grad_(trainable[name])
    logger.info(
        "compress: pruned to %d of %d heads and %d of %d MLP neurons per block",
        keep_heads,
        config.n_head,
        keep_neurons,
        config.mlp_hidden,
    )
    return pruned.train(model.training), {
        "heads": [config.n_head, keep_heads],
        "mlp_neurons": [config.mlp_hidden, keep_neurons],
        "kept": kept,
    }
