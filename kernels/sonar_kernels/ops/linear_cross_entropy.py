"""`sonar_kernels::linear_cross_entropy`: the fused linear cross-entropy as a torch.library custom op.

The forward op runs one backend's kernels ("torch": torch_ops/, "triton": triton_kernels/, "native": the
compiled CPU library through native.py) and reduces the per-token rows: it returns
`(loss, lse, d_hidden_unit, count)`, where `d_hidden_unit` is d loss_i / d hidden_i for a unit upstream
gradient (the "grad_in_forward" strategy; an empty [0] tensor otherwise) and `count` the number of
non-ignored tokens (at least 1). The autograd formula either scales `d_hidden_unit` (plain PyTorch,
traceable) or calls the backward op `sonar_kernels::linear_cross_entropy_backward`, which recomputes the
logits chunk by chunk (or tile by tile). Target values are checked inside the op (`check_targets`), where a
compiled graph never sees the host read.
- The torch and native backends (and "triton" where torch has no triton_op, torch < 2.6) run in the `custom_op`
  pair `sonar_kernels::linear_cross_entropy` / `linear_cross_entropy_backward` (argument `backend`).
- The Triton path (triton_kernels/linear_cross_entropy.py) is the `triton_op` pair
  `sonar_kernels::linear_cross_entropy_triton` / `linear_cross_entropy_triton_backward` (`triton_ops()`; the
  same arguments without `backend`; registered at import where triton imports; see ops/triton_op.py for the
  interpreter). `linear_cross_entropy_call` picks the op for a backend.
"""
from __future__ import annotations

import torch

from ..torch_ops import linear_cross_entropy as _torch_lce
from .inline import see_through
from .triton_op import finish_pair, register_at_import, triton_op

BACKENDS = ("torch", "triton", "native")


def backend_module(backend: str):
    """The module with `forward` / `backward` / `forward_with_grad` of a backend: "torch", "triton", "native"."""
    if backend == "triton":
        from ..triton_kernels import linear_cross_entropy as _triton_lce

        return _triton_lce
    if backend == "native":
        from .. import native as _native

        return _native
    return _torch_lce


def check_targets(target: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Raise when a target is neither in [0, V) nor ignore_index. CPU: ValueError with the value found.
    CUDA: an asynchronous device-side assert (no host sync); it surfaces at the next synchronising call."""
    if target.numel() == 0:
        return
    bad = ((target < 0) | (target >= num_classes)) & (target != ignore_index)
    if target.device.type == "cpu":
        if bool(bad.any()):
            value = int(target[bad][0])
            raise ValueError(f"target values must be in [0, {num_classes}) or ignore_index={ignore_index}, "
                             f"found {value} (sonar_kernels linear_cross_entropy)")
        return
    torch._assert_async(~bad.any(), f"linear_cross_entropy: a target is outside [0, {num_classes}) "
                                    f"and is not ignore_index={ignore_index}")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _autocast_off(device: torch.device):
    """Autocast off for this device's ops: the kernels compute in the precision they document (fp32 logits and
    softmax) whether or not the caller runs under torch.autocast."""
    return torch.autocast(device_type=device.type, enabled=False)


def _reduce(rows: torch.Tensor, count: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return rows
    return rows.sum() if reduction == "sum" else rows.sum() / count


def row_scale(grad_loss: torch.Tensor, count: torch.Tensor, reduction: str, n: int) -> torch.Tensor:
    """d loss / d loss_i for every row [N] (float32/64): the upstream gradient times the reduction's scale."""
    if reduction == "none":
        return grad_loss.to(count.dtype)
    if reduction == "sum":
        return grad_loss.to(count.dtype).expand(n)
    return (grad_loss.to(count.dtype) / count).expand(n)


def _forward(mod, hidden, weight, target, bias, ignore_index, reduction, label_smoothing, z_loss, grad_in_forward,
             chunk_size, validate_targets):
    """The forward op's body with backend module `mod` (the custom op's and the Triton triton_op's)."""
    if validate_targets:
        check_targets(target, weight.shape[0], ignore_index)
    with _autocast_off(hidden.device):
        if grad_in_forward:
            kw = {"chunk_size": chunk_size} if chunk_size else {}
            rows, lse, d_hidden = mod.forward_with_grad(
                hidden, weight, target, bias, ignore_index=ignore_index, label_smoothing=label_smoothing,
                z_loss=z_loss, **kw)
        else:
            rows, lse = mod.forward(hidden, weight, target, bias, ignore_index=ignore_index,
                                    label_smoothing=label_smoothing)
            if z_loss:
                rows = torch.where(target != ignore_index, rows + z_loss * lse * lse, rows)
            d_hidden = hidden.new_empty(0)
        count = (target != ignore_index).sum().clamp_min(1).to(rows.dtype)
        loss = _reduce(rows, count, reduction)
    return loss, lse, d_hidden, count


