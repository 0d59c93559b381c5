"""Reading a trained model's weights: an exported safetensors file or a run's DCP checkpoint.

Two sources, one result (`TrainedWeights`: the model state dict on the CPU, the run's resolved config as a
dict, the step and where it came from):
  * `read_exported(path)`: `model.safetensors` + `model.json` beside it (written by train/export.py:
    {"run_config": ..., "step": N, "family", "preset", "dtype", "checkpoint"});
  * `read_run(run_dir, step=None)`: `<run>/config.json` + the model tensors of the latest (or `step`'s)
    complete checkpoint `<run>/checkpoints/step_XXXXXX/` (torch.distributed.checkpoint shards, read
    without a process group; the on-disk protocol is described in train/sonar_train/checkpoint.py, which writes it).
Nothing read runs pickled code: safetensors and JSON; a DCP checkpoint is first checked against its
checksums.json, then read with sonar_llm.dcp_safe (allow-listed metadata unpickler, weights_only entries).

The directory-naming helpers (`step_dir_name`, `complete_steps`, `latest_checkpoint`) and
`quiet_single_process` are shared with the trainer's writer (train/sonar_train/checkpoint.py).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "TrainedWeights",
    "step_dir_name",
    "complete_steps",
    "latest_checkpoint",
    "find_checkpoint",
    "checkpoint_step",
    "quiet_single_process",
    "load_dcp_model_state",
    "read_exported",
    "read_run",
]

_STEP_RE = re.compile(r"^step_(\d+)$")


@dataclass
class TrainedWeights:
    """A trained model's state and provenance."""

    state: dict[str, Tensor]  # model state dict (unsharded, CPU, dtype as stored)
    run_config: dict[str, Any]  # the training run's resolved config (config.json / model.json "run_config")
    step: int | None  # optimizer step of the checkpoint
    source: str  # the file or checkpoint directory read


def step_dir_name(step: int) -> str:
    """`step_000100`: the directory of step 100's checkpoint."""
    return f"step_{step:06d}"


def complete_steps(ckpt_root: str | os.PathLike) -> list[int]:
    """Sorted steps with a complete checkpoint (a `COMPLETE` marker) under `ckpt_root`."""
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


def find_checkpoint(run_dir: str | os.PathLike, step: int | None = None) -> Path:
    """The complete checkpoint directory of `run_dir` for `step` (None: the latest)."""
    root = Path(run_dir) / "checkpoints"
    if not Path(run_dir).is_dir():
        raise FileNotFoundError(f"--run: run directory not found: {run_dir}")
    if step is None:
        found = latest_checkpoint(root)
        if found is None:
            raise FileNotFoundError(f"--run: no complete checkpoint under {root}")
        return found
    path = root / step_dir_name(step)
    if not (path / "COMPLETE").is_file():
        raise FileNotFoundError(f"--step: no complete checkpoint for step {step} at {path} "
                                f"(available: {complete_steps(root)})")
    return path


@contextlib.contextmanager
def quiet_single_process():
    """DCP warns on every single-process save/load; that mode is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is .*single process")
        yield


def load_dcp_model_state(path: str | os.PathLike) -> dict[str, Tensor]:
    """The full (unsharded) model state dict of a DCP checkpoint directory, on the CPU (no process group;
    shapes and dtypes come from the checkpoint's metadata)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from .dcp_safe import SafeFileSystemReader, SafeLoadPlanner, UnsafeCheckpointError, verify_checkpoint

    problems = verify_checkpoint(path)  # sizes + sha256 of checksums.json, before anything is parsed
    if problems:
        raise UnsafeCheckpointError("checkpoint fails verification: " + "; ".join(problems))
    reader = SafeFileSystemReader(str(path))  # allow-listed metadata unpickler
    meta = reader.read_metadata()
    state = {key: torch.empty(md.size, dtype=md.properties.dtype)
             for key, md in meta.state_dict_metadata.items()
             if key.startswith("model.") and isinstance(md, TensorStorageMetadata)}
    if not state:
        raise ValueError(f"{path}: checkpoint holds no model tensors")
    with quiet_single_process():
        dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(), no_dist=True)
    return {key[len("model."):]: t for key, t in state.items()}


def checkpoint_step(path: str | os.PathLike) -> int:
    """The step recorded in a complete checkpoint's `COMPLETE` marker."""
    return int((Path(path) / "COMPLETE").read_text().split()[0])


def read_exported(path: str | os.PathLike) -> TrainedWeights:
    """An exported model: `path` (safetensors) and its `model.json` (same name, .json suffix)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--model: file not found: {path}")
    info_path = path.with_suffix(".json")
    if not info_path.is_file():
        raise FileNotFoundError(f"--model: the export's config {info_path} is missing (train/export.py writes it)")
    info = json.loads(info_path.read_text())
    if not isinstance(info.get("run_config"), dict) or not info["run_config"]:
        raise ValueError(f"{info_path}: no 'run_config' (the training run's resolved config)")
    return TrainedWeights(load_file(str(path)), info["run_config"], info.get("step"), str(path))


def read_run(run_dir: str | os.PathLike, step: int | None = None) -> TrainedWeights:
    """A run directory: its resolved `config.json` and the latest (or `step`'s) complete checkpoint."""
    ckpt_dir = find_checkpoint(run_dir, step)
    state = load_dcp_model_state(ckpt_dir)
    cfg_file = Path(run_dir) / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"--run: {cfg_file} is missing (the resolved run config)")
    return TrainedWeights(state, json.loads(cfg_file.read_text()), checkpoint_step(ckpt_dir), str(ckpt_dir))
