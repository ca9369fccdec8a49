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

Params sections ``model`` and ``pretrain`` (:class:`~pipeline_tasks.train.params.PretrainParams`),
top-level ``seed``. Only torch, numpy and PyYAML are needed (tensorboard optional).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from pipeline_tasks import topology
from pipeline_tasks.artifacts import (
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    build_manifest,
    read_json,
    sha256_file,
    sha256_json,
)
from pipeline_tasks.config import ConfigError, to_plain
from pipeline_tasks.dataset.shards import (
    eval_window_starts,
    load_meta,
    micro_batch_seed,
    open_shard,
    window_starts,
    windows_to_tensors,
)
from pipeline_tasks.errors import PipelineError
from pipeline_tasks.train.model import ModelConfig, build_lm, mfu, num_parameters
from pipeline_tasks.train.params import PretrainParams
from pipeline_tasks.train.training import (
    CheckpointManager,
    DistInfo,
    all_gather_objects,
    all_reduce_sum,
    autocast_context,
    barrier,
    capture_rng_state,
    configure_optimizer,
    configure_runtime,
    cosine_lr,
    log_step,
    restore_rng_state,
    seed_everything,
    setup_distributed,
    teardown_distributed,
    tensorboard_writer,
    unwrap,
)

logger = logging.getLogger(__name__)

# Params that do not change the trajectory: a run may resume across changes of these.
# nodes and procs_per_node: the world size is in the fingerprint itself, and 2 nodes x 1 process or
# 1 node x 2 processes train the same trajectory (a 2-rank all-reduce sums in either order exactly).
RESUME_NEUTRAL = frozenset(
    {
        "resume",
        "keep_last",
        "checkpoint_interval",
        "log_interval",
        "compile",
        "num_threads",
        "device",
        "nodes",
        "procs_per_node",
        "dist_timeout_s",
    }
)
# bumped when the batches of a step change for an unchanged config: 2 = global micro-batch index,
# dropout masks keyed per micro-batch (1 seeded windows per rank: world size > 1 drew other batches)
SAMPLER_VERSION = 2


def accumulation_steps(cfg: PretrainParams, block_size: int, world_size: int) -> int:
    per_micro = cfg.micro_batch_size * block_size * world_size
    if cfg.tokens_per_step % per_micro:
        raise ConfigError(
            f"pretrain.tokens_per_step ({cfg.tokens_per_step}) must be a multiple of "
            f"micro_batch_size x block_size x world_size = {cfg.micro_batch_size} x {block_size} x "
            f"{world_size} = {per_micro}"
        )
    return cfg.tokens_per_step // per_micro


def run_fingerprint(params, world_size: int, tokens_dir: Path) -> str:
    """Hash of what determines the trajectory: resuming is allowed only within one fingerprint."""
    manifest = tokens_dir / "manifest.json"
    outputs = read_json(manifest).get("outputs", {}) if manifest.is_file() else {}
    data = {name: outputs.get(name) or sha256_file(tokens_dir / name) for name in ("train.bin", "val.bin")}
    pretrain = {k: v for k, v in to_plain(params.pretrain).items() if k not in RESUME_NEUTRAL}
    return sha256_json(
        {
            "model": to_plain(params.model),
            "pretrain": pretrain,
            "seed": params.seed,
            "world_size": world_size,
            "data": data,
            **({"sampler": SAMPLER_VERSION} if world_size > 1 or params.model.dropout > 0 else {}),
        }
    )[:12]


@dataclasses.dataclass
class TrainState:
    """Counters that travel in every checkpoint next to the weights."""

    step: int = 0
    best_val_loss: float = math.inf
    best_step: int = 0
    evals_without_improvement: int = 0
    train_time_s: float = 0.0
    history: list = dataclasses.field(default_factory=list)  # [step, train_loss, val_loss|nan, lr]


