"""Tracing machinery of the run planner (train/sonar_train/plan.py): one real training step on fake tensors.

`PlanFakeMode` is a `FakeTensorMode` in which floating-point tensors are fake (shape, dtype, no storage)
while integer / boolean tensors and scalars stay real. The real code does data-dependent host work on
index tensors (`int(cu_seqlens[-1])`, `.tolist()` of segment lengths, boolean masks over token ids);
with those real, the model, decoder, loss, FSDP2 and the optimizer run unchanged, and every float
tensor a GPU would hold exists only as metadata. Two adjustments, both confined to this mode:
  * a fake tensor made from a fresh meta tensor is not memoised (torch 2.13 memoises it with a weak
    reference, which makes `nn.Module.to()` refuse to swap fake parameters);
  * an all-real op runs for real (the mode is popped inside `__torch_dispatch__`); factories that make a
    floating-point tensor of more than one element make a fake one.

`flash_attention_model()` optionally replaces the packed causal attention of the code under trace with
a model of flash-attn's varlen kernel (what a GPU run with flash-attn uses): outputs [T,H,Dh] plus the
fp32 log-sum-exp [H,T] saved for backward, no mask, FLOPs of the causal part of each segment only
(4*H*Dh*sum L(L+1)/2 forward, twice that backward). Without it the CPU path (block-diagonal SDPA in groups
of segments) is traced, which is exact for a CPU run and slow to trace at GPU batch sizes.

`PlanFlopCounter` is `torch.utils.flop_counter.FlopCounterMode` with three additions:
  * every counted op is also put in one bucket, "vocab" (a matmul with a [V, D] vocabulary matrix among its
    arguments), "model" (inside a module of the trained model) or "outside" (the frozen decoder, the loss);
  * and in one phase: "forward", "backward", or "recompute" (a forward op run again during the backward
    pass by activation checkpointing: inside a backward graph task with grad mode on), so that the count
    can be set against a closed form of model FLOPs, which leaves recomputation out;
  * the CPU fused attention kernel (`aten._scaled_dot_product_flash_attention_for_cpu` and its backward,
    what `F.scaled_dot_product_attention` runs on CPU tensors, fake ones included) is counted with torch's
    formulas for the GPU flash kernel (same q, k, v arguments); FlopCounterMode has no entry for it and
    would count that attention as zero. Those formulas count the whole [Sq, Sk] square whatever the mask,
    and a backward of 2.5 x the forward (the scores are recomputed).

`fake_process_group(world_size)` is torch's fake process group (collectives do nothing) so that
`fully_shard` shards for rank 0 of `world_size` inside one process.
"""
from __future__ import annotations

import contextlib
import types
from collections import defaultdict

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["PlanFakeMode", "PlanFlopCounter", "cpu_attention_flop_formulas", "fake_process_group",
           "flash_attention_model", "flop_phase", "is_fake", "plain_mem_tracker", "storage_bytes"]


def is_fake(t) -> bool:
    return isinstance(t, FakeTensor)


def storage_bytes(tensors) -> int:
    """Bytes of the storages behind `tensors`, each tensor once (DTensors count their local shard). Tied or
    repeated tensors are the same object; real tensors sharing a storage are counted once by address."""
    seen: set = set()
    keep = []  # holds the tensors so that ids stay unique while counting
    total = 0
    for t in tensors:
        if t is None:
            continue
        local = t.to_local() if hasattr(t, "to_local") else t
        keep.append(local)
        real = not is_fake(local) and local.device.type != "meta"
        key = ("ptr", local.untyped_storage().data_ptr()) if real else ("id", id(local))
        if key in seen:
            continue
        seen.add(key)
        total += local.untyped_storage().nbytes()
    return total


