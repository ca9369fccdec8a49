"""Training throughput of the language model: tokens/s, ms/step, MFU and peak memory.

Times full optimizer steps (forward + backward + fused AdamW) on random tokens — no data
needed — after warm-up steps that are excluded (allocator, cuDNN autotune, torch.compile), with
the device synchronised around the timed region. Runs eager and ``torch.compile`` variants.

MFU = tokens/s x FLOPs per token / peak, with FLOPs per token = 6·N + 12·L·H·Q·T
(``pipeline_tasks.train.model.flops_per_token``: N = matmul weights incl. the tied output
projection, L layers, H heads, Q head dim, T context; PaLM appendix B, nanoGPT ``estimate_mfu``)
and peak = 989 TFLOP/s (H100/H200 SXM dense bf16), reported on CUDA only.

Presets: ``params`` (the ``model`` section of --params, vocab from the tokenizer meta when
present, else ``tokenize.vocab_size``; micro-batch from ``pretrain``), ``30m`` (6L/6H/384, ctx 512,
micro-batch 64, vocab 8192), ``gpt2-124m`` (12L/12H/768, ctx 1024, vocab 50304, micro-batch 16).

Only torch and numpy are needed (PyYAML too for ``--preset params``), so it runs on a bare GPU box::

    python bench/train_throughput.py                                # params preset, this device
    python bench/train_throughput.py --preset gpt2-124m --micro-batch 8 16 32
    python bench/train_throughput.py --preset 30m --compile both --steps 30

Prints a table and writes JSON to ``bench/results/train_throughput_<preset>_<device>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline_tasks.train.model import (  # noqa: E402  (after the sys.path tweak for a bare checkout)
    H100_BF16_PEAK_FLOPS,
    ModelConfig,
    ModelParams,
    build_lm,
    flops_per_token,
    num_parameters,
)
from pipeline_tasks.train.training import autocast_context, autocast_dtype, configure_optimizer  # noqa: E402

PRESETS = {
    "30m": (dict(arch="gpt", n_layer=6, n_head=6, n_embd=384, block_size=512, vocab_size=8192), 64),
    "gpt2-124m": (dict(arch="gpt", n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304), 16),
}


def params_preset(params_path: Path) -> tuple[ModelConfig, int]:
    """The configured model: params.yaml's model section (read directly: no other section imported)."""
    try:
        import yaml
    except ImportError:  # a bare GPU box with only torch + numpy
        raise SystemExit("PyYAML is not installed: pip install pyyaml, or use --preset 30m / gpt2-124m") from None
    raw = yaml.safe_load(params_path.read_text(encoding="utf-8")) or {}
    model = ModelParams(**raw.get("model", {}))
    vocab = int(raw.get("tokenize", {}).get("vocab_size", 8192))
    meta = ROOT / raw.get("paths", {}).get("tokens_dir", "data/tokens") / "meta.json"
    if meta.is_file():
        vocab = json.loads(meta.read_text(encoding="utf-8"))["vocab_size"]
    micro_batch = int(raw.get("pretrain", {}).get("micro_batch_size", 16))
    return ModelConfig.from_params(model, vocab), micro_batch


