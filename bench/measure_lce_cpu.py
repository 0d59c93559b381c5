"""Issue 14's done-when measurement: fused linear cross-entropy vs `F.cross_entropy(h @ W.T, t)` on the CPU.

    python bench/measure_lce_cpu.py            # N=8192, D=256, V=32000, fp32, frozen weight

Time: forward + backward (d_hidden only; the weight is frozen) of each path, interleaved in one process,
`--repeats` rounds after one warm-up each; the median ratio fused / naive is the result (target <= 1.05).
Memory: each path in its own fresh process (`--memory PATH`): once the inputs exist, the kernel's peak-RSS
counter is reset (`/proc/self/clear_refs` = 5), one step runs, and the increase of VmHWM over the RSS just
before the step is that path's peak memory increase (target: fused <= 1/8 of naive); the first step's is the
result (it includes one-time allocations; nothing is hidden in the allocator's free lists), the second
step's is recorded beside it.
Paths: "naive" (full fp32 logits + F.cross_entropy), "fused" (`linear_cross_entropy`, impl="auto", the
default strategy: gradient in the forward), "recompute" (the same with strategy="recompute", three GEMMs),
"native" (impl="native", when the library is built). Prints a table and writes
bench/results/lce_cpu_<UTC time>.json with the machine's CPU, thread count and load average.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sonar_kernels import native
from sonar_kernels.functional.linear_cross_entropy import linear_cross_entropy

RESULTS = Path(__file__).resolve().parent / "results"
PATHS = ("naive", "fused", "recompute", "native")


def _inputs(n: int, d: int, v: int):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, d, generator=g).requires_grad_()
    weight = torch.randn(v, d, generator=g) / d ** 0.5  # frozen
    target = torch.randint(0, v, (n,), generator=g)
    target[::17] = -100
    return hidden, weight, target


def _step_fn(path: str):
    if path == "naive":
        return lambda h, w, t: F.cross_entropy(h @ w.t(), t, ignore_index=-100)
    if path == "fused":
        return lambda h, w, t: linear_cross_entropy(h, w, t, ignore_index=-100)
    if path == "recompute":
        return lambda h, w, t: linear_cross_entropy(h, w, t, ignore_index=-100, strategy="recompute")
    if path == "native":
        return lambda h, w, t: linear_cross_entropy(h, w, t, ignore_index=-100, impl="native")
    raise ValueError(f"unknown path {path!r}; expected one of {PATHS}")


def _step(fn, hidden, weight, target) -> float:
    hidden.grad = None
    start = time.perf_counter()
    loss = fn(hidden, weight, target)
    loss.backward()
    elapsed = time.perf_counter() - start
    if not torch.isfinite(loss):
        raise RuntimeError("non-finite loss")
    return elapsed


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_increase_kib(fn, hidden, weight, target) -> int:
    hidden.grad = None
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    _step(fn, hidden, weight, target)
    return _status_kib("VmHWM") - before


def measure_memory(path: str, n: int, d: int, v: int) -> dict:
    """Peak RSS increase (bytes) of the first and of the second forward+backward step, in this fresh process.

    The first counts everything a call allocates, one-time buffers (BLAS, thread pools) included, and
    nothing the allocator kept from an earlier call: the conservative figure, reported as the result.
    The second leaves out what the first left in the allocator's free lists."""
    hidden, weight, target = _inputs(n, d, v)
    fn = _step_fn(path)
    first = _peak_increase_kib(fn, hidden, weight, target)
    second = _peak_increase_kib(fn, hidden, weight, target)
    return {"path": path, "peak_increase_bytes": first * 1024, "second_step_peak_increase_bytes": second * 1024}


