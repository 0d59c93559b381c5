"""The memory-mapped shard format: atomic writer, manifest with checksums, and the `ShardedDataset` reader.

Layout of a dataset directory:

    manifest.json                  the dataset manifest (see below)
    end_of_doc.npy                 [E] embedding of the end-of-document sentence (same dtype rule as shards)
    shard_000000/                  one folder per shard
        embeddings.npy             [S, E] float16, or uint16 holding bfloat16 bits (dtype tag "bf16")
        tokens.npy                 [T] int32 target-mode token ids of all sentences, concatenated
        sent_offsets.npy           [S+1] int64 sentence boundaries in tokens.npy
        doc_offsets.npy            [D+1] int64 document boundaries in sentences
        shard.json                 counts, dtype, doc ids, and size + sha256 of every array file (also the
                                   sha256 of each BLOCK_BYTES block, for the per-rank sampled check)

`manifest.json` holds: format/version, embed_dim, dtype, encoder and tokenizer identifiers, the
end-of-document sentence (text, token ids, file), the writer's config, the list of completed shards
(name, counts, sha256 of shard.json), totals, and `complete` (True once every shard is written). The
config's `inputs` are the input files' paths relative to the dataset folder (`input_paths` reads them back),
so a folder tree holding both the inputs and the dataset can be moved or copied and the same settings still
match; manifests written before recorded absolute paths, which still compare equal where they point.

Multi-rank writing: with world_size > 1 each rank keeps its own manifest part
`manifest.rank{r:05d}-of-{w:05d}.json`; `merge_manifest_parts` writes manifest.json once every part is
complete (the last rank to finish does it), and the reader merges the parts itself when manifest.json
is missing. With world_size == 1 the part is manifest.json itself.

Atomicity: a shard is written into a hidden temporary folder in the same directory, every file is
fsynced, and the folder is renamed into place with os.replace; the manifest (part) is rewritten
atomically (temp file, fsync, os.replace) after each completed shard. A shard is visible only once
listed in a manifest, so a killed writer leaves nothing half-written behind.
"""
from __future__ import annotations

import bisect
import glob
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "ShardCorruptionError", "ShardArrays", "write_shard", "DatasetWriter",
           "write_json_atomic", "write_npy_atomic", "shard_name", "manifest_part_name", "read_manifest",
           "merge_manifest_parts", "ShardedDataset", "to_storage", "from_storage", "sha256_file", "relative_inputs",
           "input_paths"]

FORMAT_NAME = "sonar-llm-shards"
FORMAT_VERSION = 1
ARRAY_FILES = ("embeddings.npy", "tokens.npy", "sent_offsets.npy", "doc_offsets.npy")
BLOCK_BYTES = 1 << 22  # block size of the per-block checksums in shard.json
VERIFY_MODES = ("none", "manifest", "size", "full", "sampled")
_DTYPES = ("fp16", "bf16")
_PART_RE = re.compile(r"manifest\.rank(\d{5})-of-(\d{5})\.json$")


class DatasetSettingsMismatch(ValueError):
    """An existing dataset folder was written with other settings (encoder, tokenizer, config, ...) than a resumed
    write asks for; the message names the manifest and the keys."""


class ShardCorruptionError(ValueError):
    """A shard file is missing, truncated, or does not match its checksum. The message names the file."""


def shard_name(index: int) -> str:
    return f"shard_{index:06d}"


