"""Reading a trained model's weights: an exported safetensors file or a run's DCP checkpoint.

Two sources, one result (`TrainedWeights`: the model state dict on the CPU, the run's resolved config as a
dict, the step and where it came from):
  * `read_exported(path)`: `model.safetensors` + `model.json` beside it (written by `write_exported`, which
    train/export.py and `python -m sonar_llm.convert --from public` use: {"run_config": ..., "step": N,
    "family", "preset", "dtype", "checkpoint", "files": {"weights": {"name", "sha256", "size"}, ...}});
  * `read_run(run_dir, step=None)`: `<run>/config.json` + the model tensors of the latest (or `step`'s)
    complete checkpoint `<run>/checkpoints/step_XXXXXX/` (torch.distributed.checkpoint shards, read
    without a process group; the on-disk protocol is described in train/sonar_train/checkpoint.py, which writes it).
Nothing read runs pickled code: safetensors and JSON; a DCP checkpoint is first checked against its
checksums.json, then read with sonar_llm.dcp_safe (allow-listed metadata unpickler, weights_only entries).

Exports are checksummed: `write_exported` records the sha256 and byte size of every file it writes (and of any
other file the writer names) in model.json's "files", by role; `read_exported` checks the weights file against that
record BEFORE parsing it and raises `ExportIntegrityError` (a ValueError whose message names the file and
says "truncated" or "checksum mismatch"); `verify=False` (the commands' `--no-verify`) skips the sha256.
A file that cannot be parsed as safetensors (truncated, garbage) is an `ExportIntegrityError` too, with or
without verification, never a raw `SafetensorError`. An export written before checksums existed (no
"files" in its model.json) still loads, with one warning line on the `sonar_llm.checkpoints` logger:
refusing it would strand every earlier export, and re-exporting adds the record.

The directory-naming helpers (`step_dir_name`, `complete_steps`, `latest_checkpoint`) and
`quiet_single_process` are shared with the trainer's writer (train/sonar_train/checkpoint.py).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sonar_llm.cli import shareable

__all__ = [
    "ExportIntegrityError",
    "EXPORT_FILES_KEY",
    "file_record",
    "write_exported",
    "read_run_config",
    "verify_export_file",
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
_log = logging.getLogger(__name__)

EXPORT_FILES_KEY = "files"  # model.json: {file name (relative to model.json's folder): {"sha256", "size"}}
_HASH_CHUNK = 1 << 24


class ExportIntegrityError(ValueError):
    """An exported file is damaged: truncated, a different size or sha256 than model.json records, or not
    parseable as safetensors. The message starts with the file's path."""


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


def file_record(path: str | os.PathLike) -> dict[str, Any]:
    """{"sha256": hex digest, "size": bytes} of a file (read in 16 MiB chunks)."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return {"sha256": h.hexdigest(), "size": size}


def write_exported(state: dict[str, Tensor], out: str | os.PathLike, info: dict[str, Any],
                   metadata: dict[str, str] | None = None,
                   other_files: dict[str, str | os.PathLike] | None = None) -> Path:
    """Write an export: `out` (safetensors of `state`) and `out`.json = `info` + "files": {"weights": {"name",
    "sha256", "size"} of `out`, and the same for each {role: path} of `other_files` (already written by the
    caller)}. Both files are written to temporary names and renamed only once both are complete, so a failure
    leaves no partial file. Returns `out`."""
    from safetensors.torch import save_file

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    info_path = out.with_suffix(".json")
    tmp, info_tmp = out.with_name(out.name + ".tmp"), info_path.with_name(info_path.name + ".tmp")
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)
        files = {"weights": {"name": out.name, **file_record(tmp)}}
        for role, other in (other_files or {}).items():
            files[role] = {"name": str(other), **file_record(other)}
        info_tmp.write_text(json.dumps({**info, EXPORT_FILES_KEY: files}, indent=2))
        shareable(tmp)  # safetensors writes it 0600
        os.replace(tmp, out)
        os.replace(info_tmp, info_path)
    finally:
        for t in (tmp, info_tmp):
            if t.exists():
                t.unlink()
    return out


def verify_export_file(path: str | os.PathLike, info: dict[str, Any], info_path: str | os.PathLike) -> bool:
    """Check the weights file `path` against model.json's "files" -> "weights" record (`info`, read from
    `info_path`; the record goes by role, so a renamed pair of files still verifies): size first (a shorter
    file is "truncated"), then sha256 ("checksum mismatch"); ExportIntegrityError naming the file.
    Returns False (after one warning line) when model.json records no checksum (an export written before
    checksums existed), True when verified."""
    path = Path(path)
    files = info.get(EXPORT_FILES_KEY)
    rec = files.get("weights") if isinstance(files, dict) else None
    if not isinstance(rec, dict) or not isinstance(rec.get("sha256"), str):
        _log.warning("warning: %s: no sha256 recorded in %s (written before exports were checksummed); "
                     "loaded without verification (re-export to add it)", path, info_path)
        return False
    size = path.stat().st_size
    want = rec.get("size")
    if isinstance(want, int) and size != want:
        what = "truncated" if size < want else "size mismatch"
        raise ExportIntegrityError(f"{path}: {what}: {size} bytes, {info_path} records {want} (damaged or "
                                   "incomplete copy; re-copy or re-export it)")
    got = file_record(path)["sha256"]
    if got != rec["sha256"]:
        raise ExportIntegrityError(f"{path}: checksum mismatch: sha256 {got[:16]}... but {info_path} records "
                                   f"{rec['sha256'][:16]}... (the file was changed or damaged after export; "
                                   "re-copy or re-export it, or --no-verify to load it anyway)")
    return True


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    """safetensors' load_file; a file it cannot parse -> ExportIntegrityError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportIntegrityError(f"{path}: truncated or corrupt safetensors file ({first})") from exc


