"""The one training loop for every model family: `run_training(cfg) -> dict`.

    run_training = validate -> init_distributed -> build_run -> train -> (shutdown)
    build_run    = model (family factory), parallelize (FSDP2 or not), optimizer, lr schedule, grad scaler,
                   train loader, metrics logger, resume from the newest verified checkpoint
    train        = for each optimizer step: train_step -> apply_or_skip -> the cadence
                   (log_progress, maybe_evaluate, maybe_sample, maybe_checkpoint, stop on SIGUSR1)
    train_step   = `train.grad_accum` micro-batches (gradient sync only on the last), gradient clipping,
                   one all-reduce of the step's statistics -> `StepStats` (named fields)

Non-finite steps are skipped (no update); `train.max_bad_steps` of them in a row abort the run
(TrainingAborted). Loss normalisation: a family returns a mean loss per micro-batch, and the step's
gradient is the mean over the micro-batches of all ranks (so a run with 2 ranks x 1 micro-batch follows
the same trajectory as 1 rank x 2 micro-batches fed the same batches); or a family returns a *sum* over
targets and says so with `metrics["loss_sum_targets"] = n` (the LCMs' default, `reduction: sum` in Meta's
recipes): the step's gradient is then divided by the targets of all micro-batches and ranks, as Meta's
`lcm/train/trainer.py` `normalize_gradients` does (grad * world_size / total targets after the averaging
all-reduce), i.e. the gradient of the per-target mean over the whole step, as one big batch would give;
the logged loss (train and eval) is then that per-target mean, as Meta's metric bag reports it.
"""
from __future__ import annotations

import contextlib
import random
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from sonar_train import checkpoint as ckpt
from sonar_train.config import ConfigError, RunConfig, resume_changes, save_config, validate
from sonar_train.metrics import MetricsLogger, memory_gib, peak_flops, rewind_metrics
from sonar_train.optim import build_optimizer, build_scheduler
from sonar_train.parallel import DTYPES, DistInfo, init_distributed, parallelize, shutdown_distributed, uses_fsdp


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


class CheckpointNotSaved(RuntimeError):
    """Training ran to its end, but its last checkpoint could not be saved (or is not good); the message
    names the newest good checkpoint. `result` holds what run_training would have returned."""

    def __init__(self, message: str, result: dict[str, Any]):
        super().__init__(message)
        self.result = result


class Loader(Protocol):
    def __iter__(self): ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


ModelFactory = Callable[[RunConfig], nn.Module]
DataFactory = Callable[[RunConfig, str, DistInfo], Loader]  # (cfg, "train"|"val", dist info)
SampleFn = Callable[[nn.Module, int], dict]  # (model, step) -> JSON-able record


def default_model_factory(cfg: RunConfig) -> nn.Module:
    """Build the family named by `model.family` through the library's registry (train/sonar_train/families.py passes the
    run's sections to sonar_llm.models.build; the models package is imported lazily)."""
    from sonar_train.families import build_model

    return build_model(cfg)


def shard_verification(mode: str, info: DistInfo, workers: int = 0) -> dict[str, Any]:
    """ShardedDataset arguments for `data.verify`: "full" = sha256 of each shard when first opened (with
    DataLoader workers: all shards up front in this process, so that the workers do not each hash them again),
    "sampled" = this rank's share of the per-block sha256s up front (every block checked once across the job),
    "size" = sizes and shard.json checksums only."""
    if mode == "full":
        return {"verify": "full", "lazy": workers == 0}
    if mode == "sampled":
        return {"verify": "sampled", "rank": info.rank, "world_size": info.world_size}
    return {"verify": "size"}


def default_data_factory(cfg: RunConfig, split: str, info: DistInfo) -> Loader:
    """Resumable packed-batch loader over the train (endless, shuffled) or validation (one ordered pass,
    restarted by the caller) shards, split by rank, checked as `data.verify` says."""
    from sonar_llm.data.loader import make_dataloader
    from sonar_llm.data.shards import ShardedDataset

    train = split == "train"
    workers = cfg.data.workers if train else 0
    dataset = ShardedDataset(cfg.data.path if train else cfg.data.val_path,
                             **shard_verification(cfg.data.verify, info, workers))
    return make_dataloader(dataset, num_workers=workers,
                           pin_memory=info.device.type == "cuda", max_sentences=cfg.data.max_sentences,
                           max_tokens=cfg.data.max_tokens, max_docs=cfg.data.max_docs, seed=cfg.data.seed,
                           rank=info.rank,
                           world_size=info.world_size, shuffle=train, loop=train)


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


