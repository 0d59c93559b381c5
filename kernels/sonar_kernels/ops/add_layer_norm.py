"""`sonar_kernels::add_layer_norm`: fused residual-add + LayerNorm as a torch.library custom op.

Forward op: `(normed, summed, mean, rstd)` on contiguous [M, N] tensors (`summed` is an empty [0] tensor
without a residual: an op output may not alias its input, and the wrapper returns x itself). Backward op:
`(d_summed, d_weight, d_bias)` (empty [0] for a gradient not asked for). Statistics are fp32 (fp64 for fp64
inputs) of shape [M].
- The PyTorch path (torch_ops/add_layer_norm.py) is the `custom_op` pair `sonar_kernels::add_layer_norm` /
  `add_layer_norm_backward` (`use_triton=False`).
- The Triton path (triton_kernels/add_layer_norm.py) is the `triton_op` pair
  `sonar_kernels::add_layer_norm_triton` / `add_layer_norm_triton_backward` (`triton_ops()`; registered at
  import where triton imports; see ops/triton_op.py for the interpreter). With torch < 2.6 (no triton_op) the
  custom ops run the Triton launchers instead (`use_triton=True`).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..backend import triton_available
from ..torch_ops.add_layer_norm import add_layer_norm_bwd_torch, add_layer_norm_fwd_torch
from .inline import see_through
from .triton_op import HAVE_TRITON_OP, triton_op


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _kernels(use_triton: bool):
    if use_triton:
        from ..triton_kernels.add_layer_norm import add_layer_norm_bwd_triton, add_layer_norm_fwd_triton

        return add_layer_norm_fwd_triton, add_layer_norm_bwd_triton
    return add_layer_norm_fwd_torch, add_layer_norm_bwd_torch


@torch.library.custom_op("sonar_kernels::add_layer_norm", mutates_args=())
def add_layer_norm_op(x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None, eps: float,
                      use_triton: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(LayerNorm(x + residual) * weight + bias, x + residual or [0], mean [M], rstd [M])."""
    has_res = residual is not None
    y, s, mean, rstd = _kernels(use_triton)[0](x, residual, weight, bias, eps, has_res)
    stat = _stat_dtype(x.dtype)
    summed = s if has_res else x.new_empty(0)
    return y, summed, mean.reshape(-1).to(stat).clone(), rstd.reshape(-1).to(stat).clone()


@add_layer_norm_op.register_fake
def _(x, residual, weight, bias, eps, use_triton):
    stat = _stat_dtype(x.dtype)
    m = x.shape[0]
    summed = x.new_empty(x.shape) if residual is not None else x.new_empty(0)
    return x.new_empty(x.shape), summed, x.new_empty(m, dtype=stat), x.new_empty(m, dtype=stat)


@torch.library.custom_op("sonar_kernels::add_layer_norm_backward", mutates_args=())
def add_layer_norm_backward_op(dy: Tensor, dsum: Tensor | None, summed: Tensor, weight: Tensor | None,
                               mean: Tensor, rstd: Tensor, need_dw: bool, need_db: bool, use_triton: bool
                               ) -> tuple[Tensor, Tensor, Tensor]:
    """(d_summed, d_weight or [0], d_bias or [0]) in the dtypes of summed / weight."""
    bwd = _kernels(use_triton)[1]
    if not use_triton:  # ATen's layer-norm backward takes [M, 1] statistics, in the input dtype on the CPU
        stat = summed.dtype if summed.device.type == "cpu" else mean.dtype
        mean, rstd = mean.view(-1, 1).to(stat), rstd.view(-1, 1).to(stat)
    dx, dw, db = bwd(dy, dsum, summed, weight, mean, rstd, need_dw, need_db)
    pdtype = weight.dtype if weight is not None else summed.dtype
    dw = dw.to(pdtype) if dw is not None else summed.new_empty(0)
    db = db.to(pdtype) if db is not None else summed.new_empty(0)
    return dx, dw, db


@add_layer_norm_backward_op.register_fake
def _(dy, dsum, summed, weight, mean, rstd, need_dw, need_db, use_triton):
    n = summed.shape[-1]
    pdtype = weight.dtype if weight is not None else summed.dtype
    dw = summed.new_empty(n, dtype=pdtype) if need_dw else summed.new_empty(0)
    db = summed.new_empty(n, dtype=pdtype) if need_db else summed.new_empty(0)
    return summed.new_empty(summed.shape), dw, db


def _save(ctx, x, residual, weight, bias, output, use_triton: bool) -> None:
    _, summed, mean, rstd = output
    has_res = residual is not None
    ctx.save_for_backward(summed if has_res else x, weight, mean, rstd)
    ctx.has_res, ctx.has_bias, ctx.use_triton = has_res, bias is not None, use_triton


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, _eps, use_triton = inputs
    _save(ctx, x, residual, weight, bias, output, use_triton)


