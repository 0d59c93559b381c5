"""How the training step is compiled (`train.compile`): one `torch.compile` region per transformer layer.

torchtitan style: every transformer block's forward, and the frozen SONAR decoder's per-layer unit, is
compiled on its own with `fullgraph=True` (a graph break is an error, not a silent fallback) and
`dynamic=True` (packed lengths are symbolic from the first call, so batches of other lengths reuse the
graph; parameters keep static shapes). The sonar_kernels ops inside (varlen attention, fused add +
LayerNorm, linear cross-entropy, cross-attention constants) are torch.library custom ops, which the graphs
call as they are. `backend` defaults to "inductor"; "aot_eager" traces and partitions the same graphs without
code generation (what the CPU tests use: graph breaks and recompiles are decided before the backend runs).

"inductor" means `inductor_backend`: torch's inductor, except that graphs whose tensors all live on the CPU
keep `aten.threshold_backward` (ReLU's backward) as the ATen kernel eager runs instead of decomposing it. The
decomposition `where(y <= 0, 0, grad)` lets AOT autograd's partitioner save the 1-byte mask `y <= 0` in place
of ReLU's output, and inductor's C++ code stores and reloads that bool mask through a slow path (torch 2.13,
AVX2: `h <= 0` on [120, 8192] fp32 takes 13 ms compiled against 0.7 ms in ATen, one thread). That mask was
what made the compiled SONAR decoder FFN (ReLU, 8192 wide) slower than eager on the CPU (issue 28,
docs/benchmarks.md). Kept, the graph saves ReLU's output as eager autograd does (4 bytes an element instead
of 1). CUDA graphs keep the full decomposition (Triton stores masks at full speed; the smaller activation wins).
Imports no layer of sonar_llm.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["DEFAULT_BACKEND", "compile_fullgraph", "compile_block", "inductor_backend", "CPU_KEPT_ATEN_OPS"]

DEFAULT_BACKEND = "inductor"

# aten ops left undecomposed in CPU-only inductor graphs (module docstring)
CPU_KEPT_ATEN_OPS = (torch.ops.aten.threshold_backward.default,)


def _cpu_only(example_inputs) -> bool:
    return all(t.device.type == "cpu" for t in example_inputs if isinstance(t, torch.Tensor))


def inductor_backend(gm: torch.fx.GraphModule, example_inputs):
    """torch.compile backend: inductor, with `CPU_KEPT_ATEN_OPS` kept as ATen calls in CPU-only graphs."""
    from torch._inductor.compile_fx import compile_fx

    if not _cpu_only(example_inputs):
        return compile_fx(gm, example_inputs)
    from torch._inductor.decomposition import select_decomp_table

    from torch._inductor import lowering

    for op in CPU_KEPT_ATEN_OPS:  # lower them to their ATen kernel; registered here, not by inductor on first sight,
        if op not in lowering.lowerings:  # which raises when the CI environment variable is set (a decomposition exists)
            lowering.make_fallback(op, warn=False, override_decomp=True)
    table = {op: fn for op, fn in select_decomp_table().items() if op not in CPU_KEPT_ATEN_OPS}
    # AOT autograd's cache key does not cover the decomposition table: a graph cached by plain inductor would
    # come back with the mask, so that cache is off for these graphs (inductor's own cache, keyed on the
    # partitioned graphs, still applies).
    with torch._functorch.config.patch(enable_autograd_cache=False):
        return compile_fx(gm, example_inputs, decompositions=table)


def compile_fullgraph(fn: Callable, backend: str | None = None) -> Callable:
    """`torch.compile(fn, fullgraph=True, dynamic=True, backend=backend or DEFAULT_BACKEND)`, marked as such;
    "inductor" is `inductor_backend`."""
    name = backend or DEFAULT_BACKEND
    compiled = torch.compile(fn, fullgraph=True, dynamic=True,
                             backend=inductor_backend if name == "inductor" else name)
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