class PlanFakeMode(FakeTensorMode):
    """Fake floating-point tensors, real integer tensors (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__(allow_non_fake_inputs=True)

        def from_meta_and_device(conv, fake_mode, t, device, pytype=None, dispatch_keys=None):
            return FakeTensor(fake_mode, t, device, pytype=pytype, dispatch_keys=dispatch_keys)

        self.fake_tensor_converter.from_meta_and_device = types.MethodType(
            from_meta_and_device, self.fake_tensor_converter)

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if tensors:
            if not any(isinstance(t, FakeTensor) for t in tensors) and all(
                    type(t) in (torch.Tensor, torch.nn.Parameter) for t in tensors):
                return func(*args, **kwargs)  # all real: run it (this mode is popped here)
            return super().__torch_dispatch__(func, types_, args, kwargs)
        out = super().__torch_dispatch__(func, types_, args, kwargs)
        if isinstance(out, torch.Tensor) and (not out.is_floating_point() or out.numel() <= 1):
            return func(*args, **kwargs)  # integer / scalar factory: make it real
        return out


@contextlib.contextmanager
def fake_process_group(world_size: int):
    """torch's fake process group as rank 0 of `world_size` (nothing if world_size == 1)."""
    if world_size <= 1:
        yield
        return
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("train/sonar_train/plan.py: a process group already exists; the planner needs its own fake one")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------- memory
def plain_mem_tracker():
    """torch's MemTracker for an unsharded model, made to accept frozen modules: it would install gradient
    hooks on every parameter of a called module, which fails on parameters that do not require grad."""
    from torch.distributed._tools.mem_tracker import MemTracker

    class _Tracker(MemTracker):
        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            if install_grad_hooks and any(not p.requires_grad for p in module.parameters()):
                install_grad_hooks = False
            return super()._track_module_params_and_buffers(module, install_grad_hooks=install_grad_hooks)

    return _Tracker()


# --------------------------------------------------------------------------------------------- FLOPs
def cpu_attention_flop_formulas() -> dict:
    """{CPU fused attention op: torch's FLOP formula of the GPU flash kernel} (module docstring). The two ops
    take (query, key, value, ...) and (grad_out, query, key, value, ...) first, as the GPU ones do."""
    from torch.utils.flop_counter import flop_registry

    aten = torch.ops.aten
    return {aten._scaled_dot_product_flash_attention_for_cpu:
            flop_registry[aten._scaled_dot_product_flash_attention],
            aten._scaled_dot_product_flash_attention_for_cpu_backward:
            flop_registry[aten._scaled_dot_product_flash_attention_backward]}


def flop_phase() -> str:
    """"forward", "backward" or "recompute" for an op running now (module docstring)."""
    if torch._C._current_graph_task_id() == -1:
        return "forward"
    return "recompute" if torch.is_grad_enabled() else "backward"


class PlanFlopCounter(FlopCounterMode):
    """FlopCounterMode that also splits its count into "vocab" / "model" / "outside" and into phases, and
    counts the CPU attention kernel (module docstring).

    `vocab_shapes`: the (V, D) shapes of vocabulary matrices; `model_prefix`: the module-tracker name of
    the trained model's root; ops inside its submodules (named `prefix.child...`) are "model", ops of the root's
    own forward outside any submodule (the loss through a frozen decoder) are not."""

    def __init__(self, vocab_shapes, model_prefix: str) -> None:
        super().__init__(display=False)
        self.flop_registry.update(cpu_attention_flop_formulas())
        self.vocab_shapes = {tuple(s) for s in vocab_shapes} | {tuple(reversed(s)) for s in vocab_shapes}
        self.model_prefix = model_prefix
        self.buckets: dict[str, int] = defaultdict(int)
        self.phases: dict[str, int] = defaultdict(int)

    def _count_flops(self, func_packet, out, args, kwargs):
        if func_packet in self.flop_registry:
            flops = self.flop_registry[func_packet](*args, **kwargs, out_val=out)
            for par in set(self.mod_tracker.parents):
                self.flop_counts[par][func_packet] += flops
            shapes = {tuple(a.shape) for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
            if shapes & self.vocab_shapes:
                self.buckets["vocab"] += flops
            elif any(p.startswith(self.model_prefix + ".") for p in self.mod_tracker.parents):
                self.buckets["model"] += flops
            else:
                self.buckets["outside"] += flops
            self.phases[flop_phase()] += flops
        return out


# ------------------------------------------------------------------------------- flash-attn model
_LIB = None


def _causal_pairs(cu_seqlens: torch.Tensor) -> float:
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.float64)
    return float((lengths * (lengths + 1) / 2).sum())


