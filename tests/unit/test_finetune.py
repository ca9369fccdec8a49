"""Pure parts of finetune: params, label ids, encoding, padding / pooling, batching,
class weights, layer-wise lr groups and the schedule (real tokenizer and real models, tiny)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline_tasks.config import ConfigError, parse_params
from pipeline_tasks.errors import DataError
from pipeline_tasks.train import classifier_data as fd
from pipeline_tasks.train.params import FinetuneParams

TEXTS = [
    "Stocks rally as oil prices fall\nWall Street rose on Monday after crude futures dropped.",
    "Yankees beat Red Sox in extra innings\nThe Yankees won 5-4 in the 11th.",
    "NASA probe sends images of Saturn\nScientists released new pictures from the Cassini spacecraft.",
    "UN council meets on Sudan crisis\nDiplomats gathered in New York to discuss Darfur.",
] * 5


@pytest.fixture(scope="module")
def tokenizer():
    """A real byte-level BPE like the tokenize stage's (specials first: eot 0, pad 1, cls 2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|pad|>", "<|cls|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXTS, trainer)
    return tok


# -- params ----------------------------------------------------------------------------------


def test_finetune_params_load_nested_dataset_section():
    params = parse_params(
        {
            "finetune": {
                "dataset": {"train_sources": ["a", "b"], "test_sources": []},
                "pooling": "mean",
                "layer_lr_decay": 0.8,
            }
        }
    )
    assert params.finetune.dataset.train_sources == ("a", "b")
    assert params.finetune.dataset.test_sources == ()
    assert params.finetune.pooling == "mean"


@pytest.mark.parametrize(
    "section, message",
    [
        ({"pooling": "max"}, "finetune.pooling: expected one of"),
        ({"class_weighting": "balanced"}, "finetune.class_weighting"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"layer_lr_decay": 0.0}, "layer_lr_decay"),
        ({"max_len": 1}, "max_len must be >= 2"),
        ({"class_weighting": "inverse_freq", "sampler": "weighted"}, "not both"),
        ({"epochs_typo": 3}, "finetune.epochs_typo: unknown key"),
        ({"backbone_dropout": 1.0}, "backbone_dropout must be in"),
    ],
)
def test_finetune_params_reject_bad_values(section, message):
    with pytest.raises(ConfigError, match=message):
        parse_params({"finetune": section})


# -- labelled rows ---------------------------------------------------------------------------


def test_label_vocabulary_is_sorted_and_unknown_test_label_fails():
    vocab = fd.label_vocabulary(["world", "sports", "business", "scitech", "sports"])
    assert vocab == ["business", "scitech", "sports", "world"]
    np.testing.assert_array_equal(fd.labels_to_ids(["world", "business"], vocab, "x"), [3, 0])
    with pytest.raises(DataError, match=r"test\.parquet: labels \['politics'\] do not occur"):
        fd.labels_to_ids(["politics"], vocab, "test.parquet")


# -- encoding and padding --------------------------------------------------------------------


def test_encode_texts_truncates_to_max_len_and_appends_cls(tokenizer):
    full = tokenizer.encode(TEXTS[0], add_special_tokens=False).ids
    assert len(full) > 12
    with_cls = fd.encode_texts(tokenizer, [TEXTS[0]], max_len=12, cls_id=2)[0]
    assert len(with_cls) == 12 and with_cls[-1] == 2 and with_cls[:-1].tolist() == full[:11]
    no_cls = fd.encode_texts(tokenizer, [TEXTS[0]], max_len=12)[0]
    assert no_cls.tolist() == full[:12]
    short = fd.encode_texts(tokenizer, ["Hi"], max_len=12, cls_id=2)[0]
    assert short.tolist() == [*tokenizer.encode("Hi", add_special_tokens=False).ids, 2]


def test_encode_texts_batches_preserve_order(tokenizer):
    one_by_one = [fd.encode_texts(tokenizer, [t], 20, 2)[0].tolist() for t in TEXTS[:4]]
    batched = [s.tolist() for s in fd.encode_texts(tokenizer, TEXTS[:4], 20, 2, batch_size=3)]
    assert batched == one_by_one


