"""Benchmark: how the data stages' time, memory and disk grow with the corpus (issue 15, item 3).

Runs the real stages ``ingest_wiki -> ingest_news -> prepare -> validate -> tokenize`` as a user does
(``python -m pipeline_tasks STAGE --params P``, one subprocess per stage, in a temporary
workspace whose ``params.yaml`` is the repo's with only the sources changed) on ``k`` x the
default corpus for each ``k`` of ``--sizes``. The ``k`` x corpus is built under the temp dir by
:mod:`bench._scaled_corpus` from the very files the default params point at: copy 0 is the real
data; every extra copy repeats each document with a new id and title, as an exact copy (10%), a
near copy (10%, a word in a hundred replaced) or new text (80%, 35% of the words replaced by
words of the same source, news sentences shuffled). Wiki dumps stay bz2 MediaWiki XML, so
``ingest_wiki`` runs its streaming path. Sources are given by ``path`` with no checksum (the
files are generated); ``$LMPIPE_DATA_MIRROR`` is unset for the stages, so nothing else is read.
``tokenize`` keeps the default vocabulary (8192) and trains on the whole train split.

Per size and stage: wall s; CPU s (user + system of the stage and its workers, from ``wait4``);
docs in / out; docs/s and input MB/s per core (per CPU-second, so a shared machine disturbs it
less); peak RSS of the largest single process (``wait4`` ``ru_maxrss``, includes reaped
workers) and of the whole process tree (psutil, summed every 0.1 s); disk used by the stage's
outputs; ``prepare``'s drop counts. Then a linear fit (CPU s and peak RSS against the stage's
input size) projects full English Wikipedia (~7 M articles, ~100 GB XML / ~24 GB bz2) + 10 M
news rows on a 16-core, 64 GB node; the assumptions are printed with the numbers.

    python bench/data_scaling.py                  # sizes 1 2 4
    python bench/data_scaling.py --sizes 1 2 4 8  # ~12 min on 2 busy cores (8x: ~6 min, ~3 GB RSS)

Prints a table and writes ``bench/results/data_scaling.json``.
"""

from __future__ import annotations

import argparse
import bz2
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._scaled_corpus import scale_source  # noqa: E402

STAGES = ("ingest_wiki", "ingest_news", "prepare", "validate", "tokenize")
CHECKSUM_KEYS = ("mirror_path", "url", "sha256", "sha1", "md5", "member_sha256", "tree_sha256")
MB = 1e6
# The projection's target (issue 15) and node.
TARGET_WIKI_ARTICLES = 7_000_000
TARGET_WIKI_XML_BYTES = 100e9
TARGET_WIKI_BZ2_BYTES = 24e9
TARGET_NEWS_ROWS = 10_000_000
WIKI_CHARS_PER_ARTICLE = 3_000  # ~20 GB of clean text (WikiExtractor output) over ~7 M articles
NODE_CORES, NODE_MEMORY_MB = 16, 64_000
BOUNDED_STAGES = ("ingest_wiki", "ingest_news", "prepare", "validate")
PARALLEL_UTIL = 1.3  # CPU/wall above this on the bench machine: the stage uses every core


def mirror_root() -> Path:
    return Path(os.environ.get("LMPIPE_DATA_MIRROR") or REPO.parent / "shared" / "corpora")


def tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def decompressed_bytes(path: Path) -> int:
    if path.is_dir() or path.suffix == ".zip":
        return tree_bytes(path)  # folders; the AG News zip is counted as stored
    with open(path, "rb") as fh:
        compressed = fh.read(3) == b"BZh"
    if not compressed:
        return path.stat().st_size
    total = 0
    with bz2.open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            total += len(chunk)
    return total


OVERRIDES: list[str] = []  # --set


def build_workspace(k: int, root: Path) -> tuple[Path, dict]:
    """Scaled sources under ``root/corpus``, a workspace ``root/ws`` with its ``params.yaml``."""
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    corpus = {}
    for stage in ("ingest_wiki", "ingest_news"):
        sources, files = [], {}
        for spec in params[stage]["sources"]:
            src = Path(spec["path"]) if spec.get("path") else mirror_root() / spec["mirror_path"]
            dst, plan = scale_source(spec, src, root / "corpus", k, stage)
            scaled = {key: value for key, value in spec.items() if key not in CHECKSUM_KEYS}
            sources.append({**scaled, "path": str(dst)})
            files[spec["name"]] = {"bytes": tree_bytes(dst), "decompressed_bytes": decompressed_bytes(dst), **plan}
        params[stage]["sources"] = sources
        corpus[stage] = files
    for override in OVERRIDES:  # e.g. prepare.memory_budget_mb=256
        dotted, value = override.split("=", 1)
        section, key = dotted.split(".", 1)
        params[section][key] = yaml.safe_load(value)
    ws = root / "ws"
    ws.mkdir()
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return ws, corpus


