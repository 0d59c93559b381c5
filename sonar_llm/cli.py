"""The error contract of every command (a leaf module: it imports no layer of the project).

Every command's `main(argv)` runs its body through `run(label, body, argv)`:
  * bad input (a flag, value or file the user gave is wrong: `UsageError`, a missing file, a value the
    library rejects with ValueError, an argparse error): exit 2 and ONE line on stderr,
    `<label> error: <what>`, naming the flag or the file (and the line, for data files);
  * failure during work (`CommandFailed`, an OSError such as a full disk, out of memory): exit 1 and one
    line with the reason;
  * anything else is a bug: its traceback, exit 1;
  * `--debug` (every parser made by `parser()` has it) shows the traceback in every case.
No silent exit: every non-zero exit says why on stderr. An exception may carry a `label` attribute
(e.g. the trainer's ConfigError: "config") that replaces the command's label in that line.

Outputs: `atomic_output(path)` writes through a temporary file beside `path`, renamed over it only when
the block succeeds, so a failed command leaves no output file written or changed.
`check_output_path(path, flag)` refuses an output path that cannot be written (a folder, or below a file) before
any work starts; a missing folder is created when the output is written.
Inputs: `check_device` (an unavailable accelerator is bad input, said before anything loads), argparse
types for ranges (`int_at_least`, `float_in`), `read_utf8` (names the file and line of bad bytes).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Callable, Iterator, Sequence, TextIO

__all__ = ["UsageError", "CommandFailed", "USAGE_ERRORS", "parser", "run", "one_line", "check_device",
           "check_output_path", "atomic_output", "shareable", "int_at_least", "float_in", "read_utf8"]


class UsageError(ValueError):
    """The user's mistake (a flag, value or file): exit 2, one line."""


class CommandFailed(RuntimeError):
    """The work could not be done (after valid input): exit 1, one line."""


# bad input: what the commands and the library raise for a wrong flag value or a missing / unreadable file
USAGE_ERRORS: tuple[type[BaseException], ...] = (UsageError, FileNotFoundError, NotADirectoryError,
                                                 IsADirectoryError, ValueError)
# failure during work: the reason is enough (no traceback)
WORK_ERRORS: tuple[type[BaseException], ...] = (CommandFailed, OSError, MemoryError)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (raised as UsageError, printed by `run`) and a `--debug` flag."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", help="show the Python traceback of any error")

    def error(self, message: str):  # argparse prints usage + message and exits 2: one line instead
        raise UsageError(message)


def parser(prog: str, **kwargs) -> argparse.ArgumentParser:
    """An ArgumentParser for a command: errors become one line (via `run`), `--debug` is added."""
    return _Parser(prog=prog, **kwargs)


def one_line(message: object) -> str:
    """`message` on one line (newlines and runs of blanks folded)."""
    return re.sub(r"\s*\n\s*", " ", str(message)).strip()


def _describe(e: BaseException) -> str:
    msg = one_line(e)
    if isinstance(e, OSError) and e.filename is not None and str(e.filename) not in msg:
        msg = f"{e.filename}: {msg}"
    return msg or type(e).__name__


def run(label: str, body: Callable[[list[str]], int | None], argv: Sequence[str] | None = None, *,
        usage_errors: tuple[type[BaseException], ...] = (), stderr: TextIO | None = None) -> int:
    """Run `body(argv)` under the contract (module docstring); returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    err = stderr or sys.stderr
    try:
        return int(body(argv) or 0)
    except SystemExit as e:  # --help (0), or a body that exits itself
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if code and not isinstance(e.code, int):
            print(f"{label} error: {one_line(e.code)}", file=err, flush=True)
        return code
    except KeyboardInterrupt:
        print(f"{label}: interrupted", file=err, flush=True)
        return 130
    except USAGE_ERRORS + tuple(usage_errors) as e:
        if debug:
            traceback.print_exc(file=err)
        print(f"{getattr(e, 'label', label)} error: {_describe(e)}", file=err, flush=True)
        return 2
    except WORK_ERRORS as e:
        if debug:
            traceback.print_exc(file=err)
        print(f"{getattr(e, 'label', label)} failed: {_describe(e)}", file=err, flush=True)
        return 1
    except Exception as e:  # a bug: the traceback is what a report needs
        traceback.print_exc(file=err)
        print(f"{label} failed (a bug, please report it with the traceback above): {type(e).__name__}: "
              f"{one_line(e)}", file=err, flush=True)
        return 1


def check_device(device: str, flag: str = "--device") -> str:
    """`device` if this machine has it; UsageError naming `flag` otherwise (before any model is loaded)."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise UsageError(f"{flag} {device!r}: not a device (expected cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{flag} {device}: no CUDA device on this machine (torch.cuda.is_available() is "
                             "False); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"{flag} {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UsageError(f"{flag} {device}: MPS is not available on this machine")
    elif dev.type != "cpu":
        raise UsageError(f"{flag} {device}: unsupported device type {dev.type!r} (expected cpu or cuda)")
    return device


def check_output_path(path: str | os.PathLike, flag: str = "--out") -> None:
    """UsageError naming `flag` when `path` cannot be written as a file: it is a folder, or one of the folders
    above it is a file. Call it before the command's work, so that a typo costs no model load or generation; the
    missing folders above `path` are created when it is written (`atomic_output`)."""
    if not str(path).strip():
        raise UsageError(f"{flag}: the path is empty (give the file to write)")
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{flag} {path}: is a folder (expected a file path)")
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"{flag} {path}: {parent} is a file, not a folder")
            break


def wait_passively() -> None:
    """Set OMP_WAIT_POLICY=PASSIVE unless the environment sets it: OpenMP threads that spin while they wait made
    the tiny SONAR's steps 10x and the printed evaluate command 8x slower on 2 shared cores (docs/training.md,
    "Time of the default run"). No number changes, only how idle threads wait. Call it before torch is imported
    (this module does not import torch); the user's value wins."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def shareable(path: str | os.PathLike) -> None:
    """Give a file the permissions a plain `open(path, "w")` would (0666 minus the umask), a folder those of
    `mkdir` (0777 minus the umask). Private temporary files and folders (`tempfile.mkstemp`/`mkdtemp`,
    safetensors >= 0.8) are created 0600/0700; call this before renaming one into place so that an output, an
    export or a checkpoint can be read by the people the user shares the folder with."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~umask)


def shareable_folder(path: str | os.PathLike) -> None:
    """`shareable` for a folder and the files directly in it (a checkpoint or a model folder about to be
    renamed into place)."""
    shareable(path)
    for f in Path(path).iterdir():
        if f.is_file():
            shareable(f)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on any error it is removed
    (and `path` is left as it was)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        shareable(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def int_at_least(low: int) -> Callable[[str], int]:
    """argparse type: an int >= `low` (argparse names the flag in the error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = "int"
    return parse


def float_in(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Callable[[str], float]:
    """argparse type: a finite float in [low, high] (`low_open` / `high_open` exclude the bound)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
        if not ok:
            raise argparse.ArgumentTypeError(f"must be in {'(' if low_open else '['}{low:g}, {high:g}"
                                             f"{')' if high_open else ']'}, got {text}")
        return value

    parse.__name__ = "float"
    return parse


def read_utf8(path: str | os.PathLike, what: str = "") -> str:
    """The text of a UTF-8 file; UsageError naming `what` (e.g. a flag), the file and the line of bad bytes."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        prefix = f"{what} " if what else ""
        raise UsageError(f"{prefix}{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                         f"{e.start})") from None
