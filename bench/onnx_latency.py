"""Serving benchmark: PyTorch eager vs ONNX Runtime fp32 / int8 dynamic / int8 static (/ fp16 on CUDA).

One run, one model, the same real inputs for every engine: the fine-tuned classifier of
``paths.finetune_dir/model.pt`` in PyTorch eager mode and the ONNX variants of
``paths.bundle_dir`` (written by ``lmpipe export``), fed with the bundle's own tokenization of
the test split (``prepared_dir/test.parquet``):

* latency p50 / p95 at batch 1 (one request at a time, real lengths, cycling through texts);
* throughput at batch 32 (rows/s);
* size on disk (``model.pt`` for PyTorch, the ``.onnx`` file for each variant);
* accuracy on the test split (all labelled rows, or ``--max-rows``).

Thread counts are pinned (``--threads``, default 1, for both torch and ORT) so the comparison is
engine against engine, not scheduler noise. The table ends with the ratios we care about and
whether each target is met: int8 >= 3x faster than torch eager and >= 1.5x faster than ONNX
fp32 at batch 1, int8 size <= 0.3x fp32, accuracy drop <= 0.5 point.

Inputs: the outputs of ``make run`` (``dvc repro``). If the bundle, the checkpoint or the test
split is missing, the script runs ``dvc repro export`` first (the real pipeline up to export:
several minutes on a laptop CPU); ``--no-build`` makes it exit instead.

GPU (``--device cuda``): torch eager fp32 and fp16 (autocast) on CUDA against the ORT CUDA
execution provider with the fp32 and fp16 graphs; a session that silently falls back to CPU is
an error. Both sides include the host<->device copies of inputs and logits.

    python bench/onnx_latency.py                       # CPU, 1 thread
    python bench/onnx_latency.py --threads 2 --runs 500
    python bench/onnx_latency.py --device cuda

Prints a table and writes ``bench/results/onnx_latency[_cuda].json``.
"""

from __future__ import annotations

import argparse
import contextlib
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

TARGETS = {"int8_vs_torch_b1": 3.0, "int8_vs_onnx_fp32_b1": 1.5, "int8_size_ratio": 0.3, "int8_accuracy_drop_pts": 0.5}


def ensure_inputs(params, build: bool) -> None:
    paths = params.paths
    needed = [
        Path(paths.bundle_dir) / "manifest.json",
        Path(paths.finetune_dir) / "model.pt",
        Path(paths.prepared_dir) / "test.parquet",
    ]
    missing = [str(p) for p in needed if not p.is_file()]
    if not missing:
        return
    if not build:
        sys.exit(f"missing {missing}: run `make run` (or `dvc repro export`) first, or drop --no-build")
    print(f"missing {missing}: running `dvc repro export` (the pipeline up to the bundle)...", flush=True)
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "repro", "export"], cwd=ROOT, check=True)