def run_stage(stage: str, ws: Path) -> dict:
    """Run one stage as a subprocess; wall, CPU and peak RSS (largest process and whole tree)."""
    env = {key: value for key, value in os.environ.items() if key != "LMPIPE_DATA_MIRROR"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    log = open(ws / f"{stage}.log", "wb")
    cmd = [sys.executable, "-m", "pipeline_tasks", stage, "--params", str(ws / "params.yaml")]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ws, stdout=log, stderr=subprocess.STDOUT, env=env)
    peak_tree, done = [0], threading.Event()

    def poll() -> None:
        parent = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                procs = [parent, *parent.children(recursive=True)]
                peak_tree[0] = max(peak_tree[0], sum(p.memory_info().rss for p in procs))
            except psutil.Error:
                pass  # a worker exited between listing and reading: the next sample counts
            done.wait(0.1)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    _, status, usage = os.wait4(proc.pid, 0)  # usage of this child and the workers it reaped
    wall = time.perf_counter() - started
    done.set()
    poller.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    log.close()
    if proc.returncode != 0:
        tail = (ws / f"{stage}.log").read_text(errors="replace")[-3000:]
        raise SystemExit(f"{stage} exited {proc.returncode} in {ws}:\n{tail}")
    return {
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_mb": usage.ru_maxrss * 1024 / MB,  # ru_maxrss is KiB on Linux
        "peak_tree_rss_mb": peak_tree[0] / MB,
    }


def parquet_rows(folder: Path, pattern: str = "*.parquet") -> int:
    return sum(pq.ParquetFile(p).metadata.num_rows for p in folder.glob(pattern))


def text_chars(folder: Path, pattern: str = "*.parquet") -> int:
    total = 0
    for path in folder.glob(pattern):
        for batch in pq.ParquetFile(path).iter_batches(columns=["text"]):
            total += sum(len(t) for t in batch.column(0).to_pylist() if t)
    return total


def stage_io(stage: str, ws: Path, corpus: dict) -> dict:
    """Docs and bytes in / out of a finished stage, read from its outputs."""
    raw_wiki, raw_news = ws / "data/raw/wiki", ws / "data/raw/news"
    prepared, tokens = ws / "data/prepared", ws / "data/tokens"
    if stage in ("ingest_wiki", "ingest_news"):
        files = corpus[stage].values()
        out_dir = raw_wiki if stage == "ingest_wiki" else raw_news
        reports = ws / "reports" / stage
        return {
            "docs_in": sum(f["original"] + f.get("exact", 0) + f.get("near", 0) + f.get("new", 0) for f in files),
            "docs_out": parquet_rows(out_dir),
            "input_mb": sum(f["bytes"] for f in files) / MB,
            "input_decompressed_mb": sum(f["decompressed_bytes"] for f in files) / MB,
            "text_mb_out": text_chars(out_dir) / MB,
            "disk_mb": (tree_bytes(out_dir) + tree_bytes(reports)) / MB,
        }
    if stage == "prepare":
        stats = json.loads((ws / "reports/prepare/stats.json").read_text())
        raw_bytes = tree_bytes(raw_wiki) + tree_bytes(raw_news)
        return {
            "docs_in": parquet_rows(raw_wiki) + parquet_rows(raw_news),
            "docs_out": sum(parquet_rows(prepared, f"{s}.parquet") for s in ("train", "val", "test")),
            "input_mb": raw_bytes / MB,
            "text_mb_in": (text_chars(raw_wiki) + text_chars(raw_news)) / MB,
            "disk_mb": (tree_bytes(prepared) + tree_bytes(ws / "reports/prepare")) / MB,
            "dropped": drop_counts(stats),
        }
    if stage == "validate":
        splits = ("train", "val", "test")
        return {
            "docs_in": sum(parquet_rows(prepared, f"{s}.parquet") for s in splits),
            "docs_out": sum(parquet_rows(prepared, f"{s}.parquet") for s in splits),
            "input_mb": sum(tree_bytes(prepared / f"{s}.parquet") for s in splits) / MB,
            "text_mb_in": sum(text_chars(prepared, f"{s}.parquet") for s in splits) / MB,
            "success": json.loads((ws / "reports/validate/summary.json").read_text())["success"],
            "disk_mb": tree_bytes(ws / "reports/validate") / MB,
        }
    meta = json.loads((tokens / "meta.json").read_text())
    return {
        "docs_in": sum(parquet_rows(prepared, f"{s}.parquet") for s in ("train", "val", "test")),
        "docs_out": sum(parquet_rows(prepared, f"{s}.parquet") for s in ("train", "val", "test")),
        "input_mb": sum(tree_bytes(prepared / f"{s}.parquet") for s in ("train", "val", "test")) / MB,
        "text_mb_in": sum(text_chars(prepared, f"{s}.parquet") for s in ("train", "val", "test")) / MB,
        "tokens": find_number(meta, ("tokens", "total_tokens", "n_tokens")),
        "disk_mb": (tree_bytes(tokens) + tree_bytes(ws / "reports/tokenize")) / MB,
    }


