"""What is on disk can be trusted (issue 17): no file of a run folder (or a SONAR file, an export, a shard) runs
pickled code when read; checkpoints carry checksums, a corrupted one is named and passed over; only good
checkpoints are called good; a resume applies optimizer changes and refuses model changes without writing
anything; a failed last save ends the run non-zero; metrics.jsonl stays one consistent history; family /
preset errors are config errors before any folder exists."""
import builtins
import hashlib
import io
import json
import pickle
import shutil

import numpy as np
import pytest
import torch

from _train_fakes import fake_data_factory, fake_model_factory
from sonar_train import checkpoint as ckpt
from sonar_train import main as train_main
from sonar_train.config import ConfigError, RunConfig
from sonar_train.loop import CheckpointNotSaved, TrainingAborted, run_training
from sonar_train.metrics import append_line, rewind_metrics

from test_train_checkpoint import fake_cfg  # noqa: E402  (the checkpoint tests' fake-family config)


class Payload:
    """Unpickling this creates the file `marker` (what an attacker would replace with anything)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def payload_bytes(marker) -> bytes:
    return pickle.dumps(Payload(marker))


def assert_runs_when_read_naively(marker, read) -> None:
    """Positive control: the planted payload is live (a naive reader executes it), so the refusal tests can fail."""
    assert not marker.exists()
    read()
    assert marker.exists()
    marker.unlink()


def run(cfg, **kw):
    return run_training(cfg, model_factory=fake_model_factory, data_factory=fake_data_factory, **kw)


def records(out, kind="train"):
    with open(f"{out}/metrics.jsonl") as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def rehash(ckpt_dir, name):
    """What an attacker who can write the folder does: make checksums.json match the planted file."""
    sums = json.loads((ckpt_dir / "checksums.json").read_text())
    data = (ckpt_dir / name).read_bytes()
    sums["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt_dir / "checksums.json").write_text(json.dumps(sums))


# ------------------------------------------------------------------------------------------------ no pickled code
@pytest.mark.parametrize("name, error", [
    (".metadata", r"\.metadata: refusing to unpickle global (builtins|io)\.open"),
    ("trainer.json", r"trainer\.json: unreadable"),
    ("rank_0.safetensors", r"rank_0\.safetensors: unreadable"),
])
def test_planted_payload_in_a_checkpoint_file_is_refused(tmp_path, name, error):
    cfg = fake_cfg(tmp_path / "run", 2)
    run(cfg)
    step = tmp_path / "run" / "checkpoints" / "step_000002"
    marker = tmp_path / "pwned"
    (step / name).write_bytes(payload_bytes(marker))
    rehash(step, name)  # the checksums match: only the reader stands between the payload and its execution
    cfg.train.steps = 3
    with pytest.raises((ValueError, RuntimeError), match=error):
        run(cfg)
    assert_runs_when_read_naively(marker, lambda: pickle.loads((step / name).read_bytes()))


def test_legacy_pickled_trainer_state_is_never_read(tmp_path):
    """trainer.pt / rank_0.pt (the old pickled format) planted in a checkpoint: not listed, not read."""
    cfg = fake_cfg(tmp_path / "run", 2)
    run(cfg)
    step = tmp_path / "run" / "checkpoints" / "step_000002"
    marker = tmp_path / "pwned"
    for name in ("trainer.pt", "rank_0.pt"):
        torch.save({"x": Payload(marker)}, step / name)
    cfg.train.steps = 3
    assert run(cfg)["step"] == 3
    for name in ("trainer.pt", "rank_0.pt"):
        assert_runs_when_read_naively(marker, lambda: torch.load(step / name, weights_only=False))


def test_planted_payload_in_a_dcp_entry_is_refused(tmp_path):
    """A non-tensor DCP entry is a torch.save pickle: the safe planner refuses globals; the stock planner (the
    control) runs them, so this test can fail."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint.api import CheckpointException

    from sonar_llm.dcp_safe import SafeFileSystemReader, SafeLoadPlanner

    marker = tmp_path / "pwned"
    with ckpt._quiet_single_process():
        dcp.save({"w": torch.ones(2), "extra": Payload(marker)}, checkpoint_id=str(tmp_path / "c"), no_dist=True)
    assert not marker.exists()
    with ckpt._quiet_single_process(), pytest.raises(CheckpointException) as refused:
        dcp.load({"w": torch.zeros(2), "extra": None}, storage_reader=SafeFileSystemReader(str(tmp_path / "c")),
                 planner=SafeLoadPlanner(), no_dist=True)
    assert "refusing to unpickle checkpoint entry 'extra'" in str(refused.value.failures[0][0])
    assert not marker.exists()
    with ckpt._quiet_single_process():
        dcp.load({"w": torch.zeros(2), "extra": None}, storage_reader=FileSystemReader(str(tmp_path / "c")),
                 planner=DefaultLoadPlanner(), no_dist=True)
    assert marker.exists()  # the stock reader executed the payload


