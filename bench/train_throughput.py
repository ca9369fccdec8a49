"""Training throughput of the language model: tokens/s, ms/step, MFU and peak memory, side by side
with karpathy/nanoGPT's unmodified ``model.py``.

Times full optimizer steps on random tokens — no data needed — after warm-up steps that are
excluded (allocator, cuDNN autotune, torch.compile), with the device synchronised around every
timed block. Runs eager and ``torch.compile`` variants, float32 and/or bf16 autocast.

Our step is ``pipeline_tasks.train.pretrain.train_step`` itself, on a ``RunContext`` built with the
same helpers as ``pretrain.setup_run`` (``build_lm``, ``configure_optimizer``, ``GradScaler``,
``autocast_context``) and compiled by ``pretrain.wrap_model``: forward under autocast, backward,
loss all-reduce (a no-op on one process) and its host sync, unscale + clip to 1.0 (``.item()`` of
the norm), optimizer step, ``zero_grad(set_to_none=True)``; the batch comes from the random-token
array through ``window_starts`` + ``windows_to_tensors`` as in a real run. A speed-up of the
training loop therefore shows up here without touching the bench.

The nanoGPT side (``--nanogpt PATH``: its ``model.py`` or a folder holding it; default
``build/nanogpt/model.py``, written from a local nanoGPT git repository with
``--nanogpt-from-git GITDIR``; skipped with a message when absent) loads that file with importlib,
builds ``GPT(GPTConfig(...))`` with the same config, ``model.configure_optimizers(weight_decay,
learning_rate, betas, device_type)`` and runs the body of nanoGPT ``train.py``'s loop: set the lr,
forward under the same autocast, fetch the next batch (``get_batch``: ``torch.randint`` windows,
pinned + non-blocking on CUDA) before ``scaler.scale(loss).backward()``, unscale + clip 1.0,
``scaler.step``/``update``, ``zero_grad(set_to_none=True)``. Both sides read the same random-token
array, use the same lr / weight decay / betas, micro-batch, thread count and autocast (nanoGPT's
train.py never autocasts on CPU; here both sides use ours so that the dtype matches), and start from
the same weights (nanoGPT's initialisation, loaded into ours). Before timing, the bench checks once
that both models give the same initial fp32 loss (to 1e-3) on the same batch with nanoGPT's weights
in ours: the same model is compared.

Timing is interleaved — rounds of ``--steps`` steps: ours, nanoGPT, ours, nanoGPT … (``--rounds``,
default 3) — so host noise hits both sides alike; the table shows per-side medians over rounds and
the ratio of tokens/s ours / nanoGPT for every (micro-batch, dtype, compile) combination.

MFU = tokens/s x FLOPs per token / peak, with FLOPs per token = 6·N + 12·L·H·Q·T
(``pipeline_tasks.train.model.flops_per_token``: N = matmul weights incl. the tied output
projection, L layers, H heads, Q head dim, T context; PaLM appendix B, nanoGPT ``estimate_mfu``)
and peak = 989 TFLOP/s (H100/H200 SXM dense bf16), reported on CUDA only. Peak memory is measured
per side while both models (and optimizer states) are resident.

Presets: ``params`` (the ``model`` section of --params, vocab from the tokenizer meta when
present, else ``tokenize.vocab_size``; micro-batch from ``pretrain``), ``30m`` (6L/6H/384, ctx 512,
micro-batch 64, vocab 8192), ``gpt2-124m`` (12L/12H/768, ctx 1024, vocab 50304, micro-batch 16).

Only torch and numpy are needed (PyYAML too for ``--preset params``), so it runs on a bare GPU box::

    python bench/train_throughput.py --nanogpt-from-git ../nanoGPT   # once: writes build/nanogpt/model.py
    python bench/train_throughput.py                                # params preset vs nanoGPT, this device
    python bench/train_throughput.py --compile both --dtype both --rounds 5
    python bench/train_throughput.py --preset gpt2-124m --micro-batch 8 16 32
    python bench/train_throughput.py --preset 30m --compile both --steps 30 --nanogpt none

Prints a table and writes JSON to ``bench/results/train_throughput_vs_nanogpt_<device>.json``
(``..._vs_nanogpt_<preset>_<device>.json`` for the other presets), or, without nanoGPT, to
``bench/results/train_throughput_<preset>_<device>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import importlib.util
import json
import platform
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# after the sys.path tweak for a bare checkout
from pipeline_tasks.dataset.shards import window_starts, windows_to_tensors  # noqa: E402
from pipeline_tasks.train.model import (  # noqa: E402
    H100_BF16_PEAK_FLOPS,
    ModelConfig,
    ModelParams,
    build_lm,
    flops_per_token,
    num_parameters,
)
from pipeline_tasks.train.params import PretrainParams  # noqa: E402
from pipeline_tasks.train.pretrain import RunContext, train_step, wrap_model  # noqa: E402
from pipeline_tasks.train.training import (  # noqa: E402
    DistInfo,
    autocast_context,
    autocast_dtype,
    configure_optimizer,
    seed_everything,
)

PRESETS = {
    "30m": (dict(arch="gpt", n_layer=6, n_head=6, n_embd=384, block_size=512, vocab_size=8192), 64),
    "gpt2-124m": (dict(arch="gpt", n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304), 16),
}
NANOGPT_DEFAULT = ROOT / "build" / "nanogpt" / "model.py"
NANOGPT_SOURCE_SUFFIX = ".source.json"  # build/nanogpt/model.py.source.json: where the file came from
# nanoGPT keeps a causal-mask buffer named ``bias`` only on torch < 2.0 (no SDPA); ours never has one
NANOGPT_ONLY_BUFFERS = (".attn.bias",)
# nanoGPT state_dict name -> ours: identical today (checked at run time; a rename goes here)
NANOGPT_TO_OURS: dict[str, str] = {}
SAME_LOSS_TOL = 1e-3
SEED = 0
_OPT_FIELDS = ("lr", "weight_decay", "beta1", "beta2", "grad_clip")  # recorded in the JSON
DATA_TOKENS = 1 << 21  # random-token "shard" both sides sample windows from (4 MB as uint16)


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


# ---------------------------------------------------------------------------------------------
# nanoGPT's model.py: export from a local git repository, load with importlib
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class NanoGPT:
    module: types.ModuleType
    path: Path
    sha256: str
    git_blob: str  # `git hash-object model.py`: compare with `git ls-tree <commit> model.py` of nanoGPT
    source: dict[str, Any]  # {"repo", "commit", "path"} when written by export_nanogpt

    def describe(self) -> dict[str, Any]:
        return {"path": str(self.path), "sha256": self.sha256, "git_blob_sha1": self.git_blob, **self.source}


def export_nanogpt(git_dir: Path, dest: Path = NANOGPT_DEFAULT, rev: str = "HEAD") -> Path:
    """Write nanoGPT's ``model.py`` at ``rev`` from a local git repository (bare or not) to ``dest``,
    with ``dest.source.json`` recording the commit. Reads only the local repository."""

    def git(*args: str) -> bytes:
        return subprocess.run(["git", "--git-dir", str(git_dir), *args], check=True, capture_output=True).stdout

    git_dir = Path(git_dir)
    if (git_dir / ".git").exists():
        git_dir = git_dir / ".git"
    commit = git("rev-parse", f"{rev}^{{commit}}").decode().strip()
    text = git("show", f"{commit}:model.py")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(text)
    source = {"repo": "karpathy/nanoGPT", "commit": commit, "file": "model.py", "git_dir": str(git_dir)}
    Path(str(dest) + NANOGPT_SOURCE_SUFFIX).write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")
    return dest


def resolve_nanogpt(arg: str | None) -> tuple[Path | None, str]:
    """``--nanogpt`` -> (model.py path or None, why not)."""
    if arg is not None and arg.lower() == "none":
        return None, "--nanogpt none"
    path = Path(arg) if arg else NANOGPT_DEFAULT
    if path.is_dir():
        path = path / "model.py"
    if path.is_file():
        return path, ""
    hint = "" if arg else " (write it with --nanogpt-from-git <nanoGPT git repo>, or pass --nanogpt PATH)"
    return None, f"nanoGPT model.py not found at {path}{hint}"


def load_nanogpt(path: Path) -> NanoGPT:
    """Import nanoGPT's model.py from ``path`` under a unique module name (no sys.path change)."""
    path = Path(path).resolve()
    data = path.read_bytes()
    sha256 = hashlib.sha256(data).hexdigest()
    name = f"_bench_nanogpt_model_{sha256[:16]}"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # @dataclass resolves its module through sys.modules
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    for attr in ("GPT", "GPTConfig"):
        if not hasattr(module, attr):
            raise SystemExit(f"{path} has no {attr}: is it nanoGPT's model.py?")
    git_blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    source_file = Path(str(path) + NANOGPT_SOURCE_SUFFIX)
    source = json.loads(source_file.read_text(encoding="utf-8")) if source_file.is_file() else {"commit": None}
    return NanoGPT(module=module, path=path, sha256=sha256, git_blob=git_blob, source=source)


