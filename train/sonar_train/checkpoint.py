"""Atomic, verified, resumable checkpoints with torch.distributed.checkpoint (DCP). No file of a checkpoint is
ever unpickled with code execution.

Layout of `<run>/checkpoints/`:
    step_000100/          a complete checkpoint:
        .metadata, __<r>_<i>.distcp   DCP shards of {"model", "optim"} (frozen parameters such as the SONAR
                          decoder excluded); read with sonar_llm.dcp_safe (allow-listed metadata unpickler,
                          non-tensor values with torch.load(weights_only=True))
        trainer.json      rank 0: step, grad-scaler state, skipped / bad-in-a-row counters (JSON; the lr
                          schedule is not stored: a resume rebuilds it from its config and the step)
        rank_<r>.json     rank r: data-loader state, Python and NumPy RNG states (JSON)
        rank_<r>.safetensors  rank r: torch (and CUDA) RNG state tensors
        checksums.json    written last: {"format", "step", "good", "reason", "files": {name: {"bytes", "sha256"}}}
                          for every file above; "good" = the weights are finite on every rank and the steps
                          since the previous good checkpoint were not all skipped (reason says why not)
        COMPLETE          the step number
    step_000200.tmp/      a save in progress (or one that failed): never read, removed on the next start
    latest                the name of the newest complete *good* checkpoint (replaced atomically)
    set_aside/step_000300/  a checkpoint after the step the run started from (one passed over on resume, or
                          every one when `train.resume=false` starts over): moved here before training
                          (`set_aside_newer`), so it neither outranks the run's new checkpoints in pruning and
                          resume nor is overwritten by a save of the same step; never read or deleted
Save: every rank writes into `step_X.tmp/`; once all succeeded, the ranks hash the files (each a share of
them), rank 0 writes checksums.json and COMPLETE, fsyncs, renames the folder to `step_X/` and, if the
checkpoint is good, replaces `latest`. A failure anywhere (e.g. ENOSPC) is agreed on by all ranks, the .tmp
directory is removed and the previous checkpoint stays the latest. Pruning keeps the newest `keep_last`
complete checkpoints and always the newest good one.
Resume (`find_resumable`): newest first, the first checkpoint that verifies (every file's size and sha256,
the reading shared by the ranks) and is good; each one passed over is reported with the reason (the file
that failed, or why it is not good). Multi-node runs need `train.out_dir` on a shared file system.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from sonar_llm.checkpoints import (checkpoint_step, complete_steps, latest_checkpoint,  # noqa: F401 (re-exported)
                                   step_dir_name)
from sonar_llm.checkpoints import quiet_single_process as _quiet_single_process
from sonar_llm.cli import shareable_folder
from sonar_llm.dcp_safe import (CHECKSUMS_FILE, SafeFileSystemReader, SafeLoadPlanner, UnsafeCheckpointError,
                                file_digest, read_checksums, verify_checkpoint)

_OPTIONS = StateDictOptions(ignore_frozen_params=True)
CHECKSUM_FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used (fails verification or loading); the message names the file."""


def _make_writer(path: Path) -> FileSystemWriter:
    """The DCP storage writer (a seam: tests substitute one that fails mid-save)."""
    return FileSystemWriter(str(path))


# ------------------------------------------------------------------------------------------------ RNG state
def rng_state(device: torch.device) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """This process's RNG states as (JSON-able values, tensors)."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    values = {"python": {"version": version, "state": list(mt), "gauss": gauss},
              "numpy": {"name": name, "keys": [int(k) for k in keys], "pos": int(pos), "has_gauss": int(has_gauss),
                        "cached_gaussian": float(cached)}}
    tensors = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        tensors["cuda"] = torch.cuda.get_rng_state(device)
    return values, tensors


def set_rng_state(values: dict[str, Any], tensors: dict[str, torch.Tensor], device: torch.device) -> None:
    py, npy = values["python"], values["numpy"]
    random.setstate((int(py["version"]), tuple(int(x) for x in py["state"]), py["gauss"]))
    np.random.set_state((npy["name"], np.asarray(npy["keys"], dtype=np.uint32), int(npy["pos"]),
                         int(npy["has_gauss"]), float(npy["cached_gaussian"])))
    torch.set_rng_state(tensors["torch"])
    if device.type == "cuda" and "cuda" in tensors:
        torch.cuda.set_rng_state(tensors["cuda"], device)


# ------------------------------------------------------------------------------------------------ helpers
def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _dist() else 0


def _world() -> int:
    return dist.get_world_size() if _dist() else 1


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


def _gather(value: Any) -> list[Any]:
    """Every rank's `value` (JSON-like), on every rank."""
    if not _dist():
        return [value]
    out: list[Any] = [None] * _world()
    dist.all_gather_object(out, value)
    return out


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


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        f.write(json.dumps(obj, indent=1, sort_keys=True))
        f.flush()
        os.fsync(f.fileno())


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from e


