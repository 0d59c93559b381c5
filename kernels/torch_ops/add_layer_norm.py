"""Plain-PyTorch forward and backward of fused residual-add + LayerNorm (fp32 statistics, fp64 for fp64).

Same contract as the Triton launchers in `triton_kernels/add_layer_norm.py`, on contiguous [M, N]
tensors, so the autograd Function in `functional/add_layer_norm.py` can use either. The backward is the
closed-form LayerNorm gradient, evaluated in fp32.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def add_layer_norm_fwd_torch(
    x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None, eps: float,
    store_sum: bool,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """Returns (normed in x.dtype, summed in x.dtype or None, mean [M], rstd [M]; statistics fp32, fp64 for fp64)."""
    acc = _acc_dtype(x.dtype)
    s = x.to(acc)
    if residual is not None:
        s = s + residual.to(acc)
    mean = s.mean(dim=-1)
    diff = s - mean[:, None]
    var = (diff * diff).mean(dim=-1)
    rstd = torch.rsqrt(var + eps)
    y = diff * rstd[:, None]
    if weight is not None:
        y = y * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    summed = s.to(x.dtype) if store_sum else None
    return y.to(x.dtype), summed, mean, rstd


def add_layer_norm_bwd_torch(
    dy: Tensor, dsum: Tensor | None, summed: Tensor, weight: Tensor | None, mean: Tensor, rstd: Tensor,
    need_dw: bool, need_db: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Returns (d_summed in summed.dtype, d_weight or None, d_bias or None; those two in fp32/fp64)."""
    n = summed.shape[-1]
    acc = _acc_dtype(summed.dtype)
    xhat = (summed.to(acc) - mean[:, None]) * rstd[:, None]
    dyf = dy.to(acc)
    wdy = dyf * weight.to(acc) if weight is not None else dyf
    c1 = (xhat * wdy).sum(dim=-1, keepdim=True) / n
    c2 = wdy.sum(dim=-1, keepdim=True) / n
    dx = (wdy - (xhat * c1 + c2)) * rstd[:, None]
    if dsum is not None:
        dx = dx + dsum.to(acc)
    dw = (dyf * xhat).sum(dim=0) if need_dw else None
    db = dyf.sum(dim=0) if need_db else None
    return dx.to(summed.dtype), dw, db
