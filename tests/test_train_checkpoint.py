"""Checkpoints: kill-and-resume reproduces the uninterrupted run bitwise (CPU fp32, one process), saves are
atomic (ENOSPC mid-save leaves the previous checkpoint latest and usable), pruning and pointer fallback."""
import errno
import json

import pytest
import torch

from _train_fakes import fake_data_factory, fake_model_factory
from sonar_train import checkpoint as ckpt
from sonar_train.config import RunConfig
from sonar_train.export import export, load_model_state
from sonar_train.loop import CheckpointNotSaved, run_training


def fake_cfg(out, steps, **train):
    cfg = RunConfig()
    cfg.model.family = "fake"
    cfg.optim.lr, cfg.optim.warmup_steps = 1e-2, 2
    cfg.train.precision, cfg.train.log_every, cfg.train.out_dir = "fp32", 1, str(out)
    cfg.train.steps, cfg.train.peak_flops = steps, 1e9
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def run(cfg):
    return run_training(cfg, model_factory=fake_model_factory, data_factory=fake_data_factory)


def losses(out):
    with open(f"{out}/metrics.jsonl") as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if r["kind"] == "train"}


def test_kill_and_resume_is_bitwise_identical(tmp_path, monkeypatch):
    full = fake_cfg(tmp_path / "full", 6, checkpoint_every=3, grad_accum=2)
    run(full)
    crash = fake_cfg(tmp_path / "crash", 6, checkpoint_every=3, grad_accum=2)
    monkeypatch.setenv("FAKE_FAULTS", '{"crash_call": 9}')  # dies in step 5 (calls 8, 9), after the step-3 checkpoint
    with pytest.raises(RuntimeError, match="injected failure"):
        run(crash)
    assert ckpt.latest_checkpoint(tmp_path / "crash" / "checkpoints").name == "step_000003"
    monkeypatch.delenv("FAKE_FAULTS")
    res = run(crash)
    assert res["step"] == 6
    a, b = losses(tmp_path / "full"), losses(tmp_path / "crash")
    assert [a[s] for s in range(1, 7)] == [b[s] for s in range(1, 7)]  # exact float equality
    wa = load_model_state(tmp_path / "full" / "checkpoints" / "step_000006")
    wb = load_model_state(tmp_path / "crash" / "checkpoints" / "step_000006")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_enospc_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    cfg = fake_cfg(tmp_path / "run", 4, checkpoint_every=2, keep_last=5)
    real = ckpt._make_writer
    saves = {"n": 0}

    class FullDisk(type(real(tmp_path))):
        def write_data(self, plan, planner):
            (self.path / "partial.distcp").write_bytes(b"\0" * 100)  # something half-written
            raise OSError(errno.ENOSPC, "No space left on device")

    def writer(path):
        saves["n"] += 1
        return FullDisk(str(path)) if saves["n"] == 2 else real(path)  # the step-4 save fails

    monkeypatch.setattr(ckpt, "_make_writer", writer)
    with pytest.raises(CheckpointNotSaved, match=r"stopped at step 4, .* newest good checkpoint: step 2 ") as failed:
        run(cfg)  # training is not killed by the failed save, but the run ends in an error naming step 2
    res = failed.value.result
    root = tmp_path / "run" / "checkpoints"
    assert res["step"] == 4 and res["checkpoint"].endswith("step_000002")
    assert (root / "latest").read_text().strip() == "step_000002"
    assert ckpt.complete_steps(root) == [2] and not list(root.glob("*.tmp"))
    # the previous checkpoint is usable: resuming a longer run starts from step 2 and reproduces step 3
    monkeypatch.setattr(ckpt, "_make_writer", real)
    first = losses(tmp_path / "run")
    cfg.train.steps = 4
    run(cfg)
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        recs = [r for r in map(json.loads, f) if r["kind"] == "train"]
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 3, 4]
    assert recs[4]["loss"] == first[3] and recs[5]["loss"] == first[4]


def test_keep_last_latest_pointer_and_fallback(tmp_path):
    cfg = fake_cfg(tmp_path / "run", 5, checkpoint_every=1, keep_last=2)
    run(cfg)
    root = tmp_path / "run" / "checkpoints"
    assert ckpt.complete_steps(root) == [4, 5]
    assert ckpt.latest_checkpoint(root).name == "step_000005"
    # an interrupted later save and a broken pointer: the newest complete directory wins, tmp is ignored
    (root / "step_000006.tmp").mkdir()
    (root / "latest").write_text("step_000009\n")
    assert ckpt.latest_checkpoint(root).name == "step_000005"
    ckpt.remove_stale_tmp(root)
    assert not (root / "step_000006.tmp").exists()
    (root / "step_000005" / "COMPLETE").unlink()  # incomplete directories are never picked
    assert ckpt.latest_checkpoint(root).name == "step_000004"