def find_number(meta: dict, keys: tuple[str, ...]):
    for key in keys:
        if isinstance(meta.get(key), (int, float)):
            return meta[key]
    splits = meta.get("splits") or {}
    counts = [v.get("tokens") for v in splits.values() if isinstance(v, dict)]
    return sum(c for c in counts if isinstance(c, (int, float))) or None


def drop_counts(stats: dict) -> dict[str, int]:
    """Drops per reason from prepare's stats.json (summed over sources when given per source)."""
    for key in ("dropped", "drops", "dropped_by_reason"):
        value = stats.get(key)
        if isinstance(value, dict):
            if all(isinstance(v, (int, float)) for v in value.values()):
                return {k: int(v) for k, v in value.items()}
            totals: dict[str, int] = {}
            for per_source in value.values():
                if isinstance(per_source, dict):
                    for reason, count in per_source.items():
                        if isinstance(count, (int, float)):
                            totals[reason] = totals.get(reason, 0) + int(count)
            return totals
    return {}


def measure_size(k: int, tmp: Path, ncores: int) -> dict:
    root = tmp / f"x{k}"
    root.mkdir()
    started = time.perf_counter()
    ws, corpus = build_workspace(k, root)
    build_s = time.perf_counter() - started
    stages = {}
    for stage in STAGES:
        result = run_stage(stage, ws)
        result.update(stage_io(stage, ws, corpus))
        cpu = max(result["cpu_s"], 1e-9)
        result["docs_per_cpu_s"] = result["docs_in"] / cpu
        result["mb_per_cpu_s"] = result["input_mb"] / cpu
        result["docs_per_s_per_core"] = result["docs_in"] / result["wall_s"] / ncores
        result["mb_per_s_per_core"] = result["input_mb"] / result["wall_s"] / ncores
        result["cpu_util"] = result["cpu_s"] / result["wall_s"]
        stages[stage] = result
        print(f"  x{k} {stage}: {result['wall_s']:.1f} s wall, {result['peak_tree_rss_mb']:.0f} MB", flush=True)
    return {"k": k, "build_corpus_s": build_s, "corpus": corpus, "stages": stages}


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares line ``y = a + b x``; (a, b)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0
    return my - slope * mx, slope


