"""`varlen_causal_attention`: causal self-attention over packed variable-length segments.

Backend choice for `impl="auto"`: flash-attn's varlen kernel when importable, on CUDA, with fp16/bf16;
else FlexAttention on CUDA; else SDPA with a block-diagonal causal mask (CPU). `impl` may force
"flash", "flex" or "sdpa". Every backend is differentiable through autograd.

The SDPA and Flex backends run as the custom op `sonar_kernels::varlen_causal_attention` (ops/varlen_attention.py),
so a compiled model never graph-breaks here: the checks below look only at shapes, dtypes and flags, and the
checks of cu_seqlens' values run inside the op.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..ops.varlen_attention import varlen_causal_attention_op
from ..torch_ops.varlen_attention import flash_attn_varlen_available, varlen_attention_flash

VARLEN_IMPLS = ("auto", "flash", "flex", "sdpa")


def _resolve_impl(impl: str, q: Tensor) -> str:
    if impl not in VARLEN_IMPLS:
        raise ValueError(f"impl must be one of {VARLEN_IMPLS}, got {impl!r}")
    if impl == "flash":
        if not flash_attn_varlen_available():
            raise RuntimeError("impl='flash' requested but flash_attn (flash_attn_varlen_func) is not importable")
        if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"impl='flash' needs CUDA fp16/bf16 tensors, got {q.device} {q.dtype}")
        return impl
    if impl != "auto":
        return impl
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and flash_attn_varlen_available():
        return "flash"
    if q.is_cuda:
        return "flex"
    return "sdpa"


def varlen_causal_attention(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, *,
    scale: float | None = None, impl: str = "auto",
) -> Tensor:
    """Causal attention inside each packed segment: `q[T,H,Dh]`, `k/v[T,Hkv,Dh]` -> `[T,H,Dh]`.

    `cu_seqlens`: int32 `[B+1]`, starting at 0 and ending at T, non-decreasing (checked inside the op: a
    ValueError on the CPU, a device-side assert on CUDA). `max_seqlen`: the longest
    segment. `Hkv` must divide `H` (grouped-query attention). `scale` defaults to `1/sqrt(Dh)`.
    """
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            f"q, k, v must be [T, heads, head_dim]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(f"k shape {tuple(k.shape)} must equal v shape {tuple(v.shape)}")
    if k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(f"k/v shape {tuple(k.shape)} incompatible with q shape {tuple(q.shape)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"kv heads ({k.shape[1]}) must divide query heads ({q.shape[1]})")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise TypeError(f"q, k, v dtypes must match, got {q.dtype}, {k.dtype}, {v.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be 1-D [B+1], got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 (or int64), got {cu_seqlens.dtype}")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    backend = _resolve_impl(impl, q)
    if backend == "flash":
        return varlen_attention_flash(q, k, v, cu_seqlens, max_seqlen, scale)
    if backend == "flex" and not q.is_cuda and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise ValueError("impl='flex' on CPU supports only the forward pass (no grad); use impl='sdpa'")
    return varlen_causal_attention_op(q, k, v, cu_seqlens, float(scale), backend)
