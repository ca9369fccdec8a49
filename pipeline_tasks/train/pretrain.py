"""Stage ``pretrain``: train the GPT / LSTM language model on the token shards.

Inputs: ``paths.tokens_dir/{train,val}.bin`` + ``meta.json`` (from ``tokenize``).
Outputs:

* ``paths.pretrain_dir/model.pt`` — ``{"model": state_dict, "model_config": dict, "step": int,
  "val": {...}, "special_tokens": {...}}`` with the weights of the best validation step;
* ``paths.pretrain_dir/checkpoints/run-<fingerprint>/step_XXXXXXX.pt`` (+ ``.sha256``) — kept
  across ``dvc repro`` runs (``persist: true``) so a retried or interrupted run resumes exactly.
  The fingerprint hashes everything that shapes the trajectory (model, optimisation params,
  seed, world size, data), so a changed experiment never resumes someone else's checkpoint;
* ``paths.pretrain_reports_dir/{metrics.json, loss.csv, tb/}`` — DVC metrics and plot,
  TensorBoard events.

One loop for both architectures, nanoGPT ``train.py`` style: random contiguous windows from the
memmap, gradient accumulation up to ``tokens_per_step``, AdamW with warm-up + cosine decay,
gradient clipping, periodic evaluation (loss, perplexity, bits per byte), early stopping, atomic
checkpoints. CPU by default; on CUDA bf16 autocast, TF32, fused AdamW and optional
``torch.compile``. Multi-process with ``torchrun`` (DDP; gloo on CPU, nccl on GPU)::

    python -m pipeline_tasks pretrain                         # params.yaml, CPU tiny default
    python -m pipeline_tasks pretrain --params params.gpu.yaml
    torchrun --standalone --nproc_per_node=8 -m pipeline_tasks pretrain --params params.gpu.yaml

Exact resume: the batches are a pure function of (seed, rank, step) (see
:mod:`pipeline_tasks.dataset.shards`) and each checkpoint holds weights, optimizer, RNG states of every
rank, counters and the loss history; with ``deterministic: true`` and fixed threads a run killed
at any point and resumed reproduces the uninterrupted run's losses bit for bit on CPU. SIGTERM
(Airflow / Kubernetes stopping a task) finishes the current step, writes a checkpoint and exits
with an error that says to re-run; SIGKILL loses at most ``checkpoint_interval`` steps.

Params sections ``model`` and ``pretrain`` (:class:`PretrainParams`), top-level ``seed``.
Only torch, numpy and PyYAML are needed (tensorboard optional).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Literal

from pipeline_tasks.errors import PipelineError

logger = logging.getLogger(__name__)

# Params that do not change the trajectory: a run may resume across changes of these.
RESUME_NEUTRAL = frozenset({"resume", "keep_last", "checkpoint_interval", "log_interval", "compile", "num_threads",
                            "device"})


@dataclasses.dataclass(frozen=True)
class PretrainParams:
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # autocast: bf16 on CUDA and native-bf16 CPUs
    compile: bool = False  # torch.compile the model (CUDA: ~1.3-2x faster after a compile warm-up)
    num_threads: int = 0  # CPU intra-op threads per process (0: cores / local processes)
    deterministic: bool = True  # deterministic kernels: bit-exact resume on CPU (slower on CUDA)
    max_steps: int = 300  # optimizer steps
    micro_batch_size: int = 16  # sequences per forward/backward
    tokens_per_step: int = 4096  # tokens per optimizer step over all ranks (gradient accumulation)
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global grad norm (0: off)
    eval_interval: int = 50  # optimizer steps between evaluations (and at the last step)
    eval_batches: int = 8  # micro-batches of fixed val windows per evaluation
    patience: int = 0  # stop after this many evaluations without improvement (0: never)
    min_delta: float = 0.0  # an improvement must lower val loss by more than this
    checkpoint_interval: int = 50  # optimizer steps between checkpoints (and at the end)
    keep_last: int = 2  # checkpoints kept per run
    resume: bool = True  # resume from the newest valid checkpoint of the same run
    log_interval: int = 10

    def __post_init__(self) -> None:
        positive = ("max_steps", "micro_batch_size", "tokens_per_step", "eval_interval", "eval_batches",
                    "checkpoint_interval", "keep_last", "log_interval")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.min_lr <= self.lr:
            raise ValueError(f"need 0 < min_lr <= lr, got min_lr={self.min_lr}, lr={self.lr}")
        if self.warmup_steps < 0 or self.patience < 0 or self.grad_clip < 0 or self.num_threads < 0:
            raise ValueError("warmup_steps, patience, grad_clip and num_threads must be >= 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"betas must be in [0, 1), got {self.beta1}, {self.beta2}")


def accumulation_steps(cfg: PretrainParams, block_size: int, world_size: int) -> int:
    per_micro = cfg.micro_batch_size * block_size * world_size
    if cfg.tokens_per_step % per_micro:
        from pipeline_tasks.config import ConfigError

        raise ConfigError(f"pretrain.tokens_per_step ({cfg.tokens_per_step}) must be a multiple of "
                          f"micro_batch_size x block_size x world_size = {cfg.micro_batch_size} x {block_size} x "
                          f"{world_size} = {per_micro}")
    return cfg.tokens_per_step // per_micro


def run_fingerprint(params, world_size: int, tokens_dir: Path) -> str:
    """Hash of what determines the trajectory: resuming is allowed only within one fingerprint."""
    from pipeline_tasks.artifacts import read_json, sha256_file, sha256_json
    from pipeline_tasks.config import to_plain

    manifest = tokens_dir / "manifest.json"
    outputs = read_json(manifest).get("outputs", {}) if manifest.is_file() else {}
    data = {name: outputs.get(name) or sha256_file(tokens_dir / name) for name in ("train.bin", "val.bin")}
    pretrain = {k: v for k, v in to_plain(params.pretrain).items() if k not in RESUME_NEUTRAL}
    return sha256_json({"model": to_plain(params.model), "pretrain": pretrain, "seed": params.seed,
                        "world_size": world_size, "data": data})[:12]


@dataclasses.dataclass
class TrainState:
    """Counters that travel in every checkpoint next to the weights."""

    step: int = 0
    best_val_loss: float = math.inf
    best_step: int = 0
    evals_without_improvement: int = 0
    train_time_s: float = 0.0
    history: list = dataclasses.field(default_factory=list)  # [step, train_loss, val_loss|nan, lr]


def run(params, **_options) -> dict[str, Any]:
    from pipeline_tasks.train.training import setup_distributed, teardown_distributed

    cfg: PretrainParams = params.pretrain
    info, device = setup_distributed(cfg.device)
    if not info.is_main:  # one voice in the logs; other ranks report only problems
        logging.getLogger("pipeline_tasks").setLevel(logging.WARNING)
    preempted: list[int] = []  # SIGTERM (Airflow / Kubernetes stop): finish the step, checkpoint, exit
    restore_handler = _on_sigterm(preempted.append)
    try:
        return train(params, cfg, info, device, preempted)
    finally:
        restore_handler()
        teardown_distributed()


def train(params, cfg: PretrainParams, info, device, preempted: list[int]) -> dict[str, Any]:
    import torch

    from pipeline_tasks.train.model import ModelConfig, build_lm, mfu, num_parameters
    from pipeline_tasks.dataset.shards import eval_window_starts, load_meta, open_shard, window_starts, windows_to_tensors
    from pipeline_tasks.train.training import (
        CheckpointManager, all_gather_objects, all_reduce_sum, autocast_context, autocast_dtype, barrier,
        capture_rng_state, configure_optimizer, cosine_lr, format_duration, restore_rng_state, seed_everything,
        set_num_threads, tensorboard_writer, unwrap,
    )

    # -- setup ------------------------------------------------------------------------------
    tokens_dir, out_dir = Path(params.paths.tokens_dir), Path(params.paths.pretrain_dir)
    reports_dir = Path(params.paths.pretrain_reports_dir)
    threads = set_num_threads(cfg.num_threads, int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size)))
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # needed by deterministic cuBLAS
        torch.use_deterministic_algorithms(True, warn_only=True)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for any fp32 matmul left outside autocast
    dtype = autocast_dtype(device, cfg.dtype)
    autocast = autocast_context(device, dtype)

    meta = load_meta(tokens_dir)
    train_data, val_data = open_shard(tokens_dir, "train", meta), open_shard(tokens_dir, "val", meta)
    config = ModelConfig.from_params(params.model, meta["vocab_size"])
    T, B = config.block_size, cfg.micro_batch_size
    accum = accumulation_steps(cfg, T, info.world_size)
    val_starts = eval_window_starts(len(val_data), T, cfg.eval_batches * B)
    val_split = meta["splits"]["val"]
    tokens_per_byte = val_split["tokens"] / max(val_split["bytes"], 1)

    seed_everything(params.seed)  # same initial weights on every rank
    model = build_lm(config).to(device)
    optimizer = configure_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), device)
    scaler = torch.amp.GradScaler("cuda", enabled=(dtype == torch.float16))
    torch.manual_seed(params.seed + info.rank)  # dropout masks differ across ranks

    fingerprint = run_fingerprint(params, info.world_size, tokens_dir)
    ckpt = CheckpointManager(out_dir / "checkpoints" / f"run-{fingerprint}", keep_last=cfg.keep_last)
    state = TrainState()
    if info.is_main:
        ckpt.remove_stale_temporaries()
        if not cfg.resume and ckpt.checkpoints():
            logger.warning("pretrain.resume is false: removing %d checkpoint(s) in %s", len(ckpt.checkpoints()),
                           ckpt.directory)
            ckpt.clear()
    barrier(info)
    loaded = ckpt.load_latest(map_location="cpu") if cfg.resume else None  # RNG states must stay on CPU
    if loaded is not None:
        path, saved = loaded
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scaler.load_state_dict(saved["scaler"])
        state = TrainState(**saved["train_state"])
        rng = saved["rng"]
        if len(rng) == info.world_size:
            restore_rng_state(rng[info.rank])
        logger.info("resumed from %s (step %d)", path, state.step)

    n_params = num_parameters(model)
    logger.info("model %s: %.2fM parameters (%.2fM without embeddings), vocab %d, context %d; device %s %s, "
                "%d thread(s), world size %d, %d micro-batch(es) of %dx%d per step, run %s", config.arch,
                n_params / 1e6, num_parameters(model, exclude_embeddings=True) / 1e6, config.vocab_size, T, device,
                str(dtype).replace("torch.", ""), threads, info.world_size, accum, B, T, fingerprint)
    if cfg.compile:
        model = torch.compile(model)
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    raw_model = unwrap(model)
    eval_model = getattr(model, "module", model)  # compiled, but outside DDP's gradient hooks
    writer = tensorboard_writer(reports_dir / "tb", state.step) if info.is_main else None

    def save_checkpoint() -> Path:
        rng_states = all_gather_objects(capture_rng_state(), info)
        return ckpt.save({"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                          "scaler": scaler.state_dict(), "train_state": dataclasses.asdict(state), "rng": rng_states,
                          "model_config": config.to_dict(), "fingerprint": fingerprint,
                          "world_size": info.world_size}, state.step)

    def evaluate() -> float:
        """Mean loss over the fixed val windows, each rank taking every world_size-th batch."""
        eval_model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of losses x tokens, tokens]
        with torch.no_grad():
            for i in range(info.rank * B, len(val_starts), B * info.world_size):
                x, y = windows_to_tensors(val_data, val_starts[i: i + B], T, device)
                with autocast:
                    _, loss = eval_model(x, y)
                n = torch.tensor(float(y.numel()), dtype=torch.float64, device=device)
                total += torch.stack([loss.double() * n, n])
        eval_model.train()
        all_reduce_sum(total, info)
        return (total[0] / total[1]).item()

    # -- training loop ------------------------------------------------------------------------
    stop_reason = "max_steps"
    if cfg.patience and state.evals_without_improvement >= cfg.patience:  # resumed an early-stopped run
        stop_reason = f"early stop: no val improvement in {cfg.patience} evaluations"
    last_good: Path | None = ckpt.checkpoints()[-1][1] if ckpt.checkpoints() else None
    timings: list[float] = []
    model.train()
    while state.step < cfg.max_steps and stop_reason == "max_steps":
        t0 = time.perf_counter()
        lr = cosine_lr(state.step, lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps,
                       max_steps=cfg.max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros(2, device=device)  # [mean loss, SIGTERM seen]: one all-reduce for both
        for micro_step in range(accum):
            starts = window_starts(len(train_data), T, B, seed=params.seed, rank=info.rank, step=state.step,
                                   micro_step=micro_step)
            x, y = windows_to_tensors(train_data, starts, T, device)
            # DDP averages gradients only on the last micro-step; the others accumulate locally
            sync = not info.enabled or micro_step == accum - 1
            with (model.no_sync() if not sync else contextlib.nullcontext()), autocast:
                _, loss = model(x, y)
                loss = loss / accum
            scaler.scale(loss).backward()
            loss_sum[0] += loss.detach()
        loss_sum[1] = float(bool(preempted))
        reduced = all_reduce_sum(loss_sum, info).tolist()
        train_loss, stop_requested = reduced[0] / info.world_size, reduced[1] > 0
        grad_norm = math.nan
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
        if not math.isfinite(train_loss) or (cfg.grad_clip > 0 and not math.isfinite(grad_norm)):
            where = f"last good checkpoint {last_good} is kept" if last_good else "no checkpoint was written yet"
            fix = "raise warmup_steps" + (" or set grad_clip > 0" if cfg.grad_clip == 0 else "")
            raise PipelineError(f"non-finite training loss ({train_loss}) or gradient norm ({grad_norm}) at step "
                                f"{state.step + 1}; {where}. Lower pretrain.lr (now {cfg.lr}) or {fix}, then re-run")
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        dt = time.perf_counter() - t0
        state.train_time_s += dt
        timings.append(dt)
        state.history.append([state.step, train_loss, math.nan, lr])

        if writer is not None:
            writer.add_scalar("train/loss", train_loss, state.step)
            writer.add_scalar("train/lr", lr, state.step)
            if cfg.grad_clip > 0:
                writer.add_scalar("train/grad_norm", grad_norm, state.step)
        if state.step % cfg.log_interval == 0 or state.step == cfg.max_steps:
            recent = timings[-cfg.log_interval:]
            ms = 1000 * sum(recent) / len(recent)
            tok_s = cfg.tokens_per_step / (ms / 1000)
            eta = (cfg.max_steps - state.step) * ms / 1000
            line = (f"step {state.step}/{cfg.max_steps} | loss {train_loss:.4f} | lr {lr:.2e} | {ms:.0f} ms/step | "
                    f"{tok_s:,.0f} tok/s")
            if device.type == "cuda":
                line += f" | mfu {100 * mfu(tok_s / info.world_size, config):.1f}%"
            logger.info("%s | eta %s", line, format_duration(eta))
            if writer is not None:
                writer.add_scalar("perf/tokens_per_s", tok_s, state.step)

        if state.step % cfg.eval_interval == 0 or state.step == cfg.max_steps:
            val_loss = evaluate()
            state.history[-1][2] = val_loss
            bpb = val_loss * tokens_per_byte / math.log(2)
            improved = val_loss < state.best_val_loss - cfg.min_delta
            if improved:
                state.best_val_loss, state.best_step, state.evals_without_improvement = val_loss, state.step, 0
                if info.is_main:
                    ckpt.save_file({"model": raw_model.state_dict(), "model_config": config.to_dict(),
                                    "step": state.step, "val_loss": val_loss}, ckpt.directory / "best.pt")
            else:
                state.evals_without_improvement += 1
            logger.info("eval step %d: val loss %.4f | ppl %.2f | bpb %.4f%s", state.step, val_loss,
                        math.exp(min(val_loss, 50)), bpb, " (best)" if improved else
                        f" ({state.evals_without_improvement} eval(s) without improvement)")
            if writer is not None:
                for key, value in (("loss", val_loss), ("ppl", math.exp(min(val_loss, 50))), ("bpb", bpb)):
                    writer.add_scalar(f"val/{key}", value, state.step)
            if cfg.patience and state.evals_without_improvement >= cfg.patience:
                stop_reason = f"early stop: no val improvement in {cfg.patience} evaluations"

        if stop_requested:  # every rank agrees through the all-reduce above
            stop_reason = f"stopped by signal {preempted[0] if preempted else 'on another rank'}"
        done = stop_reason != "max_steps" or state.step == cfg.max_steps
        if state.step % cfg.checkpoint_interval == 0 or done:
            if info.is_main:
                last_good = save_checkpoint()
                logger.info("saved checkpoint %s", last_good)
            else:
                all_gather_objects(capture_rng_state(), info)  # rank 0 collects every rank's RNG state
        if done and stop_reason != "max_steps":
            logger.info("%s (step %d)", stop_reason, state.step)
            break

    if writer is not None:
        writer.close()
    if stop_reason.startswith("stopped by signal"):
        raise PipelineError(f"pretrain {stop_reason} at step {state.step}; checkpoint saved in {ckpt.directory}: "
                            "re-run the same command to resume")
    if not info.is_main:
        return {}
    return _write_outputs(params, cfg, info, config, raw_model, ckpt, state, stop_reason, timings, n_params,
                          tokens_per_byte, meta, fingerprint, device)


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------

def _write_outputs(params, cfg, info, config, raw_model, ckpt, state, stop_reason, timings, n_params,
                   tokens_per_byte, meta, fingerprint, device) -> dict[str, Any]:
    import torch

    from pipeline_tasks.artifacts import atomic_path, atomic_write_json, atomic_write_text, build_manifest, sha256_file
    from pipeline_tasks.train.model import mfu

    out_dir, reports_dir = Path(params.paths.pretrain_dir), Path(params.paths.pretrain_reports_dir)
    best_path = ckpt.directory / "best.pt"
    weights, step = raw_model.state_dict(), state.step
    if best_path.is_file() and math.isfinite(state.best_val_loss):
        try:
            best = ckpt.load_file(best_path)
            weights, step = best["model"], best["step"]
        except ValueError as exc:
            logger.warning("%s; exporting the final weights instead", exc)
    best_val = state.best_val_loss
    val = {"loss": best_val, "ppl": math.exp(min(best_val, 50)), "bpb": best_val * tokens_per_byte / math.log(2),
           "step": state.best_step}
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = out_dir / "model.pt"
    with atomic_path(model_path) as tmp:
        torch.save({"model": {k: v.detach().cpu() for k, v in weights.items()}, "model_config": config.to_dict(),
                    "step": step, "val": val, "special_tokens": meta["special_tokens"], "fingerprint": fingerprint},
                   tmp)

    # steady state: the first steps include allocator / compile warm-up; a run that resumed an
    # already finished checkpoint has no timings of its own and reports the run's average
    steady = timings[min(len(timings) - 1, 5):] if timings else []
    if steady and sum(steady) > 0:
        tokens_per_s = cfg.tokens_per_step * len(steady) / sum(steady)
    else:
        tokens_per_s = cfg.tokens_per_step * state.step / state.train_time_s if state.train_time_s else 0.0
    final_train = state.history[-1][1] if state.history else math.nan
    metrics = {"train/loss": final_train, "val/loss": best_val, "val/ppl": val["ppl"], "val/bpb": val["bpb"],
               "val/best_step": state.best_step, "train/steps": state.step,
               "train/tokens": state.step * cfg.tokens_per_step, "train/tokens_per_s": round(tokens_per_s, 1),
               "train/wall_time_s": round(state.train_time_s, 2), "model/params": n_params,
               "stopped_early": stop_reason != "max_steps", "world_size": info.world_size}
    if device.type == "cuda":
        metrics["train/mfu"] = round(mfu(tokens_per_s / info.world_size, config), 4)
    atomic_write_json(reports_dir / "metrics.json", metrics)
    rows = ["step,train_loss,val_loss,lr"] + [
        f"{s},{tl:.6f},{'' if math.isnan(vl) else f'{vl:.6f}'},{lr:.6e}" for s, tl, vl, lr in state.history]
    atomic_write_text(reports_dir / "loss.csv", "\n".join(rows) + "\n")
    manifest = build_manifest("pretrain", {"model": params.model, "pretrain": cfg, "seed": params.seed},
                              inputs={name: sha256_file(Path(params.paths.tokens_dir) / name)
                                      for name in ("train.bin", "val.bin", "meta.json")},
                              extra={"outputs": {"model.pt": sha256_file(model_path)}, "fingerprint": fingerprint})
    atomic_write_json(out_dir / "manifest.json", manifest)
    logger.info("wrote %s (step %d, val loss %.4f, bpb %.4f)", model_path, step, best_val, val["bpb"])
    return {"model": str(model_path), "steps": state.step, "val_loss": round(best_val, 4),
            "val_bpb": round(val["bpb"], 4), "tokens_per_s": metrics["train/tokens_per_s"], "stop": stop_reason}


def _on_sigterm(callback):
    """Route SIGTERM to ``callback(signum)``; returns a function restoring the previous handler."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():  # signals only reach the main thread
        return lambda: None
    previous = signal.signal(signal.SIGTERM, lambda signum, _frame: callback(signum))
    return lambda: signal.signal(signal.SIGTERM, previous)