def test_special_token_id_missing_token_fails_with_hint(tokenizer):
    assert fd.special_token_id(tokenizer, "<|pad|>") == 1
    assert fd.special_token_id(tokenizer, "<|mask|>", required=False) is None
    with pytest.raises(DataError, match="re-run tokenize"):
        fd.special_token_id(tokenizer, "<|mask|>")


def test_pad_batch_right_pads_with_pad_id_and_masks():
    ids, mask = fd.pad_batch([np.array([5, 6, 7]), np.array([8])], pad_id=1)
    np.testing.assert_array_equal(ids, [[5, 6, 7], [8, 1, 1]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [1, 0, 0]])
    ids, mask = fd.pad_batch([np.array([5, 6, 7])], pad_id=1, length=5)
    np.testing.assert_array_equal(ids, [[5, 6, 7, 1, 1]])
    with pytest.raises(ValueError, match="sequence 0 is empty"):
        fd.pad_batch([np.array([], dtype=np.int64)], pad_id=1)


@pytest.mark.parametrize("arch", ["gpt", "lstm"])
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_padded_batch_gives_the_same_logits_as_each_text_alone(tokenizer, arch, pooling):
    """Collate + pooling contract: right padding never changes a text's logits."""
    from pipeline_tasks.train.model import ModelConfig, SequenceClassifier, build_lm

    torch.manual_seed(0)
    config = ModelConfig(
        arch=arch, n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=tokenizer.get_vocab_size()
    )
    model = SequenceClassifier(build_lm(config), 4, pooling=pooling, pad_id=1).eval()
    seqs = fd.encode_texts(tokenizer, [*TEXTS[:3], "Short one"], max_len=40, cls_id=2)
    assert len({len(s) for s in seqs}) > 1  # the batch really needs padding
    ids, mask = fd.pad_batch(seqs, pad_id=1)
    with torch.no_grad():
        batched = model(torch.from_numpy(ids), torch.from_numpy(mask))
        alone = torch.cat([model(torch.from_numpy(s)[None], torch.ones(1, len(s), dtype=torch.long)) for s in seqs])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-4)


# -- batching and imbalance ------------------------------------------------------------------


def test_length_bucketed_batches_cover_every_index_once_with_little_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 150, size=1000)
    batches = fd.length_bucketed_batches(lengths, 32, np.random.default_rng(1), bucket_factor=10)
    assert sorted(np.concatenate(batches).tolist()) == list(range(1000))
    assert len(batches) == math.ceil(1000 / 32)
    padded = sum(len(b) * lengths[b].max() for b in batches)
    random_batches = np.array_split(np.random.default_rng(2).permutation(1000), len(batches))
    padded_random = sum(len(b) * lengths[b].max() for b in random_batches)
    assert padded < 0.7 * padded_random
    again = fd.length_bucketed_batches(lengths, 32, np.random.default_rng(1), bucket_factor=10)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))  # seeded: reproducible


def test_sorted_batches_visit_every_index_in_length_order():
    lengths = [5, 1, 3, 9, 2]
    batches = list(fd.sorted_batches(lengths, 2))
    assert [b.tolist() for b in batches] == [[1, 4], [2, 0], [3]]


def test_class_weights_inverse_freq_matches_sklearn_balanced():
    from sklearn.utils.class_weight import compute_class_weight

    y = np.array([0] * 60 + [1] * 30 + [2] * 10)
    w = fd.class_weights(y, 3, "inverse_freq")
    np.testing.assert_allclose(w, compute_class_weight("balanced", classes=np.arange(3), y=y))
    assert fd.class_weights(y, 3, "none") is None


