"""A tiny but real project for the export / evaluate / predict tests (built once per test session).

Real data: a seeded, class-balanced sample of the AG News train subset (the ``archive.zip`` in
the shared corpora) plus HuffPost records (with dates, mapped to the canonical labels) so that
per-source and per-month slices exist. Real pipeline code: ``tokenize.run`` trains the BPE
tokenizer and writes the shards; ``pipeline_tasks.train.model`` builds the GPT / LSTM; a short training
loop here pretrains the LM and fine-tunes the classifier (written in the ``finetune`` checkpoint
format of docs/ARCHITECTURE.md) until it is confident enough for a meaningful int8 agreement
check. No mocks. Costs ~10-30 s per architecture on a shared 2-core machine.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import zipfile
from pathlib import Path
from typing import Any

LABELS = ("world", "sports", "business", "scitech")
AG_ZIP = "ag_news/jatin-12-2002_AG_News_Classification/archive.zip"
HUFFPOST = "news_category_dataset/Limpery_MGO/News_Category_Dataset_v3.json"
HUFF_MAP = {"WORLD NEWS": "world", "SPORTS": "sports", "BUSINESS": "business", "TECH": "scitech",
            "SCIENCE": "scitech"}
MAX_LEN = 64
CLASSIFIER_STEPS = {"gpt": 500, "lstm": 250}  # confident enough for a meaningful int8 agreement bar
SPLIT_SIZES = {"train": (300, 40), "val": (70, 20), "test": (70, 40)}  # (AG rows per class, HuffPost rows)

_CACHE: dict[tuple[str, str], "TinyProject"] = {}


@dataclasses.dataclass
class TinyProject:
    root: Path
    raw: dict[str, Any]  # params as a plain mapping (tests add their sections and parse it)
    train_accuracy: float = 0.0

    def params(self, **sections):
        from pipeline_tasks.config import parse_params

        return parse_params({**self.raw, **sections})

    def path(self, key: str) -> Path:
        return Path(self.raw["paths"][key])


def _ag_rows(corpora: Path, rng) -> list[dict]:
    with zipfile.ZipFile(corpora / AG_ZIP) as archive:
        reader = csv.DictReader(io.TextIOWrapper(archive.open("train.csv"), encoding="utf-8"))
        by_class: dict[str, list[dict]] = {}
        for i, row in enumerate(reader):
            label = LABELS[int(row["class_index"]) - 1]
            by_class.setdefault(label, []).append({
                "id": f"ag_news:{i}", "source": "ag_news", "title": row["title"],
                "text": f"{row['title']}\n{row['description']}", "label": label, "raw_label": row["class_index"],
                "date": None, "url": None})
    for rows in by_class.values():
        rng.shuffle(rows)
    return by_class


def _huffpost_rows(corpora: Path, rng) -> list[dict]:
    import datetime as dt

    rows = []
    with open(corpora / HUFFPOST, encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            rec = json.loads(line)
            if rec["category"] in HUFF_MAP and rec["headline"].strip():
                rows.append({"id": f"huffpost:{i}", "source": "huffpost", "title": rec["headline"],
                             "text": f"{rec['headline']}\n{rec['short_description']}".strip(),
                             "label": HUFF_MAP[rec["category"]], "raw_label": rec["category"],
                             "date": dt.datetime.fromisoformat(rec["date"]).replace(tzinfo=dt.timezone.utc),
                             "url": rec["link"]})
    rng.shuffle(rows)
    return rows


def write_prepared(prepared_dir: Path, corpora: Path, seed: int = 0) -> None:
    """train/val/test Parquet in prepare's schema from real AG News + HuffPost rows."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    ag, huff = _ag_rows(corpora, rng), _huffpost_rows(corpora, rng)
    schema = pa.schema([("id", pa.string()), ("kind", pa.string()), ("source", pa.string()), ("lang", pa.string()),
                        ("title", pa.string()), ("text", pa.string()), ("label", pa.string()),
                        ("raw_label", pa.string()), ("date", pa.timestamp("s", tz="UTC")), ("url", pa.string()),
                        ("split", pa.string())])
    prepared_dir.mkdir(parents=True, exist_ok=True)
    ag_start, huff_start = 0, 0
    for split, (per_class, n_huff) in SPLIT_SIZES.items():
        rows = [r for label in LABELS for r in ag[label][ag_start: ag_start + per_class]]
        rows += huff[huff_start: huff_start + n_huff]
        ag_start, huff_start = ag_start + per_class, huff_start + n_huff
        rows = [rows[i] for i in rng.permutation(len(rows))]
        table = pa.Table.from_pylist([{**r, "kind": "news", "lang": "en", "split": None} for r in rows], schema=schema)
        pq.write_table(table, prepared_dir / f"{split}.parquet")