def test_export_round_trip(tmp_path):
    from safetensors import safe_open

    cfg = fake_cfg(tmp_path / "run", 2, checkpoint_every=1)
    run(cfg)
    out = export(tmp_path / "run", tmp_path / "m.safetensors", step=1, dtype="bf16")
    ref = load_model_state(tmp_path / "run" / "checkpoints" / "step_000001")
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["family"] == "fake" and f.metadata()["step"] == "1"
        assert set(f.keys()) == set(ref) and not any(k.startswith("decoder.") for k in f.keys())
        for k in ref:
            assert torch.equal(f.get_tensor(k), ref[k].to(torch.bfloat16))
    info = json.loads((tmp_path / "m.json").read_text())
    assert info["step"] == 1 and info["run_config"]["train"]["steps"] == 2
    with pytest.raises(FileNotFoundError, match="--step: no complete checkpoint for step 7"):
        export(tmp_path / "run", tmp_path / "x.safetensors", step=7)


def test_sigusr1_saves_and_stops_then_resume_matches(tmp_path, monkeypatch):
    full = fake_cfg(tmp_path / "full", 6)
    run(full)
    cfg = fake_cfg(tmp_path / "stop", 6)
    monkeypatch.setenv("FAKE_FAULTS", '{"signal_call": 2}')  # SIGUSR1 arrives during step 3
    res = run(cfg)
    assert res["stopped"] is True and res["step"] == 3 and res["checkpoint"].endswith("step_000003")
    monkeypatch.delenv("FAKE_FAULTS")
    res = run(cfg)
    assert res["step"] == 6 and "stopped" not in res
    assert losses(tmp_path / "stop") == losses(tmp_path / "full")


def test_starting_over_sets_the_old_runs_checkpoints_aside(tmp_path, capsys):
    """train.resume=false in a folder with checkpoints: the new run's checkpoints are never pruned in favour of
    the old run's (higher-numbered) ones, a later resume continues the new run, and nothing old is deleted."""
    out = tmp_path / "run"
    run(fake_cfg(out, 4, checkpoint_every=1, keep_last=3))
    root = out / "checkpoints"
    old = {s: load_model_state(root / ckpt.step_dir_name(s)) for s in (2, 3, 4)}
    res = run(fake_cfg(out, 1, checkpoint_every=1, keep_last=3, resume=False))
    assert f"checkpoint of step 4 is after the step this run starts from (0): moved to {root / 'set_aside'}" in \
        capsys.readouterr().out
    assert res["checkpoint"].endswith("step_000001")
    assert ckpt.complete_steps(root) == [1]
    assert ckpt.latest_checkpoint(root).name == "step_000001"
    assert ckpt.find_resumable(root, say=lambda _m: None).name == "step_000001"
    for s, weights in old.items():  # the old run's checkpoints, intact, where the run said it put them
        kept = load_model_state(root / "set_aside" / ckpt.step_dir_name(s))
        assert all(torch.equal(kept[k], weights[k]) for k in weights)


def test_resuming_past_a_damaged_checkpoint_keeps_the_new_ones(tmp_path, capsys):
    """The newest checkpoint fails verification, the run falls back to an older one, and keep_last=1: the
    checkpoints it saves afterwards survive pruning (the damaged one, marked good, used to win), and the
    damaged one is kept aside for inspection, not deleted."""
    out = tmp_path / "run"
    run(fake_cfg(out, 4, checkpoint_every=2, keep_last=2))
    root = out / "checkpoints"
    shard = next((root / "step_000004").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-7])  # truncated
    res = run(fake_cfg(out, 3, checkpoint_every=1, keep_last=1))
    assert "step_000004 fails verification" in capsys.readouterr().out
    assert res["step"] == 3 and res["checkpoint"].endswith("step_000003")
    assert ckpt.complete_steps(root) == [3]
    assert ckpt.find_resumable(root, say=lambda _m: None).name == "step_000003"
    kept = root / "set_aside" / "step_000004"
    assert (kept / shard.name).is_file() and (kept / "COMPLETE").is_file()