def _register_flash_model():
    """torch.library ops `sonar_plan::flash_varlen` / `_bwd` with fake kernels and FLOP formulas."""
    global _LIB
    if _LIB is not None:
        return
    from torch.utils.flop_counter import register_flop_formula

    @torch.library.custom_op("sonar_plan::flash_varlen", mutates_args=())
    def flash_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        from sonar_kernels.torch_ops.varlen_attention import varlen_attention_sdpa

        out = varlen_attention_sdpa(q, k, v, cu_seqlens, scale)
        return out, torch.zeros(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device)

    @flash_varlen.register_fake
    def _(q, k, v, cu_seqlens, scale):
        return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)

    @torch.library.custom_op("sonar_plan::flash_varlen_bwd", mutates_args=())
    def flash_varlen_bwd(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         out: torch.Tensor, lse: torch.Tensor, cu_seqlens: torch.Tensor, scale: float
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from sonar_kernels.torch_ops.varlen_attention import varlen_attention_sdpa

        with torch.enable_grad():
            qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
            o = varlen_attention_sdpa(qq, kk, vv, cu_seqlens, scale)
            return torch.autograd.grad(o, (qq, kk, vv), grad)

    @flash_varlen_bwd.register_fake
    def _(grad, q, k, v, out, lse, cu_seqlens, scale):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def setup_context(ctx, inputs, output):
        q, k, v, cu, scale = inputs
        ctx.save_for_backward(q, k, v, output[0], output[1], cu)
        ctx.scale = scale

    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, cu = ctx.saved_tensors
        dq, dk, dv = flash_varlen_bwd(grad_out, q, k, v, out, lse, cu, ctx.scale)
        return dq, dk, dv, None, None

    flash_varlen.register_autograd(backward, setup_context=setup_context)

    @register_flop_formula(torch.ops.sonar_plan.flash_varlen, get_raw=True)
    def _fwd_flops(q, k, v, cu_seqlens, scale, out_val=None, **kw):
        return int(4 * q.shape[1] * q.shape[2] * _causal_pairs(cu_seqlens))

    @register_flop_formula(torch.ops.sonar_plan.flash_varlen_bwd, get_raw=True)
    def _bwd_flops(grad, q, k, v, out, lse, cu_seqlens, scale, out_val=None, **kw):
        return int(8 * q.shape[1] * q.shape[2] * _causal_pairs(cu_seqlens))

    _LIB = flash_varlen


def _flash_attention(q, k, v, cu_seqlens, max_seqlen, *, scale=None, impl="auto"):
    """Stand-in for `varlen_causal_attention` with flash-attn's memory and FLOPs (module docstring)."""
    import math

    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out, _ = torch.ops.sonar_plan.flash_varlen(q, k, v, cu_seqlens, float(scale))
    return out


@contextlib.contextmanager
def flash_attention_model():
    """Within the block, every loaded module that imported `varlen_causal_attention` calls the flash model."""
    import sys

    from sonar_kernels.functional import varlen_attention as va

    _register_flash_model()
    original = va.varlen_causal_attention
    patched = []
    for mod in list(sys.modules.values()):
        if getattr(mod, "varlen_causal_attention", None) is original:
            patched.append(mod)
            mod.varlen_causal_attention = _flash_attention
    try:
        yield
    finally:
        for mod in patched:
            mod.varlen_causal_attention = original
