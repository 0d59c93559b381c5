"""train/main.py and train/export.py as commands: exit codes, config errors reported before any work,
--dry-run, the no-argument default pipeline hook; and the metrics helpers (MFU table, progress line, JSONL)."""
import io
import json
import subprocess
import sys
from pathlib import Path

import torch

import sonar_train
from _train_fakes import fake_data_factory, fake_model_factory
from sonar_train import main as train_main
from sonar_train.metrics import MetricsLogger, format_line, gpu_peak_flops, measure_cpu_flops

REPO = Path(__file__).resolve().parent.parent


def test_bad_config_exits_2_naming_the_key_before_any_work(tmp_path, capsys, monkeypatch):
    called = []
    monkeypatch.setattr("sonar_train.loop.run_training", lambda *a, **k: called.append(1))
    rc = train_main.main(["--optim.lr=abc", f"--train.out_dir={tmp_path / 'run'}"],
                         model_factory=fake_model_factory, data_factory=fake_data_factory)
    assert rc == 2 and "optim.lr: expected float, got 'abc'" in capsys.readouterr().err
    assert not called and not (tmp_path / "run").exists()
    rc = train_main.main(["--config", str(tmp_path / "missing.toml")])
    assert rc == 2 and "config file not found" in capsys.readouterr().err


def test_dry_run_prints_resolved_config(capsys):
    rc = train_main.main(["--config", str(REPO / "configs" / "sonar_llm_600m.toml"), "--train.steps=5", "--dry-run"],
                         data_factory=fake_data_factory)
    out = capsys.readouterr().out
    assert rc == 0 and "steps = 5" in out and 'preset = "600M"' in out