# ------------------------------------------------------------------------------------------------ the run
@dataclass
class Run:
    """Everything one training run holds; built by `build_run`, advanced by `train`."""

    cfg: RunConfig
    info: DistInfo
    model: nn.Module
    use_fsdp: bool  # sharded with FSDP2 (else: one process, or full replicas with a gradient all-reduce)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    loader: Loader  # the training loader (its state is checkpointed)
    batches: _BatchStream
    data_factory: DataFactory
    sample_fn: SampleFn | None
    logger: MetricsLogger
    autocast: Any  # context manager for the loss computation
    peak_flops: float  # per device, for MFU
    run_dir: Path
    ckpt_root: Path
    step: int = 0  # optimizer steps done
    skipped: int = 0  # non-finite steps skipped in total
    bad_in_row: int = 0
    last_saved: int | None = None  # step of the newest checkpoint this run saved or resumed from
    last_good: int | None = None  # step of the newest good checkpoint (saved, or resumed from)
    good_base: int = 0  # the state a new checkpoint is compared with: the last good one, or the start
    updates_since_good: int = 0  # optimizer updates (not skipped) since `good_base`
    last_loss: float | None = None
    eval_loss: float | None = None

    @property
    def replicated(self) -> bool:
        """Full replicas on several ranks (parallel.fsdp = false under torchrun)."""
        return not self.use_fsdp and dist.is_initialized() and self.info.world_size > 1


def build_run(cfg: RunConfig, info: DistInfo, model_factory: ModelFactory, data_factory: DataFactory,
              sample_fn: SampleFn | None, stream, changes: list[str] = ()) -> Run:
    """Model, parallelism, optimizer, schedule, scaler, loader and logger; resumed from the newest verified
    good checkpoint when `train.resume` and one exists (`changes`: config keys that differ from the resumed
    run's, logged as applied). The model is built before anything is written; config.toml/json are written
    only once the run is set up."""
    t_cfg = cfg.train
    run_dir = Path(t_cfg.out_dir)
    ckpt_root = run_dir / "checkpoints"
    _seed_all(t_cfg.seed)  # identical initial weights on every rank
    try:
        model = model_factory(cfg)
    except ValueError as e:  # a family / preset / override the family rejects: a configuration error
        if str(e).startswith(("model.", "sonar.", "data.")):
            raise ConfigError(str(e)) from e
        raise
    if info.is_main:
        ckpt.remove_stale_tmp(ckpt_root)
    if dist.is_initialized():
        dist.barrier()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model factory returned {type(model).__name__}, expected an nn.Module")
    for name in ("loss", "flops_per_batch", "transformer_blocks", "decoder_to"):  # the ConceptFamily contract
        if not callable(getattr(model, name, None)):
            raise TypeError(f"model family {type(model).__name__} lacks the {name}() method")
    if info.is_main:  # a SONAR that cannot decode the data's end sentence: no trained model could ever stop
        from sonar_train.end_sentence import warn_if_end_sentence_lost

        warn_if_end_sentence_lost(model, cfg)
    use_fsdp = uses_fsdp(cfg)
    model = parallelize(model, cfg, info)
    optimizer = build_optimizer(model, cfg.optim, info.device)
    scheduler = build_scheduler(optimizer, cfg.optim, t_cfg.steps)
    if use_fsdp and t_cfg.precision == "fp16":
        # each rank sees only its gradient shard: the scaler all-reduces "found inf" so all ranks agree
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        scaler = ShardedGradScaler(info.device.type)
    else:
        scaler = torch.amp.GradScaler(info.device.type, enabled=t_cfg.precision == "fp16")
    loader = data_factory(cfg, "train", info)
    dtype = DTYPES[t_cfg.precision]
    run = Run(cfg=cfg, info=info, model=model, use_fsdp=use_fsdp, optimizer=optimizer, scheduler=scheduler,
              scaler=scaler, loader=loader, batches=None, data_factory=data_factory, sample_fn=sample_fn,
              logger=MetricsLogger(run_dir, info.is_main, t_cfg.tensorboard, stream=stream),
              autocast=(torch.autocast(info.device.type, dtype=dtype) if dtype != torch.float32
                        else contextlib.nullcontext()),
              peak_flops=peak_flops(info.device, t_cfg.precision, t_cfg.peak_flops),
              run_dir=run_dir, ckpt_root=ckpt_root)
    if not (t_cfg.resume and _resume(run, changes)):
        _seed_all(t_cfg.seed + 1 + info.rank)  # per-rank streams for dropout / diffusion noise
    if info.is_main:
        for path in ckpt.set_aside_newer(ckpt_root, run.step):
            run.logger.message(f"checkpoint of step {ckpt.checkpoint_step(path)} is after the step this run starts "
                               f"from ({run.step}): moved to {path} (never resumed or pruned; delete it when you no "
                               f"longer need it)")
        save_config(cfg, run_dir)
        dropped = rewind_metrics(run_dir / "metrics.jsonl", run.step)
        if dropped:
            run.logger.message(f"metrics.jsonl: {dropped} record(s) after step {run.step} marked stale")
    run.batches = _BatchStream(loader)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    run.logger.message(f"{cfg.model.family}/{cfg.model.preset}: {n_params / 1e6:.2f}M trainable parameters, "
                       f"world size {info.world_size} ({'FSDP2' if use_fsdp else 'replicated'}), device "
                       f"{info.device}, steps {run.step}->{t_cfg.steps}")
    return run