def _train_lm(lm, tokens_dir: Path, steps: int, seed: int):
    import numpy as np
    import torch

    meta = json.loads((tokens_dir / "meta.json").read_text())
    data = np.memmap(tokens_dir / "train.bin", dtype=np.dtype(meta["dtype"]), mode="r")
    block = lm.config.block_size
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(lm.parameters(), lr=3e-3)
    lm.train()
    for _ in range(steps):
        starts = rng.integers(0, len(data) - block - 1, size=16)
        x = torch.from_numpy(np.stack([data[s: s + block] for s in starts]).astype(np.int64))
        y = torch.from_numpy(np.stack([data[s + 1: s + 1 + block] for s in starts]).astype(np.int64))
        _, loss = lm(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return lm.eval()


def _train_classifier(clf, tokenizer, frame, pad_id: int, cls_id: int | None, steps: int, seed: int) -> float:
    import numpy as np
    import torch

    from pipeline_tasks.ship.bundle import encode_texts

    texts, y = frame["text"].tolist(), frame["label"].map({lab: i for i, lab in enumerate(LABELS)}).to_numpy()
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(clf.parameters(), lr=2e-3, weight_decay=0.01)
    clf.train()
    for _ in range(steps):
        idx = rng.integers(0, len(texts), size=32)
        ids, mask = encode_texts(tokenizer, [texts[i] for i in idx], MAX_LEN, pad_id, cls_id)
        loss = torch.nn.functional.cross_entropy(clf(torch.from_numpy(ids), torch.from_numpy(mask)),
                                                 torch.from_numpy(y[idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    clf.eval()
    ids, mask = encode_texts(tokenizer, texts, MAX_LEN, pad_id, cls_id)
    with torch.no_grad():
        return float((clf(torch.from_numpy(ids), torch.from_numpy(mask)).argmax(1).numpy() == y).mean())


def build_tiny_project(root: Path, corpora: Path, arch: str = "gpt") -> TinyProject:
    """Prepared splits, tokens, a pretrained LM and a fine-tuned classifier under ``root``."""
    key = (str(root), arch)
    if key in _CACHE:
        return _CACHE[key]
    import torch

    root = Path(root) / arch
    paths = {k: str(root / v) for k, v in {
        "prepared_dir": "data/prepared", "tokens_dir": "data/tokens", "tokenize_reports_dir": "reports/tokenize",
        "pretrain_dir": "models/pretrain", "pretrain_reports_dir": "reports/pretrain",
        "finetune_dir": "models/finetune", "finetune_reports_dir": "reports/finetune", "bundle_dir": "models/bundle",
        "export_reports_dir": "reports/export", "evaluate_dir": "reports/evaluate", "registry_dir": "registry",
        "raw_news_dir": "data/raw/news", "raw_wiki_dir": "data/raw/wiki"}.items()}
    raw = {"seed": 1337, "paths": paths,
           "tokenize": {"vocab_size": 1024, "min_frequency": 2, "kinds": ["news"]}}
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is as fast and does not fight other processes
    try:
        project = _build(root, raw, paths, corpora, arch)
    finally:
        torch.set_num_threads(threads)
    _CACHE[key] = project
    return project


def _build(root: Path, raw: dict, paths: dict, corpora: Path, arch: str) -> TinyProject:
    import pandas as pd
    import torch
    from tokenizers import Tokenizer

    from pipeline_tasks.dataset import tokenize
    from pipeline_tasks.config import parse_params
    from pipeline_tasks.train.model import ModelConfig, SequenceClassifier, build_lm

    write_prepared(Path(paths["prepared_dir"]), corpora)
    tokenize.run(parse_params(raw))
    tokens_dir = Path(paths["tokens_dir"])
    meta = json.loads((tokens_dir / "meta.json").read_text())
    pad_id = int(meta["special_tokens"]["pad"])
    config = ModelConfig(arch=arch, n_layer=2, n_head=2, n_embd=64, block_size=MAX_LEN, dropout=0.0,
                         vocab_size=int(meta["vocab_size"]))
    lm = _train_lm(build_lm(config), tokens_dir, steps=60, seed=0)
    Path(paths["pretrain_dir"]).mkdir(parents=True, exist_ok=True)
    torch.save({"model": lm.state_dict(), "model_config": config.to_dict(), "step": 60},
               Path(paths["pretrain_dir"]) / "model.pt")

    backbone = build_lm(config)
    backbone.load_state_dict(lm.state_dict())
    # both classifier layouts finetune can produce: GPT pools the appended <|cls|> token's state
    # ("last"), the LSTM averages the real tokens ("mean") without a CLS token
    cls_id, pooling = (int(meta["special_tokens"]["cls"]), "last") if arch == "gpt" else (None, "mean")
    clf = SequenceClassifier(backbone, num_classes=len(LABELS), pooling=pooling, pad_id=pad_id, dropout=0.0)
    tokenizer = Tokenizer.from_file(str(tokens_dir / "tokenizer.json"))
    train = pd.read_parquet(Path(paths["prepared_dir"]) / "train.parquet")
    train_acc = _train_classifier(clf, tokenizer, train, pad_id, cls_id, steps=CLASSIFIER_STEPS[arch], seed=0)
    finetune_dir = Path(paths["finetune_dir"])
    finetune_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"model": clf.state_dict(), "model_config": config.to_dict(), "from_scratch": False,
                "classifier": {"labels": list(LABELS), "pooling": pooling, "pad_id": pad_id, "cls_id": cls_id,
                               "max_len": MAX_LEN, "num_classes": len(LABELS)}}, finetune_dir / "model.pt")
    (finetune_dir / "labels.json").write_text(json.dumps(list(LABELS)))
    return TinyProject(root=root, raw=raw, train_accuracy=train_acc)


_EXPORTED: dict[str, dict] = {}


def export_bundle(project: TinyProject, **export_params) -> dict:
    """Run the real export stage once per project (default params unless given); returns its summary."""
    from pipeline_tasks.ship import export

    key = f"{project.root}:{sorted(export_params.items())}"
    if key not in _EXPORTED:
        _EXPORTED[key] = export.run(project.params(export=export_params))
    return _EXPORTED[key]
