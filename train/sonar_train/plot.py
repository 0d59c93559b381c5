"""A picture of a training run: train and validation loss against step, and tokens/s (`<run>/training.png`).

    python train/plot.py --run runs/default [--out FILE.png]

Reads `<run>/metrics.jsonl` (written by sonar_train.metrics.MetricsLogger): the "train" records' `loss` and
`tokens_per_s`, the "eval" records' `eval_loss`; records marked stale (steps redone after a resume) are
skipped, as every reader of that file does. The default run (train/sonar_train/default_pipeline.py) calls
`plot_run` at its end. matplotlib is optional (`pip install matplotlib`; the `dev` and `bench` extras have
it): without it `plot_run` raises `MatplotlibMissing`, which says so in one line.

Bad input (no run folder, no metrics.jsonl, an empty one, a line that is not a metrics record, an --out that is
a folder or lies below a file): one line on stderr, exit 2, nothing written. Missing folders above --out are
created, as by every command (sonar_llm.cli).
"""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from sonar_llm.cli import UsageError, atomic_output, check_output_path, parser, read_utf8, run

__all__ = ["History", "MetricsError", "MatplotlibMissing", "PLOT_NAME", "read_history", "figure", "plot_run",
           "main"]

PLOT_NAME = "training.png"


class MetricsError(UsageError):
    """The run's metrics.jsonl is missing, empty or not made of metrics records."""


class MatplotlibMissing(UsageError):
    """matplotlib is not installed: no picture can be drawn."""


@dataclass
class History:
    """What a run logged, in file order (stale records left out)."""

    train_steps: list[int] = field(default_factory=list)  # steps of the train records with a finite loss
    train_loss: list[float] = field(default_factory=list)  # their training loss
    speed_steps: list[int] = field(default_factory=list)  # steps of the train records with tokens/s
    tokens_per_s: list[float] = field(default_factory=list)  # tokens per second over each logging window
    eval_steps: list[int] = field(default_factory=list)  # steps of the eval records
    eval_loss: list[float] = field(default_factory=list)  # their validation loss


def _number(v) -> float | None:
    """A finite float, else None (a skipped step's loss is null)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def read_history(run_dir: str | os.PathLike) -> History:
    """The loss and speed history of a run folder; MetricsError (one line, naming the file) on bad input."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MetricsError(f"--run {run_dir}: no such run folder")
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise MetricsError(f"{path}: not found (the run has not logged a step yet)")
    h = History()
    records = 0
    for i, line in enumerate(read_utf8(path).splitlines(), 1):
        if not line.strip():
            continue
        records += 1
        try:
            rec = json.loads(line)
        except ValueError:
            raise MetricsError(f"{path}:{i}: not a JSON record (corrupt file)") from None
        if not isinstance(rec, dict) or isinstance(rec.get("step"), bool) or not isinstance(rec.get("step"), int):
            raise MetricsError(f"{path}:{i}: not a metrics record (a JSON object with an integer \"step\")")
        if rec.get("stale"):
            continue
        step, kind = rec["step"], rec.get("kind", "train")
        if kind == "eval":
            if (v := _number(rec.get("eval_loss"))) is not None:
                h.eval_steps.append(step)
                h.eval_loss.append(v)
        elif kind == "train":
            if (v := _number(rec.get("loss"))) is not None:
                h.train_steps.append(step)
                h.train_loss.append(v)
            if (v := _number(rec.get("tokens_per_s"))) is not None:
                h.speed_steps.append(step)
                h.tokens_per_s.append(v)
    if not records:
        raise MetricsError(f"{path}: empty (the run has not logged a step yet)")
    if not h.train_loss and not h.eval_loss:
        raise MetricsError(f"{path}: no training or validation loss in its {records} record(s)")
    return h


def figure(h: History, title: str = ""):
    """A matplotlib Figure: left, train and validation loss vs step; right, tokens/s vs step."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise MatplotlibMissing("matplotlib is not installed, so no plot was drawn (pip install matplotlib)") from None
    fig = Figure(figsize=(10, 4), layout="constrained")
    loss_ax, speed_ax = fig.subplots(1, 2)
    marker = "o" if len(h.train_steps) <= 20 else None
    loss_ax.plot(h.train_steps, h.train_loss, marker=marker, markersize=3, label="train loss")
    if h.eval_loss:
        loss_ax.plot(h.eval_steps, h.eval_loss, marker="o", markersize=4, label="validation loss")
    else:
        loss_ax.text(0.5, 0.05, "no validation loss logged (train.eval_every)", transform=loss_ax.transAxes,
                     ha="center", va="bottom", color="gray")
    loss_ax.set(xlabel="step", ylabel="loss", title="loss")
    loss_ax.legend()
    speed_ax.plot(h.speed_steps, h.tokens_per_s, marker="o" if len(h.speed_steps) <= 20 else None, markersize=3,
                  color="tab:green")
    speed_ax.set(xlabel="step", ylabel="tokens/s", title="training speed (tokens/s)")
    speed_ax.set_ylim(0, 1.1 * max(h.tokens_per_s, default=1.0))
    steps = h.train_steps + h.eval_steps + h.speed_steps
    for ax in (loss_ax, speed_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if max(steps) - min(steps) < 2:  # one logged step: whole-step ticks around it
            ax.set_xlim(min(steps) - 1, max(steps) + 1)
    if title:
        fig.suptitle(title)
    return fig


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Draw the run's history into `out` (default `<run>/training.png`, written atomically); returns the path."""
    h = read_history(run_dir)
    out = Path(out) if out else Path(run_dir) / PLOT_NAME
    check_output_path(out)  # a folder, or below a file: refused; missing folders are created, as by every command
    fig = figure(h, title=str(run_dir))
    with atomic_output(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return out


def _main(argv: list[str]) -> int:
    p = parser("train/plot.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="run folder (train.out_dir), with its metrics.jsonl")
    p.add_argument("--out", default=None, help=f"PNG to write (default: <run>/{PLOT_NAME})")
    a = p.parse_args(argv)
    if a.out is not None:  # an explicit `--out ""` is refused, not read as the default (it replaced the run's plot)
        check_output_path(a.out)
    print(f"wrote {plot_run(a.run, a.out)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command; exit 0, or 2 with one line on stderr for bad input (sonar_llm.cli)."""
    return run("plot", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
