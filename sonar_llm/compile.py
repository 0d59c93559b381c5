"""How the training step is compiled (`train.compile`): one `torch.compile` region per transformer layer.

torchtitan style: every transformer block's forward, and the frozen SONAR decoder's per-layer unit, is
compiled on its own with `fullgraph=True` (a graph break is an error, not a silent fallback) and
`dynamic=True` (packed lengths are symbolic from the first call, so batches of other lengths reuse the
graph; parameters keep static shapes). The sonar_kernels ops inside (varlen attention, fused add +
LayerNorm, linear cross-entropy, cross-attention constants) are torch.library custom ops, which the graphs
call as they are. `backend` defaults to "inductor"; "aot_eager" traces and partitions the same graphs without
code generation (what the CPU tests use: graph breaks and recompiles are decided before the backend runs).
Imports no layer of sonar_llm.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["DEFAULT_BACKEND", "compile_fullgraph", "compile_block"]

DEFAULT_BACKEND = "inductor"


def compile_fullgraph(fn: Callable, backend: str | None = None) -> Callable:
    """`torch.compile(fn, fullgraph=True, dynamic=True, backend=backend or DEFAULT_BACKEND)`, marked as such."""
    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend=backend or DEFAULT_BACKEND)
    compiled._sonar_compiled = True
    return compiled


def compile_block(block: nn.Module, backend: str | None = None) -> None:
    """Compile `block.forward` in place (`compile_fullgraph`).

    Only the forward is replaced, so module hooks (FSDP2's unshard / reshard, applied after) stay outside
    the graph; a forward already wrapped for activation checkpointing keeps its eager wrapper and gets its
    inner forward compiled. All blocks of one class share the compiled code. A compiled block is left as is."""
    fwd = block.forward
    target, attr = (fwd, "inner") if hasattr(fwd, "inner") else (block, "forward")
    current = getattr(target, attr)
    if getattr(current, "_sonar_compiled", False):
        return
    setattr(target, attr, compile_fullgraph(current, backend))
