"""Backend selection: decides whether an op runs its Triton kernel or its plain-PyTorch path.

`impl="auto"` picks Triton only where it can run natively (CUDA tensors and a Triton GPU driver);
`impl="triton"` forces Triton (on CPU tensors this needs `TRITON_INTERPRET=1`); `impl="torch"` forces
PyTorch. The linear cross-entropy also takes `impl="native"` (the optional compiled CPU library,
kernels/sonar_kernels/native.py), which it resolves before asking this module.
The environment variable `SONAR_KERNELS_IMPL` (torch|triton|native) overrides "auto" globally.
"""
from __future__ import annotations

import functools
import os

import torch

IMPLS = ("auto", "triton", "torch")


_TRITON_IMPORTS: bool | None = None  # triton_available()'s answer, once asked


def triton_available() -> bool:
    """True when the `triton` package imports (asked once; a module global rather than functools.lru_cache, which
    torch.compile warns about when it traces a call to it)."""
    global _TRITON_IMPORTS
    if _TRITON_IMPORTS is None:
        try:
            import triton  # noqa: F401
        except Exception:
            _TRITON_IMPORTS = False
        else:
            _TRITON_IMPORTS = True
    return _TRITON_IMPORTS


def interpret_mode() -> bool:
    """True when Triton runs its CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(impl: str, *tensors: torch.Tensor) -> bool:
    """Resolve `impl` for these tensors; raise a clear error when Triton is forced but cannot run."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = os.environ.get("SONAR_KERNELS_IMPL", "auto") or "auto"
        if impl == "native":  # the compiled CPU library (kernels/sonar_kernels/native.py) or else PyTorch: never Triton
            return False
        if impl not in IMPLS:
            raise ValueError(f"SONAR_KERNELS_IMPL must be one of {IMPLS + ('native',)}, got {impl!r}")
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
    if impl == "torch":
        return False
    if impl == "auto":
        return on_cuda and torch.cuda.is_available() and triton_available()
    # forced triton
    if not triton_available():
        raise RuntimeError("impl='triton' requested but the triton package is not importable")
    if not on_cuda and not interpret_mode():
        raise RuntimeError(
            "impl='triton' on CPU tensors needs TRITON_INTERPRET=1 (set before triton is imported)"
        )
    return True
