"""A tiny but real project for the export / evaluate / predict / registry / monitor tests (built
once per test session).

Real data: a seeded, class-balanced sample of the AG News train subset (the ``archive.zip`` in
the shared corpora) plus HuffPost records (with dates, mapped to the canonical labels) so that
per-source and per-month slices exist. Real stages: ``tokenize`` trains the BPE tokenizer and
writes the shards, ``pretrain`` trains the LM and ``finetune`` the classifier on it, so both
checkpoints come from their real writers and a change of the checkpoint format reaches every test
downstream. The classifier trains until it is confident enough for a meaningful int8 agreement
check. No mocks. Costs ~10-30 s per architecture on a shared 2-core machine.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import io
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline_tasks.config import parse_params
from pipeline_tasks.dataset import tokenize
from pipeline_tasks.ship import compress, export
from pipeline_tasks.train import finetune, pretrain

LABELS = ("world", "sports", "business", "scitech")
AG_ZIP = "ag_news/jatin-12-2002_AG_News_Classification/archive.zip"
HUFFPOST = "news_category_dataset/Limpery_MGO/News_Category_Dataset_v3.json"
HUFF_MAP = {"WORLD NEWS": "world", "SPORTS": "sports", "BUSINESS": "business", "TECH": "scitech", "SCIENCE": "scitech"}
SPLIT_SIZES = {"train": (300, 40), "val": (70, 20), "test": (70, 40)}  # (AG rows per class, HuffPost rows)
MAX_LEN = 64

MODEL = {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": MAX_LEN, "dropout": 0.0, "bias": False}
# float32 and one thread: the same weights on every machine (bf16 autocast depends on the CPU), and
# tiny matrices gain nothing from more threads that would fight other processes
RUNTIME = {"device": "cpu", "dtype": "float32", "num_threads": 1, "deterministic": True}
PRETRAIN = {
    **RUNTIME,
    "max_steps": 60,
    "micro_batch_size": 16,
    "tokens_per_step": 16 * MAX_LEN,
    "lr": 3e-3,
    "min_lr": 3e-4,
    "warmup_steps": 5,
    "eval_interval": 30,
    "eval_batches": 2,
    "checkpoint_interval": 60,
    "keep_last": 1,
    "log_interval": 30,
}
# a classifier trained on hard targets, without dropout, for ~13 epochs of 1,240 rows: its logits are far
# apart, so int8 agreement with fp32 measures the quantisation and not near-ties (a few hundred steps
# are needed for that; far fewer leave a coin flip)
CLASSIFIER_STEPS = {"gpt": 500, "lstm": 250}
FINETUNE = {
    **RUNTIME,
    "max_len": MAX_LEN,
    "head_dropout": 0.0,
    "backbone_dropout": None,
    "label_smoothing": 0.0,
    "epochs": 20,
    "batch_size": 32,
    "lr": 2e-3,
    "warmup_ratio": 0.0,
    "patience": 0,
    "log_interval": 100,
    "bootstrap_resamples": 0,
    # every labelled row of the tiny splits (AG News and HuffPost) trains and tests
    "dataset": {"train_sources": ["ag_news", "huffpost"], "test_sources": []},
}
# both classifier layouts finetune can produce: GPT pools the appended <|cls|> token's state, the
# LSTM averages the real tokens without a CLS token
POOLING = {"gpt": {"pooling": "last", "use_cls": True}, "lstm": {"pooling": "mean", "use_cls": False}}

_CACHE: dict[tuple[str, str], TinyProject] = {}


@dataclasses.dataclass
class TinyProject:
    root: Path
    raw: dict[str, Any]  # params as a plain mapping (tests add their sections and parse it)

    def params(self, **sections):
        return parse_params({**self.raw, **sections})

    def path(self, key: str) -> Path:
        return Path(self.raw["paths"][key])


def _ag_rows(corpora: Path, rng) -> dict[str, list[dict]]:
    with zipfile.ZipFile(corpora / AG_ZIP) as archive:
        reader = csv.DictReader(io.TextIOWrapper(archive.open("train.csv"), encoding="utf-8"))
        by_class: dict[str, list[dict]] = {}
        for i, row in enumerate(reader):
            label = LABELS[int(row["class_index"]) - 1]
            by_class.setdefault(label, []).append(
                {
                    "id": f"ag_news:{i}",
                    "source": "ag_news",
                    "title": row["title"],
                    "text": f"{row['title']}\n{row['description']}",
                    "label": label,
                    "raw_label": row["class_index"],
                    "date": None,
                    "url": None,
                }
            )
    for rows in by_class.values():
        rng.shuffle(rows)
    return by_class


def _huffpost_rows(corpora: Path, rng) -> list[dict]:
    rows = []
    with open(corpora / HUFFPOST, encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            rec = json.loads(line)
            if rec["category"] in HUFF_MAP and rec["headline"].strip():
                rows.append(
                    {
                        "id": f"huffpost:{i}",
                        "source": "huffpost",
                        "title": rec["headline"],
                        "text": f"{rec['headline']}\n{rec['short_description']}".strip(),
                        "label": HUFF_MAP[rec["category"]],
                        "raw_label": rec["category"],
                        "date": dt.datetime.fromisoformat(rec["date"]).replace(tzinfo=dt.UTC),
                        "url": rec["link"],
                    }
                )
    rng.shuffle(rows)
    return rows


def write_prepared(prepared_dir: Path, corpora: Path, seed: int = 0) -> None:
    """train/val/test Parquet in prepare's schema from real AG News + HuffPost rows."""
    rng = np.random.default_rng(seed)
    ag, huff = _ag_rows(corpora, rng), _huffpost_rows(corpora, rng)
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
    prepared_dir.mkdir(parents=True, exist_ok=True)
    ag_start, huff_start = 0, 0
    for split, (per_class, n_huff) in SPLIT_SIZES.items():
        rows = [r for label in LABELS for r in ag[label][ag_start : ag_start + per_class]]
        rows += huff[huff_start : huff_start + n_huff]
        ag_start, huff_start = ag_start + per_class, huff_start + n_huff
        rows = [rows[i] for i in rng.permutation(len(rows))]
        table = pa.Table.from_pylist([{**r, "kind": "news", "lang": "en", "split": None} for r in rows], schema=schema)
        pq.write_table(table, prepared_dir / f"{split}.parquet")