def test_planted_payload_in_export_sonar_file_and_shard_is_refused(tmp_path):
    from sonar_llm.checkpoints import read_exported
    from sonar_llm.data.shards import DatasetWriter, ShardArrays, ShardCorruptionError, ShardedDataset
    from sonar_llm.sonar.checkpoint import load_sonar_decoder

    marker = tmp_path / "pwned"
    exported = tmp_path / "model.safetensors"
    exported.write_bytes(payload_bytes(marker))
    (tmp_path / "model.json").write_text(json.dumps({"run_config": {"model": {"family": "fake"}}, "step": 1}))
    with pytest.raises(Exception, match="model.safetensors|header|deserializ"):
        read_exported(exported)
    assert_runs_when_read_naively(marker, lambda: pickle.loads(exported.read_bytes()))
    torch.save({"model": {"w": Payload(marker)}}, tmp_path / "decoder.pt")
    with pytest.raises(Exception, match=r"decoder\.pt"):
        load_sonar_decoder(tmp_path / "decoder.pt")
    assert_runs_when_read_naively(marker, lambda: torch.load(tmp_path / "decoder.pt", weights_only=False))
    w = DatasetWriter(tmp_path / "ds", embed_dim=4, dtype="fp16", end_of_doc_text="End.", end_of_doc_tokens=[1],
                      end_of_doc_embedding=np.zeros(4))
    w.add_shard(0, ShardArrays(np.zeros((2, 4), np.float16), np.arange(4, dtype=np.int32),
                               np.array([0, 2, 4], np.int64), np.array([0, 2], np.int64)))
    w.finish(1)
    emb = tmp_path / "ds" / "shard_000000" / "embeddings.npy"
    np.save(emb, np.array([Payload(marker)], dtype=object), allow_pickle=True)
    with pytest.raises(ShardCorruptionError, match=str(emb)):
        ShardedDataset(tmp_path / "ds", verify="none").doc(0)
    assert_runs_when_read_naively(marker, lambda: np.load(emb, allow_pickle=True))


# ------------------------------------------------------------------------------------------------ checksums
def test_corrupted_checkpoint_is_named_and_resume_falls_back(tmp_path):
    cfg = fake_cfg(tmp_path / "run", 4, checkpoint_every=2, keep_last=5)
    run(cfg)
    first = {r["step"]: r["loss"] for r in records(tmp_path / "run")}
    root = tmp_path / "run" / "checkpoints"
    shard = root / "step_000004" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10  # one flipped bit in the middle of the weights / optimizer state
    shard.write_bytes(bytes(data))
    assert any(str(shard) in p and "sha256" in p for p in ckpt.verify_checkpoint(root / "step_000004"))
    truncated = tmp_path / "copy"
    shutil.copytree(root / "step_000002", truncated)
    with open(truncated / "__0_0.distcp", "r+b") as f:
        f.truncate(100)
    assert ckpt.verify_checkpoint(truncated) == [f"{truncated / '__0_0.distcp'}: 100 bytes, expected "
                                                 f"{(root / 'step_000002' / '__0_0.distcp').stat().st_size} "
                                                 f"(truncated or overwritten)"]
    model = fake_model_factory(cfg)
    with pytest.raises(ckpt.CheckpointError, match=r"__0_0\.distcp: 100 bytes"):
        ckpt.load_checkpoint(truncated, model, torch.optim.AdamW(model.parameters()))

    out = io.StringIO()
    cfg.train.steps = 5
    assert run(cfg, stream=out)["step"] == 5
    log = out.getvalue()
    assert f"checkpoint {root / 'step_000004'} fails verification ({shard}: sha256" in log
    assert f"resumed from {root / 'step_000002'} at step 2" in log
    recs = records(tmp_path / "run")
    assert [r["step"] for r in recs if r.get("stale")] == [3, 4]  # the first run's records of redone steps
    live = [r for r in recs if not r.get("stale")]
    assert [r["step"] for r in live] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in live[2:4]] == [first[3], first[4]]  # the redone steps are the same steps


