"""Plain-PyTorch forward and backward of fused residual-add + LayerNorm.

Same contract as the Triton launchers in `triton_kernels/add_layer_norm.py`, on contiguous [M, N]
tensors, so the autograd Function in `functional/add_layer_norm.py` can use either. Built on ATen's
`native_layer_norm` / `native_layer_norm_backward` (one fused kernel each; statistics in fp32 for
fp16/bf16/fp32 inputs and fp64 for fp64), which also hand back the mean and reciprocal std the backward
needs. The residual sum is rounded to the input dtype before normalisation, as it is stored.
"""
from __future__ import annotations

import torch
from torch import Tensor


def add_layer_norm_fwd_torch(
    x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None, eps: float,
    store_sum: bool,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """Returns (normed in x.dtype, summed in x.dtype or None, mean [M, 1], rstd [M, 1])."""
    s = x + residual if residual is not None else x
    y, mean, rstd = torch.native_layer_norm(s, [x.shape[-1]], weight, bias, eps)
    return y, (s if store_sum else None), mean, rstd


def add_layer_norm_bwd_torch(
    dy: Tensor, dsum: Tensor | None, summed: Tensor, weight: Tensor | None, mean: Tensor, rstd: Tensor,
    need_dw: bool, need_db: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Returns (d_summed in summed.dtype, d_weight or None, d_bias or None)."""
    n = summed.shape[-1]
    # ATen allocates d_bias like `bias`; only its shape/dtype/device matter here
    bias_like = (weight if weight is not None else summed.new_empty(n)) if need_db else None
    dx, dw, db = torch.ops.aten.native_layer_norm_backward(
        dy, summed, [n], mean, rstd, weight, bias_like, [True, need_dw, need_db]
    )
    if dsum is not None:
        dx = dx + dsum
    return dx, (dw if need_dw else None), (db if need_db else None)
