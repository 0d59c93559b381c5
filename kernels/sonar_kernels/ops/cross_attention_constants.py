"""`sonar_kernels::cross_attention_constants`: every layer's folded cross-attention constant as a custom op.

Forward: `emb[B, E] @ weight[L*D, E]^T + bias` as `[B, L, D]` (one addmm, torch_ops/cross_attention_constants.py).
Backward (plain PyTorch, traceable): d_emb = g @ weight, and d_weight = g^T emb, d_bias = sum g only when the
(normally frozen) weight and bias require grad.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..torch_ops.cross_attention_constants import cross_attention_constants_torch
from .inline import see_through


@torch.library.custom_op("sonar_kernels::cross_attention_constants", mutates_args=())
def cross_attention_constants_op(emb: Tensor, weight: Tensor, bias: Tensor, num_layers: int) -> Tensor:
    """[B, L, D] constants; emb, weight and bias share a dtype."""
    return cross_attention_constants_torch(emb, weight, bias, num_layers)


@cross_attention_constants_op.register_fake
def _(emb, weight, bias, num_layers):
    return emb.new_empty(emb.shape[0], num_layers, weight.shape[0] // num_layers)


def _setup_context(ctx, inputs, output):
    emb, weight, bias, num_layers = inputs
    ctx.save_for_backward(emb, weight)


def _backward(ctx, grad):
    emb, weight = ctx.saved_tensors
    g = grad.reshape(grad.shape[0], -1)
    d_emb = g @ weight if ctx.needs_input_grad[0] else None
    d_weight = g.t() @ emb if ctx.needs_input_grad[1] else None
    d_bias = g.sum(0) if ctx.needs_input_grad[2] else None
    return d_emb, d_weight, d_bias, None


cross_attention_constants_op.register_autograd(_backward, setup_context=_setup_context)
see_through(cross_attention_constants_op)
