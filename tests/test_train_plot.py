"""`python train/plot.py --run RUN` (train/sonar_train/plot.py): the curves drawn are the records of the run's
metrics.jsonl (stale and null-loss records left out), the PNG lands in the run folder, and bad input is one
line on stderr, exit 2, nothing written. The metrics files are written here by hand, in the format
sonar_train.metrics.MetricsLogger writes (one JSON object per line)."""
from __future__ import annotations

import json
import sys

import pytest

from sonar_train import plot as P


def _write(run, records) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


RECORDS = [
    {"kind": "train", "step": 10, "loss": 5.0, "tokens_per_s": 1000.0, "lr": 1e-4},
    {"kind": "train", "step": 20, "loss": None, "tokens_per_s": 1100.0},  # a skipped step: no loss, a speed
    {"kind": "train", "step": 30, "loss": 4.0, "tokens_per_s": 1200.0, "stale": True},  # redone after a resume
    {"kind": "eval", "step": 30, "eval_loss": 4.5, "stale": True},
    {"kind": "train", "step": 30, "loss": 3.5, "tokens_per_s": 1300.0},
    {"kind": "eval", "step": 30, "eval_loss": 3.75},
    {"step": 40, "loss": 3.0, "tokens_per_s": 1400.0},  # no kind: a train record (the logger's default)
    {"kind": "eval", "step": 40, "eval_loss": 3.25},
]


def test_history_and_the_drawn_curves(tmp_path):
    run = tmp_path / "run"
    _write(run, RECORDS)
    h = P.read_history(run)
    assert (h.train_steps, h.train_loss) == ([10, 30, 40], [5.0, 3.5, 3.0])
    assert (h.speed_steps, h.tokens_per_s) == ([10, 20, 30, 40], [1000.0, 1100.0, 1300.0, 1400.0])
    assert (h.eval_steps, h.eval_loss) == ([30, 40], [3.75, 3.25])
    fig = P.figure(h)
    loss_ax, speed_ax = fig.axes
    assert [ln.get_label() for ln in loss_ax.lines] == ["train loss", "validation loss"]
    assert loss_ax.lines[0].get_xydata().tolist() == [[10, 5.0], [30, 3.5], [40, 3.0]]
    assert loss_ax.lines[1].get_xydata().tolist() == [[30, 3.75], [40, 3.25]]
    assert speed_ax.lines[0].get_xydata().tolist() == [[10, 1000.0], [20, 1100.0], [30, 1300.0], [40, 1400.0]]
    assert speed_ax.get_ylabel() == "tokens/s" and loss_ax.get_xlabel() == "step"


def test_command_writes_the_png_into_the_run_folder(tmp_path, capsys):
    from matplotlib.image import imread

    run = tmp_path / "run"
    _write(run, RECORDS)
    assert P.main(["--run", str(run)]) == 0
    png = run / P.PLOT_NAME
    assert capsys.readouterr().out.strip() == f"wrote {png}"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert imread(png).shape[:2] == (400, 1000)  # 10 x 4 inches at 100 dpi
    other = tmp_path / "elsewhere.png"
    assert P.main(["--run", str(run), "--out", str(other)]) == 0 and other.is_file()
    nested = tmp_path / "new" / "folder" / "plot.png"  # missing folders are created, as by every command
    assert P.main(["--run", str(run), "--out", str(nested)]) == 0 and nested.read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    before = png.read_bytes()  # an explicit empty --out is refused (it replaced the run's own plot)
    assert P.main(["--run", str(run), "--out", ""]) == 2
    assert capsys.readouterr().err.strip() == "plot error: --out: the path is empty (give the file to write)"
    assert png.read_bytes() == before


def _bad(kind: str, tmp_path):
    run = tmp_path / "run"
    if kind == "no run folder":
        return ["--run", str(tmp_path / "nope")], "no such run folder"
    run.mkdir()
    if kind == "no metrics.jsonl":
        return ["--run", str(run)], "metrics.jsonl: not found"
    if kind == "empty":
        (run / "metrics.jsonl").write_text("")
        return ["--run", str(run)], "metrics.jsonl: empty"
    if kind == "truncated line":
        (run / "metrics.jsonl").write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps(RECORDS[4])[:17])
        return ["--run", str(run)], "metrics.jsonl:2: not a JSON record"
    if kind == "not a record":
        (run / "metrics.jsonl").write_text(json.dumps(RECORDS[0]) + "\n[1, 2]\n")
        return ["--run", str(run)], "metrics.jsonl:2: not a metrics record"
    if kind == "not UTF-8":
        (run / "metrics.jsonl").write_bytes(json.dumps(RECORDS[0]).encode() + b"\n\xff\xfe\n")
        return ["--run", str(run)], "metrics.jsonl:2: not UTF-8"
    if kind == "no loss":
        _write(run, [{"kind": "train", "step": 1, "loss": None}])
        return ["--run", str(run)], "no training or validation loss"
    if kind == "out below a file":
        _write(run, RECORDS)
        return ["--run", str(run), "--out", str(run / "metrics.jsonl" / "x.png")], "is a file, not a folder"
    if kind == "out is a folder":
        _write(run, RECORDS)
        return ["--run", str(run), "--out", str(run)], "is a folder"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["no run folder", "no metrics.jsonl", "empty", "truncated line", "not a record",
                                  "not UTF-8", "no loss", "out below a file", "out is a folder"])
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, capsys, kind):
    argv, said = _bad(kind, tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert P.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and err.startswith("plot error: ") and said in err, err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_without_matplotlib_one_line_and_nothing_written(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    _write(run, RECORDS)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import matplotlib.figure -> ImportError
    assert P.main(["--run", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == ["plot error: matplotlib is not installed, so no plot was drawn "
                                "(pip install matplotlib)"]
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]
    from sonar_train.default_pipeline import draw

    assert draw(run) == "no plot: matplotlib is not installed, so no plot was drawn (pip install matplotlib)"