def _memory_in_subprocess(path: str, n: int, d: int, v: int) -> dict:
    cmd = [sys.executable, __file__, "--memory", path, "--n", str(n), "--d", str(d), "--v", str(v)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> int:
    """The command; errors follow sonar_llm.cli (bad input: exit 2, one line)."""
    from sonar_llm.cli import run

    return run("measure_lce_cpu", _main, argv)


def _main(argv: list[str]) -> int:
    from sonar_llm.cli import UsageError, atomic_output, int_at_least, parser

    ap = parser("bench/measure_lce_cpu.py", description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int_at_least(1), default=8192, help="rows (tokens)")
    ap.add_argument("--d", type=int_at_least(1), default=256, help="hidden size")
    ap.add_argument("--v", type=int_at_least(1), default=32000, help="vocabulary size")
    ap.add_argument("--repeats", type=int_at_least(1), default=5, help="timed rounds per path (after one warm-up)")
    ap.add_argument("--paths", default=",".join(PATHS), help="comma-separated subset of " + ",".join(PATHS))
    ap.add_argument("--memory", choices=PATHS, help=argparse.SUPPRESS)  # internal: one path's memory, JSON out
    ap.add_argument("--out", type=Path, default=None, help="result file (default bench/results/lce_cpu_<time>.json)")
    args = ap.parse_args(argv)
    n, d, v = args.n, args.d, args.v
    if args.memory:
        print(json.dumps(measure_memory(args.memory, n, d, v)))
        return 0
    paths = [p for p in args.paths.split(",") if p]
    unknown = [p for p in paths if p not in PATHS]
    if unknown or not paths:
        raise UsageError(f"--paths: expected a comma-separated subset of {','.join(PATHS)}, got {args.paths!r}")
    if "native" in paths and not native.native_available():
        print(f"skipping native: {native.native_load_error()}", file=sys.stderr)
        paths.remove("native")
    load_before = os.getloadavg()
    hidden, weight, target = _inputs(n, d, v)
    fns = {p: _step_fn(p) for p in paths}
    for p in paths:
        _step(fns[p], hidden, weight, target)  # warm-up
    times = {p: [] for p in paths}
    for _ in range(args.repeats):  # interleaved: a load change hits every path alike
        for p in paths:
            times[p].append(_step(fns[p], hidden, weight, target))
            print(f"  {p}: {times[p][-1]:.3f} s", file=sys.stderr)
    del hidden, weight, target
    memory = {p: _memory_in_subprocess(p, n, d, v) for p in paths}
    load_after = os.getloadavg()
    med = {p: statistics.median(times[p]) for p in paths}
    naive_mem = memory["naive"]["peak_increase_bytes"] if "naive" in memory else None
    rows = []
    for p in paths:
        ratio = med[p] / med["naive"] if "naive" in med else None
        mem_ratio = memory[p]["peak_increase_bytes"] / naive_mem if naive_mem else None
        rows.append({"path": p, "median_s": med[p], "min_s": min(times[p]), "times_s": times[p],
                     "time_vs_naive": ratio, "peak_increase_bytes": memory[p]["peak_increase_bytes"],
                     "second_step_peak_increase_bytes": memory[p]["second_step_peak_increase_bytes"],
                     "memory_vs_naive": mem_ratio})
    result = {
        "what": "linear cross-entropy fwd+bwd (frozen weight) vs F.cross_entropy(h @ W.T, t), issue 14",
        "shape": {"N": n, "D": d, "V": v, "dtype": "float32"},
        "targets": {"time_vs_naive_max": 1.05, "memory_vs_naive_max": 1 / 8},
        "machine": {"cpu": _cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "loadavg_before": load_before, "loadavg_after": load_after},
        "when_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "repeats": args.repeats,
        "results": rows,
    }
    print(f"N={n} D={d} V={v} fp32, frozen weight; {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    print(f"{'path':<10} {'median s':>9} {'min s':>7} {'x naive':>8} {'peak MB':>9} {'x naive mem':>12} "
          f"{'2nd step MB':>12}")
    for r in rows:
        tv = f"{r['time_vs_naive']:.3f}" if r["time_vs_naive"] is not None else "-"
        mv = f"{r['memory_vs_naive']:.3f}" if r["memory_vs_naive"] is not None else "-"
        print(f"{r['path']:<10} {r['median_s']:9.3f} {r['min_s']:7.3f} {tv:>8} "
              f"{r['peak_increase_bytes'] / 2 ** 20:9.1f} {mv:>12} "
              f"{r['second_step_peak_increase_bytes'] / 2 ** 20:12.1f}")
    out = args.out or RESULTS / f"lce_cpu_{dt.datetime.now(dt.timezone.utc).strftime('%Y%m%d-%H%M%S')}.json"
    with atomic_output(out) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