def nanogpt_config(nano: NanoGPT, config: ModelConfig):
    return nano.module.GPTConfig(
        block_size=config.block_size,
        vocab_size=config.vocab_size,
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_embd=config.n_embd,
        dropout=config.dropout,
        bias=config.bias,
    )


def nanogpt_state_for_ours(nano_state: dict[str, torch.Tensor], ours: torch.nn.Module) -> dict[str, torch.Tensor]:
    """nanoGPT's state_dict under our names; fails unless names and shapes match one to one."""
    mapped = {NANOGPT_TO_OURS.get(k, k): v for k, v in nano_state.items() if not k.endswith(NANOGPT_ONLY_BUFFERS)}
    target = ours.state_dict()
    missing, unexpected = sorted(set(target) - set(mapped)), sorted(set(mapped) - set(target))
    shapes = [k for k in mapped.keys() & target.keys() if mapped[k].shape != target[k].shape]
    if missing or unexpected or shapes:
        raise RuntimeError(
            f"nanoGPT and our state_dict differ: missing {missing}, unexpected {unexpected}, shapes {shapes}; "
            "extend NANOGPT_TO_OURS"
        )
    return mapped


# ---------------------------------------------------------------------------------------------
# The two sides
# ---------------------------------------------------------------------------------------------


def random_tokens(vocab_size: int, n_tokens: int = DATA_TOKENS, seed: int = SEED) -> np.ndarray:
    """The shard both sides sample from (uint16 as tokenize writes it, uint32 past 65,535 ids)."""
    dtype = np.uint16 if vocab_size <= 1 << 16 else np.uint32
    return np.random.default_rng(seed).integers(0, vocab_size, size=n_tokens).astype(dtype)