def project(runs: list[dict]) -> dict:
    """Full enwiki + 10 M news on a 16-core, 64 GB node, from the per-stage linear fits."""
    last = runs[-1]["stages"]
    wiki_docs = last["ingest_wiki"]["docs_out"]
    news_docs = last["ingest_news"]["docs_out"]
    news_chars = last["ingest_news"]["text_mb_out"] * MB / max(news_docs, 1)
    measured_wiki_chars = last["ingest_wiki"]["text_mb_out"] * MB / max(wiki_docs, 1)
    target_chars = TARGET_WIKI_ARTICLES * WIKI_CHARS_PER_ARTICLE + TARGET_NEWS_ROWS * news_chars
    # Stage size measure and its value at the target: ingest_wiki by decompressed XML/text bytes,
    # ingest_news by rows, prepare and tokenize by characters of text (MinHash, BPE scale with text).
    measures = {
        "ingest_wiki": (lambda s: s["input_decompressed_mb"] * MB, TARGET_WIKI_XML_BYTES, "decompressed input bytes"),
        "ingest_news": (lambda s: s["docs_in"], TARGET_NEWS_ROWS, "news rows"),
        "prepare": (lambda s: s["text_mb_in"] * MB, target_chars, "text characters"),
        "validate": (lambda s: s["text_mb_in"] * MB, target_chars * 0.9, "text characters (~90% kept)"),
        "tokenize": (lambda s: s["text_mb_in"] * MB, target_chars * 0.9, "text characters (~90% kept)"),
    }
    out, total_h, peak_mb = {}, 0.0, 0.0
    bench_cores = psutil.cpu_count()
    for stage, (measure, target, unit) in measures.items():
        xs = [measure(r["stages"][stage]) for r in runs]
        a_cpu, b_cpu = fit(xs, [r["stages"][stage]["cpu_s"] for r in runs])
        a_rss, b_rss = fit(xs, [r["stages"][stage]["peak_tree_rss_mb"] for r in runs])
        util = last[stage]["cpu_util"]
        # ingest_wiki's pool takes every core (workers: 0); the others count as parallel only if seen so.
        parallel = stage == "ingest_wiki" or util > PARALLEL_UTIL
        cpu_s = a_cpu + b_cpu * target
        wall_h = cpu_s / (NODE_CORES if parallel else 1) / 3600
        # A parallel stage's fixed memory (interpreter + imports per worker) grows with the workers.
        rss_mb = a_rss * (NODE_CORES / bench_cores if parallel else 1) + b_rss * target
        if stage in BOUNDED_STAGES:
            # Memory that stops growing: ingest buffers one row group / batch (full from the 4x size
            # on), prepare and validate hold their memory_budget_mb. A line fitted through the sizes
            # on the way up to that bound says nothing about the target: take the largest run, with
            # one interpreter per core for the stages that run a worker per core.
            rss_mb = last[stage]["peak_tree_rss_mb"] * (NODE_CORES / bench_cores if parallel else 1)
        a_doc, b_doc = fit([r["stages"][stage]["docs_in"] for r in runs], [r["stages"][stage]["cpu_s"] for r in runs])
        a_rdoc, b_rdoc = fit(
            [r["stages"][stage]["docs_in"] for r in runs], [r["stages"][stage]["peak_tree_rss_mb"] for r in runs]
        )
        out[stage] = {
            "measure": unit,
            "target": target,
            "cpu_s_per_unit": b_cpu,
            "rss_mb_per_unit": b_rss,
            "cpu_s_per_1k_docs": b_doc * 1000,
            "rss_mb_per_1k_docs": b_rdoc * 1000,
            "uses_all_cores": parallel,
            "wall_h_if_all_cores": cpu_s / NODE_CORES / 3600,
            "cpu_util_measured": util,
            "projected_cpu_h": cpu_s / 3600,
            "projected_wall_h": wall_h,
            "projected_peak_rss_mb": rss_mb,
        }
        total_h += wall_h
        peak_mb = max(peak_mb, rss_mb)
    return {
        "stages": out,
        "total_wall_h": total_h,
        "total_wall_h_if_all_stages_use_all_cores": sum(p["wall_h_if_all_cores"] for p in out.values()),
        "peak_rss_mb": peak_mb,
        "fits_64gb": peak_mb < NODE_MEMORY_MB,
        "under_3h": total_h < 3,
        "assumptions": {
            "wiki_articles": TARGET_WIKI_ARTICLES,
            "wiki_xml_bytes": TARGET_WIKI_XML_BYTES,
            "wiki_bz2_bytes": TARGET_WIKI_BZ2_BYTES,
            "news_rows": TARGET_NEWS_ROWS,
            "wiki_chars_per_article": WIKI_CHARS_PER_ARTICLE,
            "wiki_chars_per_doc_measured": measured_wiki_chars,
            "news_chars_per_row_measured": news_chars,
            "target_text_chars": target_chars,
            "node_cores": NODE_CORES,
            "node_memory_mb": NODE_MEMORY_MB,
            "parallel_rule": (
                f"ingest_wiki (worker pool, workers: 0) and any stage with CPU/wall > {PARALLEL_UTIL} here: "
                f"CPU s / {NODE_CORES}; the others: CPU s on one core"
            ),
            "linear": "CPU s and peak tree RSS linear in the stage's measure (least squares over the sizes)",
        },
    }


