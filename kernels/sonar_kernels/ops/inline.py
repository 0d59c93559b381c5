"""See through the sonar_kernels custom ops with torch's dispatch-mode tools (FLOP and memory counters).

A custom op is one opaque call to `FlopCounterMode`, `MemTracker` or any other `TorchDispatchMode`: the
matrix products and scratch buffers inside it would be invisible. Two remedies, both running an op's own
Python implementation in its place so that the modes see the aten ops the kernels really run (autograd
still records the op and its registered backward, which is inlined the same way):
- `see_through(op)` (called by every op module) registers that behaviour for torch's FlopCounterMode, so
  FLOP counts of code that uses the ops are what they were before the ops were registered;
- `inline_ops()`, a mode entered *inside* any other mode (the planner's memory trackers), does it for all
  modes below it.
"""
from __future__ import annotations

from torch._library.custom_ops import _maybe_get_opdef
from torch.utils._python_dispatch import TorchDispatchMode

NAMESPACE = "sonar_kernels"


class inline_ops(TorchDispatchMode):  # noqa: N801 - used as a context manager, like torch's modes
    """Within the block, `sonar_kernels::` ops run their implementations op by op (see the module docstring)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == NAMESPACE:
            opdef = _maybe_get_opdef(func)
            if opdef is not None:
                return opdef._init_fn(*args, **kwargs)
        return func(*args, **kwargs)


def see_through(op) -> None:
    """Make torch's FlopCounterMode count the aten ops inside custom op `op` (a `torch.library.custom_op`)."""
    from torch.utils import flop_counter

    mode_class = getattr(flop_counter, "_FlopCounterMode", None)
    if mode_class is None:  # older torch: FlopCounterMode is the dispatch mode itself
        mode_class = flop_counter.FlopCounterMode

    def run_inside(mode, func, types, args, kwargs):
        with mode:
            return op._init_fn(*args, **kwargs)

    op.register_torch_dispatch(mode_class, run_inside)


__all__ = ["inline_ops", "see_through"]