@dataclasses.dataclass
class RunContext:
    """What one pretrain run works with, built once by :func:`setup_run`."""

    params: Any  # paths, model, pretrain and seed: all of them shape the run and its manifest
    info: DistInfo
    device: torch.device
    dtype: torch.dtype
    autocast: Any  # bf16 / fp16 autocast context, or a no-op in float32
    threads: int
    config: ModelConfig
    meta: dict[str, Any]
    train_data: np.ndarray
    val_data: np.ndarray
    val_starts: np.ndarray  # fixed eval windows: every evaluation sees the same tokens
    accum: int  # micro-batches per optimizer step
    model: torch.nn.Module  # what the loop calls: compiled and DDP-wrapped by wrap_model
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ckpt: CheckpointManager
    fingerprint: str
    n_params: int

    @property
    def cfg(self) -> PretrainParams:
        return self.params.pretrain

    @property
    def raw_model(self) -> torch.nn.Module:
        return unwrap(self.model)

    @property
    def eval_model(self) -> torch.nn.Module:
        return getattr(self.model, "module", self.model)  # compiled, but outside DDP's gradient hooks

    @property
    def tokens_per_byte(self) -> float:
        val_split = self.meta["splits"]["val"]
        return val_split["tokens"] / max(val_split["bytes"], 1)


def run(params, stage_argv: tuple[str, ...] = (), **_options) -> dict[str, Any]:
    mode = topology.launch_mode(params.pretrain)
    if mode == "torchrun":
        topology.run_torchrun(params, stage_argv)
        return summary_from_outputs(params)
    if mode == "trainjob":
        topology.run_trainjob(params, stage_argv)
        return summary_from_outputs(params)
    if mode == "rank" and int(os.environ["WORLD_SIZE"]) != topology.world_size(params.pretrain):
        logger.warning(
            "launched with world size %s, params say pretrain.nodes x procs_per_node = %d: training with %s",
            os.environ["WORLD_SIZE"],
            topology.world_size(params.pretrain),
            os.environ["WORLD_SIZE"],
        )
    if mode == "rank":
        with topology.recording_rank_failure(topology.rank_failure_file(params)):
            return train_this_process(params, rank_of_many=True)
    return train_this_process(params)


def train_this_process(params, rank_of_many: bool = False) -> dict[str, Any]:
    info, device = setup_distributed(params.pretrain.device, params.pretrain.dist_timeout_s)
    if rank_of_many:  # a new run or a restarted job: failures of an earlier attempt are not this one's
        if info.is_main:
            topology.clear_rank_failure(topology.rank_failure_file(params))
        barrier(info)
    if not info.is_main:  # one voice in the logs; other ranks report only problems
        logging.getLogger("pipeline_tasks").setLevel(logging.WARNING)
    preempted: list[int] = []  # SIGTERM (Airflow / Kubernetes stop): finish the step, checkpoint, exit
    restore_handler = _on_sigterm(preempted.append)
    try:
        return train(params, info, device, preempted)
    finally:
        restore_handler()
        teardown_distributed()


def train(params, info: DistInfo, device: torch.device, preempted: list[int]) -> dict[str, Any]:
    cfg = params.pretrain
    ctx = setup_run(params, info, device)
    state = resume(ctx)
    log_run(ctx)
    wrap_model(ctx)
    writer = tensorboard_writer(Path(params.paths.pretrain_reports_dir) / "tb", state.step) if info.is_main else None

    stop_reason = "max_steps"
    if cfg.patience and state.evals_without_improvement >= cfg.patience:  # resumed an early-stopped run
        stop_reason = f"early stop: no val improvement in {cfg.patience} evaluations"
    last_good: Path | None = ctx.ckpt.checkpoints()[-1][1] if ctx.ckpt.checkpoints() else None
    timings: list[float] = []
    ctx.model.train()
    while state.step < cfg.max_steps and stop_reason == "max_steps":
        t0 = time.perf_counter()
        lr = cosine_lr(state.step, lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps)
        train_loss, grad_norm, stop_requested = train_step(ctx, state.step, lr, preempted, last_good)
        state.step += 1
        dt = time.perf_counter() - t0
        state.train_time_s += dt
        timings.append(dt)
        state.history.append([state.step, train_loss, math.nan, lr])
        log_progress(ctx, state, train_loss, lr, grad_norm, timings, writer)

        if state.step % cfg.eval_interval == 0 or state.step == cfg.max_steps:
            evaluate_and_track(ctx, state, writer)
            if cfg.patience and state.evals_without_improvement >= cfg.patience:
                stop_reason = f"early stop: no val improvement in {cfg.patience} evaluations"
        if stop_requested:  # every rank agrees through the all-reduce in train_step
            stop_reason = f"stopped by signal {preempted[0] if preempted else 'on another rank'}"
        done = stop_reason != "max_steps" or state.step == cfg.max_steps
        if state.step % cfg.checkpoint_interval == 0 or done:
            last_good = save_checkpoint(ctx, state) or last_good
        if done and stop_reason != "max_steps":
            logger.info("%s (step %d)", stop_reason, state.step)
            break

    if writer is not None:
        writer.close()
    if stop_reason.startswith("stopped by signal"):
        raise PipelineError(
            f"pretrain {stop_reason} at step {state.step}; checkpoint saved in "
            f"{ctx.ckpt.directory}: re-run the same command to resume"
        )
    if not info.is_main:
        return {}
    return write_outputs(ctx, state, stop_reason, timings)


