"""A run folder moved (or copied) together with its data resumes: `data.path` and `sonar.decoder` may change
to a path whose content is the one recorded in the run's inputs.json; other content under a new path is
refused, naming the key, and nothing is written into the run folder."""
import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from _train_fakes import fake_data_factory, fake_model_factory
from sonar_train.config import ConfigError, RunConfig
from sonar_train.loop import run_training


def cfg_for(out, data, decoder, steps):
    cfg = RunConfig()
    cfg.model.family = "fake"
    cfg.optim.lr, cfg.optim.warmup_steps = 1e-2, 2
    cfg.train.precision, cfg.train.log_every, cfg.train.out_dir = "fp32", 1, str(out)
    cfg.train.steps, cfg.train.peak_flops, cfg.train.checkpoint_every = steps, 1e9, 2
    cfg.data.path, cfg.sonar.decoder = str(data), str(decoder)
    return cfg


def run(cfg):
    return run_training(cfg, model_factory=fake_model_factory, data_factory=fake_data_factory)


def train_losses(out):
    with open(out / "metrics.jsonl") as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f) if r["kind"] == "train"]


@pytest.fixture
def first_run(tmp_path, monkeypatch):
    """A 2-step run with a dataset folder (a manifest.json) and a decoder file, then the whole tree moved.
    (The fake family reads neither; the end-sentence check, which would open them, is not under test.)"""
    import sonar_train.end_sentence

    monkeypatch.setattr(sonar_train.end_sentence, "warn_if_end_sentence_lost", lambda *a, **k: None)
    old = tmp_path / "old"
    (old / "data").mkdir(parents=True)
    (old / "data" / "manifest.json").write_text('{"shards": [{"sha256": "ab"}]}')
    save_file({"w": torch.ones(16)}, str(old / "decoder.safetensors"))
    decoder = (old / "decoder.safetensors").read_bytes()
    run(cfg_for(old / "run", old / "data", old / "decoder.safetensors", 2))
    recorded = json.loads((old / "run" / "inputs.json").read_text())
    assert recorded["data.path"]["manifest_sha256"] == hashlib.sha256(
        (old / "data" / "manifest.json").read_bytes()).hexdigest()
    assert recorded["sonar.decoder"] == {"path": str(old / "decoder.safetensors"), "bytes": len(decoder),
                                         "sha256": hashlib.sha256(decoder).hexdigest()}
    new = tmp_path / "new"
    shutil.move(old, new)
    return new


def test_a_moved_run_resumes_and_says_why(first_run, capsys, monkeypatch):
    import sonar_train.run_inputs as run_inputs

    hashed = []
    real = run_inputs.file_record
    monkeypatch.setattr(run_inputs, "file_record", lambda p: hashed.append(str(p)) or real(p))
    new = first_run
    res = run(cfg_for(new / "run", new / "data", new / "decoder.safetensors", 4))
    # the resume check and inputs.json's new record hash each moved file once (a real decoder is gigabytes)
    assert sorted(hashed) == sorted([str((new / "data" / "manifest.json").resolve()),
                                     str((new / "decoder.safetensors").resolve())]), hashed
    out = capsys.readouterr().out
    assert "resumed from" in out and "the same data: its manifest.json is byte-identical" in out
    assert "the same decoder file" in out
    assert res["step"] == 4 and [s for s, _ in train_losses(new / "run")] == [1, 2, 3, 4]
    assert json.loads((new / "run" / "inputs.json").read_text())["data.path"]["path"] == str(new / "data")


@pytest.mark.parametrize("changed", ["data", "decoder"])
def test_other_content_under_a_new_path_is_refused(first_run, changed):
    new = first_run
    if changed == "data":
        (new / "data" / "manifest.json").write_text('{"shards": [{"sha256": "cd"}]}')
    else:
        save_file({"w": torch.zeros(16)}, str(new / "decoder.safetensors"))  # same size, other bytes
    before = {p.name: p.read_bytes() for p in (new / "run").iterdir() if p.is_file()}
    key = "data.path" if changed == "data" else "sonar.decoder"
    with pytest.raises(ConfigError, match=rf"^{key}: .* differs from the run being resumed .* content differs from the one recorded"):
        run(cfg_for(new / "run", new / "data", new / "decoder.safetensors", 4))
    assert {p.name: p.read_bytes() for p in (new / "run").iterdir() if p.is_file()} == before
