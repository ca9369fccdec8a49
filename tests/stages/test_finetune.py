"""Stage ``finetune`` for real on tiny inputs: real AG News rows, the real tokenize and pretrain
stages (tiny GPT / LSTM), then the classifier. Checks that it learns (test accuracy well above
chance), the output contract (checkpoint keys, labels, reports, DVC plot files), that the saved
weights reproduce the reported accuracy, ``--from-scratch``, the training options and
determinism.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline_tasks.config import PathsParams, load_params
from pipeline_tasks.errors import DataError

REPO = Path(__file__).resolve().parents[2]
AG_LABELS = {"1": "world", "2": "sports", "3": "business", "4": "scitech"}
TINY_MODEL = {"arch": "gpt", "n_layer": 2, "n_head": 2, "n_embd": 48, "block_size": 64, "dropout": 0.0, "bias": False}
TINY_PRETRAIN = {
    "device": "cpu",
    "num_threads": 1,
    "max_steps": 40,
    "micro_batch_size": 8,
    "tokens_per_step": 512,
    "lr": 3e-3,
    "min_lr": 3e-4,
    "warmup_steps": 4,
    "eval_interval": 20,
    "eval_batches": 2,
    "checkpoint_interval": 100,
    "log_interval": 20,
}
TINY_FINETUNE = {
    "device": "cpu",
    "num_threads": 1,
    "max_len": 48,
    "epochs": 8,
    "batch_size": 16,
    "lr": 1e-3,
    "eval_interval": 0,
    "patience": 0,
    "log_interval": 20,
    "bootstrap_resamples": 200,
    "dataset": {"train_sources": ["ag_news_train"], "test_sources": ["ag_news_test"]},
}
# sports vs sci/tech: two real AG News classes a model this small separates within seconds
N_TRAIN_PER_CLASS, N_VAL_PER_CLASS, N_TEST_PER_CLASS = 150, 25, 100
CLASSES = ("2", "4")  # AG News class ids kept in the tiny set
LABELS = ["scitech", "sports"]


def _ag_rows(corpora: Path) -> tuple[list[dict], list[dict]]:
    """Real AG News rows: the 20k train subset (zip) and the official test CSV."""
    with zipfile.ZipFile(corpora / "ag_news/jatin-12-2002_AG_News_Classification/archive.zip") as zf:
        train = list(csv.DictReader(io.TextIOWrapper(zf.open("train.csv"), encoding="utf-8")))
    with open(corpora / "ag_news/mhjabreel_CharCnn_Keras/test.csv", newline="", encoding="utf-8") as fh:
        test = [dict(class_index=r[0], title=r[1], description=r[2]) for r in csv.reader(fh)]
    return train, test


def _row(source: str, i: int, r: dict, split: str | None) -> dict:
    text = f"{r['title']}\n{r['description'].replace(chr(92), ' ')}"
    return dict(
        id=f"{source}:{i}",
        kind="news",
        source=source,
        lang="en",
        title=r["title"],
        text=text,
        label=AG_LABELS[r["class_index"]],
        raw_label=r["class_index"],
        date=None,
        url=None,
        split=split,
    )


def write_prepared(corpora: Path, out_dir: Path) -> dict[str, int]:
    """Balanced tiny splits in the prepared schema, plus rows finetune must ignore."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    train_src, test_src = _ag_rows(corpora)
    per_class: dict[str, list] = {}
    for i, r in enumerate(train_src):
        if r["class_index"] not in CLASSES:
            continue
        per_class.setdefault(r["class_index"], []).append((i, r))
    splits: dict[str, list] = {"train": [], "val": [], "test": []}
    for cls, items in sorted(per_class.items()):
        items = items[:: len(items) // (N_TRAIN_PER_CLASS + N_VAL_PER_CLASS)]  # spread over the file
        splits["train"] += [_row("ag_news_train", i, r, None) for i, r in items[:N_TRAIN_PER_CLASS]]
        splits["val"] += [
            _row("ag_news_train", i, r, None) for i, r in items[N_TRAIN_PER_CLASS : N_TRAIN_PER_CLASS + N_VAL_PER_CLASS]
        ]
    counts: dict[str, int] = {}
    for i, r in enumerate(test_src):
        if r["class_index"] in CLASSES and counts.get(r["class_index"], 0) < N_TEST_PER_CLASS:
            counts[r["class_index"]] = counts.get(r["class_index"], 0) + 1
            splits["test"].append(_row("ag_news_test", i, r, "test"))
    # noise finetune must skip: unlabelled news, another labelled source (a label AG News lacks)
    noise = dict(kind="news", lang="en", title="t", raw_label=None, date=None, url=None, split=None)
    splits["train"].append(
        {
            **noise,
            "id": "huff:1",
            "source": "huffpost_v3",
            "label": None,
            "text": "Unlabelled story\nabout nothing in particular.",
        }
    )
    splits["train"].append(
        {
            **noise,
            "id": "bbc:1",
            "source": "bbc",
            "label": "politics",
            "text": "Election called\nThe prime minister called an election.",
        }
    )
    schema = pa.schema(
        [
            ("id", pa.string()),
            ("kind", pa.string()),
            ("source", pa.string()),
            ("lang", pa.string()),
            ("title", pa.string()),
            ("text", pa.string()),
            ("label", pa.string()),
            ("raw_label", pa.string()),
            ("date", pa.timestamp("s", tz="UTC")),
            ("url", pa.string()),
            ("split", pa.string()),
        ]
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), out_dir / f"{name}.parquet")
    return {k: len(v) for k, v in splits.items()}


