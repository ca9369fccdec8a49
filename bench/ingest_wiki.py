"""Benchmark: our ``ingest_wiki`` against ``bzcat`` and WikiExtractor on the same Wikipedia dump.

Side by side in one run (the machine may be shared: compare the ratios, not the absolute rates):

* ``bzcat``: decompression alone (``bzcat dump > /dev/null``), the floor for any bz2 reader,
  single core;
* ``wikiextractor``: the usual tool (PyPI ``wikiextractor``, the CLI with ``--processes N``,
  ``--no-templates`` since we drop templates too, output to a temp folder). Its time includes the
  interpreter start; the table also shows it without that (the time of ``python -c "import
  wikiextractor.WikiExtractor"``), and the target is checked against the faster of the two;
* ``ours``: :func:`pipeline_tasks.ingest.ingest_wiki.ingest_file` with ``workers=N`` (the same N; pool
  start included; default ``bz2_decoder: auto``), writing Parquet to a temp folder; plus
  ``workers=1``, bz2 blocks forced into the pool, and, for reference, the mwparserfromhell-only
  cleaner.

Rates are MB/s of *compressed* input and pages/s (pages in the dump). Each tool runs ``--repeats``
times, interleaved; the best time is used (the least disturbed run), the median is shown too.
The CPU column (user + system seconds of the process and its children) does not depend on other
load on the machine: ``cpu_bzcat_over_ours`` is the per-core rate ratio an idle machine with
perfect parallelism would show. Note that ``workers=1`` still decompresses in a read-ahead thread.
Targets: ours >= 2x wikiextractor; ours per process >= 0.5x bzcat (bzcat uses one core).

Output: a table on stdout and ``bench/results/ingest_wiki.json``.
Run: ``python bench/ingest_wiki.py [--dump PATH] [--processes N] [--repeats 3]``
(default dump: the gensim enwiki sample under ``$LMPIPE_DATA_MIRROR`` or ``../shared/corpora``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline_tasks.ingest.ingest_wiki import ingest_file, worker_pool  # noqa: E402
from pipeline_tasks.ingest.params import IngestWikiParams, WikiSourceParams  # noqa: E402

GENSIM = "wikipedia_dumps/piskvorky_gensim/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
TARGET_VS_WIKIEXTRACTOR = 2.0
TARGET_PER_CORE_VS_BZCAT = 0.5


def default_dump() -> Path:
    mirror = Path(os.environ.get("LMPIPE_DATA_MIRROR") or REPO.parent / "shared" / "corpora")
    return mirror / GENSIM


def cpu_seconds() -> float:
    """User + system CPU of this process and its reaped children (subprocesses, pool workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(fn, cpu: list | None = None) -> float:
    cpu_start, started = cpu_seconds(), time.perf_counter()
    fn()
    elapsed = time.perf_counter() - started
    if cpu is not None:
        cpu.append(cpu_seconds() - cpu_start)
    return elapsed


def run_bzcat(dump: Path) -> None:
    subprocess.run(["bzcat", str(dump)], stdout=subprocess.DEVNULL, check=True)


def run_wikiextractor(dump: Path, processes: int, out: Path) -> int:
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "wikiextractor.WikiExtractor",
            str(dump),
            "-o",
            str(out),
            "--processes",
            str(processes),
            "--no-templates",
            "-q",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return sum(p.read_text(encoding="utf-8").count("<doc ") for p in out.rglob("wiki_*"))


def run_ours(dump: Path, workers: int, out: Path, cleaner: str = "fast", bz2_decoder: str = "auto") -> dict:
    source = WikiSourceParams(name="bench", path=str(dump))
    cfg = IngestWikiParams(sources=(source,), workers=workers, cleaner=cleaner, bz2_decoder=bz2_decoder)
    with worker_pool(workers) as pool:
        return ingest_file(dump, out / "bench.parquet", source, cfg, pool, window=2 * workers)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dump", type=Path, default=None)
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--skip-reference-cleaner", action="store_true", help="leave out the slow mwparserfromhell-only row"
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "ingest_wiki.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    dump = args.dump or default_dump()
    if not dump.is_file():
        print(f"dump not found: {dump} (set LMPIPE_DATA_MIRROR or pass --dump)", file=sys.stderr)
        return 2
    if shutil.which("bzcat") is None:
        print("bzcat not found on PATH", file=sys.stderr)
        return 2
    n = args.processes
    size = dump.stat().st_size
    work = Path(tempfile.mkdtemp(prefix="bench_ingest_wiki."))
    try:
        # warm up: page cache, imports, wikiextractor's first run
        run_bzcat(dump)
        stats = run_ours(dump, 1, work)
        docs = run_wikiextractor(dump, n, work / "we")
        startup = min(
            timed(lambda: subprocess.run([sys.executable, "-c", "import wikiextractor.WikiExtractor"], check=True))
            for _ in range(args.repeats)
        )
        pages = stats["pages_seen"]
        jobs = {
            "bzcat": lambda: run_bzcat(dump),
            "wikiextractor": lambda: run_wikiextractor(dump, n, work / "we"),
            f"ours (workers={n})": lambda: run_ours(dump, n, work),
            "ours (workers=1)": lambda: run_ours(dump, 1, work),
            f"ours (workers={n}, bz2 blocks in the pool)": lambda: run_ours(dump, n, work, bz2_decoder="pool"),
        }
        if not args.skip_reference_cleaner:
            jobs[f"ours, mwparserfromhell cleaner (workers={n})"] = lambda: run_ours(dump, n, work, "mwparserfromhell")
        rows = {name: [] for name in jobs}
        cpu = {name: [] for name in jobs}
        for _ in range(args.repeats):
            for name, job in jobs.items():
                rows[name].append(timed(job, cpu[name]))
        kept = run_ours(dump, n, work)["pages_kept"]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    processes = {
        "bzcat": 1,
        "wikiextractor": n,
        f"ours (workers={n})": n,
        "ours (workers=1)": 1,
        f"ours (workers={n}, bz2 blocks in the pool)": n,
        f"ours, mwparserfromhell cleaner (workers={n})": n,
    }
    results = {}
    for name, times in rows.items():
        best = min(times)
        results[name] = {
            "seconds_best": round(best, 4),
            "seconds_median": round(statistics.median(times), 4),
            "processes": processes[name],
            "mb_per_s": round(size / 1e6 / best, 3),
            "pages_per_s": round(pages / best, 1),
            "mb_per_s_per_process": round(size / 1e6 / best / processes[name], 3),
            "cpu_seconds_best": round(min(cpu[name]), 4),
        }
    we_best = min(rows["wikiextractor"])
    we_no_start = max(we_best - startup, 1e-9)
    results["wikiextractor (without interpreter start)"] = {
        "seconds_best": round(we_no_start, 4),
        "processes": n,
        "mb_per_s": round(size / 1e6 / we_no_start, 3),
        "pages_per_s": round(pages / we_no_start, 1),
        "mb_per_s_per_process": round(size / 1e6 / we_no_start / n, 3),
    }
    ours = results[f"ours (workers={n})"]
    ratios = {
        "ours_vs_wikiextractor": round(we_best / ours["seconds_best"], 2),
        "ours_vs_wikiextractor_without_start": round(we_no_start / ours["seconds_best"], 2),
        "ours_per_process_vs_bzcat": round(ours["mb_per_s_per_process"] / results["bzcat"]["mb_per_s"], 2),
        "ours_workers1_vs_bzcat": round(results["ours (workers=1)"]["mb_per_s"] / results["bzcat"]["mb_per_s"], 2),
        # CPU seconds are robust to other load on the machine: bzcat's CPU over ours = rate per core
        # ratio on an otherwise idle machine with perfect parallelism.
        "cpu_bzcat_over_ours": round(results["bzcat"]["cpu_seconds_best"] / ours["cpu_seconds_best"], 2),
        "cpu_bzcat_over_ours_workers1": round(
            results["bzcat"]["cpu_seconds_best"] / results["ours (workers=1)"]["cpu_seconds_best"], 2
        ),
        "cpu_wikiextractor_over_ours": round(
            results["wikiextractor"]["cpu_seconds_best"] / ours["cpu_seconds_best"], 2
        ),
    }
    targets = {
        f"ours >= {TARGET_VS_WIKIEXTRACTOR}x wikiextractor": min(
            ratios["ours_vs_wikiextractor"], ratios["ours_vs_wikiextractor_without_start"]
        )
        >= TARGET_VS_WIKIEXTRACTOR,
        f"ours per process >= {TARGET_PER_CORE_VS_BZCAT}x bzcat": max(
            ratios["ours_per_process_vs_bzcat"], ratios["ours_workers1_vs_bzcat"]
        )
        >= TARGET_PER_CORE_VS_BZCAT,
    }
    report = {
        "dump": str(dump),
        "dump_bytes": size,
        "pages_in_dump": pages,
        "articles_kept_ours": kept,
        "docs_written_wikiextractor": docs,
        "processes": n,
        "repeats": args.repeats,
        "interpreter_start_s": round(startup, 4),
        "results": results,
        "ratios": ratios,
        "targets": targets,
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_avg_1m": round(os.getloadavg()[0], 2),
        },
    }

    print(f"dump {dump.name}: {size / 1e6:.2f} MB compressed, {pages} pages; {n} processes; best of {args.repeats}")
    print(f"{'tool':46s} {'s (best)':>9s} {'s (med)':>8s} {'MB/s':>7s} {'MB/s/proc':>9s} {'pages/s':>8s} {'CPU s':>6s}")
    for name, r in results.items():
        median = f"{r['seconds_median']:8.3f}" if "seconds_median" in r else f"{'':8s}"
        cpu_s = f"{r['cpu_seconds_best']:6.3f}" if "cpu_seconds_best" in r else ""
        print(
            f"{name:46s} {r['seconds_best']:9.3f} {median} {r['mb_per_s']:7.2f} {r['mb_per_s_per_process']:9.2f} "
            f"{r['pages_per_s']:8.0f} {cpu_s}"
        )
    for key, value in ratios.items():
        print(f"{key:46s} {value:.2f}")
    for key, ok in targets.items():
        print(f"target: {key:38s} {'MET' if ok else 'NOT MET'}")
    print(
        f"articles kept by ours: {kept}; docs written by wikiextractor: {docs}; load avg {report['machine']['load_avg_1m']}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