def tiny_params(root: Path, arch: str) -> dict[str, Any]:
    """The project's params as a plain mapping: every path under ``root``, tiny model and training."""
    paths = {
        k: str(root / v)
        for k, v in {
            "prepared_dir": "data/prepared",
            "tokens_dir": "data/tokens",
            "tokenize_reports_dir": "reports/tokenize",
            "pretrain_dir": "models/pretrain",
            "pretrain_reports_dir": "reports/pretrain",
            "finetune_dir": "models/finetune",
            "finetune_reports_dir": "reports/finetune",
            "compress_dir": "models/compress",
            "compress_reports_dir": "reports/compress",
            "bundle_dir": "models/bundle",
            "export_reports_dir": "reports/export",
            "evaluate_dir": "reports/evaluate",
            "registry_dir": "registry",
            "raw_news_dir": "data/raw/news",
            "raw_wiki_dir": "data/raw/wiki",
        }.items()
    }
    return {
        "seed": 1337,
        "paths": paths,
        "tokenize": {"vocab_size": 1024, "min_frequency": 2, "kinds": ["news"]},
        "model": {**MODEL, "arch": arch},
        "pretrain": PRETRAIN,
        "finetune": {**FINETUNE, **POOLING[arch], "max_steps": CLASSIFIER_STEPS[arch]},
    }


def build_tiny_project(root: Path, corpora: Path, arch: str = "gpt") -> TinyProject:
    """Prepared splits, then the real tokenize, pretrain, finetune and (pass-through) compress stages under ``root/arch``."""
    key = (str(root), arch)
    if key not in _CACHE:
        project = TinyProject(root=Path(root) / arch, raw=tiny_params(Path(root) / arch, arch))
        write_prepared(project.path("prepared_dir"), corpora)
        params = project.params()
        threads = torch.get_num_threads()
        try:  # the training stages set the process-wide thread count from their params
            for stage in (tokenize, pretrain, finetune, compress):  # compress: disabled, a pass-through
                stage.run(params)
        finally:
            torch.set_num_threads(threads)
        _CACHE[key] = project
    return _CACHE[key]


_EXPORTED: dict[str, dict] = {}


def export_bundle(project: TinyProject, **export_params) -> dict:
    """Run the real export stage once per project (default params unless given); returns its summary."""
    key = f"{project.root}:{sorted(export_params.items())}"
    if key not in _EXPORTED:
        _EXPORTED[key] = export.run(project.params(export=export_params))
    return _EXPORTED[key]