def measure(
    config: ModelConfig,
    micro_batch: int,
    device: torch.device,
    dtype: torch.dtype,
    compile_model: bool,
    steps: int,
    warmup: int,
) -> dict:
    torch.manual_seed(0)
    model = build_lm(config).to(device)
    optimizer = configure_optimizer(model, 3e-4, 0.1, (0.9, 0.95), device)
    n_params = num_parameters(model)
    if compile_model:
        model = torch.compile(model)
    autocast = autocast_context(device, dtype)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, config.vocab_size, (micro_batch, config.block_size + 1), generator=g) for _ in range(4)]

    def step(i: int) -> None:
        batch = batches[i % len(batches)].to(device, non_blocking=True)
        with autocast:
            _, loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for i in range(warmup):
        step(i)
    sync()
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    sync()
    elapsed = time.perf_counter() - t0
    tokens_per_s = steps * micro_batch * config.block_size / elapsed
    row = {
        "arch": config.arch,
        "params_m": round(n_params / 1e6, 2),
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_embd": config.n_embd,
        "block_size": config.block_size,
        "vocab_size": config.vocab_size,
        "micro_batch": micro_batch,
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "compile": compile_model,
        "ms_per_step": round(1000 * elapsed / steps, 2),
        "tokens_per_s": round(tokens_per_s, 1),
        "warmup_s": round(warmup_s, 2),
        "flops_per_token": flops_per_token(config),
    }
    if device.type == "cuda":
        row["mfu"] = round(tokens_per_s * flops_per_token(config) / H100_BF16_PEAK_FLOPS, 4)
        row["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=["params", *PRESETS], default="params")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml", help="for --preset params")
    parser.add_argument("--arch", choices=["gpt", "lstm"], default=None, help="override the preset's arch")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    parser.add_argument("--micro-batch", type=int, nargs="+", default=None, help="one or more (a sweep)")
    parser.add_argument(
        "--compile",
        choices=["auto", "off", "on", "both"],
        default="auto",
        help="auto: both on CUDA, off on CPU (inductor's CPU compile takes minutes on 2 cores)",
    )
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20 CUDA, 5 CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default 5 CUDA, 2 CPU)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(
        "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    )
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls outside autocast
    dtype = autocast_dtype(device, args.dtype)
    if args.preset == "params":
        config, default_mb = params_preset(args.params)
    else:
        fields, default_mb = PRESETS[args.preset]
        config = ModelConfig(**fields)
    if args.arch:
        config = dataclasses.replace(config, arch=args.arch)
    compile_modes = {
        "off": [False],
        "on": [True],
        "both": [False, True],
        "auto": [False, True] if device.type == "cuda" else [False],
    }[args.compile]
    steps = args.steps or (20 if device.type == "cuda" else 5)
    warmup = args.warmup or (5 if device.type == "cuda" else 2)

    rows = []
    for micro_batch in args.micro_batch or [default_mb]:
        for compile_model in compile_modes:
            try:
                rows.append(measure(config, micro_batch, device, dtype, compile_model, steps, warmup))
            except torch.cuda.OutOfMemoryError:
                rows.append({"micro_batch": micro_batch, "compile": compile_model, "error": "CUDA out of memory"})
                torch.cuda.empty_cache()
            except Exception as exc:  # e.g. no C++ compiler for inductor: report, keep the other rows
                rows.append(
                    {
                        "micro_batch": micro_batch,
                        "compile": compile_model,
                        "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
                    }
                )

    print(
        f"\ntrain throughput: preset {args.preset}, {config.arch} {config.n_layer}L/{config.n_head}H/"
        f"{config.n_embd}, ctx {config.block_size}, vocab {config.vocab_size}, {device} "
        f"{str(dtype).replace('torch.', '')}, {torch.get_num_threads()} CPU threads, {steps} timed steps"
    )
    header = f"{'micro_batch':>11} {'compile':>7} {'ms/step':>9} {'tokens/s':>12} {'mfu':>6} {'peak GB':>8}"
    print(header + "\n" + "-" * len(header))
    for r in rows:
        if "error" in r:
            print(f"{r['micro_batch']:>11} {str(r['compile']):>7}  {r['error']}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
        print(
            f"{r['micro_batch']:>11} {str(r['compile']):>7} {r['ms_per_step']:>9.1f} {r['tokens_per_s']:>12,.0f} "
            f"{mfu:>6} {r.get('peak_mem_gb', '-'):>8}"
        )

    result = {
        "bench": "train_throughput",
        "preset": args.preset,
        "created_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu_threads": torch.get_num_threads(),
        "steps": steps,
        "warmup": warmup,
        "flops_formula": "6*N + 12*L*H*Q*T per token; N = matmul weights incl. tied lm_head",
        "peak_flops": H100_BF16_PEAK_FLOPS if device.type == "cuda" else None,
        "model_config": config.to_dict(),
        "rows": rows,
    }
    out = args.out or ROOT / "bench" / "results" / f"train_throughput_{args.preset}_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {out}")
    return 0 if any("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
