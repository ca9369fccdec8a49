"""Pure pieces of ``compress``: the student's shape and init, the distillation loss, structured pruning."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pipeline_tasks.config import ConfigError
from pipeline_tasks.train import distill, prune
from pipeline_tasks.train.model import ModelConfig, SequenceClassifier, build_lm
from pipeline_tasks.train.params import StudentParams

TEACHER = ModelConfig(n_layer=4, n_head=4, n_embd=32, block_size=16, vocab_size=64)


def _classifier(config: ModelConfig, ngrams: bool = True, seed: int = 0) -> SequenceClassifier:
    torch.manual_seed(seed)
    model = SequenceClassifier(
        build_lm(config),
        num_classes=3,
        pad_id=0,
        dropout=0.0,
        ngram_buckets=97 if ngrams else 0,
        ngram_dim=8 if ngrams else 0,
    )
    if ngrams:
        model.ngram_weight.fill_(1.5)
    for p in model.parameters():  # away from the zero-initialised biases: every slice must matter
        p.data.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (5, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding, as the pipeline feeds it
    ids[mask == 0] = 0
    return ids, mask


def test_student_config_defaults_to_half_depth_same_width():
    student = distill.student_config(TEACHER, StudentParams())
    assert (student.n_layer, student.n_embd, student.n_head) == (2, 32, 4)
    assert distill.student_config(dataclasses.replace(TEACHER, n_layer=1), StudentParams()).n_layer == 1
    narrow = distill.student_config(TEACHER, StudentParams(n_embd=16))
    assert (narrow.n_embd, narrow.n_head) == (16, 2)
    with pytest.raises(ConfigError, match="compress.student"):
        distill.student_config(TEACHER, StudentParams(n_embd=30, n_head=4))


def test_layer_map_is_every_other_block_and_checked():
    assert distill.default_layer_map(4, 2) == [0, 2]
    assert distill.default_layer_map(12, 6) == [0, 2, 4, 6, 8, 10]
    assert distill.default_layer_map(3, 3) == [0, 1, 2]
    student = distill.student_config(TEACHER, StudentParams())
    assert distill.layer_map_for(TEACHER, student, StudentParams(layer_map=(2, 3))) == [2, 3]
    with pytest.raises(ConfigError, match="layer_map"):
        distill.layer_map_for(TEACHER, student, StudentParams(layer_map=(0, 4)))


def test_init_student_copies_the_mapped_teacher_blocks_and_freezes_the_ngram_expert():
    teacher = _classifier(TEACHER)
    config = distill.student_config(TEACHER, StudentParams())
    student, report = distill.init_student(teacher, config, [1, 3], head_dropout=0.0)
    assert report["tensors_from_teacher"] == report["tensors"]
    t, s = teacher.state_dict(), student.state_dict()
    assert torch.equal(
        s["backbone.transformer.h.0.attn.c_attn.weight"], t["backbone.transformer.h.1.attn.c_attn.weight"]
    )
    assert torch.equal(s["backbone.transformer.h.1.mlp.c_fc.weight"], t["backbone.transformer.h.3.mlp.c_fc.weight"])
    assert torch.equal(s["head.weight"], t["head.weight"]) and float(student.ngram_weight) == 1.5
    assert not any(p.requires_grad for p in student.ngrams.parameters())
    assert all(p.requires_grad for p in student.backbone.parameters())
    # a narrower student keeps only what fits: the n-gram expert
    narrow, narrow_report = distill.init_student(
        teacher, distill.student_config(TEACHER, StudentParams(n_embd=16)), [0, 2], 0.0
    )
    assert narrow_report["layer_map"] is None and 0 < narrow_report["tensors_from_teacher"] < narrow_report["tensors"]
    assert torch.equal(narrow.state_dict()["ngrams.bigram.weight"], t["ngrams.bigram.weight"])


def test_distillation_loss_is_zero_at_the_teacher_and_mixes_hard_labels_only_where_labelled():
    teacher = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    unlabelled = torch.tensor([-1, -1])
    assert float(distill.distillation_loss(teacher, teacher, unlabelled, 2.0, 1.0)) == pytest.approx(0.0, abs=1e-7)
    # unlabelled rows: the hard part contributes nothing whatever alpha is
    student = torch.zeros(2, 3)
    soft_only = distill.distillation_loss(student, teacher, unlabelled, 2.0, 1.0)
    assert float(distill.distillation_loss(student, teacher, unlabelled, 2.0, 0.5)) == pytest.approx(
        0.5 * float(soft_only)
    )
    labels = torch.tensor([0, -1])
    mixed = distill.distillation_loss(student, teacher, labels, 2.0, 0.5)
    hard = torch.nn.functional.cross_entropy(student[:1], labels[:1])
    assert float(mixed) == pytest.approx(0.5 * float(soft_only) + 0.5 * float(hard))
    # the T^2 factor: the soft loss of the same logits at T and its gradient scale stay comparable
    s = torch.randn(4, 3, requires_grad=True)
    t = torch.randn(4, 3)
    grads = []
    for temperature in (1.0, 4.0):
        (g,) = torch.autograd.grad(
            distill.distillation_loss(s * 0.01, t * 0.01, torch.full((4,), -1), temperature, 1.0), s
        )
        grads.append(g.norm())
    assert float(grads[1] / grads[0]) == pytest.approx(1.0, rel=0.05)  # small logits: the high-T limit


def test_pruning_nothing_keeps_the_logits_and_pruning_shrinks_the_matrices():
    model = _classifier(TEACHER)
    for p in model.ngrams.parameters():  # trained apart and frozen, as in a distilled student
        p.requires_grad_(False)
    ids, mask = _batch()
    heads = np.random.default_rng(0).random((4, 4))
    neurons = np.random.default_rng(1).random((4, 128))
    same, _ = prune.prune(model, heads, neurons, keep_heads=4, keep_neurons=128)
    with torch.no_grad():
        torch.testing.assert_close(same(ids, mask), model(ids, mask), rtol=0, atol=1e-6)
    pruned, report = prune.prune(model, heads, neurons, keep_heads=2, keep_neurons=48)
    config = pruned.backbone.config
    assert (config.n_head, config.head_dim, config.attn_dim, config.mlp_hidden) == (2, 8, 16, 48)
    assert ModelConfig.from_dict(config.to_dict()) == config  # the checkpoint round trip keeps the shape
    block = pruned.backbone.transformer.h[0]
    assert block.attn.c_attn.weight.shape == (48, 32) and block.attn.c_proj.weight.shape == (32, 16)
    assert block.mlp.c_fc.weight.shape == (48, 32) and block.mlp.c_proj.weight.shape == (32, 48)
    assert report["kept"]["heads"][0] == sorted(np.argsort(-heads[0])[:2].tolist())
    with torch.no_grad():
        assert pruned(ids, mask).shape == (5, 3)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    assert not any(p.requires_grad for p in pruned.ngrams.parameters())


def test_removing_a_head_equals_zeroing_its_output_columns():
    """The slicing removes exactly the head: same logits as the full model with that head's output cut."""
    model = _classifier(dataclasses.replace(TEACHER, n_layer=1), ngrams=False)
    ids, mask = _batch()
    scores = np.array([[0.1, 5.0, 3.0, 4.0]])  # head 0 is the least important
    pruned, _ = prune.prune(model, scores, np.ones((1, 128)), keep_heads=3, keep_neurons=128)
    masked = SequenceClassifier(build_lm(model.backbone.config), num_classes=3, pad_id=0, dropout=0.0).eval()
    masked.load_state_dict(model.state_dict())
    with torch.no_grad():
        masked.backbone.transformer.h[0].attn.c_proj.weight[:, :8] = 0.0  # head 0 owns columns 0..7
        torch.testing.assert_close(pruned(ids, mask), masked(ids, mask), rtol=0, atol=1e-5)


def test_importance_scores_every_head_and_neuron_and_refuses_an_lstm():
    model = _classifier(TEACHER).train()
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, 64, size=n) for n in (5, 9, 12, 7, 3, 11)]
    heads, neurons = prune.importance(model, seqs, np.array([0, 1, 2, 0, 1, 2]), batch_size=3, max_batches=2)
    assert heads.shape == (4, 4) and neurons.shape == (4, 128)
    assert (heads > 0).all() and (neurons >= 0).all() and neurons.sum() > 0
    assert model.training and all(p.grad is None for p in model.parameters())  # left as found
    assert prune.kept_counts(4, 128, 0.5, 0.5) == (2, 64) and prune.kept_counts(1, 4, 0.9, 0.9) == (1, 1)
    lstm = _classifier(dataclasses.replace(TEACHER, arch="lstm"), ngrams=False)
    with pytest.raises(ConfigError, match="needs a GPT"):
        prune.importance(lstm, seqs, np.zeros(6, dtype=np.int64), 3, 1)