def _point_latest(root: Path, name: str) -> None:
    """Replace `<root>/latest` with `name` atomically (the caller fsyncs `root`)."""
    pointer = root / "latest.tmp"
    pointer.write_text(name + "\n")
    os.replace(pointer, root / "latest")


def _device_of(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


# ------------------------------------------------------------------------------------------------ save
def save_checkpoint(ckpt_root: str | os.PathLike, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, trainer_state: dict[str, Any],
                    rank_state: dict[str, Any], keep_last: int = 3, good: bool = True, reason: str = "") -> bool:
    """Save a checkpoint of `step` (collective: every rank calls it). Returns True if it is complete (and,
    when good, the new `latest`), False if any rank failed with an OSError (the previous one stays latest).

    trainer_state: rank-0 JSON-able state (grad scaler, counters...); rank_state: this rank's JSON-able state
    (data loader...); RNG states are added here. good: this rank's verdict (weights finite, progress since
    the last good checkpoint); the checkpoint is good only if every rank says so (`reason` says why not)."""
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
            from safetensors.torch import save_file

            rng_values, rng_tensors = rng_state(_device_of(model))
            _write_json(tmp / f"rank_{rank}.json", {"rng": rng_values, **rank_state})
            save_file({k: v.cpu().contiguous() for k, v in rng_tensors.items()}, str(tmp / f"rank_{rank}.safetensors"))
            if rank == 0:
                _write_json(tmp / "trainer.json", {"step": step, **trainer_state})
        except (OSError, CheckpointException) as e:  # ENOSPC, EIO, a rank's DCP write failing...
            ok, error = False, e
        ok = _all_ok(ok)
    good = _all_ok(good)
    reasons = [r for r in _gather(reason if not good else "") if r]
    digests: dict[str, Any] = {}
    if ok:  # every rank hashes its share of the files (shared file system)
        try:
            names = sorted(p.name for p in tmp.iterdir() if p.is_file())
            mine = {n: file_digest(tmp / n) for i, n in enumerate(names) if i % _world() == rank}
        except OSError as e:
            ok, error, mine = False, e, {}
        ok = _all_ok(ok)
        for part in _gather(mine):
            digests.update(part)
    if ok and rank == 0:
        try:
            _write_json(tmp / CHECKSUMS_FILE, {"format": CHECKSUM_FORMAT, "step": step, "good": good,
                                               "reason": "; ".join(sorted(set(reasons))), "files": digests})
            (tmp / "COMPLETE").write_text(f"{step}\n")
            shareable_folder(tmp)  # safetensors writes its files 0600: give them the umask's permissions
            _fsync_dir(tmp)
            if final.exists():  # a stale copy of the same step from an earlier attempt
                shutil.rmtree(final)
            os.replace(tmp, final)
            if good:
                _point_latest(root, final.name)
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


# ------------------------------------------------------------------------------------------------ find
# step_dir_name / complete_steps / latest_checkpoint / checkpoint_step: sonar_llm.checkpoints (shared with readers)
def is_good(path: str | os.PathLike) -> tuple[bool, str]:
    """(good, reason) as recorded in the checkpoint's checksums.json (False if it has none)."""
    try:
        info = read_checksums(path)
    except UnsafeCheckpointError as e:
        return False, str(e)
    return bool(info.get("good")), str(info.get("reason") or "")


def find_resumable(ckpt_root: str | os.PathLike, say: Callable[[str], None] = print) -> Path | None:
    """Newest complete checkpoint that verifies and is good (collective: the ranks share the hashing and
    agree); every newer one passed over is reported through `say` with its reason. None if there is no
    complete checkpoint; CheckpointError if there are some but none can be used (starting over would
    prune them away)."""
    root = Path(ckpt_root)
    passed = []
    for step in reversed(complete_steps(root)):
        path = root / step_dir_name(step)
        good, reason = is_good(path)
        problems = [p for part in _gather(verify_checkpoint(path, _rank(), _world())) for p in part]
        if problems:
            passed.append(f"{path} fails verification ({'; '.join(problems[:3])})")
        elif not good:
            passed.append(f"{path} is not marked good ({reason})")
        else:
            return path
        say(f"checkpoint {passed[-1]}; trying an older one")
    if passed:
        raise CheckpointError(f"no checkpoint under {root} can be resumed: {'; '.join(passed)}. Move them away "
                              f"or set train.resume=false to start over (they are then moved to {root / 'set_aside'})")
    return None


def newest_good_checkpoint(ckpt_root: str | os.PathLike) -> Path | None:
    """Newest complete checkpoint that is good and verifies in full (one process; for messages)."""
    root = Path(ckpt_root)
    for step in reversed(complete_steps(root)):
        path = root / step_dir_name(step)
        if is_good(path)[0] and not verify_checkpoint(path):
            return path
    return None


def prune(ckpt_root: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints, keeping the newest good one in any case."""
    steps = complete_steps(ckpt_root)
    keep = set(steps[-keep_last:]) if keep_last > 0 else set(steps)
    good = [s for s in steps if is_good(ckpt_root / step_dir_name(s))[0]]
    if good:
        keep.add(good[-1])
    for s in steps:
        if s not in keep:
            shutil.rmtree(ckpt_root / step_dir_name(s), ignore_errors=True)


def set_aside_newer(ckpt_root: str | os.PathLike, step: int) -> list[Path]:
    """Move every checkpoint folder of a step after `step` (the step this run starts from: the resumed one, or
    0 when starting over) into `<ckpt_root>/set_aside/` (rank 0, before training). They belong to another
    run or failed verification; left in place they would outrank this run's checkpoints in pruning and in
    the next resume, and a save of the same step would delete them. Set aside, they are never read, pruned
    or deleted. `latest` is pointed at `step`'s checkpoint (removed if there is none). Returns the new paths."""
    root = Path(ckpt_root)
    moved: list[Path] = []
    for s in complete_steps(root):
        if s <= step:
            continue
        src = root / step_dir_name(s)
        dest = root / "set_aside" / src.name
        n = 0
        while dest.exists():  # a step set aside before: keep both
            n += 1
            dest = root / "set_aside" / f"{src.name}.{n}"
        dest.parent.mkdir(exist_ok=True)
        os.replace(src, dest)
        moved.append(dest)
    if moved:
        current = root / step_dir_name(step)
        if (current / "COMPLETE").is_file():
            _point_latest(root, current.name)
        else:
            (root / "latest").unlink(missing_ok=True)
        _fsync_dir(root)
    return moved


def remove_stale_tmp(ckpt_root: str | os.PathLike) -> None:
    """Remove leftovers of interrupted saves (rank 0, before training starts)."""
    root = Path(ckpt_root)
    if root.is_dir():
        for d in root.glob("step_*.tmp"):
            shutil.rmtree(d, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ load
def load_checkpoint(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    verify: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load model + optimizer in place (collective) and restore this rank's RNG states. Verifies every file
    first unless `verify=False` (the caller did, e.g. `find_resumable`). Returns (trainer_state, rank_state).
    Raises CheckpointError naming the file that fails."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "COMPLETE").is_file():
        raise FileNotFoundError(f"not a complete checkpoint directory: {path}")
    if verify:
        problems = [p for part in _gather(verify_checkpoint(path, _rank(), _world())) for p in part]
        if problems:
            raise CheckpointError("checkpoint fails verification: " + "; ".join(problems))
    rank = _rank()
    rank_json, rank_st = path / f"rank_{rank}.json", path / f"rank_{rank}.safetensors"
    for f in (rank_json, rank_st):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: missing (was the checkpoint written with fewer ranks?)")
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTIONS)
    state = {"model": model_sd, "optim": optim_sd}
    reader = SafeFileSystemReader(str(path))
    saved = reader.read_metadata().state_dict_metadata
    missing = [k for k in model_sd if f"model.{k}" not in saved]
    if missing:
        raise ValueError(f"{path}: checkpoint lacks model keys {missing[:8]}{' ...' if len(missing) > 8 else ''} "
                         f"(was it written by another model family or preset?)")
    # optimizer state may be partial: AdamW has no state for parameters that never received a gradient
    try:
        with _quiet_single_process():
            dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(allow_partial_load=True),
                     no_dist=not _dist())
    except (CheckpointException, UnsafeCheckpointError, RuntimeError, OSError, EOFError) as e:
        causes = [exc for exc, _tb in e.failures.values()] if isinstance(e, CheckpointException) else [e]
        raise CheckpointError(f"{path}: loading the DCP shards failed: " + "; ".join(
            f"{type(c).__name__}: {str(c).strip().splitlines()[0] if str(c).strip() else ''}" for c in causes)) from e
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))
    trainer = _read_json(path / "trainer.json")
    extra = _read_json(rank_json)
    try:
        tensors = load_file(str(rank_st))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{rank_st}: unreadable ({e})") from e
    set_rng_state(extra.pop("rng"), tensors, _device_of(model))
    return trainer, extra