def _grads(ctx, dy, dsum, backward_op):
    """(d_x, d_residual, d_weight, d_bias) through `backward_op(dy, dsum, summed, weight, mean, rstd, need_dw,
    need_db)`."""
    summed, weight, mean, rstd = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(summed)
    dsum = dsum.contiguous() if (ctx.has_res and dsum is not None) else None
    need_dw = weight is not None and ctx.needs_input_grad[2]
    need_db = ctx.has_bias and ctx.needs_input_grad[3]
    dx, dw, db = backward_op(dy.contiguous(), dsum, summed, weight, mean, rstd, need_dw, need_db)
    dres = dx if (ctx.has_res and ctx.needs_input_grad[1]) else None
    dxx = dx if ctx.needs_input_grad[0] else None
    return dxx, dres, (dw if need_dw else None), (db if need_db else None)


def _backward(ctx, dy, dsum, _dmean, _drstd):
    use_triton = ctx.use_triton
    grads = _grads(ctx, dy, dsum, lambda *a: add_layer_norm_backward_op(*a, use_triton))
    return (*grads, None, None)


add_layer_norm_op.register_autograd(_backward, setup_context=_setup_context)
see_through(add_layer_norm_op)
see_through(add_layer_norm_backward_op)


# ---------------------------------------------------------------------------------- Triton path: triton_ops
def _triton_fwd_fake(x, residual, weight, bias, eps):
    m = x.shape[0]
    summed = x.new_empty(x.shape) if residual is not None else x.new_empty(0)
    return x.new_empty(x.shape), summed, x.new_empty(m, dtype=torch.float32), x.new_empty(m, dtype=torch.float32)


def _triton_bwd_fake(dy, dsum, summed, weight, mean, rstd, need_dw, need_db):
    n = summed.shape[-1]
    pdtype = weight.dtype if weight is not None else summed.dtype
    dw = summed.new_empty(n, dtype=pdtype) if need_dw else summed.new_empty(0)
    db = summed.new_empty(n, dtype=pdtype) if need_db else summed.new_empty(0)
    return summed.new_empty(summed.shape), dw, db


def _register_triton_ops():
    from ..triton_kernels.add_layer_norm import add_layer_norm_bwd_triton, add_layer_norm_fwd_triton

    @triton_op("sonar_kernels::add_layer_norm_triton", _triton_fwd_fake)
    def fwd_op(x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None, eps: float
               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(LayerNorm(x + residual) * weight + bias, x + residual or [0], mean [M], rstd [M]) by the Triton kernel."""
        y, s, mean, rstd = add_layer_norm_fwd_triton(x, residual, weight, bias, eps, residual is not None)
        return y, (s if residual is not None else x.new_empty(0)), mean, rstd

    @triton_op("sonar_kernels::add_layer_norm_triton_backward", _triton_bwd_fake)
    def bwd_op(dy: Tensor, dsum: Tensor | None, summed: Tensor, weight: Tensor | None, mean: Tensor, rstd: Tensor,
               need_dw: bool, need_db: bool) -> tuple[Tensor, Tensor, Tensor]:
        """(d_summed, d_weight or [0], d_bias or [0]) by the Triton kernel, in the dtypes of summed / weight."""
        dx, dw, db = add_layer_norm_bwd_triton(dy, dsum, summed, weight, mean, rstd, need_dw, need_db)
        pdtype = weight.dtype if weight is not None else summed.dtype
        dw = dw.to(pdtype) if dw is not None else summed.new_empty(0)
        db = db.to(pdtype) if db is not None else summed.new_empty(0)
        return dx, dw, db

    def setup_context(ctx, inputs, output):
        x, residual, weight, bias, _eps = inputs
        _save(ctx, x, residual, weight, bias, output, True)

    def backward(ctx, dy, dsum, _dmean, _drstd):
        return (*_grads(ctx, dy, dsum, bwd_op), None)

    fwd_op.register_autograd(backward, setup_context=setup_context)
    see_through(fwd_op)
    see_through(bwd_op)
    return fwd_op, bwd_op


# Registered at import where triton imports (this imports triton, so TRITON_INTERPRET must be set before
# sonar_kernels is imported), not on first use: a first use inside a compiled region would have dynamo trace
# the registration.
_TRITON_OPS = _register_triton_ops() if (HAVE_TRITON_OP and triton_available()) else None


def triton_ops():
    """(forward op, backward op) of the Triton path as torch.library.triton_ops, or None without triton or
    without triton_op (torch < 2.6). Same contract as the custom ops; statistics fp32 (the Triton path never
    takes fp64)."""
    return _TRITON_OPS
