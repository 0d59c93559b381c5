"""bench/run_gpu.sh, rehearsed on the CPU: the one script that a lent GPU runs must work the first time.

The GPU machine is bare (no install of this project, `python3` only, no package registry), so the script
makes this checkout's kernels importable as `sonar_kernels` by itself, writes the result files, the log
and the targets table. SONAR_BENCH_REHEARSE=1 runs exactly that path at quick shapes with Triton in the
interpreter; these tests run it on a small selection of benchmarks.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "run_gpu.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def _run(tmp_path: Path, *args: str, rehearse: bool = True, extra_env: dict | None = None):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SONAR_BENCH_", "PYTEST_"))}
    env.update({"PYTHON": sys.executable, "SONAR_BENCH_RESULTS_DIR": str(tmp_path / "results"),
                "SONAR_BENCH_BUDGET_S": "240", "SONAR_GPU_TESTS": "tests/test_kernels_at_scale.py"})
    if rehearse:
        env["SONAR_BENCH_REHEARSE"] = "1"
    env.update(extra_env or {})
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)


def test_without_cuda_the_script_refuses_and_says_how_to_rehearse(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the script would really run")
    res = _run(tmp_path, rehearse=False)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "no CUDA device" in res.stderr and "SONAR_BENCH_REHEARSE=1" in res.stderr
    assert not (tmp_path / "results").exists(), "nothing may be written when the script refuses"


def test_missing_python_is_named(tmp_path):
    res = _run(tmp_path, extra_env={"PYTHON": "no-such-python-3.99"})
    assert res.returncode == 2
    assert "no 'no-such-python-3.99' on PATH" in res.stderr


def test_rehearsal_writes_results_log_and_targets_from_this_checkout(tmp_path):
    # a stale, broken `sonar_kernels` earlier on PYTHONPATH must not be what gets measured
    stale = tmp_path / "stale" / "sonar_kernels"
    stale.mkdir(parents=True)
    (stale / "__init__.py").write_text("raise ImportError('stale copy imported')\n")
    res = _run(tmp_path, "-k", "sonar_encoder or (linear_cross_entropy and (ours or reference))",
               extra_env={"PYTHONPATH": str(stale.parent), "SONAR_BENCH_COMMIT": "0123abcd-test"})
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    results = tmp_path / "results"
    jsons = sorted(results.glob("*.json"))
    assert len(jsons) == 1, f"expected one result file, got {jsons}"
    for suffix in (".md", ".png"):
        assert jsons[0].with_suffix(suffix).is_file(), f"missing {suffix} beside {jsons[0].name}"
    logs = list(results.glob("*_gpu_run.log"))
    assert len(logs) == 1
    log = logs[0].read_text()
    assert "pytest exit status 0" in log and "correctness tests exit status 0" in log
    assert "5 passed" in log  # the kernel correctness stage ran its tests (tests/test_kernels_at_scale.py)
    data = json.loads(jsons[0].read_text())
    assert data["machine_info_sonar"]["commit"] == "0123abcd-test"  # SONAR_BENCH_COMMIT, given below
    assert "0123abcd-test" in jsons[0].name
    by_name = {b["name"]: b for b in data["benchmarks"]}
    assert set(by_name) == {"test_bench_sonar_encoder[ours]", "test_bench_sonar_encoder[reference]",
                            "test_bench_linear_cross_entropy[ours]", "test_bench_linear_cross_entropy[reference]"}
    enc = by_name["test_bench_sonar_encoder[ours]"]["extra_info"]
    assert enc["scale"] == "quick" and enc["sentences_per_s"] > 0
    assert "Targets of the benchmark issue" in res.stdout
    assert f"results: {jsons[0].with_suffix('')}" in res.stdout


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_result_commit_ignores_untracked_files_and_honours_the_override(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import report
    finally:
        sys.path.remove(str(ROOT / "bench"))
    monkeypatch.delenv("SONAR_BENCH_COMMIT", raising=False)
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(git + ["init", "-q", str(tmp_path)], check=True)
    (tmp_path / "a.txt").write_text("a\n")
    subprocess.run(git + ["-C", str(tmp_path), "add", "a.txt"], check=True)
    subprocess.run(git + ["-C", str(tmp_path), "commit", "-qm", "a"], check=True)
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "--short=12", "HEAD"], check=True,
                          capture_output=True, text=True).stdout.strip()
    (tmp_path / "new_result.json").write_text("{}")  # untracked, like a fresh result file
    assert report.git_commit(tmp_path) == head
    (tmp_path / "a.txt").write_text("changed\n")
    assert report.git_commit(tmp_path) == head + "-dirty"
    monkeypatch.setenv("SONAR_BENCH_COMMIT", "given")
    assert report.git_commit(tmp_path) == "given"


def test_a_failing_correctness_test_fails_the_run_but_the_benchmarks_still_run(tmp_path):
    bad = tmp_path / "test_wrong_kernel.py"
    bad.write_text("def test_kernel_is_wrong():\n    assert 1 + 1 == 3\n")
    res = _run(tmp_path, "-k", "sonar_encoder and ours", extra_env={"SONAR_GPU_TESTS": str(bad)})
    assert res.returncode == 1, (res.stdout + res.stderr)[-3000:]
    assert "correctness tests exit status 1, benchmarks exit status 0" in res.stdout
    assert len(list((tmp_path / "results").glob("*.json"))) == 1
