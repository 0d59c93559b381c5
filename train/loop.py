"""The one training loop for every model family: `run_training(cfg) -> dict`.

Steps: join the process group, build model (sonar_llm.models.family.build_family) and data
(sonar_llm.data), shard with FSDP2, resume from the latest complete checkpoint, then for each optimizer
step: `train.grad_accum` micro-batches (gradient sync only on the last), gradient clipping, a non-finite
check (skip the update; abort after `train.max_bad_steps` bad steps in a row), the lr schedule, logging,
periodic evaluation / samples / checkpoints. Fault handling lives here too (TrainingAborted).

Loss normalisation: every family returns a mean loss per micro-batch; the step's gradient is the mean
over the micro-batches of all ranks (so a run with 2 ranks x 1 micro-batch follows the same trajectory
as 1 rank x 2 micro-batches fed the same batches).
"""
from __future__ import annotations

import contextlib
import random
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from train import checkpoint as ckpt
from train.config import RunConfig, save_config, validate
from train.metrics import MetricsLogger, memory_gib, peak_flops
from train.optim import build_optimizer, build_scheduler
from train.parallel import DTYPES, DistInfo, init_distributed, parallelize, shutdown_distributed


class _StopFlag:
    """Set by SIGUSR1 (e.g. SLURM `--signal=USR1@120` before preemption); checked once per step, agreed on by
    all ranks through the per-step all-reduce."""

    requested = False
    _previous = None

    def install(self) -> None:
        import signal
        import threading

        self.requested = False
        if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGUSR1"):
            self._previous = signal.signal(signal.SIGUSR1, self._handle)

    def uninstall(self) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGUSR1, self._previous)
            self._previous = None

    def _handle(self, signum, frame) -> None:
        self.requested = True


_STOP = _StopFlag()


class TrainingAborted(RuntimeError):
    """Training stopped on purpose (e.g. too many non-finite steps in a row); the message says why."""


class Loader(Protocol):
    def __iter__(self): ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


ModelFactory = Callable[[RunConfig], nn.Module]
DataFactory = Callable[[RunConfig, str, DistInfo], Loader]  # (cfg, "train"|"val", dist info)
SampleFn = Callable[[nn.Module, int], dict]  # (model, step) -> JSON-able record


def default_model_factory(cfg: RunConfig) -> nn.Module:
    """Build the family named by `model.family` (train/families.py; the models package is imported lazily)."""
    from train.families import build_model

    return build_model(cfg)


def default_data_factory(cfg: RunConfig, split: str, info: DistInfo) -> Loader:
    """Resumable packed-batch loader over the train (endless, shuffled) or validation (one ordered pass,
    restarted by the caller) shards, split by rank."""
    from sonar_llm.data.loader import make_dataloader
    from sonar_llm.data.shards import ShardedDataset

    train = split == "train"
    dataset = ShardedDataset(cfg.data.path if train else cfg.data.val_path)
    return make_dataloader(dataset, num_workers=cfg.data.workers if train else 0,
                           pin_memory=info.device.type == "cuda", max_sentences=cfg.data.max_sentences,
                           max_tokens=cfg.data.max_tokens, seed=cfg.data.seed, rank=info.rank,
                           world_size=info.world_size, shuffle=train, loop=train)


def _count(batch: Any, name: str, fallback: Callable[[Any], float]) -> float:
    v = getattr(batch, name, None)
    if v is None:
        return float(fallback(batch))
    return float(v() if callable(v) else v)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _BatchStream:
    """Endless micro-batch iterator over a loader (starts the loader over when an epoch ends)."""

    def __init__(self, loader: Loader):
        self.loader = loader
        self.it = iter(loader)
        self.epoch_batches = 0

    def next(self):
        try:
            b = next(self.it)
        except StopIteration:
            if self.epoch_batches == 0:
                raise ValueError("the data loader yields no batches (is data.path empty, or "
                                 "data.max_sentences / data.max_tokens too small for any document?)") from None
            self.it = iter(self.loader)
            self.epoch_batches = 0
            return self.next()
        self.epoch_batches += 1
        return b


