"""The argument helpers every command shares (sonar_llm.cli): range-checked int and float flags, UTF-8 files
named with the line of the bad byte, devices checked before anything is loaded. Each bound is probed on both
sides, open and closed."""
from __future__ import annotations

import argparse

import pytest
import torch

from sonar_llm.cli import UsageError, check_device, float_in, int_at_least, read_utf8


def test_int_at_least_bounds():
    parse = int_at_least(1)
    assert parse("1") == 1 and parse("7") == 7
    for bad, said in (("0", "must be >= 1, got 0"), ("-3", "must be >= 1, got -3"), ("x", "expected an integer")):
        with pytest.raises(argparse.ArgumentTypeError, match=said):
            parse(bad)
    assert int_at_least(0)("0") == 0


def test_float_in_bounds_open_and_closed():
    closed = float_in(0.0, 1.0)
    assert closed("0") == 0.0 and closed("1") == 1.0 and closed("0.25") == 0.25
    for bad in ("-0.01", "1.01", "nan", "inf"):
        with pytest.raises(argparse.ArgumentTypeError, match=r"must be in \[0, 1\]"):
            closed(bad)
    half_open = float_in(0.0, 10.0, low_open=True)
    assert half_open("10") == 10.0
    with pytest.raises(argparse.ArgumentTypeError, match=r"must be in \(0, 10\]"):
        half_open("0")
    both_open = float_in(0.0, 1.0, low_open=True, high_open=True)
    with pytest.raises(argparse.ArgumentTypeError, match=r"must be in \(0, 1\)"):
        both_open("1")
    with pytest.raises(argparse.ArgumentTypeError, match="expected a number"):
        closed("high")


def test_read_utf8_names_the_file_and_line(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("one\ntwo é\n", encoding="utf-8")
    assert read_utf8(good) == "one\ntwo é\n"
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"one\ntwo\nthr\xffee\n")
    with pytest.raises(UsageError, match=rf"--prompts {bad}:3: not UTF-8 text \(byte 0xff at offset 11\)"):
        read_utf8(bad, "--prompts")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusals of a machine without CUDA")
def test_check_device_without_cuda():
    assert check_device("cpu") == "cpu"
    for device, said in (("cuda", "no CUDA device"), ("cuda:99", "no CUDA device"), ("gpu", "not a device"),
                         ("meta", "unsupported device type")):
        with pytest.raises(UsageError, match=rf"--device {device}\b.*{said}|--device '{device}': {said}"):
            check_device(device)


@pytest.mark.parametrize("flag, value", [("--mfu", "2"), ("--mfu", "0"), ("--headroom", "1.5"), ("--nproc", "0")])
def test_plan_range_flags_are_checked_before_the_config_is_read(tmp_path, capsys, flag, value):
    """The planner names a bad range flag before it reads the config (here a missing one) or plans anything."""
    from sonar_train import plan

    assert plan.main(["--config", str(tmp_path / "missing.toml"), flag, value]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{flag} must be" in err and "missing.toml" not in err


@pytest.mark.parametrize("module", ["sonar_llm.eval.evaluate", "sonar_llm.generate"])
def test_commands_let_idle_openmp_threads_wait_passively(module):
    """Run as a command, evaluate and generate set OMP_WAIT_POLICY=PASSIVE before torch loads (spinning threads made
    the default run's printed evaluate command 8x slower on 2 shared cores); a value the user set wins; imported as a
    library they leave the environment alone."""
    import os
    import subprocess
    import sys

    probe = ("import os, runpy, sys; sys.argv = ['cmd', '--help']\n"
             "try:\n    runpy.run_module(%r, run_name='__main__')\nexcept SystemExit:\n    pass\n"
             "print('POLICY=' + os.environ.get('OMP_WAIT_POLICY', '-'))" % module)
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    for given, want in ((None, "PASSIVE"), ("ACTIVE", "ACTIVE")):
        e = dict(env, **({"OMP_WAIT_POLICY": given} if given else {}))
        out = subprocess.run([sys.executable, "-c", probe], env=e, capture_output=True, text=True, timeout=300)
        assert f"POLICY={want}" in out.stdout, out.stderr[-2000:]
    lib = subprocess.run([sys.executable, "-c", f"import os, {module}; print(os.environ.get('OMP_WAIT_POLICY', '-'))"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert lib.stdout.strip() == "-", lib.stderr[-2000:]


def test_the_default_run_waits_passively_and_a_config_run_is_left_alone():
    """train/main.py sets OMP_WAIT_POLICY=PASSIVE for the embedded default (no --config), through the same
    `cli.wait_passively`, and leaves a --config run's environment as it is."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    main = Path(__file__).resolve().parents[1] / "train" / "main.py"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    for args, want in ((["--help"], "PASSIVE"), (["--config", "x.toml", "--help"], "-")):
        probe = (f"import os, runpy, sys; sys.argv = {[str(main), *args]!r}\n"
                 f"try:\n    runpy.run_path({str(main)!r}, run_name='__main__')\nexcept SystemExit:\n    pass\n"
                 "print('POLICY=' + os.environ.get('OMP_WAIT_POLICY', '-'))")
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
        assert f"POLICY={want}" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
