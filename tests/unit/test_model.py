"""Model unit tests: shapes, causality, loss at init, pooling over padding, training, ONNX export.

Both architectures run through the same tests. The training test reads real WikiText-2 bytes
(vocab 256, no tokenizer needed) from the shared corpora.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from pipeline_tasks.errors import DataError
from pipeline_tasks.train.model import (
    ChunkedLMLoss,
    HashedNgramBag,
    ModelConfig,
    ModelParams,
    SequenceClassifier,
    build_lm,
    flops_per_token,
    generate,
    load_classifier,
    load_lm,
    mfu,
    num_parameters,
)

ARCHS = ["gpt", "lstm"]


def tiny_config(arch: str, **overrides) -> ModelConfig:
    base = dict(arch=arch, n_layer=2, n_head=4, n_embd=64, block_size=32, dropout=0.0, bias=False, vocab_size=320)
    base.update(overrides)
    return ModelConfig(**base)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("arch", ARCHS)
def test_lm_shapes_match_interface(arch):
    model = build_lm(tiny_config(arch)).eval()
    idx = torch.randint(0, 320, (3, 17))
    logits, loss = model(idx)
    assert logits.shape == (3, 17, 320) and loss is None
    logits_t, loss_t = model(idx, idx)
    assert logits_t is None and loss_t.ndim == 0  # training: the loss without the (B, T, V) logits
    last, _ = model(idx, last_only=True)
    assert last.shape == (3, 1, 320)
    torch.testing.assert_close(last[:, 0], logits[:, -1])
    assert model.hidden_states(idx).shape == (3, 17, 64)
    assert generate(model, idx[:, :5], 4).shape == (3, 9)


@pytest.mark.parametrize("arch", ARCHS)
def test_lm_is_causal(arch):
    model = build_lm(tiny_config(arch)).eval()
    idx = torch.randint(0, 320, (2, 20))
    t = 9
    changed = idx.clone()
    changed[:, t + 1 :] = (changed[:, t + 1 :] + 7) % 320
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :])  # the later positions do see the change


@pytest.mark.parametrize("arch", ARCHS)
def test_lm_initial_loss_is_close_to_log_vocab(arch):
    config = tiny_config(arch, vocab_size=1000, n_embd=128)
    model = build_lm(config).eval()
    idx = torch.randint(0, 1000, (8, 32))
    with torch.no_grad():
        _, loss = model(idx[:, :-1], idx[:, 1:])
    assert abs(loss.item() - math.log(1000)) < 0.15


@pytest.mark.parametrize("arch", ARCHS)
def test_lm_loss_ignores_minus_one_targets(arch):
    model = build_lm(tiny_config(arch)).eval()
    idx = torch.randint(0, 320, (2, 12))
    targets = idx.clone()
    targets[:, 6:] = -1
    with torch.no_grad():
        _, masked = model(idx, targets)
        logits, _ = model(idx)
    expected = torch.nn.functional.cross_entropy(logits[:, :6].reshape(-1, 320), idx[:, :6].reshape(-1))
    torch.testing.assert_close(masked, expected)


@pytest.mark.parametrize("rows", [7, 64, 1000])  # chunks that do not divide N, one chunk, N < chunk
def test_chunked_lm_loss_matches_cross_entropy_in_value_and_gradients(rows, monkeypatch):
    monkeypatch.setattr(ChunkedLMLoss, "CHUNK_ROWS", rows)
    h0, w0 = torch.randn(150, 32, dtype=torch.float64), torch.randn(97, 32, dtype=torch.float64) * 0.1
    targets = torch.randint(0, 97, (150,))
    targets[::9] = -1
    grads = []
    for chunked in (False, True):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        if chunked:
            loss = ChunkedLMLoss.apply(h, w, targets, True)
        else:
            loss = torch.nn.functional.cross_entropy(h @ w.t(), targets, ignore_index=-1)
        (2.5 * loss).backward()  # a scaled upstream gradient reaches both inputs
        grads.append((loss.detach(), h.grad, w.grad))
    for want, got in zip(grads[0], grads[1]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_chunked_lm_loss_under_bf16_autocast_and_without_grad():
    h, w = torch.randn(300, 64, requires_grad=True), (torch.randn(512, 64) * 0.05).requires_grad_()
    targets = torch.randint(0, 512, (300,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ChunkedLMLoss.apply(h, w, targets, True)
        ref = torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, w).float(), targets)
    assert loss.dtype == torch.float32 and abs(loss.item() - ref.item()) < 1e-3
    loss.backward()
    assert h.grad.dtype == h.dtype and w.grad.dtype == w.dtype and torch.isfinite(w.grad).all()
    with torch.no_grad():  # evaluation: the loss only, nothing kept for a backward
        assert abs(ChunkedLMLoss.apply(h, w, targets, False).item() - loss.item()) < 1e-3


def test_gpt_training_step_gives_the_gradients_of_the_plain_loss():
    model = build_lm(tiny_config("gpt"))
    idx = torch.randint(0, 320, (2, 16))
    _, loss = model(idx[:, :-1], idx[:, 1:])
    loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model.lm_head(model.hidden_states(idx[:, :-1]))
    torch.nn.functional.cross_entropy(logits.reshape(-1, 320), idx[:, 1:].reshape(-1)).backward()
    for name, p in model.named_parameters():  # the tied table gets both its input and output gradients
        torch.testing.assert_close(ours[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_ngram_bag_ignores_padding_and_hashes_pairs_into_its_buckets():
    bag = HashedNgramBag(vocab_size=320, buckets=97, dim=8)
    ids = torch.tensor([[5, 6, 7, 0, 0], [5, 6, 7, 8, 9]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        out = bag(ids, mask)
        alone = bag(ids[:1, :3], mask[:1, :3])
    torch.testing.assert_close(out[:1], alone)
    pairs = ids[:, :3][:, :-1] * HashedNgramBag.PAIR_MULTIPLIER + ids[:, :3][:, 1:]
    expected = (bag.unigram.weight[[5, 6, 7]].sum(0) + bag.bigram.weight[pairs[0] % 97].sum(0)) / 5
    torch.testing.assert_close(alone[0], expected.detach())


def test_classifier_ngram_expert_adds_weighted_logits_and_needs_both_sizes():
    clf = SequenceClassifier(build_lm(tiny_config("gpt")), 4, pad_id=0, ngram_buckets=101, ngram_dim=8).eval()
    ids = torch.randint(1, 320, (3, 9))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        transformer = clf.transformer_logits(ids, mask)
        torch.testing.assert_close(clf(ids, mask), transformer)  # weight 0: the transformer alone
        clf.ngram_weight.fill_(1.5)
        torch.testing.assert_close(clf(ids, mask), transformer + 1.5 * clf.ngram_logits(ids, mask))
    assert "ngram_weight" in clf.state_dict()
    with pytest.raises(ValueError, match="go together"):
        SequenceClassifier(build_lm(tiny_config("gpt")), 4, ngram_buckets=101)


def test_gpt_rejects_sequence_longer_than_block_size():
    model = build_lm(tiny_config("gpt", block_size=8))
    with pytest.raises(ValueError, match="longer than block_size 8"):
        model(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_classifier_pooling_ignores_right_padding(arch, pooling):
    pad_id = 1
    clf = SequenceClassifier(build_lm(tiny_config(arch)), num_classes=4, pooling=pooling, pad_id=pad_id).eval()
    ids = torch.randint(2, 320, (3, 10))
    mask = torch.ones_like(ids)
    ids[1, 6:], mask[1, 6:] = pad_id, 0  # one row already padded inside the batch
    padded_ids = torch.cat([ids, torch.full((3, 7), pad_id)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(3, 7, dtype=torch.long)], dim=1)
    with torch.no_grad():
        a = clf(ids, mask)
        b = clf(padded_ids, padded_mask)
        c = clf(padded_ids)  # mask derived from pad_id
        row1_alone = clf(ids[1:2, :6], mask[1:2, :6])
    assert a.shape == (3, 4)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    torch.testing.assert_close(a, c, rtol=0, atol=1e-5)
    torch.testing.assert_close(a[1:2], row1_alone, rtol=0, atol=1e-5)


def test_classifier_rejects_bad_pooling():
    with pytest.raises(ValueError, match="pooling"):
        SequenceClassifier(build_lm(tiny_config("gpt")), 4, pooling="max")


@pytest.mark.parametrize("prefix", ["", "_orig_mod."])
def test_load_lm_and_load_classifier_read_eager_and_compiled_checkpoints(prefix, tmp_path):
    config = tiny_config("gpt")
    lm = build_lm(config)
    torch.save(
        {"model": {prefix + k: v for k, v in lm.state_dict().items()}, "model_config": config.to_dict()},
        tmp_path / "lm.pt",
    )
    loaded, config_dict = load_lm(tmp_path / "lm.pt")
    assert config_dict == config.to_dict() and not loaded.training
    assert all(torch.equal(v, lm.state_dict()[k]) for k, v in loaded.state_dict().items())

    clf = SequenceClassifier(lm, num_classes=3, pooling="mean", pad_id=1)
    classifier = {"labels": ["a", "b", "c"], "pooling": "mean", "pad_id": 1}
    torch.save(
        {
            "model": {prefix + k: v for k, v in clf.state_dict().items()},
            "model_config": config.to_dict(),
            "classifier": classifier,
        },
        tmp_path / "clf.pt",
    )
    loaded_clf, meta = load_classifier(tmp_path / "clf.pt")
    assert meta["classifier"]["num_classes"] == 3 and meta["classifier"]["cls_id"] is None
    assert meta["from_scratch"] is False and loaded_clf.pooling == "mean"
    assert all(torch.equal(v, clf.state_dict()[k]) for k, v in loaded_clf.state_dict().items())


def test_load_lm_explains_a_missing_or_foreign_checkpoint(tmp_path):
    with pytest.raises(DataError, match="not found: run `lmpipe pretrain` first"):
        load_lm(tmp_path / "missing.pt")
    torch.save({"weights": {}}, tmp_path / "other.pt")
    with pytest.raises(DataError, match="not a finetune checkpoint"):
        load_classifier(tmp_path / "other.pt")


def test_model_config_roundtrips_through_dict_and_rejects_unknown_keys():
    params = ModelParams(arch="lstm", n_layer=3, n_head=2, n_embd=32, block_size=16)
    config = ModelConfig.from_params(params, vocab_size=777)
    assert config.vocab_size == 777 and config.arch == "lstm" and config.n_layer == 3
    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown keys"):
        ModelConfig.from_dict({**config.to_dict(), "rope": True})


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(n_embd=30, n_head=4), "divisible"),
        (dict(n_layer=0), "n_layer"),
        (dict(dropout=1.0), "dropout"),
    ],
)
def test_model_params_reject_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        ModelParams(**bad)


@pytest.mark.parametrize("arch", ARCHS)
def test_flops_per_token_counts_every_matmul_weight(arch):
    config = tiny_config(arch, bias=True)
    model = build_lm(config)
    matmul_weights = {
        id(p): p.numel()
        for n, p in model.named_parameters()
        if (n.endswith("weight") and p.ndim == 2 and "wpe" not in n) or "weight_" in n
    }
    expected = 6 * sum(matmul_weights.values())
    if arch == "gpt":
        expected += 12 * config.n_layer * config.n_embd * config.block_size
    assert flops_per_token(config) == expected
    assert mfu(1000.0, config, peak_flops=flops_per_token(config) * 1000.0) == pytest.approx(1.0)


def test_num_parameters_counts_tied_weights_once():
    config = tiny_config("gpt")
    model = build_lm(config)
    assert model.lm_head.weight is model.transformer.wte.weight
    total = sum(p.numel() for p in model.parameters())  # parameters() already de-duplicates
    assert num_parameters(model) == total
    embeddings = config.vocab_size * config.n_embd + config.block_size * config.n_embd
    assert num_parameters(model, exclude_embeddings=True) == total - embeddings


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_lm_loss_falls_on_real_text(arch, corpora):
    raw = (corpora / "wikitext2/DRAGNLabs_LLMHumanModeling/wiki.valid.raw").read_bytes()[:200_000]
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
    config = tiny_config(arch, vocab_size=256)
    model = build_lm(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(30):
        starts = torch.randint(0, len(data) - config.block_size - 1, (16,), generator=g)
        x = torch.stack([data[s : s + config.block_size] for s in starts.tolist()])  # (B, T)
        y = torch.stack([data[s + 1 : s + 1 + config.block_size] for s in starts.tolist()])  # (B, T)
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(256), abs=0.2)
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0, losses


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_classifier_exports_to_onnx_with_dynamic_batch_and_sequence(arch, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    from torch.export import Dim

    clf = SequenceClassifier(build_lm(tiny_config(arch)), num_classes=4, pooling="last", pad_id=0).eval()
    ids = torch.randint(1, 320, (2, 12))
    mask = torch.ones_like(ids)
    path = tmp_path / "clf.onnx"
    batch, seq = Dim("batch"), Dim("seq")
    torch.onnx.export(
        clf,
        (ids, mask),
        str(path),
        dynamo=True,
        input_names=["input_ids", "attention_mask"],
        output_names=["logits"],
        external_data=False,
        dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
    )
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in [(2, 12), (5, 27)]:
        x = torch.randint(1, 320, shape)
        m = torch.ones_like(x)
        m[0, shape[1] // 2 :] = 0
        x[0, shape[1] // 2 :] = 0
        got = session.run(None, {"input_ids": x.numpy(), "attention_mask": m.numpy()})[0]
        with torch.no_grad():
            want = clf(x, m).numpy()
        assert got.shape == (shape[0], 4)
        assert abs(got - want).max() < 1e-4


def test_model_params_is_a_frozen_dataclass():
    with pytest.raises(dataclasses.FrozenInstanceError):
        ModelParams().n_layer = 3  # type: ignore[misc]