def _resume(run: Run, changes: list[str]) -> bool:
    """Restore the newest checkpoint that verifies and is good into `run`; False if there is none. The
    optimizer's hyper-parameters and the lr schedule come from the current config (`changes` say what
    differs from the resumed run's); the optimizer state, counters, RNG and data position from the checkpoint."""
    path = ckpt.find_resumable(run.ckpt_root, say=run.logger.message)
    if path is None:
        return False
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in run.optimizer.param_groups]
    trainer_state, rank_state = ckpt.load_checkpoint(path, run.model, run.optimizer, verify=False)
    for group, hyper in zip(run.optimizer.param_groups, fresh):
        group.update(hyper)
    run.step = run.last_saved = run.last_good = run.good_base = int(trainer_state["step"])
    run.scheduler = build_scheduler(run.optimizer, run.cfg.optim, run.cfg.train.steps, start_step=run.step)
    run.scaler.load_state_dict(trainer_state["scaler"])
    run.loader.load_state_dict(rank_state["loader"])
    run.skipped = int(trainer_state["skipped_steps"])
    run.bad_in_row = int(trainer_state["bad_in_row"])
    run.logger.message(f"resumed from {path} at step {run.step}")
    if changes:
        run.logger.message("config changes applied on resume: " + "; ".join(changes))
    return True


# ------------------------------------------------------------------------------------------------ one step
@dataclass
class StepStats:
    """One optimizer step, summed over its micro-batches and all ranks (the same on every rank)."""

    loss: float | None  # mean micro-batch loss over micro-batches and ranks; None when the step is skipped
    skipped: bool  # a rank saw a non-finite loss (or, outside fp16, gradient norm): no update
    sentences: float  # sentences in the step's batches
    tokens: float  # target tokens in the step's batches
    flops: float  # model FLOPs of the step (forward + backward)
    grad_norm: float  # global gradient norm before clipping
    stop_requested: bool  # a rank received SIGUSR1
    seconds: float = 0.0  # wall time of the step on this rank

    # the all-reduced vector: one float64 per name, summed over ranks (the only place that packs it)
    _PACKED = ("loss_sum", "bad_ranks", "sentences", "tokens", "flops", "grad_norm_sum", "stop_ranks")

    @classmethod
    def all_reduce(cls, local: dict[str, torch.Tensor | float], info: DistInfo, micro_batches: int) -> StepStats:
        """Sum this rank's values over all ranks and name them (`local` holds every name in _PACKED)."""
        f64 = dict(dtype=torch.float64, device=info.device)
        vec = torch.stack([torch.as_tensor(local[k], **f64).reshape(()) for k in cls._PACKED])
        total = dict(zip(cls._PACKED, _all_reduce_sum(vec, info).tolist()))
        skipped = total["bad_ranks"] > 0
        return cls(loss=None if skipped else total["loss_sum"] / (micro_batches * info.world_size),
                   skipped=skipped, sentences=total["sentences"], tokens=total["tokens"], flops=total["flops"],
                   grad_norm=total["grad_norm_sum"] / info.world_size,  # the same on every rank: the mean is it
                   stop_requested=total["stop_ranks"] > 0)