# ---------------------------------------------------------------------------------------------
# Setup and resume
# ---------------------------------------------------------------------------------------------


def setup_run(params, info: DistInfo, device: torch.device) -> RunContext:
    """Runtime, data, model, optimizer and checkpoint directory: everything before the first step."""
    cfg, tokens_dir = params.pretrain, Path(params.paths.tokens_dir)
    threads, dtype = configure_runtime(
        device,
        num_threads=cfg.num_threads,
        deterministic=cfg.deterministic,
        dtype=cfg.dtype,
        tf32=True,
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size)),
    )
    meta = load_meta(tokens_dir)
    train_data, val_data = open_shard(tokens_dir, "train", meta), open_shard(tokens_dir, "val", meta)
    config = ModelConfig.from_params(params.model, meta["vocab_size"])
    accum = accumulation_steps(cfg, config.block_size, info.world_size)
    val_starts = eval_window_starts(len(val_data), config.block_size, cfg.eval_batches * cfg.micro_batch_size)

    seed_everything(params.seed)  # same initial weights on every rank
    model = build_lm(config).to(device)
    optimizer = configure_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), device)
    scaler = torch.amp.GradScaler("cuda", enabled=(dtype == torch.float16))
    torch.manual_seed(params.seed + info.rank)  # dropout masks differ across ranks

    fingerprint = run_fingerprint(params, info.world_size, tokens_dir)
    ckpt = CheckpointManager(
        Path(params.paths.pretrain_dir) / "checkpoints" / f"run-{fingerprint}", keep_last=cfg.keep_last
    )
    return RunContext(
        params=params,
        info=info,
        device=device,
        dtype=dtype,
        autocast=autocast_context(device, dtype),
        threads=threads,
        config=config,
        meta=meta,
        train_data=train_data,
        val_data=val_data,
        val_starts=val_starts,
        accum=accum,
        model=model,
        optimizer=optimizer,
        scaler=scaler,
        ckpt=ckpt,
        fingerprint=fingerprint,
        n_params=num_parameters(model),
    )


def resume(ctx: RunContext) -> TrainState:
    """Load the newest valid checkpoint of this run into ctx (weights, optimizer, scaler, RNG)."""
    ckpt = ctx.ckpt
    if ctx.info.is_main:
        ckpt.remove_stale_temporaries()
        if not ctx.cfg.resume and ckpt.checkpoints():
            logger.warning(
                "pretrain.resume is false: removing %d checkpoint(s) in %s", len(ckpt.checkpoints()), ckpt.directory
            )
            ckpt.clear()
    barrier(ctx.info)
    loaded = ckpt.load_latest(map_location="cpu") if ctx.cfg.resume else None  # RNG states must stay on CPU
    if loaded is None:
        return TrainState()
    path, saved = loaded
    ctx.model.load_state_dict(saved["model"])
    ctx.optimizer.load_state_dict(saved["optimizer"])
    ctx.scaler.load_state_dict(saved["scaler"])
    state = TrainState(**saved["train_state"])
    rng = saved["rng"]
    if len(rng) == ctx.info.world_size:
        restore_rng_state(rng[ctx.info.rank])
    logger.info("resumed from %s (step %d)", path, state.step)
    return state


def log_run(ctx: RunContext) -> None:
    config, cfg = ctx.config, ctx.cfg
    logger.info(
        "model %s: %.2fM parameters (%.2fM without embeddings), vocab %d, context %d; device %s %s, "
        "%d thread(s), world size %d, %d micro-batch(es) of %dx%d per step, run %s",
        config.arch,
        ctx.n_params / 1e6,
        num_parameters(ctx.model, exclude_embeddings=True) / 1e6,
        config.vocab_size,
        config.block_size,
        ctx.device,
        str(ctx.dtype).replace("torch.", ""),
        ctx.threads,
        ctx.info.world_size,
        ctx.accum,
        cfg.micro_batch_size,
        config.block_size,
        ctx.fingerprint,
    )


