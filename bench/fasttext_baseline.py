"""Benchmark: the fastText bigram baseline against our fine-tuned classifier on AG News.

fastText (Joulin et al. 2016, "Bag of Tricks") with word bigrams is the classic strong, cheap
AG News baseline. It is trained here on exactly the rows our ``finetune`` stage trains on and
scored on exactly its test rows:

* when ``paths.prepared_dir/train.parquet`` exists: the labelled rows of ``finetune.dataset``
  (``train_sources`` from train.parquet, ``test_sources`` from test.parquet), read with the same
  helper as finetune (:func:`pipeline_tasks.dataset.prepared.read_labelled_split`), so the text is
  the prepared (cleaned, deduplicated) text;
* otherwise directly from the shared corpora (``$LMPIPE_DATA_MIRROR``): the 20k AG News train
  subset and the official 7,600-row test set, cleaned with ingest_news' own ``clean_text`` (no
  dedup, and no val rows held out, so the train set is ~5% larger than finetune's).

fastText input normalisation (lower case, punctuation split off words) follows fastText's own
``classification-example.sh``; training uses one thread per seed so that runs are reproducible,
and reports the mean over ``--seeds`` seeds. Our numbers come from ``reports/finetune/metrics.json``
(``paths.finetune_reports_dir``) and any ``--finetune-metrics`` file (for example a copy of the
metrics of a ``finetune --from-scratch`` run); each is put in the pretrained or from-scratch row by
its ``from_scratch`` flag.

Output: a table on stdout and ``bench/results/fasttext_baseline.json``.
Run: ``python bench/fasttext_baseline.py [--params params.yaml] [--seeds 3] [--epoch 5 --lr 0.5 --dim 50]``
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import platform
import random
import re
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline_tasks import metrics  # noqa: E402

logger = logging.getLogger("bench.fasttext_baseline")
AG_LABELS = {"1": "world", "2": "sports", "3": "business", "4": "scitech"}
AG_TRAIN_ZIP = "ag_news/jatin-12-2002_AG_News_Classification/archive.zip"
AG_TEST_CSV = "ag_news/mhjabreel_CharCnn_Keras/test.csv"
_PUNCT = re.compile(r"([.!?,'\"():;/\-])")


def fasttext_normalise(text: str) -> str:
    """One line, lower case, punctuation as separate tokens (fastText's AG News preprocessing)."""
    return " ".join(_PUNCT.sub(r" \1 ", text.lower()).split())


def load_prepared(params) -> tuple[dict, dict, str]:
    from pipeline_tasks.dataset.prepared import read_labelled_split

    ds = params.finetune.dataset
    prepared = Path(params.paths.prepared_dir)
    train = read_labelled_split(prepared, "train", sources=ds.train_sources).to_pydict()
    test = read_labelled_split(prepared, "test", sources=ds.test_sources).to_pydict()
    return train, test, f"{prepared} (train sources {list(ds.train_sources)}, test sources {list(ds.test_sources)})"


def load_corpora(mirror: Path) -> tuple[dict, dict, str]:
    from pipeline_tasks.ingest.newsformats import clean_text

    def row(label: str, title: str, body: str) -> tuple[str, str]:
        opts = dict(backslash_breaks=True, repair_entities=True)
        text = "\n".join(p for p in (clean_text(title, **opts), clean_text(body, multiline=True, **opts)) if p)
        return AG_LABELS[label], text

    with zipfile.ZipFile(mirror / AG_TRAIN_ZIP) as zf:
        reader = csv.DictReader(io.TextIOWrapper(zf.open("train.csv"), encoding="utf-8", newline=""))
        train_rows = [row(r["class_index"], r["title"], r["description"]) for r in reader]
    with open(mirror / AG_TEST_CSV, encoding="utf-8", newline="") as fh:
        test_rows = [row(r[0], r[1], r[2]) for r in csv.reader(fh)]
    as_cols = lambda rows: {"label": [r[0] for r in rows], "text": [r[1] for r in rows]}  # noqa: E731
    return as_cols(train_rows), as_cols(test_rows), f"{mirror} (AG News 20k train subset, official test; no prepare)"


def train_and_score(train: dict, test: dict, labels: list[str], args, seed: int) -> dict:
    import fasttext

    lines = [f"__label__{lab} {fasttext_normalise(t)}" for lab, t in zip(train["label"], train["text"])]
    # fastText reads the file in order and a class-sorted file ruins SGD: shuffle with the seed
    random.Random(seed).shuffle(lines)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8", delete=False) as fh:
        fh.write("\n".join(lines) + "\n")
        train_path = fh.name
    try:
        start = time.perf_counter()
        model = fasttext.train_supervised(
            input=train_path,
            lr=args.lr,
            epoch=args.epoch,
            dim=args.dim,
            wordNgrams=args.word_ngrams,
            minCount=1,
            bucket=args.bucket,
            loss="softmax",
            thread=args.threads,
            seed=seed,
            verbose=0,
        )
        train_s = time.perf_counter() - start
    finally:
        os.unlink(train_path)
    start = time.perf_counter()
    predicted, _ = model.predict([fasttext_normalise(t) for t in test["text"]], k=1)
    predict_s = time.perf_counter() - start
    index = {name: i for i, name in enumerate(labels)}
    y = np.array([index[lab] for lab in test["label"]])
    pred = np.array([index[p[0].removeprefix("__label__")] for p in predicted])
    ci = metrics.bootstrap_ci(y, pred, metrics.accuracy, n_resamples=1000, seed=seed)
    return {
        "seed": seed,
        "accuracy": metrics.accuracy(y, pred),
        "macro_f1": metrics.macro_f1(y, pred, len(labels)),
        "accuracy_ci95": list(ci),
        "train_s": train_s,
        "predict_s": predict_s,
        "test_per_s": len(y) / max(predict_s, 1e-9),
    }


def our_results(paths: list[Path]) -> dict[str, dict]:
    """``{"pretrained": {...}, "from_scratch": {...}}`` from finetune metrics files that exist."""
    found: dict[str, dict] = {}
    for path in paths:
        if not path.is_file():
            continue
        m = json.loads(path.read_text(encoding="utf-8"))
        key = "from_scratch" if m.get("from_scratch") else "pretrained"
        found[key] = {
            "file": str(path),
            "accuracy": m["test"]["accuracy"],
            "macro_f1": m["test"]["macro_f1"],
            "n": m["test"]["n"],
            "train_s": m.get("train", {}).get("seconds"),
            "arch": m.get("arch"),
            "accuracy_ci95": m["test"].get("accuracy_ci95"),
        }
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--epoch", type=int, default=5)
    parser.add_argument("--dim", type=int, default=50)
    parser.add_argument("--word-ngrams", type=int, default=2)
    parser.add_argument("--bucket", type=int, default=2_000_000)
    parser.add_argument("--threads", type=int, default=1, help="fastText threads (>1 is faster but not reproducible)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--finetune-metrics",
        action="append",
        type=Path,
        default=[],
        help="extra finetune metrics.json files (e.g. a --from-scratch run's)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/fasttext_baseline.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.chdir(REPO)  # params paths are relative to the project root

    from pipeline_tasks.config import load_params

    params = load_params(args.params)
    if (Path(params.paths.prepared_dir) / "train.parquet").is_file():
        train, test, origin = load_prepared(params)
    else:
        mirror = Path(os.environ.get("LMPIPE_DATA_MIRROR") or REPO.parent / "shared/corpora")
        train, test, origin = load_corpora(mirror)
    labels = sorted(set(train["label"]))
    logger.info(
        "data: %s: %d train rows, %d test rows, labels %s", origin, len(train["label"]), len(test["label"]), labels
    )

    runs = [train_and_score(train, test, labels, args, seed) for seed in range(args.seeds)]
    acc = np.array([r["accuracy"] for r in runs])
    f1 = np.array([r["macro_f1"] for r in runs])
    fasttext_summary = {
        "accuracy_mean": float(acc.mean()),
        "accuracy_std": float(acc.std()),
        "macro_f1_mean": float(f1.mean()),
        "train_s_mean": float(np.mean([r["train_s"] for r in runs])),
        "runs": runs,
    }
    ours = our_results([Path(params.paths.finetune_reports_dir) / "metrics.json", *args.finetune_metrics])

    rows = [
        (
            f"fastText bigrams (mean of {args.seeds} seeds)",
            acc.mean(),
            f1.mean(),
            fasttext_summary["train_s_mean"],
            len(test["label"]),
        )
    ]
    for key, name in (
        ("pretrained", "ours: finetuned from pretrained LM"),
        ("from_scratch", "ours: same model, from scratch"),
    ):
        if key in ours:
            o = ours[key]
            rows.append((f"{name} ({o['arch']})", o["accuracy"], o["macro_f1"], o["train_s"], o["n"]))
    print(f"\nAG News topic classification, test set: {origin}")
    print(f"{'model':<48} {'accuracy':>9} {'macro-F1':>9} {'train s':>9} {'test n':>7}")
    for name, a, f, t, n in rows:
        print(f"{name:<48} {a:>9.4f} {f:>9.4f} {t if t is not None else float('nan'):>9.1f} {n:>7}")
    if "pretrained" not in ours:
        print("(no reports/finetune/metrics.json yet: run `dvc repro finetune` for our row)")

    result = {
        "benchmark": "fasttext_baseline",
        "data": {
            "origin": origin,
            "train_rows": len(train["label"]),
            "test_rows": len(test["label"]),
            "labels": labels,
        },
        "fasttext": {
            "params": {
                "lr": args.lr,
                "epoch": args.epoch,
                "dim": args.dim,
                "wordNgrams": args.word_ngrams,
                "bucket": args.bucket,
                "threads": args.threads,
                "minCount": 1,
            },
            **fasttext_summary,
        },
        "ours": ours,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from pipeline_tasks.artifacts import atomic_write_json

    atomic_write_json(args.out, result)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