def _grad_params(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad and p.grad is not None]


def _all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if dist.is_initialized() and info.world_size > 1:
        dist.all_reduce(t)
    return t


def _all_reduce_grads(model: nn.Module, info: DistInfo) -> None:
    """Plain data parallelism (parallel.fsdp = false): average the gradients of every rank, one bucket."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:  # every rank must contribute the same buffer layout
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= info.world_size
    for g, r in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(r)


def run_training(cfg: RunConfig, *, model_factory: ModelFactory | None = None,
                 data_factory: DataFactory | None = None, sample_fn: SampleFn | None = None,
                 stream=None) -> dict[str, Any]:
    """Train as configured; returns the final metrics (step, loss, eval_loss, skipped_steps, steps_per_s,
    checkpoint, and stopped=True when SIGUSR1 ended the run early after a checkpoint). Raises TrainingAborted / ValueError / ... after logging; the process group is destroyed
    on the way out in every case."""
    validate(cfg, check_paths=data_factory is None)
    if data_factory is None and cfg.train.eval_every and not cfg.data.val_path:
        raise ValueError("train.eval_every > 0 needs data.val_path (the validation shards)")
    info = init_distributed(cfg)
    try:
        return _train(cfg, info, model_factory or default_model_factory, data_factory or default_data_factory,
                      sample_fn, stream)
    except BaseException as e:
        if not isinstance(e, KeyboardInterrupt):
            print(f"[rank {info.rank}] training failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            if not isinstance(e, TrainingAborted):
                traceback.print_exc(file=sys.stderr)
        raise
    finally:
        _STOP.uninstall()
        shutdown_distributed(info)


def _train(cfg: RunConfig, info: DistInfo, model_factory: ModelFactory, data_factory: DataFactory,
           sample_fn: SampleFn | None, stream) -> dict[str, Any]:
    t_cfg = cfg.train
    device = info.device
    run_dir = Path(t_cfg.out_dir)
    ckpt_root = run_dir / "checkpoints"
    if info.is_main:
        save_config(cfg, run_dir)
        ckpt.remove_stale_tmp(ckpt_root)
    if dist.is_initialized():
        dist.barrier()

    _seed_all(t_cfg.seed)  # identical initial weights on every rank
    model = model_factory(cfg)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model factory returned {type(model).__name__}, expected an nn.Module")
    for name in ("loss", "flops_per_batch", "transformer_blocks"):
        if not callable(getattr(model, name, None)):
            raise TypeError(f"model family {type(model).__name__} lacks the {name}() method")
    model = parallelize(model, cfg, info)
    use_fsdp = hasattr(model, "set_requires_gradient_sync")
    replicated = not use_fsdp and dist.is_initialized() and info.world_size > 1  # parallel.fsdp = false
    optimizer = build_optimizer(model, cfg.optim, device)
    scheduler = build_scheduler(optimizer, cfg.optim, t_cfg.steps)
    if use_fsdp and t_cfg.precision == "fp16":
        # each rank sees only its gradient shard: the scaler all-reduces "found inf" so all ranks agree
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        scaler = ShardedGradScaler(device.type)
    else:
        scaler = torch.amp.GradScaler(device.type, enabled=t_cfg.precision == "fp16")
    train_loader = data_factory(cfg, "train", info)
    if sample_fn is None and callable(getattr(model, "sample", None)):
        sample_fn = lambda m, step: m.sample(step)  # noqa: E731

    logger = MetricsLogger(run_dir, info.is_main, t_cfg.tensorboard, stream=stream)
    start_step, skipped, bad_in_row = 0, 0, 0
    last_ckpt = ckpt.latest_checkpoint(ckpt_root) if t_cfg.resume else None
    if last_ckpt is not None:
        trainer_state, rank_state = ckpt.load_checkpoint(last_ckpt, model, optimizer)
        scheduler.load_state_dict(trainer_state["scheduler"])
        scaler.load_state_dict(trainer_state["scaler"])
        train_loader.load_state_dict(rank_state["loader"])
        start_step = int(trainer_state["step"])
        skipped = int(trainer_state.get("skipped_steps", 0))
        bad_in_row = int(trainer_state.get("bad_in_row", 0))
        logger.message(f"resumed from {last_ckpt} at step {start_step}")
    else:
        _seed_all(t_cfg.seed + 1 + info.rank)  # per-rank streams for dropout / diffusion noise

    peak = peak_flops(device, t_cfg.precision, t_cfg.peak_flops)
    dtype = DTYPES[t_cfg.precision]
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32
                else contextlib.nullcontext())
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.message(f"{cfg.model.family}/{cfg.model.preset}: {n_params / 1e6:.2f}M trainable parameters, "
                   f"world size {info.world_size} ({'FSDP2' if use_fsdp else 'replicated'}), device {device}, "
                   f"steps {start_step}->{t_cfg.steps}")

    def checkpoint_now(step: int) -> bool:
        trainer_state = {"scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                         "skipped_steps": skipped, "bad_in_row": bad_in_row}
        return ckpt.save_checkpoint(ckpt_root, step, model, optimizer, trainer_state,
                                    {"loader": train_loader.state_dict()}, keep_last=t_cfg.keep_last)

    batches = _BatchStream(train_loader)
    _STOP.install()
    model.train()
    result: dict[str, Any] = {"step": start_step, "loss": None, "eval_loss": None, "skipped_steps": skipped}
    step_times: list[float] = []
    window = {"time": 0.0, "sent": 0.0, "tok": 0.0, "flops": 0.0, "steps": 0}
    last_loss = None
    last_saved = start_step if last_ckpt is not None else None
    for step in range(start_step, t_cfg.steps):
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        n_sent = n_tok = flops = 0.0
        for micro in range(t_cfg.grad_accum):
            batch = batches.next()
            batch = batch.to(device)
            n_sent += _count(batch, "num_sentences", lambda b: b.embeddings.shape[0])
            n_tok += _count(batch, "num_target_tokens", lambda b: b.tokens.numel())
            flops += float(model.flops_per_batch(batch))
            if use_fsdp:
                model.set_requires_gradient_sync(micro == t_cfg.grad_accum - 1)
            with autocast:
                loss, _ = model.loss(batch)
            if loss.ndim != 0:
                raise ValueError(f"{type(model).__name__}.loss must return a scalar, got shape {tuple(loss.shape)}")
            scaler.scale(loss / t_cfg.grad_accum).backward()
            loss_sum += loss.detach().double()
        if replicated:
            _all_reduce_grads(model, info)
        scaler.unscale_(optimizer)
        max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(_grad_params(model), max_norm)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        bad_local = ~torch.isfinite(loss_sum)
        if t_cfg.precision != "fp16":  # fp16 overflow is the grad scaler's business
            bad_local = bad_local | ~torch.isfinite(norm.to(device).double())
        f64 = dict(dtype=torch.float64, device=device)
        stats = torch.stack([torch.nan_to_num(loss_sum, nan=0.0, posinf=0.0, neginf=0.0), bad_local.double(),
                             torch.tensor(n_sent, **f64), torch.tensor(n_tok, **f64), torch.tensor(flops, **f64),
                             norm.detach().to(device).double(),
                             torch.tensor(float(_STOP.requested), **f64)])
        stats = _all_reduce_sum(stats, info).tolist()
        bad = stats[1] > 0
        grad_norm = stats[5] / info.world_size  # identical on every rank: the mean is the value
        if bad:
            optimizer.zero_grad(set_to_none=True)
            if scaler.is_enabled():
                scaler.update()
            skipped += 1
            bad_in_row += 1
            logger.message(f"step {step + 1}: non-finite loss or gradient, update skipped "
                           f"({bad_in_row} in a row, {skipped} in total)")
            if bad_in_row >= t_cfg.max_bad_steps:
                latest = ckpt.latest_checkpoint(ckpt_root)
                raise TrainingAborted(
                    f"{bad_in_row} non-finite steps in a row (train.max_bad_steps={t_cfg.max_bad_steps}) at step "
                    f"{step + 1}; last good checkpoint: {latest if latest else 'none'}")
        else:
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            bad_in_row = 0
            last_loss = stats[0] / (t_cfg.grad_accum * info.world_size)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        dt = time.perf_counter() - t0
        if step > start_step:  # the first step includes start-up costs
            step_times.append(dt)
        for k, v in (("time", dt), ("sent", stats[2]), ("tok", stats[3]), ("flops", stats[4]), ("steps", 1)):
            window[k] += v
        done = step + 1
        if done % t_cfg.log_every == 0 or done == t_cfg.steps:
            w = window
            logger.log({"kind": "train", "step": done,
                        "loss": None if bad else last_loss, "lr": lr, "grad_norm": grad_norm,
                        "sentences_per_s": w["sent"] / w["time"], "tokens_per_s": w["tok"] / w["time"],
                        "mfu": w["flops"] / w["time"] / (peak * info.world_size),
                        "step_s": w["time"] / w["steps"],
                        "mem_gib": memory_gib(device), "skipped_steps": skipped})
            window = {k: 0.0 for k in window}
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
        if t_cfg.eval_every and done % t_cfg.eval_every == 0:
            result["eval_loss"] = evaluate(model, cfg, info, data_factory, autocast)
            logger.log({"kind": "eval", "step": done, "eval_loss": result["eval_loss"]})
        if sample_fn is not None and t_cfg.sample_every and done % t_cfg.sample_every == 0:
            _write_samples(model, sample_fn, done, run_dir, info)
        if (t_cfg.checkpoint_every and done % t_cfg.checkpoint_every == 0) or done == t_cfg.steps:
            if checkpoint_now(done):
                last_saved = done
        result.update(step=done, loss=last_loss, skipped_steps=skipped)
        if stats[6] > 0 and done < t_cfg.steps:  # a rank got SIGUSR1: all ranks save and stop here
            if checkpoint_now(done):
                last_saved = done
            result["stopped"] = True
            logger.message(f"stop requested (SIGUSR1): checkpoint saved at step {done}, exiting")
            break
    logger.close()
    result["steps_per_s"] = (len(step_times) / sum(step_times)) if step_times else None
    result["checkpoint"] = (str(ckpt_root / ckpt.step_dir_name(last_saved)) if last_saved is not None else None)
    return result


def evaluate(model: nn.Module, cfg: RunConfig, info: DistInfo, data_factory: DataFactory,
             autocast=None) -> float:
    """Mean loss over `train.eval_batches` validation micro-batches per rank (a fresh loader each time, so
    every evaluation sees the same batches), averaged over ranks."""
    loader = data_factory(cfg, "val", info)
    stream = _BatchStream(loader)
    total = torch.zeros((), dtype=torch.float64, device=info.device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for _ in range(cfg.train.eval_batches):
            batch = stream.next().to(info.device)
            with autocast or contextlib.nullcontext():
                loss, _ = model.loss(batch)
            total += loss.double()
    model.train(was_training)
    total = _all_reduce_sum(total, info)
    return float(total.item()) / (cfg.train.eval_batches * info.world_size)


def _write_samples(model: nn.Module, sample_fn: SampleFn, step: int, run_dir: Path, info: DistInfo) -> None:
    """Call the sample hook on every rank (it may run sharded forwards); rank 0 appends to samples.jsonl."""
    import json

    was_training = model.training
    model.eval()
    with torch.no_grad():
        record = sample_fn(model, step)
    model.train(was_training)
    if info.is_main and record is not None:
        with (run_dir / "samples.jsonl").open("a") as f:
            f.write(json.dumps({"step": step, **(record if isinstance(record, dict) else {"samples": record})},
                               default=str) + "\n")
