"""Benchmark results: machine metadata, markdown tables, PNG plots, and comparing two result files.

Every benchmark records `extra_info["role"]` ("ours", "reference", or a third-party name such as
"liger" or "cce") and belongs to a pytest-benchmark group; ratios are computed within one group of one
run, against the group's "reference" entry, so they compare code measured side by side.

CLI:
    python bench/report.py show RESULT.json            # markdown table of one run
    python bench/report.py compare OLD.json NEW.json   # per-benchmark speed ratios NEW vs OLD
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path


def git_commit(repo: Path | None = None) -> str:
    """Short commit of the checkout, "-dirty" when tracked files changed (untracked ones, such as new result
    files, do not count). SONAR_BENCH_COMMIT overrides it, for copies of a tree that travel without .git."""
    forced = os.environ.get("SONAR_BENCH_COMMIT", "").strip()
    if forced:
        return forced
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=repo or Path(__file__).parent,
                             capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo or Path(__file__).parent,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except Exception:
        return "unknown"


def machine_info() -> dict:
    import torch

    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": None,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def _rows(result: dict) -> list[dict]:
    rows = []
    for b in result.get("benchmarks", []):
        st = b.get("stats", {})
        ex = b.get("extra_info", {})
        rows.append({
            "group": b.get("group") or "-",
            "name": b.get("name"),
            "role": ex.get("role", "-"),
            "mean_s": st.get("mean"),
            "min_s": st.get("min"),
            "rounds": st.get("rounds"),
            "extra": {k: v for k, v in ex.items() if k != "role"},
        })
    # ratio against the group's reference
    by_group: dict[str, list[dict]] = {}
    for r in rows:
        by_group.setdefault(r["group"], []).append(r)
    for group_rows in by_group.values():
        refs = [r for r in group_rows if r["role"] == "reference" and r["mean_s"]]
        for r in group_rows:
            r["speedup_vs_reference"] = (refs[0]["mean_s"] / r["mean_s"]) if refs and r["mean_s"] else None
    return rows


def _fmt(v, unit=""):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}{unit}"
    return f"{v}{unit}"


def markdown(result: dict) -> str:
    m = result.get("machine_info_sonar", {})
    lines = [
        f"# Benchmarks {m.get('date', '')}",
        "",
        f"- commit `{m.get('commit')}`, GPU: {m.get('gpu') or 'none'}, CPU: {m.get('cpu')} x{m.get('cpu_count')}, "
        f"torch {m.get('torch')}, triton {m.get('triton')}",
        "- speedup = reference mean time / this mean time, within one group of this run",
        "",
        "| group | benchmark | role | mean | min | speedup | details |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in _rows(result):
        details = ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(r["extra"].items()))
        lines.append(f"| {r['group']} | {r['name']} | {r['role']} | {_fmt(r['mean_s'], ' s')} | "
                     f"{_fmt(r['min_s'], ' s')} | {_fmt(r['speedup_vs_reference'], 'x')} | {details} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, out_png: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return False
    rows = [r for r in _rows(result) if r["mean_s"]]
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(10, max(3, 0.35 * len(rows))))
    labels = [f"{r['group']}: {r['role']}" for r in rows]
    ax.barh(range(len(rows)), [r["mean_s"] * 1e3 for r in rows], color="tab:blue")
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("mean time per call (ms, log scale)")
    ax.set_title(f"sonar-llm benchmarks, {result.get('machine_info_sonar', {}).get('gpu') or 'CPU'}")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return True


def write_outputs(json_path: Path) -> None:
    result = json.loads(json_path.read_text())
    json_path.with_suffix(".md").write_text(markdown(result))
    plot(result, json_path.with_suffix(".png"))


def compare(old: dict, new: dict) -> str:
    old_rows = {(r["group"], r["name"]): r for r in _rows(old)}
    lines = ["| group | benchmark | old mean | new mean | new speed / old speed |", "|---|---|---|---|---|"]
    for r in _rows(new):
        o = old_rows.get((r["group"], r["name"]))
        if o is None or not o["mean_s"] or not r["mean_s"]:
            continue
        lines.append(f"| {r['group']} | {r['name']} | {_fmt(o['mean_s'], ' s')} | {_fmt(r['mean_s'], ' s')} | "
                     f"{o['mean_s'] / r['mean_s']:.3f}x |")
    return "\n".join(lines)


def read_result(path: Path) -> dict:
    """A benchmark result file; errors name the file (and the line of bad JSON or bytes)."""
    from sonar_llm.cli import read_utf8

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such result file")
    try:
        data = json.loads(read_utf8(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks", []), list):
        raise ValueError(f"{path}: not a pytest-benchmark result (a JSON object with a 'benchmarks' list)")
    return data


def main(argv=None) -> int:
    """The command; errors follow sonar_llm.cli (bad input: exit 2, one line)."""
    from sonar_llm.cli import run

    return run("report", _main, argv)


def _main(argv: list[str]) -> int:
    from sonar_llm.cli import parser

    ap = parser("bench/report.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("show", help="one result as markdown")
    s.add_argument("result", type=Path, help="a pytest-benchmark JSON result")
    c = sub.add_parser("compare", help="two results side by side")
    c.add_argument("old", type=Path, help="the earlier result")
    c.add_argument("new", type=Path, help="the later result")
    a = ap.parse_args(argv)
    if a.cmd == "show":
        print(markdown(read_result(a.result)))
    else:
        print(compare(read_result(a.old), read_result(a.new)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
