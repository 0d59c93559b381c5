"""What a run's data and SONAR decoder *are*, not where they were: lets a run folder that was moved or copied
(with its data, or to a machine where the same files live elsewhere) resume, while a different dataset or
decoder under a new path is still refused.

`<run>/inputs.json` (written by rank 0 at every start, next to config.json; JSON only):
    {"format": 1,
     "data.path":     {"path": str, "manifest_sha256": hex | null},   the dataset's manifest.json, whose
                      per-shard sizes and checksums identify the data; null when it has none (parts only)
     "sonar.decoder": {"path": str, "bytes": int, "sha256": hex} | {"path": str} (an asset name, not a file)}
Resume (`config.resume_changes`) accepts a new value of one of these keys when the new path's identity equals
the recorded one, and says so; otherwise the key is refused as before.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

from sonar_llm.checkpoints import file_record

INPUTS_FILE = "inputs.json"
FORMAT = 1
KEYS = ("data.path", "sonar.decoder")  # the config keys identified by content


@functools.lru_cache(maxsize=8)
def _record(path: str, size: int, mtime_ns: int) -> dict[str, Any]:
    """file_record of `path`, once per process for an unchanged file (size and mtime are the cache key): a
    moved run's resume checks the decoder's identity before preparing, again in the loop, and records it."""
    return file_record(path)


def _file_record(path: Path) -> dict[str, Any]:
    st = path.stat()
    return _record(str(path.resolve()), st.st_size, st.st_mtime_ns)


def identity(key: str, value: str) -> dict[str, Any]:
    """The identity record of `value` for `key` (one of KEYS); {"path": value} alone when there is nothing on
    disk to identify (no manifest.json, an asset name)."""
    path = Path(value)
    if key == "data.path":
        manifest = path / "manifest.json"
        return {"path": value, "manifest_sha256": _file_record(manifest)["sha256"] if manifest.is_file() else None}
    if path.is_file():
        record = _file_record(path)
        return {"path": value, "bytes": record["size"], "sha256": record["sha256"]}
    return {"path": value}


def _known(record: dict[str, Any]) -> bool:
    return bool(record.get("manifest_sha256") or record.get("sha256"))


def record_inputs(cfg_dict: dict[str, Any], run_dir: str | os.PathLike) -> None:
    """Write `<run_dir>/inputs.json` for the config `cfg_dict` (atomically). A record whose path is unchanged
    is kept as it is, so a resume does not hash the decoder again."""
    run_dir = Path(run_dir)
    old = read_inputs(run_dir)
    out: dict[str, Any] = {"format": FORMAT}
    for key in KEYS:
        section, name = key.split(".")
        value = (cfg_dict.get(section) or {}).get(name)
        if not isinstance(value, str) or not value:
            continue
        before = old.get(key)
        out[key] = before if isinstance(before, dict) and before.get("path") == value else identity(key, value)
    tmp = run_dir / (INPUTS_FILE + ".tmp")
    tmp.write_text(json.dumps(out, indent=2))
    os.replace(tmp, run_dir / INPUTS_FILE)


def read_inputs(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The records of `<run_dir>/inputs.json`; {} when it is missing or unreadable (nothing can be matched)."""
    try:
        data = json.loads((Path(run_dir) / INPUTS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and data.get("format") == FORMAT else {}


def same_content(key: str, new_value: str, run_dir: str | os.PathLike) -> str | None:
    """Why `new_value` holds the same content as the value recorded for `key` (one of KEYS) in the run's
    inputs.json (a phrase for the log), or None when it does not or cannot be told."""
    before = read_inputs(run_dir).get(key)
    if not isinstance(before, dict) or not _known(before):
        return None
    now = identity(key, new_value)
    if key == "data.path" and now.get("manifest_sha256") == before["manifest_sha256"]:
        return "the same data: its manifest.json is byte-identical"
    if key == "sonar.decoder" and (now.get("bytes"), now.get("sha256")) == (before.get("bytes"), before["sha256"]):
        return "the same decoder file: same size and sha256"
    return None
