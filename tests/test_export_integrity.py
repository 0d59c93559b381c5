"""Checksummed exports: every writer records each file's sha256 and size in model.json, every loader checks
the weights file against it before parsing it, names the file and says what is wrong ("truncated",
"checksum mismatch"); `verify=False` / `--no-verify` opts out; an export from before checksums loads with
one warning line. The reference for the digest is hashlib over the file's bytes, computed here."""
from __future__ import annotations

import hashlib
import json
import logging

import pytest
import torch
from safetensors.torch import save_file

from sonar_llm.checkpoints import ExportIntegrityError, read_exported, write_exported

RUN_CONFIG = {"model": {"family": "fake", "preset": "tiny"}}


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def export_file(tmp_path):
    state = {"w": torch.arange(4096, dtype=torch.float32).reshape(64, 64), "b": torch.ones(64)}
    out = write_exported(state, tmp_path / "model.safetensors", {"run_config": RUN_CONFIG, "step": 3},
                         metadata={"step": "3"})
    return out, state


def flip_bytes(path, n: int = 64) -> None:
    """Flip `n` bytes in the tensor data (after the header), as a bad disk or copy would."""
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    for i in range(n):
        data[header + 100 + i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_written_record_is_the_files_sha256_and_size(export_file):
    out, state = export_file
    info = json.loads(out.with_suffix(".json").read_text())
    rec = info["files"]["weights"]
    assert rec == {"name": "model.safetensors", "sha256": sha256(out), "size": out.stat().st_size}
    assert info["step"] == 3 and info["run_config"] == RUN_CONFIG
    got = read_exported(out)
    assert set(got.state) == set(state) and all(torch.equal(got.state[k], v) for k, v in state.items())
    assert not list(out.parent.glob("*.tmp"))


def test_flipped_bytes_are_a_checksum_mismatch(export_file):
    out, state = export_file
    flip_bytes(out)
    with pytest.raises(ExportIntegrityError, match=r"model\.safetensors: checksum mismatch") as info:
        read_exported(out)
    assert isinstance(info.value, ValueError)  # the commands' bad-input class: one line, exit 2
    # the opt-out loads it, and the damage is real (without the check it would go unnoticed)
    got = read_exported(out, verify=False)
    assert not all(torch.equal(got.state[k], v) for k, v in state.items())


def test_a_renamed_pair_still_verifies(export_file):
    out, _ = export_file
    moved = out.with_name("best.safetensors")
    out.rename(moved)
    out.with_suffix(".json").rename(moved.with_suffix(".json"))
    flip_bytes(moved)
    with pytest.raises(ExportIntegrityError, match=r"best\.safetensors: checksum mismatch"):
        read_exported(moved)


@pytest.mark.parametrize("verify", [True, False])
def test_truncated_file_is_named_never_a_safetensor_error(export_file, verify):
    out, _ = export_file
    data = out.read_bytes()
    out.write_bytes(data[: len(data) // 2])
    expected = r"model\.safetensors: truncated" if verify else r"model\.safetensors: truncated or corrupt safetensors"
    with pytest.raises(ExportIntegrityError, match=expected):
        read_exported(out, verify=verify)


def test_header_cut_is_named_without_a_record(tmp_path):
    """An export from before checksums, cut inside its header: still our error, naming the file."""
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(8, 8)}, str(path))
    path.write_bytes(path.read_bytes()[:20])
    path.with_suffix(".json").write_text(json.dumps({"run_config": RUN_CONFIG}))
    with pytest.raises(ExportIntegrityError, match=r"model\.safetensors: truncated or corrupt"):
        read_exported(path)


def test_export_without_checksums_loads_with_one_warning_line(tmp_path, caplog):
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(3)}, str(path))
    path.with_suffix(".json").write_text(json.dumps({"run_config": RUN_CONFIG, "step": 1}))
    with caplog.at_level(logging.WARNING, logger="sonar_llm.checkpoints"):
        got = read_exported(path)
    assert torch.equal(got.state["w"], torch.ones(3))
    msgs = [r.getMessage() for r in caplog.records if r.name == "sonar_llm.checkpoints"]
    assert len(msgs) == 1 and "\n" not in msgs[0]
    assert "model.safetensors" in msgs[0] and "no sha256 recorded" in msgs[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sonar_llm.checkpoints"):
        read_exported(path, verify=False)  # opted out: nothing to warn about
    assert not caplog.records


def test_failed_write_leaves_nothing(tmp_path):
    bad = {"w": torch.ones(2), "v": "not a tensor"}
    with pytest.raises(Exception):
        write_exported(bad, tmp_path / "model.safetensors", {"run_config": RUN_CONFIG})
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_train_export_records_and_verifies(tmp_path):
    """train/export.py's writer: the record matches the file; a flipped byte is caught on load."""
    from test_train_checkpoint import fake_cfg, run

    from sonar_train.export import export

    run(fake_cfg(tmp_path / "run", 1, checkpoint_every=1))
    out = export(tmp_path / "run", tmp_path / "m.safetensors")
    info = json.loads((tmp_path / "m.json").read_text())
    assert info["files"]["weights"]["sha256"] == sha256(out) and info["files"]["weights"]["size"] == out.stat().st_size
    assert read_exported(out).step == info["step"]
    flip_bytes(out, 1)
    with pytest.raises(ExportIntegrityError, match=r"m\.safetensors: checksum mismatch"):
        read_exported(out)