def train_params(config: ModelConfig, micro_batch: int, dtype: torch.dtype, compile_model: bool) -> PretrainParams:
    """``pretrain`` params of a one-micro-batch step (lr, decay, betas, clip 1.0: the defaults)."""
    return PretrainParams(
        micro_batch_size=micro_batch,
        tokens_per_step=micro_batch * config.block_size,
        dtype=str(dtype).replace("torch.", ""),
        compile=compile_model,
        grad_clip=1.0,
    )


def our_context(
    config: ModelConfig,
    micro_batch: int,
    device: torch.device,
    dtype: torch.dtype,
    compile_model: bool,
    data: np.ndarray,
    init_state: dict[str, torch.Tensor] | None = None,
) -> RunContext:
    """A RunContext as ``pretrain.setup_run`` + ``resume`` + ``wrap_model`` build it, on ``data``."""
    cfg = train_params(config, micro_batch, dtype, compile_model)
    params = types.SimpleNamespace(pretrain=cfg, seed=SEED)
    info = DistInfo()
    seed_everything(SEED)
    model = build_lm(config).to(device)
    optimizer = configure_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), device)
    scaler = torch.amp.GradScaler("cuda", enabled=(dtype == torch.float16))
    torch.manual_seed(SEED + info.rank)
    if init_state is not None:  # like resume(): weights loaded after the optimizer is built
        model.load_state_dict(init_state)
    ctx = RunContext(
        params=params,
        info=info,
        device=device,
        dtype=dtype,
        autocast=autocast_context(device, dtype),
        threads=torch.get_num_threads(),
        config=config,
        meta={"vocab_size": config.vocab_size},
        train_data=data,
        val_data=data[:0],
        val_starts=np.zeros(0, dtype=np.int64),
        accum=1,  # one micro-batch per optimizer step: the bench's unit
        model=model,
        optimizer=optimizer,
        scaler=scaler,
        ckpt=None,
        fingerprint="bench",
        n_params=num_parameters(model),
    )
    wrap_model(ctx)
    ctx.model.train()
    return ctx