def wrap_model(ctx: RunContext) -> None:
    """``torch.compile`` and DDP around the (resumed) model; ``ctx.raw_model`` stays the plain one."""
    if ctx.cfg.compile:
        ctx.model = torch.compile(ctx.model)
    if ctx.info.enabled:
        ctx.model = DDP(ctx.model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)


# ---------------------------------------------------------------------------------------------
# One step, evaluation, checkpoints
# ---------------------------------------------------------------------------------------------


def train_step(
    ctx: RunContext, step: int, lr: float, preempted: list[int], last_good: Path | None
) -> tuple[float, float, bool]:
    """Accumulate ``ctx.accum`` micro-batches, clip, update -> ``(train loss, grad norm, stop requested)``."""
    cfg, info, model, T, B = ctx.cfg, ctx.info, ctx.model, ctx.config.block_size, ctx.cfg.micro_batch_size
    for group in ctx.optimizer.param_groups:
        group["lr"] = lr
    loss_sum = torch.zeros(2, device=ctx.device)  # [mean loss, SIGTERM seen]: one all-reduce for both
    for micro_step in range(ctx.accum):
        micro_batch = info.rank * ctx.accum + micro_step  # global index: topology-invariant batches
        starts = window_starts(len(ctx.train_data), T, B, seed=ctx.params.seed, step=step, micro_batch=micro_batch)
        if ctx.config.dropout > 0:  # masks keyed like the windows: 2 nodes x 1 process = 1 process
            torch.manual_seed(micro_batch_seed(ctx.params.seed, step, micro_batch))
        x, y = windows_to_tensors(ctx.train_data, starts, T, ctx.device)
        # DDP averages gradients only on the last micro-step; the others accumulate locally
        sync = not info.enabled or micro_step == ctx.accum - 1
        with model.no_sync() if not sync else contextlib.nullcontext(), ctx.autocast:
            _, loss = model(x, y)
            loss = loss / ctx.accum
        ctx.scaler.scale(loss).backward()
        loss_sum[0] += loss.detach()
    loss_sum[1] = float(bool(preempted))
    reduced = all_reduce_sum(loss_sum, info).tolist()
    train_loss, stop_requested = reduced[0] / info.world_size, reduced[1] > 0
    grad_norm = math.nan
    if cfg.grad_clip > 0:
        ctx.scaler.unscale_(ctx.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
    if not math.isfinite(train_loss) or (cfg.grad_clip > 0 and not math.isfinite(grad_norm)):
        where = f"last good checkpoint {last_good} is kept" if last_good else "no checkpoint was written yet"
        fix = "raise warmup_steps" + (" or set grad_clip > 0" if cfg.grad_clip == 0 else "")
        raise PipelineError(
            f"non-finite training loss ({train_loss}) or gradient norm ({grad_norm}) at step "
            f"{step + 1}; {where}. Lower pretrain.lr (now {cfg.lr}) or {fix}, then re-run"
        )
    ctx.scaler.step(ctx.optimizer)
    ctx.scaler.update()
    ctx.optimizer.zero_grad(set_to_none=True)
    return train_loss, grad_norm, stop_requested


def log_progress(
    ctx: RunContext, state: TrainState, train_loss: float, lr: float, grad_norm: float, timings: list[float], writer
) -> None:
    """TensorBoard scalars every step; the step line every ``log_interval`` steps and at the end."""
    cfg = ctx.cfg
    if writer is not None:
        writer.add_scalar("train/loss", train_loss, state.step)
        writer.add_scalar("train/lr", lr, state.step)
        if cfg.grad_clip > 0:
            writer.add_scalar("train/grad_norm", grad_norm, state.step)
    if state.step % cfg.log_interval and state.step != cfg.max_steps:
        return
    recent = timings[-cfg.log_interval :]
    ms = 1000 * sum(recent) / len(recent)
    tok_s = cfg.tokens_per_step / (ms / 1000)
    throughput = f"{ms:.0f} ms/step | {tok_s:,.0f} tok/s"
    if ctx.device.type == "cuda":
        throughput += f" | mfu {100 * mfu(tok_s / ctx.info.world_size, ctx.config):.1f}%"
    log_step(logger, state.step, cfg.max_steps, train_loss, lr, throughput=throughput, seconds_per_step=ms / 1000)
    if writer is not None:
        writer.add_scalar("perf/tokens_per_s", tok_s, state.step)


def evaluate(ctx: RunContext) -> float:
    """Mean loss over the fixed val windows, each rank taking every world_size-th batch."""
    info, model, T, B = ctx.info, ctx.eval_model, ctx.config.block_size, ctx.cfg.micro_batch_size
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=ctx.device)  # [sum of losses x tokens, tokens]
    with torch.no_grad():
        for i in range(info.rank * B, len(ctx.val_starts), B * info.world_size):
            x, y = windows_to_tensors(ctx.val_data, ctx.val_starts[i : i + B], T, ctx.device)
            with ctx.autocast:
                _, loss = model(x, y)
            n = torch.tensor(float(y.numel()), dtype=torch.float64, device=ctx.device)
            total += torch.stack([loss.double() * n, n])
    model.train()
    all_reduce_sum(total, info)
    return (total[0] / total[1]).item()


