"""Atomic, resumable checkpoints with torch.distributed.checkpoint (DCP).

Layout of `<run>/checkpoints/`:
    step_000100/          a complete checkpoint: DCP shards of {"model", "optim"} (frozen parameters such as
                          the SONAR decoder excluded), trainer.pt (step, scheduler, grad scaler, counters;
                          rank 0), rank_<r>.pt (RNG states and data-loader state of rank r), COMPLETE
    step_000200.tmp/      a save in progress (or one that failed): never read, removed on the next start
    latest                the name of the newest complete checkpoint (replaced atomically)
Every rank writes into `step_X.tmp/`; once all succeeded rank 0 renames it to `step_X/` and then replaces
`latest`. A failure anywhere (e.g. ENOSPC) is agreed on by all ranks, the .tmp directory is removed and the
previous checkpoint stays the latest. Multi-node runs need `train.out_dir` on a shared file system.
"""
from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

_STEP_RE = re.compile(r"^step_(\d+)$")
_OPTIONS = StateDictOptions(ignore_frozen_params=True)


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def _make_writer(path: Path) -> FileSystemWriter:
    """The DCP storage writer (a seam: tests substitute one that fails mid-save)."""
    return FileSystemWriter(str(path))


def rng_state(device: torch.device) -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _dist() else 0


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns on every single-process save/load; that mode is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is .*single process")
        yield


def _barrier() -> None:
    if _dist():
        dist.barrier()


def _all_ok(ok: bool) -> bool:
    """True only if `ok` on every rank."""
    if not _dist():
        return ok
    flag = torch.tensor([0 if ok else 1], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag)
    return int(flag.item()) == 0


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(ckpt_root: str | os.PathLike, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, trainer_state: dict[str, Any],
                    rank_state: dict[str, Any], keep_last: int = 3) -> bool:
    """Save a checkpoint of `step` (collective: every rank calls it). Returns True if it is complete and
    now the latest, False if any rank failed with an OSError (the previous checkpoint stays latest).

    trainer_state: rank-0 state (scheduler, scaler, counters...); rank_state: this rank's state
    (data loader...). RNG states are added here."""
    root = Path(ckpt_root)
    rank = _rank()
    final = root / step_dir_name(step)
    tmp = root / (step_dir_name(step) + ".tmp")
    ok = True
    error: BaseException | None = None
    try:
        if rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
    except OSError as e:
        ok, error = False, e
    ok = _all_ok(ok)
    if ok:
        try:
            model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTIONS)
            with _quiet_single_process():
                dcp.save({"model": model_sd, "optim": optim_sd}, storage_writer=_make_writer(tmp), no_dist=not _dist())
            extra = {"rng": rng_state(_device_of(model)), **rank_state}
            torch.save(extra, tmp / f"rank_{rank}.pt")
            if rank == 0:
                torch.save({"step": step, **trainer_state}, tmp / "trainer.pt")
        except (OSError, CheckpointException) as e:  # ENOSPC, EIO, a rank's DCP write failing...
            ok, error = False, e
        ok = _all_ok(ok)
    if ok and rank == 0:
        try:
            (tmp / "COMPLETE").write_text(f"{step}\n")
            _fsync_dir(tmp)
            if final.exists():  # a stale copy of the same step from an earlier attempt
                shutil.rmtree(final)
            os.replace(tmp, final)
            pointer = root / "latest.tmp"
            pointer.write_text(final.name + "\n")
            os.replace(pointer, root / "latest")
            _fsync_dir(root)
        except OSError as e:
            ok, error = False, e
    ok = _all_ok(ok)
    if not ok:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            if error is None:
                error = RuntimeError("another rank failed")
            print(f"[checkpoint] saving step {step} failed ({error}); previous checkpoint kept", flush=True)
        _barrier()
        return False
    if rank == 0:
        prune(root, keep_last)
    _barrier()
    return True


def _device_of(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def complete_steps(ckpt_root: str | os.PathLike) -> list[int]:
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    steps = []
    for d in root.iterdir():
        m = _STEP_RE.match(d.name)
        if m and d.is_dir() and (d / "COMPLETE").is_file():
            steps.append(int(m.group(1)))
    return sorted(steps)


def latest_checkpoint(ckpt_root: str | os.PathLike) -> Path | None:
    """The checkpoint named by `latest` if complete, else the newest complete step directory, else None."""
    root = Path(ckpt_root)
    pointer = root / "latest"
    if pointer.is_file():
        cand = root / pointer.read_text().strip()
        if (cand / "COMPLETE").is_file():
            return cand
    steps = complete_steps(root)
    return root / step_dir_name(steps[-1]) if steps else None


def prune(ckpt_root: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints."""
    steps = complete_steps(ckpt_root)
    for s in steps[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(ckpt_root / step_dir_name(s), ignore_errors=True)


def remove_stale_tmp(ckpt_root: str | os.PathLike) -> None:
    """Remove leftovers of interrupted saves (rank 0, before training starts)."""
    root = Path(ckpt_root)
    if root.is_dir():
        for d in root.glob("step_*.tmp"):
            shutil.rmtree(d, ignore_errors=True)


def load_checkpoint(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load model + optimizer in place (collective) and restore this rank's RNG states.
    Returns (trainer_state, rank_state)."""
    path = Path(path)
    if not (path / "COMPLETE").is_file():
        raise FileNotFoundError(f"not a complete checkpoint directory: {path}")
    rank = _rank()
    rank_file = path / f"rank_{rank}.pt"
    if not rank_file.is_file():
        raise FileNotFoundError(f"{rank_file}: missing (was the checkpoint written with fewer ranks?)")
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTIONS)
    state = {"model": model_sd, "optim": optim_sd}
    reader = FileSystemReader(str(path))
    saved = reader.read_metadata().state_dict_metadata
    missing = [k for k in model_sd if f"model.{k}" not in saved]
    if missing:
        raise ValueError(f"{path}: checkpoint lacks model keys {missing[:8]}{' ...' if len(missing) > 8 else ''} "
                         f"(was it written by another model family or preset?)")
    # optimizer state may be partial: AdamW has no state for parameters that never received a gradient
    with _quiet_single_process():
        dcp.load(state, storage_reader=reader, planner=DefaultLoadPlanner(allow_partial_load=True),
                 no_dist=not _dist())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))
    trainer = torch.load(path / "trainer.pt", weights_only=False)
    extra = torch.load(rank_file, weights_only=False)
    set_rng_state(extra.pop("rng"), _device_of(model))
    return trainer, extra
