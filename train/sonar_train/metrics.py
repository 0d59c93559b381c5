"""Observability: the live progress line, the per-run `metrics.jsonl`, optional TensorBoard, MFU and memory.

MFU = (model FLOPs of the step, summed over ranks) / (step seconds * peak FLOP/s per device * devices).
Peak FLOP/s: dense bf16 tensor-core figures for known GPUs (table below; fp32 runs on the same GPUs use
the TF32 figure), `train.peak_flops` when set, and on the CPU a short fp32 matmul measurement at start-up
(so a CPU "MFU" is relative to what torch reaches on that machine, not a vendor number).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import torch

# Dense (no sparsity) peak FLOP/s: (bf16/fp16, tf32) per device, from the vendors' data sheets.
GPU_PEAK_FLOPS: dict[str, tuple[float, float]] = {
    "H200": (989e12, 494e12),
    "H100 PCIe": (756e12, 378e12),
    "H100": (989e12, 494e12),  # SXM
    "A100": (312e12, 156e12),
    "A10G": (125e12, 62.5e12),
    "L4": (121e12, 60e12),
    "V100": (125e12, 15.7e12),
}


def gpu_peak_flops(name: str, precision: str) -> float | None:
    """Peak dense FLOP/s for a CUDA device name (longest table key contained in it), or None if unknown."""
    for key in sorted(GPU_PEAK_FLOPS, key=len, reverse=True):
        if key in name:
            bf16, tf32 = GPU_PEAK_FLOPS[key]
            return tf32 if precision == "fp32" else bf16
    return None


def measure_cpu_flops(seconds: float = 0.3, n: int = 1024, trials: int = 3) -> float:
    """Measured fp32 matmul FLOP/s of this process on the CPU, best of `trials` (a stand-in for a peak
    figure: CPU "MFU" is relative to what torch.mm reaches here, and reads high when the machine is busy
    during this measurement)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = 0.0
    for _ in range(trials):
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / trials or count == 0:
            torch.mm(a, b)
            count += 1
        best = max(best, 2.0 * n**3 * count / (time.perf_counter() - start))
    return best


def peak_flops(device: torch.device, precision: str, configured: float = 0.0) -> float:
    if configured > 0:
        return configured
    if device.type == "cuda":
        found = gpu_peak_flops(torch.cuda.get_device_name(device), precision)
        if found is not None:
            return found
    return measure_cpu_flops()


def memory_gib(device: torch.device) -> float:
    """CUDA max allocated since the last reset, else this process's resident set size (GiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (OSError, ValueError, IndexError):  # non-Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def format_line(m: dict[str, Any]) -> str:
    parts = [f"step {m['step']}"]
    for key, fmt in (("loss", "loss {:.4f}"), ("eval_loss", "eval loss {:.4f}"), ("lr", "lr {:.2e}"), ("grad_norm", "gnorm {:.3f}"),
                     ("sentences_per_s", "{:.0f} sent/s"), ("tokens_per_s", "{:.0f} tok/s"),
                     ("mfu", "mfu {:.1%}"), ("mem_gib", "mem {:.2f}G"), ("skipped_steps", "skipped {}")):
        if m.get(key) is not None and (key != "skipped_steps" or m[key]):
            parts.append(fmt.format(m[key]))
    return " | ".join(parts)


def append_line(path: Path, line: str) -> None:
    """Append `line` + newline to `path` in one write, fsynced; if the write fails or is short (disk full),
    the file is cut back to its previous length: it never ends in half a line written here."""
    data = (line + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:
            if os.write(fd, data) != len(data):
                raise OSError(f"short write to {path}")
            os.fsync(fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)


def rewind_metrics(path: str | os.PathLike, step: int) -> int:
    """Make `metrics.jsonl` one consistent history for a run that (re)starts at `step`: a trailing partial
    line (a write cut short by a crash) is removed, and every record with "step" > `step` not yet marked gets
    `"stale": true` (those steps are redone; readers skip stale records). The file is rewritten atomically
    only when something changed. Returns the number of records newly marked stale."""
    path = Path(path)
    if not path.is_file():
        return 0
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline, else a partial line
    out, marked = [], 0
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a garbled line (not written by append_line): dropped
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] > step and not rec.get("stale"):
            rec["stale"] = True
            marked += 1
            out.append(json.dumps(rec).encode())
        else:
            out.append(line)
    new = b"".join(x + b"\n" for x in out)
    if new != raw or tail:
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(new)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return marked


class MetricsLogger:
    """Rank 0 writes one JSON object per log step to `<run>/metrics.jsonl` (appended across resumes, one
    fsynced write per line; see `rewind_metrics` for what a resume does to the records of redone steps),
    prints the progress line (\\r-updated on a TTY, plain lines otherwise) and mirrors scalars to
    TensorBoard when requested and installed. Other ranks do nothing."""

    def __init__(self, run_dir: str | os.PathLike, enabled: bool, tensorboard: bool = False,
                 stream: TextIO | None = None):
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._jsonl = None
        self._tb = None
        self._open_line = False
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = run_dir / "metrics.jsonl"  # opened per record: nothing is lost when a run dies
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                self.message("tensorboard requested but not installed; skipping it")

    def log(self, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()}
        record.setdefault("time", time.time())
        try:
            append_line(self._jsonl, json.dumps(record))
        except OSError as e:  # e.g. ENOSPC: the record is lost, the file stays whole; training goes on
            self.message(f"{self._jsonl}: could not append the step {record.get('step')} record ({e})")
        line = format_line(record)
        if self.tty:
            self.stream.write("\r" + line.ljust(120)[:160])
            self._open_line = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        if self._tb is not None:
            prefix = record.get("kind", "train")
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "time"):
                    self._tb.add_scalar(f"{prefix}/{k}", v, record["step"])

    def message(self, text: str) -> None:
        """A plain line (ends any open progress line first)."""
        if not self.enabled:
            return
        if self._open_line:
            self.stream.write("\n")
            self._open_line = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._open_line:
            self.stream.write("\n")
            self._open_line = False
        if self._tb is not None:
            self._tb.close()
            self._tb = None
