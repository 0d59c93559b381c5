"""Root pytest configuration: run Triton kernels in the CPU interpreter on machines without a GPU.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at collection start.
Under SONAR_NATIVE_REQUIRED=1 (.ci/run where a toolchain exists) a native test that would skip because the
native library does not load fails instead.
"""
import os

import pytest

try:
    import torch

    _has_cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _patch_triton_interpreter_index() -> None:
    """Let Triton 3.6's interpreter run with NumPy >= 2.4 (what the torch 2.11 benchmark machine may have).

    Triton 3.6's interpreter turns a scalar (a 1-element array) into a Python int with `int(arr)`, which
    NumPy 2.4 made a TypeError ("only 0-dimensional arrays can be converted to Python scalars"): every
    `range()` over a runtime bound in a kernel then fails. Triton 3.9 squeezes first; this does the same,
    and only where Triton's own code does not and NumPy refuses. Tests only: compiled kernels are unaffected.
    """
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return
    try:
        import numpy as np

        int(np.array([1]))
        return  # NumPy < 2.4 still converts (with a DeprecationWarning)
    except TypeError:
        pass
    except Exception:  # pragma: no cover - no numpy: nothing to do
        return
    try:
        import inspect

        from triton.runtime import interpreter as ti

        original = ti._patch_lang_tensor
        if "squeeze" in inspect.getsource(original):
            return  # this Triton already squeezes (3.9)
    except Exception:  # pragma: no cover - no triton, or an interpreter laid out differently
        return

    def _patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    ti._patch_lang_tensor = _patch_lang_tensor


_patch_triton_interpreter_index()


def _native_required() -> bool:
    """SONAR_NATIVE_REQUIRED=1 (set by .ci/run after building the native library): native tests must run."""
    return os.environ.get("SONAR_NATIVE_REQUIRED", "") not in ("", "0")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Where the native library is required, a test skipped because it does not load is a failure.

    Every native skip (tests/ and bench/) gives `sonar_kernels.native.native_load_error()` as its reason;
    under SONAR_NATIVE_REQUIRED=1 such a skip is reported as failed, naming why the library is missing."""
    outcome = yield
    report = outcome.get_result()
    if not (report.skipped and _native_required()) or not isinstance(report.longrepr, tuple):
        return
    from sonar_kernels import native

    why = native.native_load_error()
    reason = str(report.longrepr[2])
    if not native.native_available() and why and why in reason:
        report.outcome = "failed"
        report.longrepr = f"SONAR_NATIVE_REQUIRED=1 but this native test would skip: {reason}"
