"""Fused residual-add + LayerNorm: the autograd Function and the user-facing `add_layer_norm`.

`add_layer_norm(x, residual, weight, bias)` returns `(LayerNorm(x + residual), x + residual)`, the pair
every pre-LN transformer sub-block boundary needs. The Function accepts upstream gradients for both
outputs; `d_x = d_residual = d_summed + LN'(d_normed)`. Weight/bias gradients are skipped when they do
not require grad. Triton or PyTorch is chosen by `backend.use_triton`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..backend import use_triton
from ..torch_ops.add_layer_norm import add_layer_norm_bwd_torch, add_layer_norm_fwd_torch


def _fwd(use_tri: bool):
    if use_tri:
        from ..triton_kernels.add_layer_norm import add_layer_norm_fwd_triton

        return add_layer_norm_fwd_triton
    return add_layer_norm_fwd_torch


def _bwd(use_tri: bool):
    if use_tri:
        from ..triton_kernels.add_layer_norm import add_layer_norm_bwd_triton

        return add_layer_norm_bwd_triton
    return add_layer_norm_bwd_torch


class AddLayerNormFunction(torch.autograd.Function):
    """Autograd Function over contiguous [M, N] tensors. Outputs (normed, summed) when `residual` is
    given, else (normed,) only (the caller returns x itself as `summed`)."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, use_tri):
        has_res = residual is not None
        y, s, mean, rstd = _fwd(use_tri)(x, residual, weight, bias, eps, has_res)
        saved_sum = s if has_res else x
        ctx.save_for_backward(saved_sum, weight, mean, rstd)
        ctx.use_tri = use_tri
        ctx.has_res = has_res
        ctx.has_bias = bias is not None
        ctx.set_materialize_grads(False)  # an unused output (often `summed`) gets None, not zeros
        if has_res:
            return y, s
        return (y,)

    @staticmethod
    def backward(ctx, dy, *rest):
        summed, weight, mean, rstd = ctx.saved_tensors
        dsum = rest[0] if ctx.has_res and rest else None
        if dy is None:
            dy = torch.zeros_like(summed)
        dy = dy.contiguous()
        if dsum is not None:
            dsum = dsum.contiguous()
        need_dw = weight is not None and ctx.needs_input_grad[2]
        need_db = ctx.has_bias and ctx.needs_input_grad[3]
        dx, dw, db = _bwd(ctx.use_tri)(dy, dsum, summed, weight, mean, rstd, need_dw, need_db)
        if dw is not None:
            dw = dw.to(weight.dtype)
        if db is not None:
            db = db.to(weight.dtype if weight is not None else summed.dtype)
        dres = dx if (ctx.has_res and ctx.needs_input_grad[1]) else None
        dxx = dx if ctx.needs_input_grad[0] else None
        return dxx, dres, dw, db, None, None


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
    outs = AddLayerNormFunction.apply(x2, r2, w, b, float(eps), use_tri)
    normed = outs[0].view(shape)
    summed = outs[1].view(shape) if residual is not None else x
    return normed, summed