def read_exported(path: str | os.PathLike, verify: bool = True) -> TrainedWeights:
    """An exported model: `path` (safetensors) and its `model.json` (same name, .json suffix). With `verify`,
    the file is checked against model.json's sha256 and size before it is parsed (`verify_export_file`)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"--model: {path} is a folder (expected an exported .safetensors file; "
                                "a training run folder goes to --run)")
    if not path.is_file():
        raise FileNotFoundError(f"--model: file not found: {path}")
    info_path = path.with_suffix(".json")
    if not info_path.is_file():
        raise FileNotFoundError(f"--model: the export's config {info_path} is missing (train/export.py writes it)")
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{info_path}: not valid JSON ({exc})") from None
    if not isinstance(info, dict) or not isinstance(info.get("run_config"), dict) or not info["run_config"]:
        raise ValueError(f"{info_path}: no 'run_config' (the training run's resolved config)")
    _check_model_table(info["run_config"], f"{info_path} (its run_config)")
    if verify:
        verify_export_file(path, info, info_path)
    return TrainedWeights(_load_safetensors(path), info["run_config"], info.get("step"), str(path))


def check_run(run_dir: str | os.PathLike, step: int | None = None) -> tuple[Path, Path]:
    """(checkpoint directory, config.json) of a run, without reading either; FileNotFoundError naming what is
    missing (a command checks this before any model loads)."""
    ckpt_dir = find_checkpoint(run_dir, step)
    cfg_file = Path(run_dir) / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"--run: {cfg_file} is missing (the resolved run config)")
    return ckpt_dir, cfg_file


def read_run_config(cfg_file: str | os.PathLike) -> dict[str, Any]:
    """A run's resolved `config.json`; ValueError naming the file when it is not UTF-8 JSON holding an object."""
    try:
        cfg = json.loads(Path(cfg_file).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{cfg_file}: not a readable run config ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_file}: not a run config (expected a JSON object, got {type(cfg).__name__})")
    _check_model_table(cfg, cfg_file)
    return cfg


def _check_model_table(run_config: dict[str, Any], where: str | os.PathLike) -> None:
    """ValueError naming `where` when the run config has no [model] table naming its family (every loader
    starts there)."""
    model = run_config.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("family"), str) or not model["family"]:
        raise ValueError(f"{where}: not a run config (no [model] table with a family)")


def read_run(run_dir: str | os.PathLike, step: int | None = None) -> TrainedWeights:
    """A run directory: its resolved `config.json` and the latest (or `step`'s) complete checkpoint."""
    ckpt_dir, cfg_file = check_run(run_dir, step)
    run_cfg = read_run_config(cfg_file)  # a damaged config is named before the weights are read
    return TrainedWeights(load_dcp_model_state(ckpt_dir), run_cfg, checkpoint_step(ckpt_dir), str(ckpt_dir))
