"""Plain-PyTorch math for single-key cross-attention constants.

With one key/value (the sentence embedding e), softmax over keys is exactly 1, so a cross-attention
block outputs `W_o (W_v e + b_v) + b_o = W e + b` with `W = W_o W_v` and `b = W_o b_v + b_o`. These
helpers fold the two projections once and evaluate the constants for every layer in one GEMM.
"""
from __future__ import annotations

import torch
from torch import Tensor


def fold_cross_attention_torch(
    v_weight: Tensor, v_bias: Tensor | None, o_weight: Tensor, o_bias: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Return `(W[D,E], b[D])`, folded in float64 and cast back to `v_weight.dtype`."""
    out_dtype = v_weight.dtype
    wv = v_weight.detach().to(torch.float64)
    wo = o_weight.detach().to(torch.float64)
    weight = wo @ wv
    bias = torch.zeros(wo.shape[0], dtype=torch.float64, device=wo.device)
    if v_bias is not None:
        bias = bias + wo @ v_bias.detach().to(torch.float64)
    if o_bias is not None:
        bias = bias + o_bias.detach().to(torch.float64)
    return weight.to(out_dtype), bias.to(out_dtype)


def cross_attention_constants_torch(emb: Tensor, weight: Tensor, bias: Tensor, num_layers: int) -> Tensor:
    """`emb[B,E] @ weight[L*D,E]^T + bias[L*D]` reshaped to `[B, L, D]` (one addmm)."""
    out = torch.addmm(bias, emb, weight.t())
    return out.view(emb.shape[0], num_layers, weight.shape[0] // num_layers)
