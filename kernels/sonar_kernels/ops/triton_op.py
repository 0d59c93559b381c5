"""`torch.library.triton_op` for the Triton paths of the sonar_kernels ops.

A `triton_op` is a custom op whose body (torch ops + kernels launched through `torch.library.wrap_triton`)
torch.compile traces: inductor sees the Triton kernels and schedules them with the rest of the graph, where a
`custom_op` stays one opaque call. On a GPU, the ops' Triton paths are triton_ops registered by
`triton_op(name, fake)` below; their plain-PyTorch paths stay `torch.library.custom_op`s.

Under the Triton interpreter (`TRITON_INTERPRET=1`, kernels on CPU tensors) torch cannot trace the body:
`triton.jit` then returns an `InterpretedFunction`, for which `wrap_triton` hands back the kernel itself
("eager-launchable but lacks the JIT metadata the traceable wrapper needs", torch 2.13), so tracing launches it
on fake tensors and fails ("Cannot access data pointer of Tensor (e.g. FakeTensor, FunctionalTensor)"). There
the op gets `fake` as its fake implementation and stays one opaque node in compiled graphs (as torch.export
keeps triton_ops), running its body, the interpreted kernels, when the graph runs. Everything but the
decomposition into kernel nodes is therefore checked on the CPU; the decomposition itself only on a GPU.
torch < 2.6 has no triton_op: `HAVE_TRITON_OP` is False and callers keep their custom ops.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from ..backend import interpret_mode, triton_available

HAVE_TRITON_OP = hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")


def _keep_opaque(mode, func, types, args, kwargs):
    return mode.__torch_dispatch__(func, types, args, kwargs)


def triton_op(name: str, fake: Callable) -> Callable:
    """Decorator: `torch.library.triton_op(name, mutates_args=())`; under the interpreter also `fake` as the
    fake implementation and no decomposition (module docstring)."""

    def register(fn: Callable):
        op = torch.library.triton_op(name, mutates_args=())(fn)
        if interpret_mode():
            from torch._subclasses.functional_tensor import FunctionalTensorMode

            op.register_fake(fake)
            op.register_torch_dispatch(FunctionalTensorMode, _keep_opaque)
        return op

    return register


def register_at_import(register: Callable):
    """`register()` (which registers an op's triton_op pair and returns it) where torch has triton_op and triton
    imports, else None. Called at import (TRITON_INTERPRET must be set before sonar_kernels is imported), not on
    first use: a first use inside a compiled region would have dynamo trace the registration."""
    return register() if (HAVE_TRITON_OP and triton_available()) else None


def finish_pair(fwd_op, bwd_op, backward: Callable, setup_context: Callable):
    """The forward triton_op's autograd (`backward`, `setup_context`), and FLOP counters seeing through both ops
    (ops/inline.py); returns (fwd_op, bwd_op)."""
    from .inline import see_through

    fwd_op.register_autograd(backward, setup_context=setup_context)
    see_through(fwd_op)
    see_through(bwd_op)
    return fwd_op, bwd_op


__all__ = ["HAVE_TRITON_OP", "finish_pair", "register_at_import", "triton_op"]