def test_class_weights_sqrt_is_milder_and_keeps_loss_scale():
    y = np.array([0] * 60 + [1] * 30 + [2] * 10)
    counts = np.bincount(y)
    inv, sqrt = fd.class_weights(y, 3, "inverse_freq"), fd.class_weights(y, 3, "sqrt_inverse_freq")
    assert sqrt[2] / sqrt[0] == pytest.approx(math.sqrt(inv[2] / inv[0]))
    assert (counts * sqrt).sum() == pytest.approx(len(y))  # mean weight over the data is 1
    np.testing.assert_allclose(fd.class_weights(np.array([0, 1, 2, 0, 1, 2]), 3, "sqrt_inverse_freq"), [1, 1, 1])


def test_class_weights_missing_class_fails():
    with pytest.raises(DataError, match=r"classes \[1\] have no training examples"):
        fd.class_weights(np.array([0, 0, 2]), 3, "inverse_freq")


def test_sample_weights_give_every_class_equal_mass():
    y = np.array([0] * 90 + [1] * 9 + [2] * 1)
    w = fd.sample_weights(y, 3)
    mass = np.array([w[y == c].sum() for c in range(3)])
    np.testing.assert_allclose(mass, [1.0, 1.0, 1.0])


# -- optimiser groups and schedule -----------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt", "lstm"])
def test_param_groups_place_every_weight_and_decay_lr_from_the_top(arch):
    from pipeline_tasks.train.finetune_loop import freeze_embeddings, layer_index, param_groups
    from pipeline_tasks.train.model import ModelConfig, SequenceClassifier, build_lm

    L = 3
    config = ModelConfig(arch=arch, n_layer=L, n_head=2, n_embd=16, block_size=16, vocab_size=64)
    model = SequenceClassifier(build_lm(config), 4)
    depths = {name: layer_index(name, L) for name, _ in model.named_parameters()}
    assert depths["head.weight"] == L + 1 and set(depths.values()) == set(range(L + 2))
    groups = param_groups(model, weight_decay=0.1, layer_lr_decay=0.5, n_layer=L)
    n_grouped = sum(p.numel() for g in groups for p in g["params"])
    assert n_grouped == sum(p.numel() for p in model.parameters())  # each (tied) weight exactly once
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert scale_of[id(params["head.weight"])] == 1.0
    embedding = "backbone.transformer.wte.weight" if arch == "gpt" else "backbone.wte.weight"
    assert scale_of[id(params[embedding])] == pytest.approx(0.5 ** (L + 1))
    assert all(g["weight_decay"] == 0.0 for g in groups if any(p.dim() < 2 for p in g["params"]))

    frozen = freeze_embeddings(model, L)
    assert frozen > 0 and not params[embedding].requires_grad
    assert all(id(params[embedding]) != id(p) for g in param_groups(model, 0.1, 0.5, L) for p in g["params"])


def test_lr_schedule_warms_up_then_decays_to_floor():
    from pipeline_tasks.train.finetune_loop import lr_at

    cfg = FinetuneParams(lr=1e-3, warmup_ratio=0.1, min_lr_ratio=0.1, schedule="linear")
    lrs = [lr_at(s, 100, cfg) for s in range(101)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # monotone decay after warm-up
    assert lrs[100] == pytest.approx(1e-4)
    cosine = FinetuneParams(lr=1e-3, warmup_ratio=0.1, min_lr_ratio=0.0, schedule="cosine")
    assert lr_at(55, 100, cosine) == pytest.approx(5e-4, rel=1e-6)  # half-way through the decay
    assert lr_at(55, 100, FinetuneParams(lr=1e-3, warmup_ratio=0.1)) == pytest.approx(5e-4, rel=1e-6)


def test_resolve_dtype_cpu_uses_bf16_only_where_native():
    from pipeline_tasks.errors import PipelineError
    from pipeline_tasks.train.training import autocast_dtype as resolve_dtype
    from pipeline_tasks.train.training import cpu_has_native_bf16

    cpu = torch.device("cpu")
    assert resolve_dtype(cpu, "float32") == torch.float32
    assert resolve_dtype(cpu, "bfloat16") == torch.bfloat16
    assert resolve_dtype(cpu, "auto") == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)
    with pytest.raises(PipelineError, match="float16 is for CUDA only"):
        resolve_dtype(cpu, "float16")
