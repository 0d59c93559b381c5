"""Fused residual-add + LayerNorm: the user-facing `add_layer_norm` (the op and its autograd: ops/add_layer_norm.py).

`add_layer_norm(x, residual, weight, bias)` returns `(LayerNorm(x + residual), x + residual)`, the pair
every pre-LN transformer sub-block boundary needs. The op accepts upstream gradients for both
outputs; `d_x = d_residual = d_summed + LN'(d_normed)`. Weight/bias gradients are skipped when they do
not require grad. Triton or PyTorch is chosen by `backend.use_triton`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..backend import use_triton
from ..ops.add_layer_norm import add_layer_norm_op, triton_ops


def add_layer_norm(
    x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None,
    eps: float = 1e-5, impl: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Return `(normed, summed)`: `summed = x + residual` (or `x` when `residual` is None) and
    `normed = LayerNorm(summed) * weight + bias` over the last dimension, statistics in fp32.

    `x` and `residual`: same shape `[..., N]` and dtype; `weight`, `bias`: `[N]` or None. Outputs are in
    `x.dtype`. Differentiable with respect to x, residual, weight and bias. float64 inputs always run the
    PyTorch path with float64 statistics.
    `impl`: "auto" | "triton" | "torch" (see `sonar_kernels.backend`).
    """
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise ValueError(f"x must be a tensor with at least 1 dimension, got {getattr(x, 'shape', type(x))}")
    if not x.is_floating_point():
        raise TypeError(f"x must be floating point, got {x.dtype}")
    n = x.shape[-1]
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"residual shape {tuple(residual.shape)} must equal x shape {tuple(x.shape)}")
        if residual.dtype != x.dtype:
            raise TypeError(f"residual dtype {residual.dtype} must equal x dtype {x.dtype}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and tuple(p.shape) != (n,):
            raise ValueError(f"{name} must have shape ({n},), got {tuple(p.shape)}")
    if eps <= 0:
        raise ValueError(f"eps must be positive, got {eps}")
    # float64 (tests, references) always takes the PyTorch path with float64 statistics
    use_tri = use_triton(impl, x, residual, weight, bias) and x.dtype != torch.float64
    shape = x.shape
    x2 = x.reshape(-1, n).contiguous()
    r2 = residual.reshape(-1, n).contiguous() if residual is not None else None
    w = weight.contiguous() if weight is not None else None
    b = bias.contiguous() if bias is not None else None
    ops = triton_ops() if use_tri else None  # the Triton path's triton_op, where torch has triton_op
    if ops is not None:
        normed, summed, _, _ = ops[0](x2, r2, w, b, float(eps))
    else:
        normed, summed, _, _ = add_layer_norm_op(x2, r2, w, b, float(eps), use_tri)
    normed = normed.view(shape)
    summed = summed.view(shape) if residual is not None else x
    return normed, summed
