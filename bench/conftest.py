"""Benchmark-suite configuration: quick mode, machine metadata and the results files.

`pytest bench/` measures at reduced shapes on the CPU and at the paper's shapes on a GPU, and writes
bench/results/<date>_<device>_<commit>.json plus a markdown table and a PNG plot beside it.
`--benchmark-disable` (what CI uses) runs every benchmark body once at the smallest shapes as a
smoke test and writes nothing. `SONAR_BENCH_QUICK=1` forces the small shapes while still timing.
"""
from __future__ import annotations

import datetime as _dt
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import report  # noqa: E402

# SONAR_BENCH_RESULTS_DIR redirects the result files (bench/run_gpu.sh's rehearsal writes to a temp dir)
RESULTS = Path(os.environ.get("SONAR_BENCH_RESULTS_DIR") or Path(__file__).parent / "results")


def _disabled(config) -> bool:
    return bool(getattr(config.option, "benchmark_disable", False))


@pytest.fixture(scope="session")
def bench_quick(request) -> bool:
    """True when benchmarks should use their smallest shapes (CI smoke run or SONAR_BENCH_QUICK=1)."""
    return _disabled(request.config) or os.environ.get("SONAR_BENCH_QUICK", "0") == "1"


@pytest.fixture(scope="session")
def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _benchmark_json_is_path() -> bool:
    """True where pytest-benchmark (>= 5.3) takes --benchmark-json as a path rather than an open file."""
    try:
        import pytest_benchmark

        major, minor = (int(x) for x in pytest_benchmark.__version__.split(".")[:2])
    except Exception:  # no version to read: the long-standing open-file form
        return False
    return (major, minor) >= (5, 3)


def pytest_configure(config):
    if _disabled(config) or getattr(config.option, "benchmark_json", None) is not None:
        return
    if not hasattr(config.option, "benchmark_json"):
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name(0).replace(" ", "-") if torch.cuda.is_available() else "cpu"
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    path = RESULTS / f"{stamp}_{device}_{report.git_commit()}.json"
    config._sonar_bench_json = path
    # pytest-benchmark >= 5.3 declares --benchmark-json as a path and opens it itself when saving; older
    # releases declare it as argparse.FileType("wb") and write into the open file they were given
    config.option.benchmark_json = path if _benchmark_json_is_path() else open(path, "wb")


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["machine_info_sonar"] = report.machine_info()


def pytest_unconfigure(config):
    path = getattr(config, "_sonar_bench_json", None)
    if path is None:
        return
    fh = config.option.benchmark_json
    if hasattr(fh, "close"):  # an open file (pytest-benchmark < 5.3); a path needs no closing
        try:
            fh.close()
        except Exception:
            pass
    if path.exists() and path.stat().st_size > 0:
        try:
            report.write_outputs(path)
        except Exception as exc:  # a broken plot must not hide the measured JSON
            print(f"bench: could not write the markdown/plot for {path}: {exc}", file=sys.stderr)
    elif path.exists():
        path.unlink()
