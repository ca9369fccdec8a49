"""Benchmark: 100,000 news texts through the ``monitor`` stage, plus its false-positive rate.

Throughput part: the texts are resampled (with replacement, seeded) from the real news corpora in
``$LMPIPE_DATA_MIRROR`` (HuffPost v3 + v2 headlines and descriptions, AG News train subset and
test set), written as one Parquet batch and run through :func:`pipeline_tasks.monitor.monitor.run` exactly
as ``lmpipe monitor`` would, against a reference of HuffPost 2018 rows. Reported breakdown (from the
stage's own timers): descriptors over all texts (our BPE tokenizer), embeddings + predictions and
LM bits per byte on the fixed-size samples (``monitor.sample_rows`` / ``reference_rows``; the
statistical tests run on those samples by design, see the monitor docstring), the evidently tests,
the evidently HTML report, and the total. The embedding throughput (texts/s) is reported too, so
the cost of embedding every text of a batch can be read off.

Quality part (``--fpr``, default on): HuffPost 2018 rows featurized once; ``--resamples`` random
"months" of 200 rows against disjoint reference samples (false positives), HuffPost 2022-08
against the 2018 reference and AG News against it (both must be flagged). Same code path as the
stage (:func:`pipeline_tasks.monitor.drift.compare` + :func:`~pipeline_tasks.monitor.drift.decide_drift`).

Needs an exported bundle (``--bundle``, default ``paths.bundle_dir`` of params.yaml).
Output: a table on stdout and ``bench/results/drift.json``.
Run: ``python bench/drift.py [--bundle models/bundle] [--texts 100000] [--cores 2] [--resamples 20]``
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

logger = logging.getLogger("bench.drift")
HUFF_V3 = "news_category_dataset/Limpery_MGO/News_Category_Dataset_v3.json"
HUFF_V2 = "news_category_dataset/ongraphpythondev_elastic_search/News_Category_Dataset_v2.json"
AG_TRAIN_ZIP = "ag_news/jatin-12-2002_AG_News_Classification/archive.zip"
AG_TEST_CSV = "ag_news/mhjabreel_CharCnn_Keras/test.csv"


def load_corpora(mirror: Path):
    """Real news texts with source and date: HuffPost v3/v2 and AG News (train subset + test)."""
    import pandas as pd

    frames = []
    for rel, source in ((HUFF_V3, "huffpost_v3"), (HUFF_V2, "huffpost_v2")):
        hp = pd.read_json(mirror / rel, lines=True)
        text = (hp["headline"].str.strip() + "\n" + hp["short_description"].str.strip()).str.strip()
        frames.append(pd.DataFrame({"text": text, "source": source, "date": pd.to_datetime(hp["date"], utc=True)}))
    with zipfile.ZipFile(mirror / AG_TRAIN_ZIP) as archive:
        ag = pd.read_csv(io.BytesIO(archive.read("train.csv")))
    frames.append(pd.DataFrame({"text": ag["title"] + "\n" + ag["description"], "source": "ag_news_train"}))
    ag_test = pd.read_csv(mirror / AG_TEST_CSV, header=None, names=["label", "title", "description"])
    frames.append(pd.DataFrame({"text": ag_test["title"] + "\n" + ag_test["description"], "source": "ag_news_test"}))
    frame = pd.concat(frames, ignore_index=True)
    return frame[frame["text"].str.strip() != ""].reset_index(drop=True)


def pin_cores(cores: int) -> list[int]:
    """Restrict this process (and the ORT / tokenizers threads it starts) to ``cores`` CPUs."""
    available = sorted(os.sched_getaffinity(0))
    chosen = available[:cores]
    os.sched_setaffinity(0, chosen)
    os.environ["RAYON_NUM_THREADS"] = str(len(chosen))  # tokenizers' thread pool
    return chosen


def throughput(bundle_dir: Path, corpus, n_texts: int, cores: int, seed: int, work: Path) -> dict:
    import pandas as pd

    from pipeline_tasks.config import parse_params
    from pipeline_tasks.monitor import monitor

    batch = corpus.sample(n_texts, replace=True, random_state=seed).reset_index(drop=True)
    batch["id"] = [f"bench:{i}" for i in range(len(batch))]  # resampled rows are distinct batch items
    reference = corpus[(corpus["source"] == "huffpost_v3") & (corpus["date"] < pd.Timestamp("2019-01-01", tz="UTC"))]
    batch[["id", "text", "source"]].to_parquet(work / "batch.parquet")
    reference[["text", "source", "date"]].to_parquet(work / "reference.parquet")
    params = parse_params(
        {
            "seed": seed,
            "paths": {"bundle_dir": str(bundle_dir), "monitor_dir": str(work / "monitor")},
            "monitor": {
                "reference": {"path": str(work / "reference.parquet")},
                "batch": {"path": str(work / "batch.parquet")},
                "intra_op_threads": cores,
            },
        }
    )
    started = time.perf_counter()
    result = monitor.run(params)
    wall = time.perf_counter() - started
    summary = json.loads((work / "monitor" / "drift_summary.json").read_text())
    timings = summary["timings"]
    model_rows = summary["batch"]["sampled"] + summary["reference"]["sampled"]
    return {
        "texts": n_texts,
        "wall_s": round(wall, 2),
        "timings": timings,
        "model_rows": model_rows,
        "reference_rows": summary["reference"]["rows"],
        "embedding_texts_per_s": round(model_rows / max(timings.get("embedding_s", 1e-9), 1e-9), 1),
        "descriptor_texts_per_s": round(
            (n_texts + summary["reference"]["rows"]) / max(timings.get("descriptors_s", 1e-9), 1e-9), 1
        ),
        "drift_detected": result["drift_detected"],
        "fired": result["fired"],
    }


def false_positive_rate(bundle_dir: Path, corpus, resamples: int, seed: int) -> dict:
    import numpy as np
    import pandas as pd

    from pipeline_tasks.config import parse_params
    from pipeline_tasks.monitor import drift
    from pipeline_tasks.ship.bundle import load_bundle

    settings = parse_params({"monitor": {}}).monitor
    thresholds = {k: getattr(settings.thresholds, k) for k in drift.SIGNALS}
    bundle = load_bundle(bundle_dir)
    huff = corpus[corpus["source"] == "huffpost_v3"]
    pool_texts = huff[huff["date"] < pd.Timestamp("2019-01-01", tz="UTC")]["text"].tolist()
    far_mask = (huff["date"] >= pd.Timestamp("2022-08-01", tz="UTC")) & (
        huff["date"] < pd.Timestamp("2022-09-01", tz="UTC")
    )
    far_texts = huff[far_mask]["text"].tolist()
    ag_texts = corpus[corpus["source"] == "ag_news_test"]["text"].sample(1000, random_state=seed).tolist()

    def feats(texts):
        return drift.featurize(bundle, texts, None, np.arange(len(texts)))

    pool, far, ag = feats(pool_texts), feats(far_texts), feats(ag_texts)
    rng = np.random.default_rng(seed)
    fired_counts, flagged = [], 0
    for _ in range(resamples):
        perm = rng.permutation(len(pool_texts))
        cur, ref = perm[:200], perm[200 : 200 + settings.reference_rows]
        values, _ = drift.compare(pool.take(ref), pool.take(cur), settings)
        decision = drift.decide_drift(values, thresholds, settings.min_signals)
        flagged += decision.drift_detected
        fired_counts.append(decision.fired)
    ref = pool.take(rng.permutation(len(pool_texts))[: settings.reference_rows])
    out = {
        "resamples": resamples,
        "month_rows": 200,
        "false_positive_rate": flagged / resamples,
        "fired_per_resample": fired_counts,
    }
    for name, cur in (("far_month_2022_08", far), ("ag_news_vs_huffpost", ag)):
        values, _ = drift.compare(ref, cur, settings)
        decision = drift.decide_drift(values, thresholds, settings.min_signals)
        out[name] = {
            "rows": cur.rows,
            "drift_detected": decision.drift_detected,
            "fired": decision.fired,
            "values": {k: (None if v is None else round(float(v), 5)) for k, v in values.items()},
        }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--bundle", default=None, help="bundle dir (default: paths.bundle_dir of --params)")
    parser.add_argument("--texts", type=int, default=100_000)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--resamples", type=int, default=20)
    parser.add_argument("--no-fpr", action="store_true", help="skip the false-positive-rate measurement")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--out", default=str(REPO / "bench/results/drift.json"))
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    for noisy in ("matplotlib", "numexpr"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from pipeline_tasks.serve.predict import default_bundle_dir

    bundle_dir = Path(args.bundle) if args.bundle else default_bundle_dir(args.params)
    if not (bundle_dir / "manifest.json").is_file():
        print(f"no bundle at {bundle_dir}: run `dvc repro export` or pass --bundle DIR", file=sys.stderr)
        return 2
    mirror = Path(os.environ.get("LMPIPE_DATA_MIRROR") or REPO.parent / "shared" / "corpora")
    if not mirror.is_dir():
        print(f"corpora not found at {mirror}: set LMPIPE_DATA_MIRROR", file=sys.stderr)
        return 2
    cores = pin_cores(args.cores)
    corpus = load_corpora(mirror)
    with tempfile.TemporaryDirectory(prefix="bench-drift-") as tmp:
        result = {
            "machine": {"platform": platform.platform(), "cores": cores, "cpu_count": os.cpu_count()},
            "bundle": str(bundle_dir),
            "corpus_texts": len(corpus),
            "throughput": throughput(bundle_dir, corpus, args.texts, len(cores), args.seed, Path(tmp)),
        }
    if not args.no_fpr:
        result["quality"] = false_positive_rate(bundle_dir, corpus, args.resamples, args.seed)
    t = result["throughput"]
    rows = [
        ("texts through the monitor", f"{t['texts']:,}"),
        ("cores", str(len(cores))),
        ("descriptors (all texts)", f"{t['timings'].get('descriptors_s', 0):.2f} s"),
        (
            "embeddings + predictions (sampled)",
            f"{t['timings'].get('embedding_s', 0):.2f} s ({t['model_rows']} texts, "
            f"{t['embedding_texts_per_s']:.0f} texts/s)",
        ),
        ("LM bits per byte (sampled)", f"{t['timings'].get('bpb_s', 0):.2f} s"),
        ("evidently tests", f"{t['timings'].get('evidently_s', 0):.2f} s"),
        ("evidently HTML report", f"{t['timings'].get('html_report_s', 0):.2f} s"),
        ("stage total", f"{t['timings'].get('total_s', 0):.2f} s"),
        ("wall (incl. reading, writing)", f"{t['wall_s']:.2f} s"),
    ]
    if "quality" in result:
        q = result["quality"]
        rows += [
            (f"false-positive rate ({q['resamples']} resamples)", f"{q['false_positive_rate']:.2f}"),
            (
                "HuffPost 2022-08 vs 2018 flagged",
                f"{q['far_month_2022_08']['drift_detected']} ({', '.join(q['far_month_2022_08']['fired'])})",
            ),
            (
                "AG News vs HuffPost 2018 flagged",
                f"{q['ag_news_vs_huffpost']['drift_detected']} ({', '.join(q['ag_news_vs_huffpost']['fired'])})",
            ),
        ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