def _forward_fake(hidden, weight, target, bias, ignore_index, reduction, label_smoothing, z_loss, grad_in_forward,
                  chunk_size, validate_targets):
    n = hidden.shape[0]
    acc = _acc_dtype(hidden.dtype)
    loss = hidden.new_empty(n, dtype=acc) if reduction == "none" else hidden.new_empty((), dtype=acc)
    d_hidden = hidden.new_empty(hidden.shape) if grad_in_forward else hidden.new_empty(0)
    return loss, hidden.new_empty(n, dtype=acc), d_hidden, hidden.new_empty((), dtype=acc)


def _backward_body(mod, hidden, weight, target, bias, lse, grad_rows, ignore_index, label_smoothing, z_loss,
                   need_hidden, need_weight, need_bias):
    """The backward op's body with backend module `mod` (the custom op's and the Triton triton_op's)."""
    kw = {"z_loss": z_loss} if z_loss else {}
    with _autocast_off(hidden.device):
        dh, dw, db = mod.backward(
            hidden, weight, target, bias, lse, grad_rows, ignore_index=ignore_index,
            label_smoothing=label_smoothing, need_hidden=need_hidden, need_weight=need_weight, need_bias=need_bias,
            **kw)
    empty = hidden.new_empty(0)
    return (dh.to(hidden.dtype) if need_hidden else empty,
            dw.to(weight.dtype) if need_weight else empty.clone(),
            db.to(bias.dtype) if need_bias else empty.clone())


def _backward_fake(hidden, weight, target, bias, lse, grad_rows, ignore_index, label_smoothing, z_loss, need_hidden,
                   need_weight, need_bias):
    return (hidden.new_empty(hidden.shape) if need_hidden else hidden.new_empty(0),
            weight.new_empty(weight.shape) if need_weight else hidden.new_empty(0),
            bias.new_empty(bias.shape) if need_bias else hidden.new_empty(0))


def _save(ctx, inputs, output) -> None:
    """setup_context of both forward ops; `inputs` without the custom op's `backend`."""
    (hidden, weight, target, bias, ignore_index, reduction, label_smoothing, z_loss, grad_in_forward, _chunk,
     _validate) = inputs
    _, lse, d_hidden, count = output
    if grad_in_forward:
        ctx.save_for_backward(d_hidden, count)
    else:
        ctx.save_for_backward(hidden, weight, target, bias, lse, count)
    ctx.mark_non_differentiable(lse, d_hidden, count)
    ctx.settings = (ignore_index, reduction, float(label_smoothing), float(z_loss), grad_in_forward,
                    bias is not None)


def _grads(ctx, grad_loss, backward_op):
    """(d_hidden, d_weight, d_bias), each None when not needed; `backward_op` takes `_backward_body`'s
    arguments after `mod`."""
    ignore_index, reduction, label_smoothing, z_loss, grad_in_forward, has_bias = ctx.settings
    if grad_loss is None:
        return None, None, None
    if grad_in_forward:
        d_hidden_unit, count = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        g = row_scale(grad_loss, count, reduction, d_hidden_unit.shape[0])
        d_hidden = (d_hidden_unit * g[:, None].to(d_hidden_unit.dtype) if d_hidden_unit.dtype == g.dtype
                    else (d_hidden_unit.to(g.dtype) * g[:, None]).to(d_hidden_unit.dtype))
        return d_hidden, None, None
    hidden, weight, target, bias, lse, count = ctx.saved_tensors
    need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_b = has_bias and ctx.needs_input_grad[3]
    if not (need_h or need_w or need_b):
        return None, None, None
    g = row_scale(grad_loss, count, reduction, hidden.shape[0]).contiguous()
    dh, dw, db = backward_op(hidden, weight, target, bias, lse, g, ignore_index, label_smoothing, z_loss, need_h,
                             need_w, need_b)
    return dh if need_h else None, dw if need_w else None, db if need_b else None


# ------------------------------------------------------------- custom ops: every backend (torch, native; triton
# where torch has no triton_op)
@torch.library.custom_op("sonar_kernels::linear_cross_entropy", mutates_args=())
def linear_cross_entropy_op(
    hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None,
    ignore_index: int, reduction: str, label_smoothing: float, z_loss: float, backend: str,
    grad_in_forward: bool, chunk_size: int, validate_targets: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, lse [N], d_hidden_unit [N, D] or [0], count []); `chunk_size` 0 = the backend's default."""
    return _forward(backend_module(backend), hidden, weight, target, bias, ignore_index, reduction,
                    label_smoothing, z_loss, grad_in_forward, chunk_size, validate_targets)