def evaluate_and_track(ctx: RunContext, state: TrainState, writer) -> None:
    """Evaluate, record the val loss, keep ``best.pt`` and the early-stopping count up to date."""
    cfg = ctx.cfg
    val_loss = evaluate(ctx)
    state.history[-1][2] = val_loss
    bpb = val_loss * ctx.tokens_per_byte / math.log(2)
    improved = val_loss < state.best_val_loss - cfg.min_delta
    if improved:
        state.best_val_loss, state.best_step, state.evals_without_improvement = val_loss, state.step, 0
        if ctx.info.is_main:
            ctx.ckpt.save_file(
                {
                    "model": ctx.raw_model.state_dict(),
                    "model_config": ctx.config.to_dict(),
                    "step": state.step,
                    "val_loss": val_loss,
                },
                ctx.ckpt.directory / "best.pt",
            )
    else:
        state.evals_without_improvement += 1
    logger.info(
        "eval step %d: val loss %.4f | ppl %.2f | bpb %.4f%s",
        state.step,
        val_loss,
        math.exp(min(val_loss, 50)),
        bpb,
        " (best)" if improved else f" ({state.evals_without_improvement} eval(s) without improvement)",
    )
    if writer is not None:
        for key, value in (("loss", val_loss), ("ppl", math.exp(min(val_loss, 50))), ("bpb", bpb)):
            writer.add_scalar(f"val/{key}", value, state.step)


def save_checkpoint(ctx: RunContext, state: TrainState) -> Path | None:
    """Rank 0 writes the checkpoint with every rank's RNG state; the other ranks only send theirs."""
    rng_states = all_gather_objects(capture_rng_state(), ctx.info)
    if not ctx.info.is_main:
        return None
    path = ctx.ckpt.save(
        {
            "model": ctx.raw_model.state_dict(),
            "optimizer": ctx.optimizer.state_dict(),
            "scaler": ctx.scaler.state_dict(),
            "train_state": dataclasses.asdict(state),
            "rng": rng_states,
            "model_config": ctx.config.to_dict(),
            "fingerprint": ctx.fingerprint,
            "world_size": ctx.info.world_size,
        },
        state.step,
    )
    logger.info("saved checkpoint %s", path)
    return path


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------