def our_step(ctx: RunContext, step: int) -> None:
    """One optimizer step exactly as pretrain's loop does it (constant lr: no schedule)."""
    train_step(ctx, step, ctx.cfg.lr, [], None)


class NanoGPTSide:
    """nanoGPT: its model and ``configure_optimizers``, and the body of train.py's training loop."""

    def __init__(
        self,
        nano: NanoGPT,
        config: ModelConfig,
        micro_batch: int,
        device: torch.device,
        dtype: torch.dtype,
        compile_model: bool,
        data: np.ndarray,
    ):
        cfg = train_params(config, micro_batch, dtype, compile_model)
        self.device, self.data, self.batch_size, self.block_size = device, data, micro_batch, config.block_size
        self.learning_rate, self.grad_clip, self.gradient_accumulation_steps = cfg.lr, cfg.grad_clip, 1
        torch.manual_seed(SEED)
        model = nano.module.GPT(nanogpt_config(nano, config))
        model.to(device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=(dtype == torch.float16))
        self.optimizer = model.configure_optimizers(cfg.weight_decay, cfg.lr, (cfg.beta1, cfg.beta2), device.type)
        self.raw_model = model
        self.n_params = num_parameters(model)
        self.model = torch.compile(model) if compile_model else model
        self.model.train()
        self.ctx = autocast_context(device, dtype)
        self.X, self.Y = self.get_batch()  # fetch the very first batch

    def get_batch(self):
        data, block_size, batch_size, device = self.data, self.block_size, self.batch_size, self.device
        ix = torch.randint(len(data) - block_size, (batch_size,))
        x = torch.stack([torch.from_numpy((data[i : i + block_size]).astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy((data[i + 1 : i + 1 + block_size]).astype(np.int64)) for i in ix])
        if device.type == "cuda":
            x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        else:
            x, y = x.to(device), y.to(device)
        return x, y

    def step(self, step: int) -> None:
        lr = self.learning_rate
        for param_group in self.optimizer.param_groups:
            param_group["lr"] = lr
        for _micro_step in range(self.gradient_accumulation_steps):
            with self.ctx:
                logits, loss = self.model(self.X, self.Y)
                loss = loss / self.gradient_accumulation_steps
            self.X, self.Y = self.get_batch()  # async prefetch while the GPU runs the forward
            self.scaler.scale(loss).backward()
        if self.grad_clip != 0.0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------------
# Same-model check and the interleaved measurement
# ---------------------------------------------------------------------------------------------


def check_same_model(nano: NanoGPT, config: ModelConfig, micro_batch: int, device: torch.device) -> dict:
    """Ours loaded with nanoGPT's initial weights: same fp32 loss on the same batch (to 1e-3)?"""
    torch.manual_seed(SEED)
    theirs = nano.module.GPT(nanogpt_config(nano, config)).to(device).eval()
    ours = build_lm(config).to(device).eval()
    state = nanogpt_state_for_ours(theirs.state_dict(), ours)
    ours.load_state_dict(state)
    data = random_tokens(config.vocab_size, n_tokens=max(4 * micro_batch * (config.block_size + 1), 4096))
    starts = window_starts(len(data), config.block_size, micro_batch, seed=SEED, step=0, micro_batch=0)
    x, y = windows_to_tensors(data, starts, config.block_size, device)
    with torch.no_grad():
        logits_theirs, _ = theirs(x, y)
        logits_ours, _ = ours(x)  # our training forward returns no logits (ChunkedLMLoss)
    # the training path: loss and every gradient of one backward, as the timed steps compute them
    _, loss_theirs = theirs(x, y)
    loss_theirs.backward()
    _, loss_ours = ours(x, y)
    loss_ours.backward()
    grads_theirs = dict(theirs.named_parameters())
    grad_diff = max(
        ((p.grad - grads_theirs[name].grad).abs().max() / grads_theirs[name].grad.abs().max().clamp(min=1e-12)).item()
        for name, p in ours.named_parameters()
    )
    diff = abs(loss_ours.item() - loss_theirs.item())
    return {
        "dtype": "float32",
        "micro_batch": micro_batch,
        "state_dict_tensors": len(state),
        "key_mapping": "identity" if not NANOGPT_TO_OURS else NANOGPT_TO_OURS,
        "params_ours": num_parameters(ours),
        "params_nanogpt": num_parameters(theirs),
        "loss_ours": round(loss_ours.item(), 6),
        "loss_nanogpt": round(loss_theirs.item(), 6),
        "abs_diff": diff,
        "max_abs_logit_diff": (logits_ours - logits_theirs).abs().max().item(),
        "max_rel_grad_diff": grad_diff,
        "tol": SAME_LOSS_TOL,
        "passed": bool(
            diff <= SAME_LOSS_TOL and grad_diff <= SAME_LOSS_TOL and num_parameters(ours) == num_parameters(theirs)
        ),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step, first: int, n: int, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    for i in range(first, first + n):
        step(i)
    _sync(device)
    return time.perf_counter() - t0


def compare(
    config: ModelConfig,
    micro_batch: int,
    device: torch.device,
    dtype: torch.dtype,
    compile_model: bool,
    steps: int,
    warmup: int,
    rounds: int,
    nano: NanoGPT | None,
) -> dict:
    """Warm up both sides, then ``rounds`` x (``steps`` of ours, ``steps`` of nanoGPT): one row."""
    data = random_tokens(config.vocab_size)
    sides: dict[str, Any] = {}
    init_state = None
    if nano is not None:
        nano_side = NanoGPTSide(nano, config, micro_batch, device, dtype, compile_model, data)
        init_state = nanogpt_state_for_ours(nano_side.raw_model.state_dict(), build_lm(config))
    ctx = our_context(config, micro_batch, device, dtype, compile_model, data, init_state)
    sides["ours"] = (lambda i: our_step(ctx, i), ctx.n_params)
    if nano is not None:
        sides["nanogpt"] = (nano_side.step, nano_side.n_params)

    counters = dict.fromkeys(sides, 0)
    stats = {name: {"round_s": [], "peak_mem": 0} for name in sides}
    for name, (step, _) in sides.items():  # warm-up (compile included) outside the timed rounds
        stats[name]["warmup_s"] = _timed(step, 0, warmup, device)
        counters[name] = warmup
    for _ in range(rounds):
        for name, (step, _) in sides.items():  # ours, nanoGPT, ours, nanoGPT, ...
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            stats[name]["round_s"].append(_timed(step, counters[name], steps, device))
            counters[name] += steps
            if device.type == "cuda":
                stats[name]["peak_mem"] = max(stats[name]["peak_mem"], torch.cuda.max_memory_allocated(device))

    tokens_per_step = micro_batch * config.block_size
    row: dict[str, Any] = {
        "arch": config.arch,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_embd": config.n_embd,
        "block_size": config.block_size,
        "vocab_size": config.vocab_size,
        "micro_batch": micro_batch,
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "compile": compile_model,
        "flops_per_token": flops_per_token(config),
    }
    for name, (_, n_params) in sides.items():
        s = stats[name]
        median_s = statistics.median(s["round_s"]) / steps
        tokens_per_s = tokens_per_step / median_s
        side = {
            "params_m": round(n_params / 1e6, 2),
            "ms_per_step": round(1000 * median_s, 2),
            "tokens_per_s": round(tokens_per_s, 1),
            "round_ms_per_step": [round(1000 * t / steps, 2) for t in s["round_s"]],
            "warmup_s": round(s["warmup_s"], 2),
        }
        if device.type == "cuda":
            side["mfu"] = round(tokens_per_s * flops_per_token(config) / H100_BF16_PEAK_FLOPS, 4)
            side["peak_mem_gb"] = round(s["peak_mem"] / 1e9, 2)
        row[name] = side
    if "nanogpt" in row:
        row["ratio_tokens_per_s_ours_over_nanogpt"] = round(
            row["ours"]["tokens_per_s"] / row["nanogpt"]["tokens_per_s"], 3
        )
    return row


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def _print_table(rows: list[dict]) -> None:
    header = (
        f"{'micro_batch':>11} {'dtype':>8} {'compile':>7} {'side':>8} {'ms/step':>9} {'tokens/s':>12} "
        f"{'mfu':>6} {'peak GB':>8} {'ours/nanoGPT':>12}"
    )
    print(header + "\n" + "-" * len(header))
    for r in rows:
        lead = f"{r['micro_batch']:>11} {r.get('dtype', '-'):>8} {str(r['compile']):>7}"
        if "error" in r:
            print(f"{lead}  {r['error']}")
            continue
        for name in ("ours", "nanogpt"):
            if name not in r:
                continue
            s = r[name]
            mfu = f"{100 * s['mfu']:.1f}%" if "mfu" in s else "-"
            ratio = r.get("ratio_tokens_per_s_ours_over_nanogpt") if name == "nanogpt" else None
            print(
                f"{lead} {name:>8} {s['ms_per_step']:>9.1f} {s['tokens_per_s']:>12,.0f} {mfu:>6} "
                f"{s.get('peak_mem_gb', '-'):>8} {f'{ratio:.3f}x' if ratio else '':>12}"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=["params", *PRESETS], default="params")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml", help="for --preset params")
    parser.add_argument("--arch", choices=["gpt", "lstm"], default=None, help="override the preset's arch")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16", "both"],
        default="auto",
        help="autocast dtype of both sides; both = float32 and bfloat16",
    )
    parser.add_argument("--micro-batch", type=int, nargs="+", default=None, help="one or more (a sweep)")
    parser.add_argument(
        "--compile",
        choices=["auto", "off", "on", "both"],
        default="auto",
        help="auto: both on CUDA, off on CPU (inductor's CPU compile takes minutes on 2 cores)",
    )
    parser.add_argument("--steps", type=int, default=None, help="timed steps per round (default 20 CUDA, 5 CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per side (default 5 CUDA, 2 CPU)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per side (median reported)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    parser.add_argument(
        "--nanogpt",
        default=None,
        help=f"nanoGPT's model.py or its folder (default {NANOGPT_DEFAULT.relative_to(ROOT)} if present; none: skip)",
    )
    parser.add_argument(
        "--nanogpt-from-git",
        type=Path,
        default=None,
        metavar="GITDIR",
        help=f"first write {NANOGPT_DEFAULT.relative_to(ROOT)} from this local nanoGPT git repo (HEAD)",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1 or args.rounds < 1:
        parser.error("--steps and --rounds must be >= 1")

    if args.nanogpt_from_git:
        written = export_nanogpt(args.nanogpt_from_git)
        print(f"wrote {written} from {args.nanogpt_from_git}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(
        "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    )
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls outside autocast (pretrain: tf32=True)
    dtypes = [torch.float32, torch.bfloat16] if args.dtype == "both" else [autocast_dtype(device, args.dtype)]
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
    warmup = args.warmup if args.warmup is not None else (5 if device.type == "cuda" else 2)
    micro_batches = args.micro_batch or [default_mb]

    nano_path, why_not = resolve_nanogpt(args.nanogpt)
    if nano_path is not None and config.arch != "gpt":
        nano_path, why_not = None, f"nanoGPT has no {config.arch} model"
    nano = load_nanogpt(nano_path) if nano_path else None
    same_model = None
    if nano is None:
        print(f"nanoGPT side skipped: {why_not}")
    else:
        print(f"nanoGPT: {nano.path} (commit {nano.source.get('commit') or 'unknown'}, sha256 {nano.sha256[:16]}…)")
        same_model = check_same_model(nano, config, micro_batches[0], device)
        print(
            f"same-model check: initial fp32 loss ours {same_model['loss_ours']:.6f} vs nanoGPT "
            f"{same_model['loss_nanogpt']:.6f} (|diff| {same_model['abs_diff']:.2e}, max |logit diff| "
            f"{same_model['max_abs_logit_diff']:.2e}, max relative gradient diff "
            f"{same_model['max_rel_grad_diff']:.2e}, tol {SAME_LOSS_TOL}, {same_model['state_dict_tensors']} "
            f"tensors mapped by name {same_model['key_mapping']}): {'PASSED' if same_model['passed'] else 'FAILED'}"
        )

    rows = []
    for micro_batch in micro_batches:
        for dtype in dtypes:
            for compile_model in compile_modes:
                key = {"micro_batch": micro_batch, "dtype": str(dtype).replace("torch.", ""), "compile": compile_model}
                try:
                    rows.append(
                        compare(config, micro_batch, device, dtype, compile_model, steps, warmup, args.rounds, nano)
                    )
                except torch.cuda.OutOfMemoryError:
                    rows.append({**key, "error": "CUDA out of memory"})
                    torch.cuda.empty_cache()
                except Exception as exc:  # e.g. no C++ compiler for inductor: report, keep the other rows
                    rows.append({**key, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"})

    print(
        f"\ntrain throughput: preset {args.preset}, {config.arch} {config.n_layer}L/{config.n_head}H/"
        f"{config.n_embd}, ctx {config.block_size}, vocab {config.vocab_size}, bias {config.bias}, "
        f"dropout {config.dropout}, {device}, {torch.get_num_threads()} CPU threads, median of {args.rounds} "
        f"interleaved rounds x {steps} timed steps (+{warmup} warm-up) per side"
    )
    _print_table(rows)
    if same_model is not None:
        print(
            f"same-model check (initial fp32 loss, tol {SAME_LOSS_TOL}): {'PASSED' if same_model['passed'] else 'FAILED'}"
        )

    result = {
        "bench": "train_throughput_vs_nanogpt" if nano else "train_throughput",
        "preset": args.preset,
        "created_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu_threads": torch.get_num_threads(),
        "steps_per_round": steps,
        "rounds": args.rounds,
        "warmup": warmup,
        "timing": "per side: median over interleaved rounds (ours, nanoGPT, ours, ...) of ms/step",
        "our_step": "pipeline_tasks.train.pretrain.train_step on a RunContext built like setup_run + wrap_model",
        "nanogpt_step": "nanoGPT train.py loop body: lr, forward, get_batch prefetch, backward, unscale+clip 1.0, "
        "scaler.step/update, zero_grad(set_to_none=True); optimizer from model.configure_optimizers",
        "optimizer": {k: getattr(train_params(config, 1, torch.float32, False), k) for k in _OPT_FIELDS},
        "nanogpt": nano.describe() if nano else None,
        "nanogpt_skipped": None if nano else why_not,
        "same_model_check": same_model,
        "flops_formula": "6*N + 12*L*H*Q*T per token; N = matmul weights incl. tied lm_head",
        "peak_flops": H100_BF16_PEAK_FLOPS if device.type == "cuda" else None,
        "peak_mem_note": "max allocated during a side's timed rounds, with both models and optimizers resident",
        "model_config": config.to_dict(),
        "rows": rows,
    }
    suffix = f"{args.preset}_{device.type}" if args.preset != "params" else device.type
    default_out = (
        f"train_throughput_vs_nanogpt_{suffix}.json" if nano else f"train_throughput_{args.preset}_{device.type}.json"
    )
    out = args.out or ROOT / "bench" / "results" / default_out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {out}")
    ok = any("error" not in r for r in rows) and (same_model is None or same_model["passed"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