def train_step(run: Run) -> StepStats:
    """Forward/backward over `train.grad_accum` micro-batches, gradient all-reduce (replicated mode),
    unscale and clip. The optimizer is not stepped here (see `apply_or_skip`)."""
    cfg, model, device = run.cfg, run.model, run.info.device
    t0 = time.perf_counter()
    accum = cfg.train.grad_accum
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    sentences = tokens = flops = 0.0
    sum_targets: float | None = None  # targets of sum-reduced losses ("loss_sum_targets"), None: mean losses
    for micro in range(accum):
        batch = run.batches.next().to(device)
        sentences += float(batch.num_sentences)
        tokens += float(batch.num_target_tokens)
        flops += float(model.flops_per_batch(batch))
        if run.use_fsdp:
            model.set_requires_gradient_sync(micro == accum - 1)
        with run.autocast:
            loss, metrics = model.loss(batch)
        if loss.ndim != 0:
            raise ValueError(f"{type(model).__name__}.loss must return a scalar, got shape {tuple(loss.shape)}")
        if "loss_sum_targets" in metrics:
            sum_targets = (sum_targets or 0.0) + float(metrics["loss_sum_targets"])
        run.scaler.scale(loss / accum).backward()
        loss_sum += loss.detach().double()
    if run.replicated:
        _all_reduce_grads(model, run.info)
    params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
    if sum_targets is not None:  # Meta's normalize_gradients: per-target mean over the step's micro-batches and ranks
        total = _all_reduce_sum(torch.tensor(sum_targets, dtype=torch.float64, device=device), run.info)
        factor = accum * run.info.world_size / max(float(total.item()), 1.0)
        for p in params:
            p.grad.mul_(factor)
        loss_sum *= factor  # StepStats' loss becomes sum of losses / total targets
    run.scaler.unscale_(run.optimizer)
    max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if run.use_fsdp:  # a DTensor over the sharded gradients
        norm = norm.full_tensor()
    norm = norm.detach().to(device).double()
    bad = ~torch.isfinite(loss_sum)
    if cfg.train.precision != "fp16":  # fp16 overflow is the grad scaler's business
        bad = bad | ~torch.isfinite(norm)
    local = {"loss_sum": torch.nan_to_num(loss_sum, nan=0.0, posinf=0.0, neginf=0.0), "bad_ranks": bad.double(),
             "sentences": sentences, "tokens": tokens, "flops": flops, "grad_norm_sum": norm,
             "stop_ranks": float(_STOP.requested)}
    stats = StepStats.all_reduce(local, run.info, accum)
    stats.seconds = time.perf_counter() - t0
    return stats


def apply_or_skip(run: Run, stats: StepStats) -> float:
    """Step the optimizer (or drop the gradients of a skipped step, aborting after too many in a row) and
    the schedule; returns the lr the step used."""
    opt, scaler = run.optimizer, run.scaler
    if stats.skipped:
        opt.zero_grad(set_to_none=True)
        if scaler.is_enabled():
            scaler.update()
        run.skipped += 1
        run.bad_in_row += 1
        run.logger.message(f"step {run.step + 1}: non-finite loss or gradient, update skipped "
                           f"({run.bad_in_row} in a row, {run.skipped} in total)")
        limit = run.cfg.train.max_bad_steps
        if run.bad_in_row >= limit:
            latest = ckpt.newest_good_checkpoint(run.ckpt_root)
            raise TrainingAborted(f"{run.bad_in_row} non-finite steps in a row (train.max_bad_steps={limit}) at "
                                  f"step {run.step + 1}; last good checkpoint: {latest if latest else 'none'}")
    else:
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        run.bad_in_row = 0
        run.updates_since_good += 1
        run.last_loss = stats.loss
    lr = run.scheduler.get_last_lr()[0]
    run.scheduler.step()
    return lr


# ------------------------------------------------------------------------------------------------ cadence
@dataclass
class _Window:
    """Throughput accumulated since the last progress line."""

    seconds: float = 0.0
    sentences: float = 0.0
    tokens: float = 0.0
    flops: float = 0.0
    steps: int = 0

    def add(self, s: StepStats) -> None:
        self.seconds += s.seconds
        self.sentences += s.sentences
        self.tokens += s.tokens
        self.flops += s.flops
        self.steps += 1


def _every(step: int, period: int) -> bool:
    return bool(period) and step % period == 0


