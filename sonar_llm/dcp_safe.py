"""Reading a torch.distributed.checkpoint (DCP) directory without running code from it, and checking it.

A DCP directory holds `.metadata` (a pickle of `torch.distributed.checkpoint.metadata.Metadata`) and
`__<rank>_<i>.distcp` data files (tensors as `torch.save` records, other values as pickled bytes). Plain
`FileSystemReader.read_metadata` is `pickle.load`, and `DefaultLoadPlanner.load_bytes` is
`torch.load(weights_only=False)`: a planted `__reduce__` payload in either runs on load. Here:
  * `SafeFileSystemReader` unpickles `.metadata` with `MetadataUnpickler`, whose `find_class` admits only
    the DCP metadata dataclasses, `torch.Size`, torch dtypes / layouts / memory formats and `pathlib`
    paths (the allow-list `_ALLOWED`); anything else raises `UnsafeCheckpointError` naming the file and
    the refused global, before any object is built;
  * `SafeLoadPlanner.load_bytes` reads non-tensor values with `torch.load(weights_only=True)`;
  * `checksums.json` (written last by the trainer, train/sonar_train/checkpoint.py) records the size and sha256 of
    every file; `verify_checkpoint` recomputes them (streaming, 4 MiB reads) and names any file that is
    missing, of the wrong size or of the wrong digest. Verify before loading: then nothing unverified is
    even parsed.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader

__all__ = ["UnsafeCheckpointError", "MetadataUnpickler", "read_dcp_metadata", "SafeFileSystemReader",
           "SafeLoadPlanner", "CHECKSUMS_FILE", "file_digest", "read_checksums", "verify_checkpoint"]

CHECKSUMS_FILE = "checksums.json"

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_ALLOWED: dict[str, set[str]] = {
    _DCP_METADATA: {"Metadata", "MetadataIndex", "ChunkStorageMetadata", "TensorStorageMetadata",
                    "BytesStorageMetadata", "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class UnsafeCheckpointError(ValueError):
    """A checkpoint file references code outside the allow-list, or fails its checksum (names the file)."""


def _torch_constant(name: str) -> bool:
    """torch.float32, torch.strided, torch.contiguous_format ...: plain constants, not callables."""
    obj = getattr(torch, name, None)
    return isinstance(obj, (torch.dtype, torch.layout, torch.memory_format))


class MetadataUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` that builds only the classes a DCP `.metadata` file needs (see `_ALLOWED`)."""

    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED.get(module, ()) or (module == "torch" and _torch_constant(name)):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(f"{self.source}: refusing to unpickle global {module}.{name} (not a DCP "
                                    f"metadata class; the file may have been tampered with)")


def read_dcp_metadata(path: str | os.PathLike):
    """The `Metadata` of DCP file `path` (`<dir>/.metadata`), unpickled with the allow-list."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return MetadataUnpickler(f, str(path)).load()
    except UnsafeCheckpointError:
        raise
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: DCP metadata file is missing") from None
    except Exception as e:  # truncated or garbled pickle
        raise UnsafeCheckpointError(f"{path}: cannot read DCP metadata ({type(e).__name__}: {e})") from e


class SafeFileSystemReader(FileSystemReader):
    """`FileSystemReader` whose metadata is read by `read_dcp_metadata` (no arbitrary globals)."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        from torch.distributed.checkpoint.metadata import StorageMeta

        metadata = read_dcp_metadata(Path(str(self.path)) / ".metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """`DefaultLoadPlanner` that reads non-tensor values (optimizer hyper-parameters, step counters...) with
    `torch.load(weights_only=True)`; the parent then only ever sees a stream this class re-serialised."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpointError(f"refusing to unpickle checkpoint entry {read_item.dest_index.fqn!r} "
                                        f"(weights_only load failed: {e})") from e
        clean = io.BytesIO()
        torch.save(obj, clean)
        clean.seek(0)
        super().load_bytes(read_item, clean)


def file_digest(path: str | os.PathLike, chunk: int = 1 << 22) -> dict[str, Any]:
    """{"bytes": size, "sha256": hex digest} of a file, read in `chunk`-byte pieces."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
            size += len(b)
    return {"bytes": size, "sha256": h.hexdigest()}


def read_checksums(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    """The parsed `checksums.json` of a checkpoint directory (UnsafeCheckpointError if missing/invalid)."""
    path = Path(ckpt_dir) / CHECKSUMS_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UnsafeCheckpointError(f"{path}: missing (a checkpoint without checksums cannot be verified)") from None
    except (OSError, ValueError) as e:
        raise UnsafeCheckpointError(f"{path}: unreadable ({e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise UnsafeCheckpointError(f"{path}: not a checksum manifest (no 'files' table)")
    return data


def verify_checkpoint(ckpt_dir: str | os.PathLike, rank: int = 0, world_size: int = 1) -> list[str]:
    """Problems found in a checkpoint directory (empty = verified). With world_size > 1 this call checks
    the files i (sorted by name) with i % world_size == rank, so the ranks of a job share the reading."""
    ckpt_dir = Path(ckpt_dir)
    try:
        files = read_checksums(ckpt_dir)["files"]
    except UnsafeCheckpointError as e:
        return [str(e)]
    problems = []
    for i, name in enumerate(sorted(files)):
        if i % world_size != rank:
            continue
        want, path = files[name], ckpt_dir / name
        if Path(name).name != name or name.startswith("."):
            if name != ".metadata":
                problems.append(f"{ckpt_dir / CHECKSUMS_FILE}: bad file name {name!r}")
                continue
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        size = path.stat().st_size
        if size != want.get("bytes"):
            problems.append(f"{path}: {size} bytes, expected {want.get('bytes')} (truncated or overwritten)")
            continue
        got = file_digest(path)["sha256"]
        if got != want.get("sha256"):
            problems.append(f"{path}: sha256 {got[:12]}... does not match checksums.json "
                            f"({str(want.get('sha256'))[:12]}...)")
    return problems
