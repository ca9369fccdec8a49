"""What pretraining is worth: fine-tuned accuracy against the number of pretraining tokens.

For each point of ``--tokens`` the real ``pretrain`` stage runs for ``tokens / tokens_per_step``
steps (its default schedule: warm-up, cosine decay to the end, so every point is a complete run
of that length, not a snapshot of a longer one), then the real ``finetune`` stage on it; 0 tokens
is ``finetune --from-scratch`` (the same architecture from random weights). Everything else is the
params file's: data, model, fine-tuning recipe (including the n-gram expert when it is on). Each
point writes under ``--work/<tokens>/``, so the pipeline's own outputs are untouched.

Needs the prepared splits and the tokenizer (``dvc repro tokenize`` first). Reports, per point:
steps, tokens, pretraining val bits per byte, fine-tuned test accuracy (AG News test, the mixed
model) and, when the n-gram expert is on, the transformer alone and the n-gram expert alone on the
same rows, plus wall time. Prints a table; JSON to ``bench/results/pretraining_curve.json``.

Run: ``python bench/pretraining_curve.py [--tokens 0 0.5e6 1e6 2e6 4e6] [-S finetune.ngram_buckets=0 ...]``
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline_tasks.config import load_params  # noqa: E402


def run_stage(stage: str, params_path: Path, overrides: list[str], extra: list[str] = ()) -> float:
    """Run ``python -m pipeline_tasks STAGE`` with ``-S`` overrides; returns its wall seconds."""
    cmd = [sys.executable, "-m", "pipeline_tasks", stage, "--params", str(params_path), *extra]
    for item in overrides:
        cmd += ["-S", item]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=os.environ, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{stage} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return time.perf_counter() - start


def point(tokens: float, params_path: Path, work: Path, tokens_per_step: int, extra: list[str]) -> dict:
    out = work / f"{int(tokens)}"
    paths = {
        "paths.pretrain_dir": out / "models/pretrain",
        "paths.pretrain_reports_dir": out / "reports/pretrain",
        "paths.finetune_dir": out / "models/finetune",
        "paths.finetune_reports_dir": out / "reports/finetune",
    }
    overrides = [f"{k}={v}" for k, v in paths.items()] + extra
    steps = round(tokens / tokens_per_step)
    row: dict = {"tokens": steps * tokens_per_step, "steps": steps}
    if steps:
        row["pretrain_s"] = run_stage("pretrain", params_path, [*overrides, f"pretrain.max_steps={steps}"])
        pretrain = json.loads((paths["paths.pretrain_reports_dir"] / "metrics.json").read_text(encoding="utf-8"))
        row["val_bpb"] = pretrain.get("val/bpb")
    row["finetune_s"] = run_stage("finetune", params_path, overrides, [] if steps else ["--from-scratch"])
    finetune = json.loads((paths["paths.finetune_reports_dir"] / "metrics.json").read_text(encoding="utf-8"))
    row["test_accuracy"] = finetune["test"]["accuracy"]
    row["val_macro_f1"] = finetune["val"]["macro_f1"]
    ngram = finetune.get("ngram") or {}
    row["transformer_alone"] = ngram.get("test_accuracy_transformer_alone", finetune["test"]["accuracy"])
    row["ngram_alone"] = ngram.get("test_accuracy_ngram_alone")
    row["ngram_weight"] = ngram.get("weight")
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--tokens", type=float, nargs="+", default=[0, 0.5e6, 1e6, 2e6, 4e6])
    parser.add_argument("--work", type=Path, default=ROOT / "build/pretraining_curve")
    parser.add_argument("-S", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/pretraining_curve.json")
    args = parser.parse_args()
    params = load_params(args.params)
    tokens_per_step = int(params.pretrain.tokens_per_step)
    rows = []
    for tokens in args.tokens:
        rows.append(point(tokens, args.params.resolve(), args.work.resolve(), tokens_per_step, args.overrides))
        print(json.dumps(rows[-1]), flush=True)

    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    print(
        f"\n{'tokens':>10} {'steps':>6} {'val bpb':>8} {'test acc':>9} {'transformer':>12} {'n-gram':>7} {'weight':>7}"
    )
    for r in rows:
        print(
            f"{r['tokens']:>10,} {r['steps']:>6} {fmt(r.get('val_bpb'), '.3f'):>8} {r['test_accuracy']:>9.4f} "
            f"{r['transformer_alone']:>12.4f} {fmt(r['ngram_alone'], '.4f'):>7} {fmt(r['ngram_weight'], 'g'):>7}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "created_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
                "params": str(args.params),
                "overrides": args.overrides,
                "tokens_per_step": tokens_per_step,
                "rows": rows,
            },
            indent=2,
        )
        + "\n",
        encoding="utf-8",
    )
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
