"""Two gloo processes under torchrun with FSDP2 on the fake family: same losses as one process fed the same
global batch; a rank that dies takes the job down (non-zero exit, no hang); resume after the crash follows
the uninterrupted 2-process run; bf16 mixed precision (frozen decoder replicated, cast to bf16) with
activation checkpointing stays close to fp32; plain replicated data parallelism (parallel.fsdp = false) matches too."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _train_fakes import fake_data_factory, fake_model_factory
from sonar_train.config import load_config
from sonar_train.loop import run_training

HERE = Path(__file__).resolve().parent
WORKER = HERE / "_train_worker.py"
BASE = ["--model.family=fake", "--optim.lr=0.01", "--optim.warmup_steps=2", "--train.precision=fp32",
        "--train.log_every=1", "--train.peak_flops=1e9", "--train.steps=6"]
pytestmark = pytest.mark.slow


def start_torchrun(args, **env_extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **env_extra)
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER), *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), time.monotonic()


def wait_torchrun(started, timeout=120):
    proc, t0 = started
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"torchrun did not finish in {timeout} s (hang?)\n{out[-2000:]}\n{err[-2000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), time.monotonic() - t0


def torchrun(args, timeout=120):
    return wait_torchrun(start_torchrun(args), timeout)


def final(p):
    for line in p.stdout.splitlines():
        if line.startswith('{"final"'):
            return json.loads(line)["final"]
    raise AssertionError(f"no final result; rc={p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")


def train_losses(run_dir):
    with open(Path(run_dir) / "metrics.jsonl") as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if r["kind"] == "train"}


def test_two_ranks_match_one_and_survive_a_dead_rank(tmp_path):
    # launched together (independent jobs, overlapping start-up): the uninterrupted 2 ranks x 1 micro-batch,
    # and a job whose rank 1 dies hard (os._exit) in step 4, after the step-2 checkpoint
    crash_dir = tmp_path / "crash"
    args = BASE + [f"--train.out_dir={crash_dir}", "--train.checkpoint_every=2", "--parallel.timeout_minutes=1"]
    job_two = start_torchrun(BASE + [f"--train.out_dir={tmp_path / 'two'}", "--train.checkpoint_every=2"])
    job_crash = start_torchrun(args, FAKE_FAULTS='{"crash_call": 3, "crash_rank": 1, "crash_mode": "exit"}')
    # 1 rank x 2 micro-batches = the same global batches (FakeLoader deals batch g to rank g % world)
    cfg = load_config(None, BASE + [f"--train.out_dir={tmp_path / 'one'}", "--train.grad_accum=2"], check_paths=False,
                      check_model=False)
    one = run_training(cfg, model_factory=fake_model_factory, data_factory=fake_data_factory)
    two = final(wait_torchrun(job_two)[0])
    la, lb = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert sorted(la) == sorted(lb) == list(range(1, 7))
    for s in la:  # fp32; FSDP's reduce-scatter sums in a different order: allow 1e-5 relative
        assert abs(la[s] - lb[s]) <= 1e-5 * abs(la[s]), (s, la[s], lb[s])
    print(f"\nsteps/s fake family: 1 process x grad_accum 2: {one['steps_per_s']:.1f}; "
          f"2 processes (FSDP2, gloo): {two['steps_per_s']:.1f}")

    # the crashed job ends, non-zero, without hanging
    p, _ = wait_torchrun(job_crash)
    assert p.returncode != 0, p.stdout[-2000:]
    assert "exitcode" in p.stderr and "17" in p.stderr  # torchrun reports the dead rank's exit code
    assert (crash_dir / "checkpoints" / "latest").read_text().strip() == "step_000002"
    # resume with both ranks: the same trajectory as the uninterrupted 2-rank run
    p, _ = torchrun(args)
    assert final(p)["step"] == 6
    with open(crash_dir / "metrics.jsonl") as f:
        resumed = [r for r in map(json.loads, f) if r["kind"] == "train"][-4:]
    assert [r["step"] for r in resumed] == [3, 4, 5, 6]
    for r in resumed:
        assert abs(r["loss"] - lb[r["step"]]) <= 1e-6 * abs(lb[r["step"]])

    # two ranks past a damaged newest checkpoint: both verify it (each hashes a share), fall back to step 4, rank 0
    # sets step 6 aside, and steps 5-6 follow the uninterrupted trajectory again
    two_dir = tmp_path / "two"
    shard = sorted((two_dir / "checkpoints" / "step_000006").glob("*.distcp"))[-1]
    shard.write_bytes(shard.read_bytes()[:-5])
    p, _ = torchrun(BASE + [f"--train.out_dir={two_dir}", "--train.checkpoint_every=2"])
    assert final(p)["step"] == 6 and "step_000006 fails verification" in p.stdout, p.stdout[-3000:]
    assert (two_dir / "checkpoints" / "set_aside" / "step_000006" / shard.name).is_file()
    with open(two_dir / "metrics.jsonl") as f:
        again = [r for r in map(json.loads, f) if r["kind"] == "train"][-2:]
    assert [r["step"] for r in again] == [5, 6]
    for r in again:
        assert abs(r["loss"] - lb[r["step"]]) <= 1e-6 * abs(lb[r["step"]])


def test_bf16_sharded_decoder_checkpointing_and_replicated_mode(tmp_path):
    """Two jobs at once: bf16 FSDP2 (frozen decoder replicated in bf16) with full activation checkpointing (close
    to fp32), and parallel.fsdp = false (full replicas, one gradient all-reduce per step: equal to fp32)."""
    bf16 = start_torchrun(BASE + ["--train.steps=3", "--train.precision=bf16",
                                  "--train.activation_checkpointing=full", f"--train.out_dir={tmp_path / 'bf16'}"])
    ddp = start_torchrun(BASE + ["--parallel.fsdp=false", f"--train.out_dir={tmp_path / 'ddp'}"])
    cfg = load_config(None, BASE + ["--train.grad_accum=2", f"--train.out_dir={tmp_path / 'fp32'}"], check_paths=False,
                      check_model=False)
    run_training(cfg, model_factory=fake_model_factory, data_factory=fake_data_factory)
    assert final(wait_torchrun(bf16)[0])["step"] == 3
    assert final(wait_torchrun(ddp)[0])["step"] == 6
    lf, lb, ld = (train_losses(tmp_path / d) for d in ("fp32", "bf16", "ddp"))
    for s in (1, 2, 3):  # bf16 has 8 mantissa bits: 3e-2 relative covers a few roundings per layer
        assert abs(lb[s] - lf[s]) <= 3e-2 * abs(lf[s]), (s, lb[s], lf[s])
    for s in range(1, 7):
        assert abs(ld[s] - lf[s]) <= 1e-5 * abs(lf[s]), (s, ld[s], lf[s])