class ShardGroups:
    """Documents, in order, grouped into the shards they belong to: shard k holds documents
    k * shard_size .. (k + 1) * shard_size - 1, so a resumed or multi-rank run assigns every document to the same
    shard. Iterating yields (k, documents of shard k) for every shard `skip(k)` does not pass over (a completed
    shard, another rank's); afterwards `num_docs` counts every document seen and `num_shards` the planned shards."""

    def __init__(self, docs: Iterable, shard_size: int, skip: Callable[[int], bool]):
        self.docs, self.shard_size, self.skip = docs, shard_size, skip
        self.num_docs = 0

    @property
    def num_shards(self) -> int:
        return -(-self.num_docs // self.shard_size)

    def __iter__(self) -> Iterator[tuple[int, list]]:
        pending: list = []
        pending_idx = -1
        for doc in self.docs:
            k = self.num_docs // self.shard_size
            self.num_docs += 1
            if self.skip(k):
                continue
            if k != pending_idx and pending:
                yield pending_idx, pending
                pending = []
            pending_idx = k
            pending.append(doc)
        if pending:
            yield pending_idx, pending


def manifest_part_name(rank: int, world_size: int) -> str:
    """File name of a rank's manifest: 'manifest.json' for a single rank."""
    if world_size == 1:
        return "manifest.json"
    return f"manifest.rank{rank:05d}-of-{world_size:05d}.json"


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a file, streamed in BLOCK_BYTES reads."""
    return _file_digests(path, blocks=False)[0]


def _file_digests(path: str | os.PathLike, blocks: bool = True) -> tuple[str, list[str]]:
    """(sha256 of the file, sha256 of each BLOCK_BYTES block if `blocks`) in one streaming pass."""
    whole, sums = hashlib.sha256(), []
    with open(path, "rb") as f:
        while True:
            b = f.read(BLOCK_BYTES)
            if not b:
                break
            whole.update(b)
            if blocks:
                sums.append(hashlib.sha256(b).hexdigest())
    return whole.hexdigest(), sums


def _fsync_dir(path: str | os.PathLike) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _tmp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON to `path` atomically: temp file in the same folder, fsync, os.replace, fsync folder."""
    path = Path(path)
    tmp = _tmp_name(path)
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_npy_atomic(path: str | os.PathLike, array: np.ndarray) -> None:
    """np.save to `path` atomically (temp file, fsync, os.replace)."""
    path = Path(path)
    tmp = _tmp_name(path)
    with open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(array), allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def to_storage(embeddings: torch.Tensor | np.ndarray, dtype: str) -> np.ndarray:
    """Convert embeddings to the on-disk array: float16, or bfloat16 bits as uint16 (dtype 'bf16')."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    t = torch.as_tensor(embeddings) if not isinstance(embeddings, torch.Tensor) else embeddings
    if not t.is_floating_point():
        raise TypeError(f"embeddings must be floating point, got {t.dtype}")
    t = t.detach().cpu()
    if dtype == "fp16":
        return t.to(torch.float16).contiguous().numpy()
    return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)


def from_storage(array: np.ndarray, dtype: str, *, copy: bool = True) -> torch.Tensor:
    """Inverse of `to_storage`: a float16 or bfloat16 tensor over a copy of `array` (or over `array` itself
    with copy=False, for a writable array the caller owns)."""
    if dtype == "fp16":
        if array.dtype != np.float16:
            raise TypeError(f"fp16 embeddings must be stored as float16, got {array.dtype}")
        return torch.from_numpy(np.array(array, copy=True) if copy else array)
    if dtype == "bf16":
        if array.dtype != np.uint16:
            raise TypeError(f"bf16 embeddings must be stored as uint16, got {array.dtype}")
        arr = np.array(array, copy=True) if copy else array
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")


@dataclass
class ShardArrays:
    """The content of one shard in memory (what `write_shard` writes)."""

    embeddings: np.ndarray   # [S, E] storage array (see to_storage)
    tokens: np.ndarray       # [T] int32
    sent_offsets: np.ndarray  # [S+1] int64
    doc_offsets: np.ndarray  # [D+1] int64

    def validate(self) -> None:
        e, t, so, do = self.embeddings, self.tokens, self.sent_offsets, self.doc_offsets
        if e.ndim != 2:
            raise ValueError(f"shard embeddings must be [S, E], got shape {e.shape}")
        if t.dtype != np.int32 or t.ndim != 1:
            raise ValueError(f"shard tokens must be 1-D int32, got {t.dtype} shape {t.shape}")
        if so.dtype != np.int64 or so.shape != (e.shape[0] + 1,):
            raise ValueError(f"sent_offsets must be int64 [S+1]=[{e.shape[0] + 1}], got {so.dtype} {so.shape}")
        if do.dtype != np.int64 or do.ndim != 1 or do.size < 1:
            raise ValueError(f"doc_offsets must be int64 [D+1], got {do.dtype} {do.shape}")
        if so[0] != 0 or so[-1] != t.size or (np.diff(so) < 1).any():
            raise ValueError("sent_offsets must start at 0, end at len(tokens) and increase strictly")
        if do[0] != 0 or do[-1] != e.shape[0] or (np.diff(do) < 1).any():
            raise ValueError("doc_offsets must start at 0, end at S and increase strictly (no empty documents)")


def write_shard(out_dir: str | os.PathLike, index: int, arrays: ShardArrays, *, dtype: str,
                doc_ids: Sequence[str] | None = None, extra: dict | None = None) -> dict:
    """Write shard `index` atomically under `out_dir` and return its manifest entry.

    A leftover folder of the same name (from a run killed before its manifest update) is replaced.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    want = np.float16 if dtype == "fp16" else np.uint16
    if arrays.embeddings.dtype != want:
        raise TypeError(f"shard embeddings for dtype {dtype!r} must be stored as {np.dtype(want)}, "
                        f"got {arrays.embeddings.dtype} (use to_storage)")
    arrays.validate()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = shard_name(index)
    final = out_dir / name
    tmp = _tmp_name(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    files = {}
    for fname, arr in zip(ARRAY_FILES, (arrays.embeddings, arrays.tokens, arrays.sent_offsets, arrays.doc_offsets)):
        path = tmp / fname
        with open(path, "wb") as f:
            np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        digest, blocks = _file_digests(path)
        files[fname] = {"bytes": path.stat().st_size, "sha256": digest, "block_bytes": BLOCK_BYTES,
                        "block_sha256": blocks, "shape": list(arr.shape), "dtype": str(arr.dtype)}
    num_docs = int(arrays.doc_offsets.size - 1)
    if doc_ids is not None and len(doc_ids) != num_docs:
        raise ValueError(f"doc_ids has {len(doc_ids)} entries for {num_docs} documents")
    info = {"name": name, "index": int(index), "num_docs": num_docs,
            "num_sentences": int(arrays.embeddings.shape[0]), "num_tokens": int(arrays.tokens.size),
            "embed_dim": int(arrays.embeddings.shape[1]), "dtype": dtype, "files": files,
            "doc_ids": list(doc_ids) if doc_ids is not None else None, "extra": extra or {}}
    with open(tmp / "shard.json", "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1, sort_keys=True, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(out_dir)
    return {"name": name, "index": int(index), "num_docs": num_docs, "num_sentences": info["num_sentences"],
            "num_tokens": info["num_tokens"], "shard_json_sha256": sha256_file(final / "shard.json")}


def relative_inputs(files: Sequence[str], out_dir: str | os.PathLike) -> list[str]:
    """The manifest's `config.inputs` for `files`: each path relative to the dataset folder `out_dir`."""
    root = os.path.abspath(out_dir)
    return [os.path.relpath(os.path.abspath(f), root) for f in files]


def input_paths(manifest: dict, dataset_dir: str | os.PathLike) -> list[str]:
    """The input files a manifest's `config.inputs` names, as paths usable from here (relative entries are
    relative to the dataset folder; absolute ones, from manifests written before, stay as they are)."""
    root = os.path.abspath(dataset_dir)
    return [os.path.normpath(os.path.join(root, p)) for p in (manifest.get("config") or {}).get("inputs") or []]


def _load_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardCorruptionError(f"{path}: not valid JSON ({e})") from e


_SHARED_KEYS = ("format", "version", "embed_dim", "dtype", "encoder", "tokenizer", "end_of_doc", "config")


def _merge(parts: list[dict], paths: list[Path], *, allow_incomplete: bool) -> dict:
    world = {p.get("world_size") for p in parts}
    if len(world) != 1:
        raise ValueError(f"manifest parts disagree on world_size: {sorted(map(str, world))}")
    w = world.pop()
    if len(parts) != w:
        raise ValueError(f"found {len(parts)} manifest parts for world_size={w}: {[p.name for p in paths]}")
    base = parts[0]
    if base.get("format") != FORMAT_NAME or base.get("version") != FORMAT_VERSION:
        raise ValueError(f"{paths[0]}: not a {FORMAT_NAME} v{FORMAT_VERSION} manifest "
                         f"(format={base.get('format')!r}, version={base.get('version')!r})")
    for part, path in zip(parts[1:], paths[1:]):
        bad = [k for k in _SHARED_KEYS if part.get(k) != base.get(k)]
        if bad:
            raise ValueError(f"manifest part {path} disagrees with {paths[0]} on {bad}")
    incomplete = [str(path) for part, path in zip(parts, paths) if not part.get("complete")]
    if incomplete and not allow_incomplete:
        raise ValueError(f"preprocessing is not finished: incomplete manifest parts {incomplete} "
                         f"(re-run preprocess for those ranks, or pass allow_incomplete=True)")
    shards = sorted((s for p in parts for s in p["shards"]), key=lambda s: s["index"])
    merged = {k: base.get(k) for k in _SHARED_KEYS}
    merged.update(world_size=w, rank=None, complete=not incomplete, shards=shards,
                  num_planned_shards=base.get("num_planned_shards"), ingest=base.get("ingest"),
                  skipped_no_sentences=sum(int(p.get("skipped_no_sentences", 0)) for p in parts))
    merged["totals"] = _totals(shards)
    return merged


def _totals(shards: Sequence[dict]) -> dict:
    return {"shards": len(shards), "docs": sum(s["num_docs"] for s in shards),
            "sentences": sum(s["num_sentences"] for s in shards), "tokens": sum(s["num_tokens"] for s in shards)}


def read_manifest(path: str | os.PathLike, *, allow_incomplete: bool = False) -> dict:
    """Read a dataset manifest: `manifest.json`, or the merge of the rank parts when it is missing."""
    root = Path(path)
    if root.is_file():
        root = root.parent
    if not root.is_dir():
        raise FileNotFoundError(f"dataset directory {str(root)!r} does not exist")
    main = root / "manifest.json"
    if main.exists():
        m = _load_json(main)
        if m.get("format") != FORMAT_NAME:
            raise ValueError(f"{main}: not a {FORMAT_NAME} manifest (format={m.get('format')!r})")
        if m.get("version") != FORMAT_VERSION:
            raise ValueError(f"{main}: unsupported format version {m.get('version')!r} (expected {FORMAT_VERSION})")
        if not m.get("complete") and not allow_incomplete:
            raise ValueError(f"{main}: preprocessing is not finished ({len(m['shards'])} of "
                             f"{m.get('num_planned_shards')} shards); re-run it, or pass allow_incomplete=True")
        return m
    paths = sorted(Path(p) for p in glob.glob(str(root / "manifest.rank*-of-*.json")) if _PART_RE.search(p))
    if not paths:
        raise FileNotFoundError(f"no manifest.json or manifest.rank*-of-*.json in {str(root)!r}")
    return _merge([_load_json(p) for p in paths], paths, allow_incomplete=allow_incomplete)


def merge_manifest_parts(out_dir: str | os.PathLike) -> dict | None:
    """Write manifest.json from the rank parts if every part is complete; return it (None if not ready)."""
    root = Path(out_dir)
    paths = sorted(Path(p) for p in glob.glob(str(root / "manifest.rank*-of-*.json")) if _PART_RE.search(p))
    if not paths:
        return None
    parts = [_load_json(p) for p in paths]
    w = parts[0].get("world_size")
    if len(parts) != w or not all(p.get("complete") for p in parts):
        return None
    merged = _merge(parts, paths, allow_incomplete=False)
    write_json_atomic(root / "manifest.json", merged)
    return merged


class DatasetWriter:
    """Writes the shards of one rank and keeps its manifest (part) up to date, atomically.

    Opening an existing manifest (part) keeps its completed shards (`completed` holds their indices) when
    its settings (`config`, encoder, tokenizer, dtype, end-of-document sentence) equal the new ones;
    otherwise ValueError names the differing keys (pass overwrite=True to start over).
    """

    def __init__(self, out_dir: str | os.PathLike, *, embed_dim: int, dtype: str, end_of_doc_text: str,
                 end_of_doc_tokens: Sequence[int], end_of_doc_embedding: torch.Tensor | np.ndarray,
                 encoder: str = "", tokenizer: str = "", config: dict | None = None, rank: int = 0,
                 world_size: int = 1, overwrite: bool = False):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        eod = to_storage(end_of_doc_embedding, dtype).reshape(-1)
        if eod.shape != (embed_dim,):
            raise ValueError(f"end_of_doc_embedding must have {embed_dim} values, got shape {eod.shape}")
        self.root = Path(out_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        self.rank, self.world_size, self.dtype = rank, world_size, dtype
        self.path = self.root / manifest_part_name(rank, world_size)
        self.manifest = {
            "format": FORMAT_NAME, "version": FORMAT_VERSION, "embed_dim": int(embed_dim), "dtype": dtype,
            "encoder": encoder, "tokenizer": tokenizer,
            "end_of_doc": {"text": end_of_doc_text, "tokens": [int(t) for t in end_of_doc_tokens],
                           "file": "end_of_doc.npy"},
            "config": config or {}, "rank": rank, "world_size": world_size, "complete": False,
            "num_planned_shards": None, "shards": [], "ingest": None,
        }
        if self.path.exists() and not overwrite:
            old = _load_json(self.path)
            keys = ("format", "version", "embed_dim", "dtype", "encoder", "tokenizer", "end_of_doc", "world_size")
            bad = [k for k in keys if old.get(k) != self.manifest[k]]
            old_cfg, new_cfg = old.get("config", {}), self.manifest["config"]
            bad += [f"config.{k}" for k in sorted(set(old_cfg) | set(new_cfg)) if old_cfg.get(k) != new_cfg.get(k)
                    and not (k == "inputs" and input_paths(old, self.root) == input_paths(self.manifest, self.root))]
            if bad:
                raise DatasetSettingsMismatch(f"{self.path} was written with different settings ({bad}); use "
                                              f"another output directory or overwrite=True")
            self.manifest["shards"] = sorted(old["shards"], key=lambda e: e["index"])
            if old.get("complete"):
                for k in ("complete", "num_planned_shards", "ingest"):
                    self.manifest[k] = old.get(k)
        elif overwrite:
            for p in glob.glob(str(self.root / "shard_*")):
                idx = Path(p).name[len("shard_"):]
                if idx.isdigit() and int(idx) % world_size == rank:
                    shutil.rmtree(p, ignore_errors=True)
            if world_size > 1 and rank == 0 and (self.root / "manifest.json").exists():
                os.remove(self.root / "manifest.json")
        self._clean_tmp()
        write_npy_atomic(self.root / "end_of_doc.npy", eod)
        self._commit()

    def _clean_tmp(self) -> None:
        """Remove temporary files a killed run of this rank left behind (they were never visible)."""
        for p in glob.glob(str(self.root / ".shard_*.tmp-*")):
            idx = Path(p).name[len(".shard_"):].split(".")[0]
            if idx.isdigit() and int(idx) % self.world_size == self.rank:
                shutil.rmtree(p, ignore_errors=True)
        patterns = [f".{self.path.name}.tmp-*"] + ([".end_of_doc.npy.tmp-*", ".manifest.json.tmp-*"]
                                                    if self.rank == 0 else [])
        for pat in patterns:
            for p in glob.glob(str(self.root / pat)):
                try:
                    os.remove(p)
                except FileNotFoundError:
                    pass

    @property
    def completed(self) -> set[int]:
        return {int(e["index"]) for e in self.manifest["shards"]}

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    def _commit(self) -> None:
        shards = self.manifest["shards"]
        self.manifest["totals"] = _totals(shards)
        self.manifest["skipped_no_sentences"] = sum(int(e.get("no_sentences", 0)) for e in shards)
        write_json_atomic(self.path, self.manifest)

    def add_shard(self, index: int, arrays: ShardArrays, *, doc_ids: Sequence[str] | None = None,
                  extra: dict | None = None) -> dict:
        """Write shard `index` (must belong to this rank) and record it in the manifest."""
        if index % self.world_size != self.rank:
            raise ValueError(f"shard {index} belongs to rank {index % self.world_size}, not rank {self.rank}")
        if arrays.embeddings.ndim != 2 or arrays.embeddings.shape[1] != self.manifest["embed_dim"]:
            raise ValueError(f"shard {index}: embeddings shape {arrays.embeddings.shape}, expected "
                             f"[S, {self.manifest['embed_dim']}]")
        entry = write_shard(self.root, index, arrays, dtype=self.dtype, doc_ids=doc_ids, extra=extra)
        entry.update(extra or {})
        shards = [e for e in self.manifest["shards"] if e["index"] != index] + [entry]
        self.manifest["shards"] = sorted(shards, key=lambda e: e["index"])
        self._commit()
        return entry

    def finish(self, num_planned_shards: int, ingest: dict | None = None) -> dict:
        """Mark this rank complete; with several ranks, merge the parts once all are complete.

        Returns the merged manifest when it was written, else this rank's manifest.
        """
        mine = {k for k in range(num_planned_shards) if k % self.world_size == self.rank}
        missing = sorted(mine - self.completed)
        if missing:
            raise ValueError(f"rank {self.rank} cannot finish: shards {missing[:10]} are not written")
        self.manifest.update(complete=True, num_planned_shards=int(num_planned_shards), ingest=ingest)
        self._commit()
        if self.world_size > 1:
            merged = merge_manifest_parts(self.root)
            if merged is not None:
                return merged
        return self.manifest


class ShardedDataset:
    """Read-only, memory-mapped view of a preprocessed dataset.

    Documents are numbered globally in shard-index order. `verify`:
      "manifest" / "size" (default) - each shard.json matches its checksum in the manifest and every array
                             file exists with the recorded size (no content read);
      "full"               - also the sha256 of every array file: all shards here, or with `lazy=True` each
                             shard when it is first opened (what training uses: the cost is spread out, and
                             any flipped byte of a shard is caught before the shard is read);
      "sampled"            - this rank's share of the per-block sha256s of shard.json (blocks numbered over
                             all files, block b checked by rank b % world_size): across the ranks of a job
                             every block is checked exactly once, so a single flipped block is caught with
                             certainty at 1/world_size of the reading per rank (files written without block
                             sums are shared out whole); with world_size 1 it equals "full";
      "none"               - trust the files.
    Problems raise ShardCorruptionError (a ValueError) or FileNotFoundError naming the file.
    """

    def __init__(self, path: str | os.PathLike, verify: str = "manifest", *, allow_incomplete: bool = False,
                 lazy: bool = False, rank: int = 0, world_size: int = 1):
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {', '.join(VERIFY_MODES)}, got {verify!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.root = Path(path)
        self.manifest = read_manifest(self.root, allow_incomplete=allow_incomplete)
        if self.root.is_file():
            self.root = self.root.parent
        self.verify = "manifest" if verify == "size" else verify
        self.lazy = lazy and verify == "full"
        self._content_checked: list[bool] = [False] * len(self.manifest["shards"])
        self.dtype: str = self.manifest["dtype"]
        self.embed_dim: int = int(self.manifest["embed_dim"])
        self.shards: list[dict] = list(self.manifest["shards"])
        self._shard_info: list[dict | None] = [None] * len(self.shards)
        self._arrays: list[dict[str, np.ndarray] | None] = [None] * len(self.shards)
        counts = [int(s["num_docs"]) for s in self.shards]
        self._doc_starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).tolist()
        self._lengths: tuple[np.ndarray, np.ndarray] | None = None
        if self.verify != "none":
            for k in range(len(self.shards)):
                self._check_shard(k)
        if self.verify == "sampled":
            self._check_blocks(rank, world_size)

    # -- integrity --------------------------------------------------------------------------------
    def _shard_dir(self, k: int) -> Path:
        return self.root / self.shards[k]["name"]

    def _check_shard(self, k: int) -> dict:
        entry = self.shards[k]
        d = self._shard_dir(k)
        sj = d / "shard.json"
        if not sj.exists():
            raise FileNotFoundError(f"shard file {sj} is missing (listed in the manifest of {self.root})")
        digest = sha256_file(sj)
        if entry.get("shard_json_sha256") and digest != entry["shard_json_sha256"]:
            raise ShardCorruptionError(f"shard file {sj}: sha256 {digest[:12]}... does not match the manifest "
                                       f"({entry['shard_json_sha256'][:12]}...)")
        info = _load_json(sj)
        for fname in ARRAY_FILES:
            path = d / fname
            rec = info["files"][fname]
            if not path.exists():
                raise FileNotFoundError(f"shard file {path} is missing")
            size = path.stat().st_size
            if size != rec["bytes"]:
                raise ShardCorruptionError(f"shard file {path} has {size} bytes, expected {rec['bytes']} "
                                           f"(truncated or overwritten)")
        self._shard_info[k] = info
        if self.verify == "full" and not self.lazy:
            self._check_content(k)
        return info

    def _check_content(self, k: int) -> None:
        """sha256 of every array file of shard k against its shard.json (once)."""
        if self._content_checked[k]:
            return
        info = self._shard_info[k] or self._check_shard(k)
        for fname in ARRAY_FILES:
            path, rec = self._shard_dir(k) / fname, info["files"][fname]
            digest = sha256_file(path)
            if digest != rec["sha256"]:
                raise ShardCorruptionError(f"shard file {path}: sha256 {digest[:12]}... does not match "
                                           f"shard.json ({rec['sha256'][:12]}...)")
        self._content_checked[k] = True

    def _check_blocks(self, rank: int, world_size: int) -> None:
        """The "sampled" check: blocks (numbered over every array file of every shard) b % world_size == rank."""
        b = 0
        for k in range(len(self.shards)):
            for fname in ARRAY_FILES:
                path, rec = self._shard_dir(k) / fname, self._shard_info[k]["files"][fname]
                blocks, size = rec.get("block_sha256"), int(rec.get("block_bytes") or 0)
                if not blocks or size <= 0:  # written without block sums: the whole file is one unit
                    if b % world_size == rank and sha256_file(path) != rec["sha256"]:
                        raise ShardCorruptionError(f"shard file {path}: sha256 does not match shard.json")
                    b += 1
                    continue
                with open(path, "rb") as f:
                    for i, want in enumerate(blocks):
                        if (b + i) % world_size == rank:
                            f.seek(i * size)
                            got = hashlib.sha256(f.read(size)).hexdigest()
                            if got != want:
                                raise ShardCorruptionError(
                                    f"shard file {path}: block {i} (bytes {i * size}-{(i + 1) * size - 1}) sha256 "
                                    f"{got[:12]}... does not match shard.json ({want[:12]}...)")
                b += len(blocks)

    def _open(self, k: int) -> dict[str, np.ndarray]:
        arrays = self._arrays[k]
        if arrays is not None:
            return arrays
        d = self._shard_dir(k)
        if self.lazy:
            self._check_content(k)
        arrays = {}
        for fname in ARRAY_FILES:
            path = d / fname
            if not path.exists():
                raise FileNotFoundError(f"shard file {path} is missing")
            try:
                arrays[fname[:-4]] = np.load(path, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError, EOFError) as e:
                raise ShardCorruptionError(f"shard file {path} cannot be read ({e})") from e
        entry = self.shards[k]
        emb, so, do = arrays["embeddings"], arrays["sent_offsets"], arrays["doc_offsets"]
        if (emb.ndim != 2 or emb.shape != (entry["num_sentences"], self.embed_dim)
                or so.shape != (emb.shape[0] + 1,) or do.shape != (entry["num_docs"] + 1,)
                or arrays["tokens"].shape != (entry["num_tokens"],)):
            raise ShardCorruptionError(f"shard {d}: array shapes {emb.shape}, {arrays['tokens'].shape}, {so.shape}, "
                                       f"{do.shape} do not match the manifest counts")
        self._arrays[k] = arrays
        return arrays

    def __getstate__(self) -> dict:  # memory maps are reopened in the receiving process
        state = dict(self.__dict__)
        state["_arrays"] = [None] * len(self.shards)
        return state

    # -- access -----------------------------------------------------------------------------------
    @property
    def num_docs(self) -> int:
        return int(self._doc_starts[-1])

    def __len__(self) -> int:
        return self.num_docs

    @property
    def num_sentences(self) -> int:
        return int(sum(s["num_sentences"] for s in self.shards))

    @property
    def end_of_doc_text(self) -> str:
        return self.manifest["end_of_doc"]["text"]

    def end_of_doc_embedding(self) -> torch.Tensor:
        """[E] embedding of the end-of-document sentence (stored dtype)."""
        path = self.root / self.manifest["end_of_doc"]["file"]
        if not path.exists():
            raise FileNotFoundError(f"end-of-document embedding file {path} is missing")
        return from_storage(np.load(path, allow_pickle=False), self.dtype)

    def locate(self, i: int) -> tuple[int, int]:
        """(shard position, document index inside the shard) of global document i."""
        if not 0 <= i < self.num_docs:
            raise IndexError(f"document index {i} out of range [0, {self.num_docs})")
        k = bisect.bisect_right(self._doc_starts, i) - 1
        return k, i - self._doc_starts[k]

    def raw_doc(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Document i as zero-copy memory-map views: (embedding storage [S, E] float16/uint16, tokens int32 [T],
        tok_offsets int64 [S+1] starting at 0). Use `from_storage(emb, dataset.dtype)` for a tensor."""
        k, j = self.locate(int(i))
        a = self._open(k)
        s0, s1 = int(a["doc_offsets"][j]), int(a["doc_offsets"][j + 1])
        d = self._shard_dir(k)
        if not 0 <= s0 < s1 <= a["embeddings"].shape[0]:  # (cheap checks: garbage offsets never index silently)
            raise ShardCorruptionError(f"shard file {d / 'doc_offsets.npy'}: document {j} spans sentences "
                                       f"[{s0}, {s1}) of {a['embeddings'].shape[0]}")
        offs = np.asarray(a["sent_offsets"][s0:s1 + 1], dtype=np.int64)
        if offs[0] < 0 or offs[-1] > a["tokens"].shape[0] or (np.diff(offs) < 1).any():
            raise ShardCorruptionError(f"shard file {d / 'sent_offsets.npy'}: sentence offsets of document {j} are "
                                       f"not increasing within [0, {a['tokens'].shape[0]}]")
        return a["embeddings"][s0:s1], a["tokens"][offs[0]:offs[-1]], offs - offs[0]

    def doc(self, i: int) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """Document i as (embeddings [S, E] float16/bfloat16 tensor, tokens int32 [T], tok_offsets int64 [S+1])."""
        emb, tokens, offs = self.raw_doc(i)
        return from_storage(emb, self.dtype), np.array(tokens, dtype=np.int32), offs

    def doc_id(self, i: int) -> str | None:
        k, j = self.locate(int(i))
        if self._shard_info[k] is None:
            self._shard_info[k] = _load_json(self._shard_dir(k) / "shard.json")
        ids = self._shard_info[k].get("doc_ids")
        return ids[j] if ids else None

    def doc_lengths(self) -> tuple[np.ndarray, np.ndarray]:
        """(sentences per document, target tokens per document), int64 [num_docs] each (cached)."""
        if self._lengths is None:
            sents, toks = [], []
            for k in range(len(self.shards)):
                a = self._open(k)
                do = np.asarray(a["doc_offsets"], dtype=np.int64)
                so = np.asarray(a["sent_offsets"], dtype=np.int64)
                sents.append(np.diff(do))
                toks.append(so[do[1:]] - so[do[:-1]])
            if sents:
                self._lengths = (np.concatenate(sents), np.concatenate(toks))
            else:
                self._lengths = (np.zeros(0, np.int64), np.zeros(0, np.int64))
        return self._lengths

    def sentence_token_lengths(self, i: int) -> np.ndarray:
        """Tokens per sentence of document i, int64 [S] (no embedding access)."""
        k, j = self.locate(int(i))
        a = self._open(k)
        s0, s1 = int(a["doc_offsets"][j]), int(a["doc_offsets"][j + 1])
        return np.diff(np.asarray(a["sent_offsets"][s0:s1 + 1], dtype=np.int64))