def log_progress(run: Run, stats: StepStats, lr: float, window: _Window) -> _Window:
    """Every `train.log_every` steps (and at the end): one metrics record; returns the next window."""
    done, t_cfg, device = run.step, run.cfg.train, run.info.device
    if not (_every(done, t_cfg.log_every) or done == t_cfg.steps):
        return window
    w = window
    run.logger.log({"kind": "train", "step": done, "loss": None if stats.skipped else run.last_loss, "lr": lr,
                    "grad_norm": stats.grad_norm, "sentences_per_s": w.sentences / w.seconds,
                    "tokens_per_s": w.tokens / w.seconds,
                    "mfu": w.flops / w.seconds / (run.peak_flops * run.info.world_size),
                    "step_s": w.seconds / w.steps, "mem_gib": memory_gib(device), "skipped_steps": run.skipped})
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return _Window()


def maybe_evaluate(run: Run) -> None:
    """Every `train.eval_every` steps and at the last step (so a run shorter than the period reports one)."""
    every = run.cfg.train.eval_every
    if _every(run.step, every) or (every and run.step == run.cfg.train.steps):
        run.eval_loss = evaluate(run.model, run.cfg, run.info, run.data_factory, run.autocast)
        run.logger.log({"kind": "eval", "step": run.step, "eval_loss": run.eval_loss})


def maybe_sample(run: Run) -> None:
    if run.sample_fn is not None and _every(run.step, run.cfg.train.sample_every):
        _write_samples(run.model, run.sample_fn, run.step, run.run_dir, run.info)


def _weights_finite(run: Run) -> bool:
    """This rank's trainable weights (its shards under FSDP2) are all finite."""
    for p in run.model.parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        if p.requires_grad and not bool(torch.isfinite(local).all()):
            return False
    return True