def test_only_good_checkpoints_are_called_good(tmp_path, monkeypatch):
    # steps 5, 6 skipped (non-finite): the step-6 checkpoint follows no update, so it is not good; step 7
    # makes 3 in a row: the abort names step 4, and a resume passes over step 6
    cfg = fake_cfg(tmp_path / "run", 10, checkpoint_every=2, keep_last=5, max_bad_steps=3)
    monkeypatch.setenv("FAKE_FAULTS", json.dumps({"nan_calls": [4, 5, 6]}))
    with pytest.raises(TrainingAborted, match=r"last good checkpoint: .*step_000004$"):
        run(cfg)
    root = tmp_path / "run" / "checkpoints"
    assert ckpt.is_good(root / "step_000006") == (False, "every step since step 4 was skipped")
    assert ckpt.is_good(root / "step_000004") == (True, "")
    assert (root / "latest").read_text().strip() == "step_000004"
    monkeypatch.delenv("FAKE_FAULTS")
    out = io.StringIO()
    run(cfg, stream=out)
    assert "is not marked good (every step since step 4 was skipped); trying an older one" in out.getvalue()
    assert f"resumed from {root / 'step_000004'} at step 4" in out.getvalue()


def test_non_finite_weights_are_not_good_and_the_run_fails(tmp_path, capsys):
    def poison(model, step):  # the sample hook runs before the checkpoint of its step
        with torch.no_grad():
            model.out.weight[0, 0] = float("inf")

    cfg = fake_cfg(tmp_path / "run", 2, checkpoint_every=1, sample_every=2)
    with pytest.raises(CheckpointNotSaved, match=r"stopped at step 2, .*newest good checkpoint: step 1 "):
        run(cfg, sample_fn=poison)
    assert ckpt.is_good(tmp_path / "run" / "checkpoints" / "step_000002") == (False, "non-finite weights")


def test_failed_last_save_exits_non_zero_naming_the_good_step(tmp_path, capsys, monkeypatch):
    import errno

    real = ckpt._make_writer
    calls = {"n": 0}

    class FullDisk(type(real(tmp_path))):
        def write_data(self, plan, planner):
            raise OSError(errno.ENOSPC, "No space left on device")

    def writer(path):
        calls["n"] += 1
        return FullDisk(str(path)) if calls["n"] == 2 else real(path)

    monkeypatch.setattr(ckpt, "_make_writer", writer)
    rc = train_main.main(["--model.family=fake", "--train.precision=fp32", "--train.peak_flops=1e9",
                          "--train.steps=4", "--train.checkpoint_every=2", f"--train.out_dir={tmp_path / 'run'}"],
                         model_factory=fake_model_factory, data_factory=fake_data_factory)
    err = capsys.readouterr().err
    assert rc == 4 and "newest good checkpoint: step 2" in err


# ------------------------------------------------------------------------------------------------ resume config
def test_resume_applies_optimizer_changes_and_refuses_model_changes(tmp_path, capsys):
    cfg = fake_cfg(tmp_path / "run", 3)
    run(cfg)
    run_dir = tmp_path / "run"
    cfg.optim.lr, cfg.train.steps = 2e-2, 5
    out = io.StringIO()
    run(cfg, stream=out)
    assert "config changes applied on resume: optim.lr: 0.01 -> 0.02; train.steps: 3 -> 5" in out.getvalue()
    recs = [r for r in records(run_dir) if not r.get("stale")]
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5]
    # closed form (warm-up 2, cosine to min_lr_ratio 0.1 over steps 2..5; 0-based optimizer steps 3 and 4):
    # lr = 0.02 * (0.1 + 0.9 * (1 + cos(pi * (s - 2) / 3)) / 2) = 0.0155 and 0.0065
    assert cfg.optim.warmup_steps == 2 and cfg.optim.min_lr_ratio == 0.1
    assert abs(recs[3]["lr"] - 0.0155) < 1e-15 and abs(recs[4]["lr"] - 0.0065) < 1e-15
    assert "lr = 0.02" in (run_dir / "config.toml").read_text()

    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    cfg.model.preset, cfg.train.steps = "small", 6
    with pytest.raises(ConfigError, match=r"model.preset: 'tiny' -> 'small' differs from the run being resumed"):
        run(cfg)
    rc = train_main.main(["--model.family=fake", "--model.overrides.n_blocks=3", "--train.steps=6",
                          "--train.peak_flops=1e9", "--train.precision=fp32", f"--train.out_dir={run_dir}"],
                         model_factory=fake_model_factory, data_factory=fake_data_factory)
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "model.overrides: {} -> {'n_blocks': 3}" in err
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before  # nothing written