def measure(name: str, fn, singles, batches, args) -> dict:
    from pipeline_tasks.ship.onnx_tools import latency_stats, throughput

    lat = latency_stats(fn, singles, args.warmup, args.runs)
    rows = [int(b[0].shape[0]) for b in batches]
    tput = throughput(fn, batches, rows, max(2, args.warmup // 5), args.batch_runs)
    print(f"  {name:<16} p50 {lat['p50_ms']:8.3f} ms  p95 {lat['p95_ms']:8.3f} ms  {tput:10.1f} rows/s", flush=True)
    return {
        "latency_p50_ms": lat["p50_ms"],
        "latency_p95_ms": lat["p95_ms"],
        "latency_mean_ms": lat["mean_ms"],
        "throughput_rows_per_s": tput,
    }


def torch_runner(model, device: str, fp16: bool = False):
    import torch

    def run(feed):
        ids, mask = feed
        autocast = torch.autocast(device_type=device, dtype=torch.float16) if fp16 else contextlib.nullcontext()
        with torch.inference_mode(), autocast:
            out = model(torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device))
        if device == "cuda":
            torch.cuda.synchronize()
        return out.float().cpu()  # includes the device->host copy, like ORT returning numpy

    return run


def ort_runner(session):
    def run(feed):
        return session.run(["logits"], {"input_ids": feed[0], "attention_mask": feed[1]})[0]

    return run


def accuracy(fn, encoded_batches, y) -> float:
    import numpy as np

    preds = np.concatenate([np.asarray(fn(b)).argmax(1) for b in encoded_batches])
    return float((preds == y).mean())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch and ORT intra-op threads")
    parser.add_argument("--runs", type=int, default=300, help="timed batch-1 requests per engine")
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batch-runs", type=int, default=30)
    parser.add_argument("--max-rows", type=int, default=0, help="test rows for accuracy (0 = all)")
    parser.add_argument("--no-build", action="store_true", help="exit instead of running `dvc repro export`")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    os.chdir(ROOT)
    from pipeline_tasks.config import load_params

    params = load_params(args.params)
    ensure_inputs(params, build=not args.no_build)

    import numpy as np
    import torch

    from pipeline_tasks.dataset.prepared import read_labelled_split
    from pipeline_tasks.ship.bundle import load_bundle, make_session
    from pipeline_tasks.train.model import load_classifier

    torch.set_num_threads(args.threads)
    paths = params.paths
    bundle = load_bundle(paths.bundle_dir, intra_op_threads=args.threads)
    model_pt = Path(paths.finetune_dir) / "model.pt"
    model, meta = load_classifier(model_pt)
    test = read_labelled_split(
        paths.prepared_dir, "test", labels=bundle.labels, kinds=("news",), max_rows=args.max_rows, seed=params.seed
    ).to_pandas()
    texts, y = test["text"].tolist(), test["label_idx"].to_numpy()
    singles = [bundle.encode([t]) for t in texts[:256]]
    batches = [bundle.encode(texts[i : i + args.batch]) for i in range(0, min(len(texts), 8 * args.batch), args.batch)]
    scoring = [bundle.encode(texts[i : i + 64]) for i in range(0, len(texts), 64)]
    print(
        f"{meta['model_config']['arch']} classifier, {len(texts)} test rows, threads={args.threads}, "
        f"device={args.device}",
        flush=True,
    )

    results: dict[str, dict] = {}
    engines = []
    if args.device == "cpu":
        engines.append(("torch_eager_fp32", torch_runner(model.to("cpu"), "cpu"), model_pt))
        for variant in ("fp32", "int8_dynamic", "int8_static"):
            session = make_session(bundle.variant_path(variant), "cpu", args.threads)
            engines.append((f"onnx_{variant}", ort_runner(session), bundle.variant_path(variant)))
    else:
        if not torch.cuda.is_available():
            sys.exit("--device cuda: torch sees no GPU")
        gpu_model = model.to("cuda")
        engines.append(("torch_eager_fp32", torch_runner(gpu_model, "cuda"), model_pt))
        engines.append(("torch_eager_fp16", torch_runner(gpu_model, "cuda", fp16=True), model_pt))
        for variant in ("fp32", "fp16"):
            session = make_session(bundle.variant_path(variant), "cuda", args.threads)  # raises on CPU fallback
            engines.append((f"onnx_cuda_{variant}", ort_runner(session), bundle.variant_path(variant)))
    for name, fn, path in engines:
        results[name] = {
            **measure(name, fn, singles, batches, args),
            "size_mb": Path(path).stat().st_size / 1e6,
            "accuracy": accuracy(fn, scoring, y),
        }

    rows = [("engine", "p50 ms b=1", "p95 ms b=1", "rows/s b=32", "size MB", "accuracy")]
    rows += [
        (
            n,
            f"{r['latency_p50_ms']:.3f}",
            f"{r['latency_p95_ms']:.3f}",
            f"{r['throughput_rows_per_s']:.1f}",
            f"{r['size_mb']:.2f}",
            f"{r['accuracy']:.4f}",
        )
        for n, r in results.items()
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print()
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))

    ratios, targets_met = {}, {}
    if args.device == "cpu":
        t, f, q = results["torch_eager_fp32"], results["onnx_fp32"], results["onnx_int8_dynamic"]
        ratios = {
            "int8_vs_torch_b1": t["latency_p50_ms"] / q["latency_p50_ms"],
            "int8_vs_onnx_fp32_b1": f["latency_p50_ms"] / q["latency_p50_ms"],
            "int8_vs_torch_b32_throughput": q["throughput_rows_per_s"] / t["throughput_rows_per_s"],
            "onnx_fp32_vs_torch_b1": t["latency_p50_ms"] / f["latency_p50_ms"],
            "int8_size_ratio": q["size_mb"] / f["size_mb"],
            "int8_accuracy_drop_pts": 100 * (f["accuracy"] - q["accuracy"]),
            "int8_static_accuracy_drop_pts": 100 * (f["accuracy"] - results["onnx_int8_static"]["accuracy"]),
        }
        targets_met = {k: (ratios[k] >= v if k.startswith("int8_vs") else ratios[k] <= v) for k, v in TARGETS.items()}
    else:
        t = results["torch_eager_fp32"]
        ratios = {
            f"{n}_vs_torch_fp32_b1": t["latency_p50_ms"] / r["latency_p50_ms"]
            for n, r in results.items()
            if n != "torch_eager_fp32"
        }
    print()
    for key, value in ratios.items():
        mark = "" if key not in targets_met else ("  target met" if targets_met[key] else "  TARGET MISSED")
        print(f"  {key:<32} {value:8.3f}{mark}")

    out = Path(args.out or ROOT / "bench" / "results" / f"onnx_latency{'_cuda' if args.device == 'cuda' else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    import onnxruntime

    payload = {
        "created_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": args.device,
        "threads": args.threads,
        "runs": args.runs,
        "batch": args.batch,
        "test_rows": len(texts),
        "model_config": meta["model_config"],
        "serving_variant": bundle.default_variant,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
        },
        "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "numpy": np.__version__},
        "results": results,
        "ratios": ratios,
        "targets": TARGETS,
        "targets_met": targets_met,
    }
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"\nwrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out} ({time.strftime('%H:%M:%S')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