def write_outputs(ctx: RunContext, state: TrainState, stop_reason: str, timings: list[float]) -> dict[str, Any]:
    """``model.pt`` (best weights), ``metrics.json``, ``loss.csv`` and the manifest (rank 0 only)."""
    params, cfg, info = ctx.params, ctx.cfg, ctx.info
    out_dir, reports_dir = Path(params.paths.pretrain_dir), Path(params.paths.pretrain_reports_dir)
    best_path = ctx.ckpt.directory / "best.pt"
    weights, step = ctx.raw_model.state_dict(), state.step
    if best_path.is_file() and math.isfinite(state.best_val_loss):
        try:
            best = ctx.ckpt.load_file(best_path)
            weights, step = best["model"], best["step"]
        except ValueError as exc:
            logger.warning("%s; exporting the final weights instead", exc)
    best_val = state.best_val_loss
    val = {
        "loss": best_val,
        "ppl": math.exp(min(best_val, 50)),
        "bpb": best_val * ctx.tokens_per_byte / math.log(2),
        "step": state.best_step,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = out_dir / "model.pt"
    with atomic_path(model_path) as tmp:
        torch.save(
            {
                "model": {k: v.detach().cpu() for k, v in weights.items()},
                "model_config": ctx.config.to_dict(),
                "step": step,
                "val": val,
                "special_tokens": ctx.meta["special_tokens"],
                "fingerprint": ctx.fingerprint,
            },
            tmp,
        )

    # steady state: the first steps include allocator / compile warm-up; a run that resumed an
    # already finished checkpoint has no timings of its own and reports the run's average
    steady = timings[min(len(timings) - 1, 5) :] if timings else []
    if steady and sum(steady) > 0:
        tokens_per_s = cfg.tokens_per_step * len(steady) / sum(steady)
    else:
        tokens_per_s = cfg.tokens_per_step * state.step / state.train_time_s if state.train_time_s else 0.0
    final_train = state.history[-1][1] if state.history else math.nan
    metrics = {
        "train/loss": final_train,
        "val/loss": best_val,
        "val/ppl": val["ppl"],
        "val/bpb": val["bpb"],
        "val/best_step": state.best_step,
        "train/steps": state.step,
        "train/tokens": state.step * cfg.tokens_per_step,
        "train/tokens_per_s": round(tokens_per_s, 1),
        "train/wall_time_s": round(state.train_time_s, 2),
        "model/params": ctx.n_params,
        "stopped_early": stop_reason != "max_steps",
        "world_size": info.world_size,
    }
    if ctx.device.type == "cuda":
        metrics["train/mfu"] = round(mfu(tokens_per_s / info.world_size, ctx.config), 4)
    atomic_write_json(reports_dir / "metrics.json", metrics)
    rows = ["step,train_loss,val_loss,lr"] + [
        f"{s},{tl:.6f},{'' if math.isnan(vl) else f'{vl:.6f}'},{lr:.6e}" for s, tl, vl, lr in state.history
    ]
    atomic_write_text(reports_dir / "loss.csv", "\n".join(rows) + "\n")
    manifest = build_manifest(
        "pretrain",
        {"model": params.model, "pretrain": cfg, "seed": params.seed},
        inputs={
            name: sha256_file(Path(params.paths.tokens_dir) / name) for name in ("train.bin", "val.bin", "meta.json")
        },
        extra={"outputs": {"model.pt": sha256_file(model_path)}, "fingerprint": ctx.fingerprint},
    )
    atomic_write_json(out_dir / "manifest.json", manifest)
    logger.info("wrote %s (step %d, val loss %.4f, bpb %.4f)", model_path, step, best_val, val["bpb"])
    return {
        "model": str(model_path),
        "steps": state.step,
        "val_loss": round(best_val, 4),
        "val_bpb": round(val["bpb"], 4),
        "tokens_per_s": metrics["train/tokens_per_s"],
        "stop": stop_reason,
    }


def summary_from_outputs(params) -> dict[str, Any]:
    """The stage summary of a run whose rank 0 was another process (torchrun, TrainJob pods)."""
    metrics_path = Path(params.paths.pretrain_reports_dir) / "metrics.json"
    model_path = Path(params.paths.pretrain_dir) / "model.pt"
    if not metrics_path.is_file() or not model_path.is_file():
        raise PipelineError(f"the distributed run finished but wrote no {metrics_path} / {model_path}")
    metrics = read_json(metrics_path)
    return {
        "model": str(model_path),
        "steps": metrics["train/steps"],
        "val_loss": round(metrics["val/loss"], 4),
        "val_bpb": round(metrics["val/bpb"], 4),
        "tokens_per_s": metrics["train/tokens_per_s"],
        "world_size": metrics["world_size"],
        "stop": "early stop" if metrics["stopped_early"] else "max_steps",
    }


def _on_sigterm(callback):
    """Route SIGTERM to ``callback(signum)``; returns a function restoring the previous handler."""
    if threading.current_thread() is not threading.main_thread():  # signals only reach the main thread
        return lambda: None
    previous = signal.signal(signal.SIGTERM, lambda signum, _frame: callback(signum))
    return lambda: signal.signal(signal.SIGTERM, previous)
