"""Where the Triton-path tests run: on the GPU when there is one, else on the CPU in the interpreter.

Tests build their inputs (and float64 references) on the CPU; for impl="triton" they move the inputs with
`for_triton(...)` and compare results after `.cpu()`. So the same tests check the kernels in the CPU
interpreter (CI) and for real on a GPU machine.
"""
from __future__ import annotations

import torch

from sonar_kernels.backend import interpret_mode


def triton_device() -> torch.device:
    """cuda when a GPU runs Triton natively, else cpu (the interpreter, TRITON_INTERPRET=1)."""
    return torch.device("cuda" if torch.cuda.is_available() and not interpret_mode() else "cpu")


def for_triton(*tensors):
    """The tensors (None stays None) on `triton_device()`; one tensor comes back bare."""
    dev = triton_device()
    moved = tuple(t if t is None else t.to(dev) for t in tensors)
    return moved[0] if len(moved) == 1 else moved