def _reshard(model: nn.Module) -> None:
    """Give FSDP2 modules back their sharded parameters after forwards without a backward (evaluation,
    samples): the root is sharded with reshard_after_forward=False and would otherwise stay unsharded, its
    parameters plain tensors until the next backward (so a checkpoint or a finiteness check in between
    would see full, not sharded, weights)."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def save_checkpoint(run: Run) -> bool:
    """Checkpoint the current step (collective, once per step); True if it is saved. It is marked good when
    the weights are finite and not every step since the last good checkpoint (or the start) was skipped."""
    if run.last_saved == run.step:
        return True
    progress = run.step == run.good_base or run.updates_since_good > 0
    finite = _weights_finite(run)
    reason = ("non-finite weights" if not finite else
              "" if progress else f"every step since step {run.good_base} was skipped")
    trainer_state = {"scaler": run.scaler.state_dict(), "skipped_steps": run.skipped, "bad_in_row": run.bad_in_row}
    ok = ckpt.save_checkpoint(run.ckpt_root, run.step, run.model, run.optimizer, trainer_state,
                              {"loader": run.loader.state_dict()}, keep_last=run.cfg.train.keep_last,
                              good=finite and progress, reason=reason)
    if ok:
        run.last_saved = run.step
        good, why = ckpt.is_good(run.ckpt_root / ckpt.step_dir_name(run.step))
        if good:
            run.last_good = run.good_base = run.step
            run.updates_since_good = 0
        else:
            run.logger.message(f"checkpoint of step {run.step} is not marked good ({why})")
    return ok


def maybe_checkpoint(run: Run) -> None:
    if _every(run.step, run.cfg.train.checkpoint_every) or run.step == run.cfg.train.steps:
        save_checkpoint(run)


def stop_if_requested(run: Run, stats: StepStats) -> bool:
    """A rank got SIGUSR1: every rank saves and stops here (True)."""
    if not stats.stop_requested or run.step >= run.cfg.train.steps:
        return False
    save_checkpoint(run)
    run.logger.message(f"stop requested (SIGUSR1): checkpoint saved at step {run.step}, exiting")
    return True


# ------------------------------------------------------------------------------------------------ the loop
def train(run: Run) -> dict[str, Any]:
    """Run the remaining steps; returns the final metrics."""
    result: dict[str, Any] = {"step": run.step, "start_step": run.step, "loss": None, "eval_loss": None,
                              "skipped_steps": run.skipped}
    first_step, step_times, window = run.step, [], _Window()
    _STOP.install()
    run.model.train()
    while run.step < run.cfg.train.steps:
        stats = train_step(run)
        lr = apply_or_skip(run, stats)
        if run.step > first_step:  # the first step includes start-up costs
            step_times.append(stats.seconds)
        run.step += 1
        window.add(stats)
        window = log_progress(run, stats, lr, window)
        maybe_evaluate(run)
        maybe_sample(run)
        maybe_checkpoint(run)
        result.update(step=run.step, loss=run.last_loss, skipped_steps=run.skipped, eval_loss=run.eval_loss)
        if stop_if_requested(run, stats):
            result["stopped"] = True
            break
    run.logger.close()
    result["steps_per_s"] = (len(step_times) / sum(step_times)) if step_times else None
    result["checkpoint"] = (str(run.ckpt_root / ckpt.step_dir_name(run.last_saved))
                            if run.last_saved is not None else None)
    if run.last_good != run.step:
        good = ckpt.newest_good_checkpoint(run.ckpt_root)
        where = f"step {ckpt.checkpoint_step(good)} ({good})" if good else "none"
        raise CheckpointNotSaved(f"stopped at step {run.step}, but its checkpoint could not be saved as a good one; "
                                 f"newest good checkpoint: {where}", result)
    return result


def run_training(cfg: RunConfig, *, model_factory: ModelFactory | None = None,
                 data_factory: DataFactory | None = None, sample_fn: SampleFn | None = None,
                 stream=None) -> dict[str, Any]:
    """Train as configured; returns the final metrics (step, loss, eval_loss, skipped_steps, steps_per_s,
    checkpoint, and stopped=True when SIGUSR1 ended the run early after a checkpoint). Raises TrainingAborted /
    ValueError / ... after logging; the process group is destroyed on the way out in every case.
    `sample_fn(model, step) -> record` is called every `train.sample_every` steps (None: no samples)."""
    validate(cfg, check_paths=data_factory is None, check_model=model_factory is None)
    if data_factory is None and cfg.train.eval_every and not cfg.data.val_path:
        raise ConfigError("train.eval_every > 0 needs data.val_path (the validation shards)")
    changes = resume_changes(cfg)  # refuses a model/data change before anything is written
    info = init_distributed(cfg)
    try:
        run = build_run(cfg, info, model_factory or default_model_factory, data_factory or default_data_factory,
                        sample_fn, stream, changes)
        return train(run)
    except BaseException as e:
        if isinstance(e, (ConfigError, ckpt.CheckpointError)):  # bad input (a damaged checkpoint names its file):
            raise  # one line, from the caller (train/main.py: exit 2)
        if not isinstance(e, KeyboardInterrupt):
            print(f"[rank {info.rank}] training failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            if not isinstance(e, (TrainingAborted, CheckpointNotSaved)):
                traceback.print_exc(file=sys.stderr)
            with contextlib.suppress(AttributeError, TypeError):
                e.reported = True  # type: ignore[attr-defined]  # train/main.py: said already, exit 1
        raise
    finally:
        _STOP.uninstall()
        shutdown_distributed(info)


def evaluate(model: nn.Module, cfg: RunConfig, info: DistInfo, data_factory: DataFactory,
             autocast=None) -> float:
    """Mean loss over `train.eval_batches` validation micro-batches per rank (a fresh loader each time, so
    every evaluation sees the same batches), averaged over ranks; for sum-reduced losses
    (`metrics["loss_sum_targets"]`) the sum of all losses over the sum of all targets. The random state is
    restored afterwards (a loss that draws noise, as Two-Tower's, would otherwise shift training's draws), so
    training is the same whatever the evaluation schedule, and a resumed run equals an uninterrupted one."""
    loader = data_factory(cfg, "val", info)
    stream = _BatchStream(loader)
    total = torch.zeros(2, dtype=torch.float64, device=info.device)  # losses, targets of sum-reduced losses
    was_training = model.training
    model.eval()
    devices = [info.device] if info.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        for _ in range(cfg.train.eval_batches):
            batch = stream.next().to(info.device)
            with autocast or contextlib.nullcontext():
                loss, metrics = model.loss(batch)
            total[0] += loss.double()
            total[1] += float(metrics.get("loss_sum_targets", 0))
    model.train(was_training)
    _reshard(model)
    total = _all_reduce_sum(total, info)
    if total[1] > 0:
        return float(total[0].item()) / float(total[1].item())
    return float(total[0].item()) / (cfg.train.eval_batches * info.world_size)


def _write_samples(model: nn.Module, sample_fn: SampleFn, step: int, run_dir: Path, info: DistInfo) -> None:
    """Call the sample hook on every rank (it may run sharded forwards); rank 0 appends to samples.jsonl."""
    import json

    was_training = model.training
    model.eval()
    with torch.no_grad():
        record = sample_fn(model, step)
    model.train(was_training)
    _reshard(model)
    if info.is_main and record is not None:
        with (run_dir / "samples.jsonl").open("a") as f:
            f.write(json.dumps({"step": step, **(record if isinstance(record, dict) else {"samples": record})},
                               default=str) + "\n")
