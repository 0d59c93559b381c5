"""Optional native (C++) CPU linear cross-entropy: loader, op wrappers and the build command.

The library `kernels/sonar_kernels/_native/libsonar_native.so` is built from `native/*.cpp` by the root CMakeLists.txt
(`python -m sonar_kernels.native build`, or `scripts/build_native.sh`, both through `native_build.py`) and
registers the operators `torch.ops.sonar_native.lce_forward` / `lce_backward` / `lce_forward_grad`.
Importing this module never fails when the library is absent or was built against another torch: `native_available()` is then False and
`native_load_error()` says why.

`forward` / `backward` / `forward_with_grad` have the same signatures and return conventions as
`sonar_kernels.torch_ops.linear_cross_entropy.forward` / `.backward`, so the op in
`ops/linear_cross_entropy.py` runs any of them; `sonar_kernels.functional.linear_cross_entropy.linear_cross_entropy_native`
is `linear_cross_entropy(..., impl="native")`. This module imports nothing from functional/ or ops/ (the
arrow points one way: they import it).
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from pathlib import Path

import torch

from . import native_build
from .torch_ops.linear_cross_entropy import CHUNK_FRACTION, MAX_CHUNK_BYTES, z_loss_shifted_lse

PACKAGE_DIR = Path(__file__).resolve().parent
LIBRARY_DIR = PACKAGE_DIR / "_native"
LIBRARY_NAME = native_build.LIBRARY_NAME

# Tile sizes (token rows x vocabulary columns of one logits tile); 0 lets the library pick: up to 256 x 512
# (512 KiB in fp32), fewer rows when there are fewer tokens than threads x 256.
BLOCK_ROWS = 0
BLOCK_VOCAB = 0

_load_error: str | None = None


def library_path() -> Path:
    """Where the built library is looked for (override with SONAR_NATIVE_LIB=/path/to/lib.so)."""
    env = os.environ.get("SONAR_NATIVE_LIB")
    return Path(env) if env else LIBRARY_DIR / LIBRARY_NAME


@functools.lru_cache(maxsize=None)
def _load() -> bool:
    global _load_error
    path = library_path()
    if not path.is_file():
        _load_error = f"native library not built: {path} does not exist (run `python -m sonar_kernels.native build`)"
        return False
    try:
        torch.ops.load_library(str(path))
        torch.ops.sonar_native.lce_forward  # noqa: B018 - raises if the ops did not register
    except (OSError, RuntimeError, AttributeError) as exc:
        _load_error = f"native library {path} failed to load (rebuild it against this torch): {exc}"
        return False
    return True


def native_available() -> bool:
    """True when the native library is built and loads into this torch."""
    return _load()


def native_load_error() -> str | None:
    """Why `native_available()` is False (None when it is True or was not asked yet)."""
    _load()
    return _load_error


def _require() -> None:
    if not native_available():
        raise RuntimeError(f"impl='native' requested but {native_load_error()}")


def use_native(impl: str, *tensors: torch.Tensor | None) -> bool:
    """Whether an op called with `impl` on these tensors runs the native path.

    "native" forces it (RuntimeError when the library is missing, ValueError for non-CPU tensors).
    "auto" takes it only when SONAR_KERNELS_IMPL=native asks for it (CPU tensors, library available):
    measured side by side on a quiet 2-core machine it does not beat the chunked PyTorch path
    (docs/native.md), so it stays out of the default path. Any other impl does not use it.
    """
    on_cpu = all(t.device.type == "cpu" for t in tensors if t is not None)
    if impl == "native":
        _require()
        if not on_cpu:
            devices = sorted({str(t.device) for t in tensors if t is not None})
            raise ValueError(f"impl='native' runs on CPU tensors only, got devices {devices}")
        return True
    if impl != "auto" or os.environ.get("SONAR_KERNELS_IMPL", "auto") != "native":
        return False
    return on_cpu and native_available()


def forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    block_rows: int = BLOCK_ROWS,
    block_vocab: int = BLOCK_VOCAB,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss [N] (0 on ignored rows) and lse [N], float32 (float64 for float64 inputs)."""
    _require()
    return torch.ops.sonar_native.lce_forward(
        hidden, weight, target, bias, int(ignore_index), float(label_smoothing), int(block_rows), int(block_vocab)
    )


def backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None,
    lse: torch.Tensor,
    grad_rows: torch.Tensor,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    need_hidden: bool = True,
    need_weight: bool = False,
    need_bias: bool = False,
    block_rows: int = BLOCK_ROWS,
    block_vocab: int = BLOCK_VOCAB,
    z_loss: float = 0.0,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(d_hidden, d_weight, d_bias) of sum_i grad_rows[i] * loss_i, each None unless requested.
    `z_loss`: include the gradient of z_loss * lse^2 (see `torch_ops...z_loss_shifted_lse`)."""
    _require()
    if z_loss:
        lse = z_loss_shifted_lse(lse, z_loss)
    if need_bias and bias is None:
        raise ValueError("need_bias=True but bias is None")
    if not (need_hidden or need_weight or need_bias):
        return None, None, None
    dh, dw, db = torch.ops.sonar_native.lce_backward(
        hidden, weight, target, bias, lse, grad_rows, int(ignore_index), float(label_smoothing),
        bool(need_hidden), bool(need_weight), bool(need_bias), int(block_rows), int(block_vocab),
    )
    return (dh if need_hidden else None, dw if need_weight else None, db if need_bias else None)


def forward_with_grad(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss [N], lse [N], d_hidden [N, D] for a unit upstream gradient), as
    `sonar_kernels.torch_ops.linear_cross_entropy.forward_with_grad`. `chunk_size` is the token rows of
    one thread's block (default: the threads' fp32 [rows, V] buffers within min(1/8 of the full fp32
    logits, 256 MB), at most 64 rows)."""
    _require()
    n, v = hidden.shape[0], weight.shape[0]
    elem = 8 if hidden.dtype == torch.float64 else 4
    budget = min(MAX_CHUNK_BYTES, n * v * elem // CHUNK_FRACTION)
    return torch.ops.sonar_native.lce_forward_grad(
        hidden, weight, target, bias, int(ignore_index), float(label_smoothing), float(z_loss),
        int(chunk_size or 0), int(budget))


# ---------------------------------------------------------------------------------------------------
# build command
# ---------------------------------------------------------------------------------------------------

def build(build_dir: Path | None = None, jobs: int | None = None, generator: str | None = None,
          verbose: bool = False) -> Path:
    """Configure, build and install the library into kernels/sonar_kernels/_native/ (see `native_build.py`); returns
    the installed path. Needs cmake >= 3.25 and a C++ compiler for the standard the installed torch needs."""
    path = native_build.run_build(LIBRARY_DIR, build_dir, jobs, generator, verbose)
    _load.cache_clear()
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sonar_kernels.native",
                                     description="Build or inspect the optional native CPU library.")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="configure + build + install into kernels/sonar_kernels/_native/")
    b.add_argument("--build-dir", type=Path, default=None, help="CMake build folder (default build/native)")
    b.add_argument("--jobs", type=int, default=None, help="parallel compile jobs (default: all cores)")
    b.add_argument("--verbose", action="store_true", help="show CMake and compiler output")
    sub.add_parser("status", help="say whether the library is built and loads")
    args = parser.parse_args(argv)
    if args.command == "build":
        start = time.perf_counter()
        path = build(args.build_dir, args.jobs, verbose=args.verbose)
        ok = native_available()
        print(f"built {path} in {time.perf_counter() - start:.0f} s; loads: {ok}")
        if not ok:
            print(native_load_error(), file=sys.stderr)
        return 0 if ok else 1
    ok = native_available()
    print(f"native library {library_path()}: " + ("available" if ok else native_load_error()))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