# ------------------------------------------------------------------------------------------------ config errors
@pytest.mark.parametrize("arg, message", [
    ("--model.family=nope", "config error: model.family: expected one of base_lcm, sonar_llm, token_llm, "
                            "two_tower, got 'nope'"),
    ("--model.preset=huge", "config error: model.preset: expected one of "),
])
def test_unknown_family_or_preset_is_a_config_error_before_any_folder(tmp_path, capsys, arg, message):
    rc = train_main.main([arg, f"--train.out_dir={tmp_path / 'run'}", f"--data.path={tmp_path}"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(message) and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_override_rejected_by_the_family_is_a_config_error_before_any_folder(tmp_path, capsys):
    def factory(cfg):
        raise ValueError("model.overrides: unknown key(s) ['colour'] for family 'fake'")

    rc = train_main.main(["--model.family=fake", f"--train.out_dir={tmp_path / 'run'}"], model_factory=factory,
                         data_factory=fake_data_factory)
    err = capsys.readouterr().err
    assert rc == 2 and err == "config error: model.overrides: unknown key(s) ['colour'] for family 'fake'\n"
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------ metrics.jsonl
def test_metrics_lines_are_whole_and_rewound(tmp_path, monkeypatch):
    import os

    path = tmp_path / "metrics.jsonl"
    append_line(path, json.dumps({"kind": "train", "step": 1}))
    before = path.read_bytes()
    real_write = os.write
    monkeypatch.setattr("sonar_train.metrics.os.write", lambda fd, data: real_write(fd, data[:5]))  # disk fills mid-line
    with pytest.raises(OSError, match="short write"):
        append_line(path, json.dumps({"kind": "train", "step": 2}))
    assert path.read_bytes() == before  # cut back: no half line
    monkeypatch.undo()
    for s in (2, 3, 4):
        append_line(path, json.dumps({"kind": "train", "step": s}))
    with open(path, "ab") as f:
        f.write(b'{"kind": "train", "st')  # a half line written by something else (e.g. an old version)
    assert rewind_metrics(path, 2) == 2
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    assert [(r["step"], r.get("stale", False)) for r in recs] == [(1, False), (2, False), (3, True), (4, True)]
    assert rewind_metrics(path, 2) == 0 and path.read_text().endswith("\n")


# ------------------------------------------------------------------------------------------------ shards
def test_training_data_is_verified_as_configured(tmp_path):
    from sonar_llm.data.shards import DatasetWriter, ShardArrays, ShardCorruptionError
    from sonar_train.loop import default_data_factory
    from sonar_train.parallel import DistInfo

    w = DatasetWriter(tmp_path / "ds", embed_dim=4, dtype="fp16", end_of_doc_text="End.", end_of_doc_tokens=[1],
                      end_of_doc_embedding=np.zeros(4))
    w.add_shard(0, ShardArrays(np.ones((6, 4), np.float16), np.arange(5, 29, dtype=np.int32),
                               np.arange(0, 25, 4, dtype=np.int64), np.array([0, 3, 6], np.int64)))
    w.finish(1)
    tokens = tmp_path / "ds" / "shard_000000" / "tokens.npy"
    data = bytearray(tokens.read_bytes())
    data[-2] ^= 0x01  # one token id of the last document changes
    tokens.write_bytes(bytes(data))
    cfg = RunConfig()
    cfg.data.path = str(tmp_path / "ds")
    assert cfg.data.verify == "full"  # the default catches it, naming the file, before any batch is built
    with pytest.raises(ShardCorruptionError, match=str(tokens) + ": sha256"):
        next(iter(default_data_factory(cfg, "train", DistInfo())))
    cfg.data.verify = "sampled"
    with pytest.raises(ShardCorruptionError, match=str(tokens)):
        default_data_factory(cfg, "train", DistInfo())
    cfg.data.verify = "size"  # sizes only: the flipped id goes through unnoticed (what the knob trades)
    assert next(iter(default_data_factory(cfg, "train", DistInfo()))) is not None