def print_tables(runs: list[dict], projection: dict, ncores: int) -> None:
    header = (
        f"{'k':>3} {'stage':<12} {'wall s':>7} {'cpu s':>7} {'util':>5} {'docs in':>9} {'docs out':>9} "
        f"{'docs/cpu-s':>10} {'MB/cpu-s':>8} {'docs/s/core':>11} {'MB/s/core':>9} {'in MB':>7} "
        f"{'RSS MB':>7} {'tree MB':>7} {'disk MB':>7}"
    )
    print(f"\n=== data stages, k x default corpus ({ncores} cores on this machine) ===")
    print(header)
    for run in runs:
        for stage, s in run["stages"].items():
            print(
                f"{run['k']:>3} {stage:<12} {s['wall_s']:>7.1f} {s['cpu_s']:>7.1f} {s['cpu_util']:>5.2f} "
                f"{s['docs_in']:>9} {s['docs_out']:>9} {s['docs_per_cpu_s']:>10.0f} {s['mb_per_cpu_s']:>8.2f} "
                f"{s['docs_per_s_per_core']:>11.0f} {s['mb_per_s_per_core']:>9.2f} {s['input_mb']:>7.1f} "
                f"{s['peak_rss_mb']:>7.0f} {s['peak_tree_rss_mb']:>7.0f} {s['disk_mb']:>7.1f}"
            )
    print("\nprepare drops:")
    for run in runs:
        drops = run["stages"]["prepare"]["dropped"]
        planted = {
            kind: sum(f.get(kind, 0) for st in run["corpus"].values() for f in st.values())
            for kind in ("exact", "near", "new")
        }
        print(f"  x{run['k']}: {json.dumps(drops, sort_keys=True)}  planted copies: {planted}")
    print("\ngrowth per doubling of the corpus (ratio of the next size; k must double):")
    for small, large in zip(runs, runs[1:]):
        step = large["k"] / small["k"]
        for stage in STAGES:
            a, b = small["stages"][stage], large["stages"][stage]
            print(
                f"  x{small['k']} -> x{large['k']} {stage:<12} wall x{b['wall_s'] / a['wall_s']:.2f}  "
                f"cpu x{b['cpu_s'] / a['cpu_s']:.2f}  tree RSS x{b['peak_tree_rss_mb'] / a['peak_tree_rss_mb']:.2f}  "
                f"docs/cpu-s x{b['docs_per_cpu_s'] / a['docs_per_cpu_s']:.2f}  (corpus x{step:g})"
            )
    print(
        f"\n=== projection: full enwiki + {TARGET_NEWS_ROWS:,} news rows, {NODE_CORES} cores, {NODE_MEMORY_MB // 1000} GB ==="
    )
    for stage, p in projection["stages"].items():
        print(
            f"  {stage:<12} by {p['measure']:<28} target {p['target']:.3g}: cpu {p['projected_cpu_h']:.2f} h, "
            f"wall {p['projected_wall_h']:.2f} h ({'all cores' if p['uses_all_cores'] else '1 core'}, "
            f"util here {p['cpu_util_measured']:.2f}), peak RSS {p['projected_peak_rss_mb'] / 1000:.1f} GB; "
            f"slopes {p['cpu_s_per_1k_docs']:.3f} cpu-s and {p['rss_mb_per_1k_docs']:.2f} MB RSS per 1k docs in"
        )
    print(
        f"  total {projection['total_wall_h']:.2f} h (target < 3 h: {projection['under_3h']}); "
        f"peak {projection['peak_rss_mb'] / 1000:.1f} GB, fits 64 GB: {projection['fits_64gb']}; "
        f"if every stage used all {NODE_CORES} cores: {projection['total_wall_h_if_all_stages_use_all_cores']:.2f} h"
    )
    print("  assumptions:", json.dumps(projection["assumptions"], indent=None))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4], help="multiples of the default corpus")
    parser.add_argument("--keep", action="store_true", help="keep the temp workspaces (printed)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="params override (repeatable)"
    )
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "data_scaling.json"))
    args = parser.parse_args()
    OVERRIDES.extend(args.set)
    ncores = psutil.cpu_count()
    tmp_ctx = tempfile.TemporaryDirectory(prefix="data_scaling_")
    tmp = Path(tmp_ctx.name)
    runs = []
    for k in sorted(set(args.sizes)):
        print(f"building and running x{k} in {tmp / f'x{k}'}", flush=True)
        runs.append(measure_size(k, tmp, ncores))
    projection = project(runs) if len(runs) > 1 else {}
    if projection:
        print_tables(runs, projection, ncores)
    result = {
        "machine": {"cores": ncores, "platform": platform.platform(), "python": platform.python_version()},
        "busy_note": "2 shared cores: compare ratios and CPU seconds, not absolute wall times",
        "runs": runs,
        "projection": projection,
    }
    result["overrides"] = args.set
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
    print(f"\nwrote {out}")
    if args.keep:
        print(f"kept {tmp}")
        tmp_ctx._finalizer.detach()
    else:
        tmp_ctx.cleanup()


if __name__ == "__main__":
    main()