@linear_cross_entropy_op.register_fake
def _(hidden, weight, target, bias, ignore_index, reduction, label_smoothing, z_loss, backend, grad_in_forward,
      chunk_size, validate_targets):
    return _forward_fake(hidden, weight, target, bias, ignore_index, reduction, label_smoothing, z_loss,
                         grad_in_forward, chunk_size, validate_targets)


@torch.library.custom_op("sonar_kernels::linear_cross_entropy_backward", mutates_args=())
def linear_cross_entropy_backward_op(
    hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None,
    lse: torch.Tensor, grad_rows: torch.Tensor, ignore_index: int, label_smoothing: float, z_loss: float,
    need_hidden: bool, need_weight: bool, need_bias: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d_hidden, d_weight, d_bias) of sum_i grad_rows[i] * loss_i; a gradient not asked for is an empty [0]."""
    return _backward_body(backend_module(backend), hidden, weight, target, bias, lse, grad_rows, ignore_index,
                          label_smoothing, z_loss, need_hidden, need_weight, need_bias)


@linear_cross_entropy_backward_op.register_fake
def _(hidden, weight, target, bias, lse, grad_rows, ignore_index, label_smoothing, z_loss, need_hidden,
      need_weight, need_bias, backend):
    return _backward_fake(hidden, weight, target, bias, lse, grad_rows, ignore_index, label_smoothing, z_loss,
                          need_hidden, need_weight, need_bias)


def _setup_context(ctx, inputs, output):
    _save(ctx, inputs[:8] + inputs[9:], output)
    ctx.backend = inputs[8]


def _backward(ctx, grad_loss, _grad_lse, _grad_dh, _grad_count):
    backend = ctx.backend
    dh, dw, db = _grads(ctx, grad_loss, lambda *a: linear_cross_entropy_backward_op(*a, backend))
    return (dh, dw, None, db) + (None,) * 8


linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)
see_through(linear_cross_entropy_op)
see_through(linear_cross_entropy_backward_op)


# ---------------------------------------------------------------------------------- Triton path: triton_ops
def _register_triton_ops():
    from ..triton_kernels import linear_cross_entropy as tri

    @triton_op("sonar_kernels::linear_cross_entropy_triton", _forward_fake)
    def fwd_op(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None,
               ignore_index: int, reduction: str, label_smoothing: float, z_loss: float, grad_in_forward: bool,
               chunk_size: int, validate_targets: bool
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """`linear_cross_entropy_op` with backend "triton", by the Triton kernels."""
        return _forward(tri, hidden, weight, target, bias, ignore_index, reduction, label_smoothing, z_loss,
                        grad_in_forward, chunk_size, validate_targets)

    @triton_op("sonar_kernels::linear_cross_entropy_triton_backward", _backward_fake)
    def bwd_op(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None,
               lse: torch.Tensor, grad_rows: torch.Tensor, ignore_index: int, label_smoothing: float, z_loss: float,
               need_hidden: bool, need_weight: bool, need_bias: bool
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`linear_cross_entropy_backward_op` with backend "triton", by the Triton kernels."""
        return _backward_body(tri, hidden, weight, target, bias, lse, grad_rows, ignore_index, label_smoothing,
                              z_loss, need_hidden, need_weight, need_bias)

    def backward(ctx, grad_loss, _grad_lse, _grad_dh, _grad_count):
        dh, dw, db = _grads(ctx, grad_loss, bwd_op)
        return (dh, dw, None, db) + (None,) * 7

    return finish_pair(fwd_op, bwd_op, backward, _save)


_TRITON_OPS = register_at_import(_register_triton_ops)


def triton_ops():
    """(forward op, backward op) of the Triton path as torch.library.triton_ops (the custom ops' contract without
    `backend`), or None without triton or without triton_op (torch < 2.6)."""
    return _TRITON_OPS


def linear_cross_entropy_call(hidden, weight, target, bias, ignore_index, reduction, label_smoothing, z_loss,
                              backend, grad_in_forward, chunk_size, validate_targets):
    """`linear_cross_entropy_op`'s outputs by the op that runs `backend`: the triton_op for "triton" where
    torch has triton_op, else the custom op."""
    args = (hidden, weight, target, bias, ignore_index, reduction, label_smoothing, z_loss)
    rest = (grad_in_forward, chunk_size, validate_targets)
    if backend == "triton" and _TRITON_OPS is not None:
        return _TRITON_OPS[0](*args, *rest)
    return linear_cross_entropy_op(*args, backend, *rest)