def write_params(root: Path, shared: Path, model=None, pretrain=None, finetune=None) -> Path:
    """Params with every path under ``root``; prepared data and tokens come from ``shared``."""
    paths = {f: str(root / getattr(PathsParams(), f)) for f in PathsParams.__dataclass_fields__}
    paths["prepared_dir"] = str(shared / "data/prepared")
    paths["tokens_dir"] = str(shared / "data/tokens")
    doc = {
        "seed": 1337,
        "paths": paths,
        "model": {**TINY_MODEL, **(model or {})},
        "pretrain": {**TINY_PRETRAIN, **(pretrain or {})},
        "finetune": {**TINY_FINETUNE, **(finetune or {})},
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return root / "params.yaml"


@pytest.fixture(scope="module")
def shared(corpora, tmp_path_factory) -> Path:
    """Prepared rows + the real tokenize stage (vocab 512) once for the module."""
    from pipeline_tasks.dataset import tokenize

    root = tmp_path_factory.mktemp("ft_shared")
    write_prepared(corpora, root / "data/prepared")
    doc = {
        "seed": 1337,
        "paths": {
            "prepared_dir": str(root / "data/prepared"),
            "tokens_dir": str(root / "data/tokens"),
            "tokenize_reports_dir": str(root / "reports/tokenize"),
        },
        "tokenize": {"vocab_size": 512},
    }
    (root / "tok.yaml").write_text(yaml.safe_dump(doc), encoding="utf-8")
    tokenize.run(load_params(root / "tok.yaml"))
    return root


@pytest.fixture(scope="module")
def pretrained(shared, tmp_path_factory) -> dict[str, Path]:
    """A tiny pretrained GPT and LSTM from the real pretrain stage."""
    from pipeline_tasks.train import pretrain

    roots = {}
    for arch in ("gpt", "lstm"):
        root = tmp_path_factory.mktemp(f"pre_{arch}")
        pretrain.run(load_params(write_params(root, shared, model={"arch": arch})))
        roots[arch] = root
    return roots


def _finetune_in(root: Path, shared: Path, from_scratch: bool = False, **overrides):
    from pipeline_tasks.train import finetune

    params = load_params(write_params(root, shared, model=overrides.pop("model", None), finetune=overrides))
    return params, finetune.run(params, from_scratch=from_scratch)


def _with_pretrain(pre_root: Path, tmp_path: Path) -> Path:
    """A fresh run folder that reuses ``pre_root``'s pretrained model.pt."""
    target = tmp_path / "models/pretrain"
    target.mkdir(parents=True)
    os.symlink(pre_root / "models/pretrain/model.pt", target / "model.pt")
    return tmp_path


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gpt", "lstm"])
def test_finetune_learns_above_chance_and_writes_the_contract(arch, shared, pretrained, tmp_path):
    from pipeline_tasks.train.model import ModelConfig, SequenceClassifier, build_lm

    root = _with_pretrain(pretrained[arch], tmp_path)
    params, result = _finetune_in(root, shared, model={"arch": arch})
    out, reports = Path(params.paths.finetune_dir), Path(params.paths.finetune_reports_dir)
    metrics = json.loads((reports / "metrics.json").read_text())
    labels = LABELS

    # learning: 2 balanced classes, chance is 0.5 (sd 0.035 on 200 rows); TF-IDF + LR gets ~0.9
    assert metrics["test"]["accuracy"] > 0.6, metrics["test"]
    assert metrics["test"]["n"] == 2 * N_TEST_PER_CLASS and metrics["val"]["n"] == 2 * N_VAL_PER_CLASS
    assert metrics["train"]["rows"] == 2 * N_TRAIN_PER_CLASS  # unlabelled and other-source rows skipped
    assert metrics["from_scratch"] is False and metrics["arch"] == arch and metrics["labels"] == labels
    low, high = metrics["test"]["accuracy_ci95"]
    assert low <= metrics["test"]["accuracy"] <= high
    assert set(metrics["test"]["per_class"]) == set(labels)
    assert result["test_accuracy"] == pytest.approx(metrics["test"]["accuracy"], abs=1e-4)

    # checkpoint contract; the saved (best) weights reproduce the reported test accuracy
    ckpt = torch.load(out / "model.pt", map_location="cpu", weights_only=True)
    cls = ckpt["classifier"]
    assert {"labels", "pooling", "pad_id", "cls_id", "max_len", "num_classes"} <= set(cls)
    assert cls["labels"] == labels and cls["num_classes"] == 2 and cls["max_len"] == 48
    assert cls["pad_id"] == 1 and cls["cls_id"] == 2 and ckpt["from_scratch"] is False
    assert json.loads((out / "labels.json").read_text()) == labels
    assert json.loads((out / "manifest.json").read_text())["stage"] == "finetune"
    config = ModelConfig.from_dict(ckpt["model_config"])
    model = SequenceClassifier(build_lm(config), cls["num_classes"], cls["pooling"], cls["pad_id"])
    model.load_state_dict(ckpt["model"])
    from tokenizers import Tokenizer

    from pipeline_tasks.dataset.prepared import read_labelled_split
    from pipeline_tasks.train import classifier_data as fd
    from pipeline_tasks.train.finetune_loop import predict

    rows = read_labelled_split(params.paths.prepared_dir, "test", sources=["ag_news_test"]).to_pydict()
    seqs = fd.encode_texts(
        Tokenizer.from_file(str(Path(params.paths.tokens_dir) / "tokenizer.json")),
        rows["text"],
        cls["max_len"],
        cls["cls_id"],
    )
    pred = predict(model, seqs, cls["pad_id"], 64, torch.device("cpu"))
    y = fd.labels_to_ids(rows["label"], labels, "test")
    assert float((pred == y).mean()) == pytest.approx(metrics["test"]["accuracy"])

    # DVC plots: one confusion row per test example, a val curve row per evaluation (one per epoch)
    confusion = list(csv.DictReader(open(reports / "confusion.csv", encoding="utf-8")))
    assert len(confusion) == metrics["test"]["n"] and set(confusion[0]) == {"actual", "predicted"}
    assert sum(r["actual"] == r["predicted"] for r in confusion) == round(metrics["test"]["accuracy"] * len(confusion))
    curve = list(csv.DictReader(open(reports / "val_curve.csv", encoding="utf-8")))
    assert len(curve) == TINY_FINETUNE["epochs"]
    assert {"step", "val_macro_f1", "val_acc", "train_loss"} <= set(curve[0])
    assert float(curve[-1]["train_loss"]) < float(curve[0]["train_loss"])  # it learned
    best = max(curve, key=lambda r: float(r["val_macro_f1"]))
    assert int(best["step"]) == metrics["best"]["step"] == ckpt["best_step"]


@pytest.mark.slow
def test_finetune_from_scratch_cli_flag_needs_no_pretrained_model(shared, tmp_path):
    params_path = write_params(tmp_path, shared, finetune={"epochs": 2})
    assert not (tmp_path / "models/pretrain/model.pt").exists()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline_tasks", "finetune", "--params", str(params_path), "--from-scratch"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["from_scratch"] is True
    assert "from scratch" in proc.stderr
    ckpt = torch.load(tmp_path / "models/finetune/model.pt", weights_only=True)
    assert ckpt["from_scratch"] is True and ckpt["init"] == "scratch"
    assert json.loads((tmp_path / "reports/finetune/metrics.json").read_text())["from_scratch"] is True


def test_finetune_without_pretrained_model_fails_with_hint(shared, tmp_path):
    with pytest.raises(DataError, match=r"model\.pt not found: run .*pretrain.*--from-scratch"):
        _finetune_in(tmp_path, shared, epochs=1)
    assert not (tmp_path / "models/finetune").exists()  # nothing half-written


def test_finetune_unknown_source_fails_naming_params(shared, tmp_path):
    with pytest.raises(DataError, match=r"train\.parquet: no labelled rows from sources \['agnews'\]"):
        _finetune_in(
            tmp_path, shared, from_scratch=True, dataset={"train_sources": ["agnews"], "test_sources": ["ag_news_test"]}
        )


@pytest.mark.slow
def test_finetune_imbalance_options_lr_decay_and_frozen_embeddings_run(shared, pretrained, tmp_path):
    from pipeline_tasks.train.finetune_loop import layer_index

    root = _with_pretrain(pretrained["gpt"], tmp_path / "a")
    params, result = _finetune_in(
        root,
        shared,
        sampler="weighted",
        layer_lr_decay=0.8,
        freeze_embeddings=True,
        pooling="mean",
        use_cls=False,
        max_steps=12,
        eval_interval=4,
        patience=1,
        schedule="cosine",
        min_delta=1.0,
    )  # no gain after step 4 can count: stops at 8
    ckpt = torch.load(Path(params.paths.finetune_dir) / "model.pt", weights_only=True)
    pre = torch.load(pretrained["gpt"] / "models/pretrain/model.pt", weights_only=True)["model"]
    frozen = [k for k in ckpt["model"] if k.startswith("backbone.") and layer_index(k, 2) == 0]
    assert frozen and all(torch.equal(ckpt["model"][k], pre[k.removeprefix("backbone.")]) for k in frozen)
    assert not torch.equal(
        ckpt["model"]["backbone.transformer.h.0.mlp.c_fc.weight"], pre["transformer.h.0.mlp.c_fc.weight"]
    )
    assert ckpt["classifier"]["cls_id"] is None and ckpt["classifier"]["pooling"] == "mean"
    metrics = json.loads((Path(params.paths.finetune_reports_dir) / "metrics.json").read_text())
    assert metrics["train"]["steps"] == 8 and metrics["train"]["stop_reason"].startswith("early_stopping")

    root_b = _with_pretrain(pretrained["gpt"], tmp_path / "b")
    _, weighted = _finetune_in(root_b, shared, class_weighting="inverse_freq", max_steps=6)
    assert np.isfinite(weighted["test_accuracy"])


@pytest.mark.slow
def test_finetune_is_deterministic_on_cpu(shared, pretrained, tmp_path):
    runs = []
    for name in ("a", "b"):
        root = _with_pretrain(pretrained["gpt"], tmp_path / name)
        params, _ = _finetune_in(root, shared, max_steps=8, head_dropout=0.1)
        runs.append(torch.load(Path(params.paths.finetune_dir) / "model.pt", weights_only=True)["model"])
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


@pytest.mark.slow
def test_finetune_with_ngram_expert_picks_its_weight_on_val_and_exports(shared, pretrained, tmp_path):
    """The n-gram expert trains alone, is frozen, gets the val-best weight, reloads and exports to ONNX."""
    onnxruntime = pytest.importorskip("onnxruntime")
    from pipeline_tasks.ship.export import classifier_graph
    from pipeline_tasks.train.model import load_classifier

    root = _with_pretrain(pretrained["gpt"], tmp_path)
    weights = [0.0, 0.5, 1.0, 2.0]
    params, result = _finetune_in(
        root, shared, ngram_buckets=4099, ngram_dim=8, ngram_epochs=3, ngram_weights=weights, max_steps=30
    )
    metrics = json.loads((Path(params.paths.finetune_reports_dir) / "metrics.json").read_text())
    ngram = metrics["ngram"]
    assert ngram["val_accuracy_alone"] > 0.6  # the bag alone separates the two classes
    assert [row["weight"] for row in ngram["grid"]] == weights
    best = max(ngram["grid"], key=lambda row: row["val_macro_f1"])
    assert ngram["weight"] == best["weight"]
    model, meta = load_classifier(Path(params.paths.finetune_dir) / "model.pt")
    assert meta["classifier"]["ngram_buckets"] == 4099 and float(model.ngram_weight) == ngram["weight"]
    assert metrics["val"]["macro_f1"] == pytest.approx(best["val_macro_f1"])  # the saved model is the chosen mix

    model.ngram_weight.fill_(1.0)  # a non-zero weight, so the graph must carry the expert
    ids = torch.randint(3, 512, (3, 20))
    mask = torch.ones_like(ids)
    mask[1, 12:], ids[1, 12:] = 0, 1
    path, batch, seq = tmp_path / "clf.onnx", torch.export.Dim("batch"), torch.export.Dim("seq")
    torch.onnx.export(
        classifier_graph(model),
        (ids, mask),
        str(path),
        dynamo=True,
        input_names=["input_ids", "attention_mask"],
        output_names=["logits", "pooled"],
        external_data=False,
        dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
    )
    got = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        ["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    )[0]
    with torch.no_grad():
        want = model(ids, mask).numpy()
        assert not np.allclose(want, model.transformer_logits(ids, mask).numpy())  # the expert counts
    assert np.abs(got - want).max() < 1e-4