def test_dry_run_without_config_prints_the_embedded_default_and_prepares_nothing(tmp_path, capsys, monkeypatch):
    """`python train/main.py --dry-run` is the dry run of `python train/main.py`: configs/default.toml with the
    paths the default pipeline would prepare (SONAR_LLM_DEFAULT_DIR, the tiny SONAR cache) and its step budget."""
    import tomllib

    monkeypatch.setenv("SONAR_LLM_DEFAULT_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("SONAR_LLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SONAR_LLM_DEFAULT_STEPS", "7")
    assert train_main.main(["--dry-run", "--optim.lr=1e-3"]) == 0
    printed = tomllib.loads(capsys.readouterr().out)
    default = tomllib.loads((REPO / "configs" / "default.toml").read_text())
    assert printed["model"]["family"] == default["model"]["family"]
    assert printed["model"]["preset"] == default["model"]["preset"]
    assert printed["data"]["path"] == str(tmp_path / "run" / "data" / "train")
    assert printed["sonar"]["decoder"] == str(tmp_path / "cache" / "tiny_sonar" / "tiny_sonar_decoder.pt")
    assert printed["train"]["steps"] == 7 and printed["optim"]["lr"] == 1e-3
    assert printed["train"]["out_dir"] == str(tmp_path / "run")
    assert list(tmp_path.iterdir()) == []  # nothing prepared, nothing written


def test_overrides_without_config_go_on_top_of_the_embedded_default(tmp_path, capsys, monkeypatch):
    """`python train/main.py --train.steps=5` runs the default with 5 steps (not the bare dataclass defaults);
    a bad override or a missing GPU fails before anything is prepared, in the dry run as in the real run."""
    import types

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SONAR_LLM_DEFAULT_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("SONAR_LLM_CACHE", str(tmp_path / "cache"))
    got = []
    fake = types.ModuleType("sonar_train.default_pipeline")
    import sonar_train.default_pipeline as real

    fake.planned_config = real.planned_config
    fake.main = lambda extra=(): got.append(list(extra)) or 0
    monkeypatch.setitem(sys.modules, "sonar_train.default_pipeline", fake)
    monkeypatch.setattr(sonar_train, "default_pipeline", fake, raising=False)
    assert train_main.main(["--train.steps=5"]) == 0 and got == [["--train.steps=5"]]
    for argv in (["--train.steps=0"], ["--train.steps=0", "--dry-run"], ["--train.out_dir=elsewhere"]):
        assert train_main.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and ("train.steps" in err[0] or "train.out_dir" in err[0]), err
    if not torch.cuda.is_available():
        for argv in (["--train.device=cuda"], ["--train.device=cuda", "--dry-run"]):
            assert train_main.main(argv) == 2
            assert "train.device" in capsys.readouterr().err
    assert got == [["--train.steps=5"]] and list(tmp_path.iterdir()) == []  # nothing else ran or was written
    # bringing data (--data.path) without --config: the overrides are the whole config, not the default
    assert train_main.main([f"--data.path={tmp_path / 'nodata'}", "--train.steps=5", "--dry-run"]) == 2
    assert "data.path" in capsys.readouterr().err and got == [["--train.steps=5"]]


def test_exit_codes_of_training(tmp_path, capsys):
    base = ["--model.family=fake", "--train.precision=fp32", "--train.peak_flops=1e9", "--train.steps=3"]
    ok = train_main.main(base + [f"--train.out_dir={tmp_path / 'a'}"],
                         model_factory=fake_model_factory, data_factory=fake_data_factory)
    assert ok == 0 and '"final"' in capsys.readouterr().out
    aborted = train_main.main(base + [f"--train.out_dir={tmp_path / 'b'}", "--train.max_bad_steps=1",
                                      "--model.overrides.nan_calls=[1]"],
                              model_factory=fake_model_factory, data_factory=fake_data_factory)
    assert aborted == 3 and "train.max_bad_steps=1" in capsys.readouterr().err
    failed = train_main.main(base + [f"--train.out_dir={tmp_path / 'c'}", "--model.overrides.crash_call=0"],
                             model_factory=fake_model_factory, data_factory=fake_data_factory)
    assert failed == 1 and "injected failure" in capsys.readouterr().err


def test_no_arguments_runs_default_pipeline(monkeypatch):
    import types

    ran = []
    fake = types.ModuleType("sonar_train.default_pipeline")
    fake.main = lambda: ran.append(1) or 0
    monkeypatch.setitem(sys.modules, "sonar_train.default_pipeline", fake)
    import sonar_train

    monkeypatch.setattr(sonar_train, "default_pipeline", fake, raising=False)
    assert train_main.main([]) == 0 and ran == [1]


def test_main_script_runs_standalone(tmp_path):
    """`python train/main.py --dry-run` from another directory: main.py puts the repo root on sys.path."""
    p = subprocess.run([sys.executable, str(REPO / "train" / "main.py"), "--train.steps=2", "--dry-run"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "[train]" in p.stdout


def test_peak_flops_table_and_cpu_measurement():
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert gpu_peak_flops("NVIDIA H100 PCIe", "bf16") == 756e12
    assert gpu_peak_flops("NVIDIA H200", "fp32") == 494e12
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB", "bf16") == 312e12
    assert gpu_peak_flops("Some Future GPU", "bf16") is None
    assert 1e6 < measure_cpu_flops(seconds=0.05, n=64) < 1e14


def test_metrics_logger_jsonl_and_lines(tmp_path):
    out = io.StringIO()
    log = MetricsLogger(tmp_path, enabled=True, stream=out)
    log.log({"kind": "train", "step": 1, "loss": 2.5, "lr": 1e-3, "mfu": 0.25, "skipped_steps": 0})
    log.message("hello")
    log.close()
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert recs[0]["loss"] == 2.5 and recs[0]["step"] == 1 and "time" in recs[0]
    lines = out.getvalue().splitlines()  # not a TTY: one plain line per record
    assert lines == ["step 1 | loss 2.5000 | lr 1.00e-03 | mfu 25.0%", "hello"]
    silent = MetricsLogger(tmp_path / "other", enabled=False)  # ranks > 0 write nothing
    silent.log({"step": 1})
    assert not (tmp_path / "other").exists()
    assert format_line({"step": 3, "loss": None, "skipped_steps": 2}) == "step 3 | skipped 2"


def test_tensorboard_mirror_when_installed(tmp_path, monkeypatch):
    import types

    scalars = []

    class Writer:
        def __init__(self, logdir):
            self.logdir = logdir

        def add_scalar(self, tag, value, step):
            scalars.append((tag, value, step))

        def close(self):
            scalars.append("closed")

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    log = MetricsLogger(tmp_path, enabled=True, tensorboard=True, stream=io.StringIO())
    log.log({"kind": "eval", "step": 4, "eval_loss": 1.5, "note": "x"})
    log.close()
    assert scalars == [("eval/eval_loss", 1.5, 4), "closed"]
