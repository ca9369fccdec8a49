"""Benchmark: the drift monitor's false-alarm rate by window size, fixed thresholds vs the permutation null.

The reference is built exactly as ``lmpipe monitor`` builds it (``monitor.reference`` of the params:
by default the HuffPost news rows of the prepared train split) and a seeded pool of ``--pool-rows``
of its rows goes once through the exported bundle (descriptors, embeddings, predictions, labels, LM
bits per byte). Then, for each window size in ``--sizes``, ``--resamples`` times: a window of that
many pool rows against a disjoint reference sample of ``monitor.reference_rows`` rows, both from
one distribution, so every drift verdict is a false alarm. Each resample is decided twice on the
same signal values (:func:`pipeline_tasks.monitor.drift.compare`):

* **fixed** — the configured ``monitor.thresholds`` alone (the monitor before the permutation null);
* **null** — the thresholds of :func:`pipeline_tasks.monitor.permutation.null_thresholds`
  (``null_permutations`` re-splits, ``null_alpha``), what the stage does now.

Sensitivity is checked the same way when the ingested HuffPost feed is there
(``paths.raw_news_dir/huffpost_v3.parquet``): windows of the same sizes drawn from 2022-08, four
years after most of the reference: how often they are still flagged.

Settings: ``--params`` (default: this checkout's ``params.yaml``). Data: the paths it names, under
``--project DIR`` (default: this checkout), after a ``make run`` (or ``dvc repro export``) there.
Output: a table on stdout and ``bench/results/monitor_false_alarms.json``.

    python bench/monitor_false_alarms.py [--project DIR] [--sizes 30 50 100 200] [--resamples 200]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

logger = logging.getLogger("bench.monitor_false_alarms")
FAR_MONTH = ("2022-08-01", "2022-09-01")


def project_params(params_file: Path, project: Path):
    """The params of ``params_file`` with every path made absolute under ``project``."""
    from pipeline_tasks.config import PathsParams, parse_params, read_params_raw

    raw = read_params_raw(params_file)
    paths = {**dataclasses.asdict(PathsParams()), **raw.get("paths", {})}
    raw["paths"] = {key: str(project / value) for key, value in paths.items()}
    return parse_params(raw, params_file)


def features_of(bundle, frame, settings):
    """Every row of ``frame`` through the bundle (descriptors, model outputs, labels)."""
    import numpy as np

    from pipeline_tasks.monitor import drift
    from pipeline_tasks.monitor.monitor import _labels

    return drift.featurize(
        bundle,
        frame["text"].tolist(),
        _labels(frame),
        np.arange(len(frame)),
        oov_max_pieces=settings.oov_max_pieces,
        variant=settings.variant,
        batch_size=settings.batch_size,
    )


def alarm_rates(pool, window_pool, settings, sizes, resamples, seed) -> list[dict]:
    """Per window size: share of resamples flagged with fixed thresholds and with the null, and by which signal.

    ``window_pool`` is ``None`` for same-distribution windows (drawn from ``pool``, disjoint from
    the reference sample) or the features of another period to draw windows from.
    """
    import numpy as np

    from pipeline_tasks.monitor import drift
    from pipeline_tasks.monitor.permutation import null_thresholds

    configured = {name: getattr(settings.thresholds, name) for name in drift.SIGNALS}
    rng = np.random.default_rng(seed)
    out = []
    for size in sizes:
        flagged = {"fixed": 0, "null": 0}
        by_signal = {"fixed": dict.fromkeys(drift.SIGNALS, 0), "null": dict.fromkeys(drift.SIGNALS, 0)}
        raised, null_seconds = [], 0.0
        for r in range(resamples):
            perm = rng.permutation(pool.rows)
            if window_pool is None:
                window, ref = pool.take(perm[:size]), pool.take(perm[size : size + settings.reference_rows])
            else:
                picked = rng.permutation(window_pool.rows)[: min(size, window_pool.rows)]
                window, ref = window_pool.take(picked), pool.take(perm[: settings.reference_rows])
            values, _ = drift.compare(ref, window, settings)
            started = time.perf_counter()
            thresholds, details = null_thresholds(ref, window, settings, seed + r)
            null_seconds += time.perf_counter() - started
            raised.append({k: v["threshold"] for k, v in details["signals"].items()})
            for name, table in (("fixed", configured), ("null", thresholds)):
                decision = drift.decide_drift(values, table, settings.min_signals)
                flagged[name] += decision.drift_detected
                for signal in decision.fired:
                    by_signal[name][signal] += 1
        out.append(
            {
                "window_rows": min(size, window_pool.rows) if window_pool is not None else size,
                "resamples": resamples,
                "rate_fixed": flagged["fixed"] / resamples,
                "rate_null": flagged["null"] / resamples,
                "fired_fixed": by_signal["fixed"],
                "fired_null": by_signal["null"],
                "median_null_threshold": {
                    name: float(np.median([t[name] for t in raised if name in t]))
                    for name in drift.SIGNALS
                    if any(name in t for t in raised)
                },
                "null_s_per_window": null_seconds / resamples,
            }
        )
        logger.info("%s rows: fixed %.3f, null %.3f", size, out[-1]["rate_fixed"], out[-1]["rate_null"])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default=str(REPO / "params.yaml"), help="the monitor settings")
    parser.add_argument("--project", default=str(REPO), help="where the params' paths are (bundle, prepared data)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[30, 50, 100, 200])
    parser.add_argument("--resamples", type=int, default=200)
    parser.add_argument("--pool-rows", type=int, default=4000, help="reference rows featurized once")
    parser.add_argument("--null-permutations", type=int, default=None, help="override monitor.null_permutations")
    parser.add_argument("--null-alpha", type=float, default=None, help="override monitor.null_alpha")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--out", default=str(REPO / "bench/results/monitor_false_alarms.json"))
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    for noisy in ("matplotlib", "numexpr"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from pipeline_tasks.monitor.monitor import load_slice
    from pipeline_tasks.monitor.params import SliceParams
    from pipeline_tasks.ship.bundle import load_bundle

    project = Path(args.project).resolve()
    params = project_params(Path(args.params).resolve(), project)
    settings = params.monitor
    overrides = {"null_permutations": args.null_permutations, "null_alpha": args.null_alpha}
    settings = dataclasses.replace(settings, **{k: v for k, v in overrides.items() if v is not None})
    bundle_dir = Path(params.paths.bundle_dir)
    if not (bundle_dir / "manifest.json").is_file():
        print(f"no bundle at {bundle_dir}: run `make run` (or `dvc repro export`) in {project}", file=sys.stderr)
        return 2
    reference, _ = load_slice(settings.reference, params.paths, params.seed)
    far_path = Path(params.paths.raw_news_dir) / "huffpost_v3.parquet"
    far_frame = None
    if far_path.is_file():
        far_frame, _ = load_slice(
            SliceParams(path=str(far_path), start=FAR_MONTH[0], end=FAR_MONTH[1]), params.paths, 0
        )
        # as the stage does: the window's own rows never sit in the reference
        reference = reference[~reference["id"].isin(set(far_frame["id"].dropna()))]
    pool_frame = reference.sample(min(args.pool_rows, len(reference)), random_state=args.seed).reset_index(drop=True)
    logger.info("reference %d rows (%s); featurizing a pool of %d", len(reference), settings.reference, len(pool_frame))
    bundle = load_bundle(bundle_dir)
    started = time.perf_counter()
    pool = features_of(bundle, pool_frame, settings)
    featurize_s = time.perf_counter() - started
    result = {
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
        "project": str(project),
        "bundle_manifest": str(bundle_dir / "manifest.json"),
        "reference": {"spec": dataclasses.asdict(settings.reference), "rows": len(reference), "pool": pool.rows},
        "settings": {
            "thresholds": dataclasses.asdict(settings.thresholds),
            "min_signals": settings.min_signals,
            "reference_rows": settings.reference_rows,
            "null_permutations": settings.null_permutations,
            "null_alpha": settings.null_alpha,
        },
        "featurize_s": round(featurize_s, 1),
        "false_alarms": alarm_rates(pool, None, settings, args.sizes, args.resamples, args.seed),
    }
    if far_frame is not None:
        far = features_of(bundle, far_frame, settings)
        result["far_month"] = {
            "window": list(FAR_MONTH),
            "rows": far.rows,
            "detection": alarm_rates(pool, far, settings, args.sizes, max(20, args.resamples // 5), args.seed),
        }

    header = (
        f"{'window rows':>11}  {'fixed thresholds':>16}  {'permutation null':>16}  signals that fired (fixed -> null)"
    )
    lines = ["false-alarm rate on same-distribution resamples of the reference", header]
    for row in result["false_alarms"]:
        fired = ", ".join(
            f"{k} {row['fired_fixed'][k]}->{row['fired_null'][k]}"
            for k in row["fired_fixed"]
            if row["fired_fixed"][k] or row["fired_null"][k]
        )
        lines.append(f"{row['window_rows']:>11}  {row['rate_fixed']:>16.3f}  {row['rate_null']:>16.3f}  {fired or '-'}")
    if "far_month" in result:
        lines += ["", f"detection rate of HuffPost {FAR_MONTH[0][:7]} windows ({result['far_month']['rows']} rows)"]
        lines.append(header)
        for row in result["far_month"]["detection"]:
            lines.append(f"{row['window_rows']:>11}  {row['rate_fixed']:>16.3f}  {row['rate_null']:>16.3f}")
    print("\n".join(lines))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    tmp.replace(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
