"""`sonar_kernels::varlen_causal_attention`: packed varlen causal attention as a torch.library custom op.

The op runs the SDPA (block-diagonal mask) or FlexAttention backend of `torch_ops/varlen_attention.py` on
real tensors, so its host-side work (reading `cu_seqlens` to build masks, checking that it starts at 0,
ends at T and never decreases) never enters a traced graph. The backward op recomputes the attention
probabilities of each group of segments (the SDPA backend's block-diagonal groups) and applies the closed-form
attention gradient; nothing but q, k, v is kept between forward and backward.
flash-attn is not wrapped here: its varlen function is itself a registered custom op (flash-attn >= 2.6).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..torch_ops.varlen_attention import DEFAULT_GROUP_TOKENS, sdpa_plan, varlen_attention_flex, varlen_attention_sdpa
from .inline import see_through

OP_BACKENDS = ("sdpa", "flex")


def check_cu_seqlens(cu_seqlens: Tensor, total: int) -> None:
    """Raise ValueError unless cu_seqlens starts at 0, ends at `total` and never decreases. CPU: a host check
    (free there); CUDA: an asynchronous device-side assert (no sync)."""
    bad = (cu_seqlens[0] != 0) | (cu_seqlens[-1] != total)
    if cu_seqlens.numel() > 1:
        decreasing = (cu_seqlens[1:] < cu_seqlens[:-1]).any()
    else:
        decreasing = torch.zeros((), dtype=torch.bool, device=cu_seqlens.device)
    if cu_seqlens.device.type != "cpu":
        torch._assert_async(~(bad | decreasing), "varlen_causal_attention: cu_seqlens must rise from 0 to T")
        return
    if bool(bad):
        raise ValueError(
            f"cu_seqlens must start at 0 and end at T={total}, got {int(cu_seqlens[0])}..{int(cu_seqlens[-1])}")
    if bool(decreasing):
        raise ValueError("cu_seqlens must be non-decreasing")


def _attend(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, scale: float, backend: str) -> Tensor:
    if backend == "flex":
        return varlen_attention_flex(q, k, v, cu_seqlens, scale)
    return varlen_attention_sdpa(q, k, v, cu_seqlens, scale)


@torch.library.custom_op("sonar_kernels::varlen_causal_attention", mutates_args=())
def varlen_causal_attention_op(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, scale: float,
                               backend: str) -> Tensor:
    """[T, H, Dh] causal attention inside each packed segment (backend "sdpa" | "flex")."""
    check_cu_seqlens(cu_seqlens, q.shape[0])
    return _attend(q, k, v, cu_seqlens, scale, backend).contiguous()


@varlen_causal_attention_op.register_fake
def _(q, k, v, cu_seqlens, scale, backend):
    return q.new_empty(q.shape)


def _group_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of one group's masked attention; q, grad [t, H, Dh], k, v [t, Hkv, Dh], mask [t, t] bool.
    Computed in fp32 (fp64 for fp64 inputs): p = softmax(q k^T s), dv = p^T dO, ds = p (dO v^T - rowsum),
    dq = ds k s, dk = ds^T q s; key/value heads shared by `rep` query heads sum their gradients."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    t, h, dh = q.shape
    hkv = k.shape[1]
    rep = h // hkv
    qh = q.to(acc).transpose(0, 1)  # [H, t, Dh]
    kh = k.to(acc).repeat_interleave(rep, dim=1).transpose(0, 1)
    vh = v.to(acc).repeat_interleave(rep, dim=1).transpose(0, 1)
    go = grad.to(acc).transpose(0, 1)
    p = torch.softmax((qh @ kh.transpose(1, 2) * scale).masked_fill(~mask, float("-inf")), dim=-1)
    dv = p.transpose(1, 2) @ go
    dp = go @ vh.transpose(1, 2)
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    dq = (ds @ kh) * scale
    dk = (ds.transpose(1, 2) @ qh) * scale
    dk = dk.view(hkv, rep, t, dh).sum(1)
    dv = dv.view(hkv, rep, t, dh).sum(1)
    return dq.transpose(0, 1), dk.transpose(0, 1), dv.transpose(0, 1)


@torch.library.custom_op("sonar_kernels::varlen_causal_attention_backward", mutates_args=())
def varlen_causal_attention_backward_op(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor,
                                        scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of sum(grad * attention(q, k, v)) for either backend, by recomputing each group's
    attention probabilities (the SDPA backend's groups of segments, `DEFAULT_GROUP_TOKENS`)."""
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for t0, t1, mask in sdpa_plan(cu_seqlens, q.device, DEFAULT_GROUP_TOKENS):
        gq, gk, gv = _group_backward(grad[t0:t1], q[t0:t1], k[t0:t1], v[t0:t1], mask, scale)
        dq[t0:t1], dk[t0:t1], dv[t0:t1] = gq, gk, gv
    return dq, dk, dv


@varlen_causal_attention_backward_op.register_fake
def _(grad, q, k, v, cu_seqlens, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, scale, backend = inputs
    ctx.save_for_backward(q, k, v, cu_seqlens)
    ctx.scale, ctx.backend = scale, backend


def _backward(ctx, grad):
    q, k, v, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = varlen_causal_attention_backward_op(grad.contiguous(), q, k, v, cu_seqlens, ctx.scale)
    return dq, dk, dv, None, None, None


varlen_causal_attention_op.register_autograd(_backward, setup_context=_setup_context)
see_through(varlen_causal_attention_op)
see_through(varlen_causal_attention_backward_op)
