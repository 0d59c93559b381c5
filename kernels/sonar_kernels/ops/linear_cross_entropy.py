"""`sonar_kernels::linear_cross_entropy`: the fused linear cross-entropy as a torch.library custom op.

The forward op runs one backend's kernels ("torch": torch_ops/, "triton": triton_kernels/, "native": the
compiled CPU library through native.py) and reduces the per-token rows: it returns
`(loss, lse, d_hidden_unit, count)`, where `d_hidden_unit` is d loss_i / d hidden_i for a unit upstream
gradient (the "grad_in_forward" strategy; an empty [0] tensor otherwise) and `count` the number of
non-ignored tokens (at least 1). The autograd formula either scales `d_hidden_unit` (plain PyTorch,
traceable) or calls the backward op `sonar_kernels::linear_cross_entropy_backward`, which recomputes the
logits chunk by chunk (or tile by tile). Target values are checked inside the op (`check_targets`), where a
compiled graph never sees the host read.
"""
from __future__ import annotations

import torch

from ..torch_ops import linear_cross_entropy as _torch_lce
from .inline import see_through

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


@torch.library.custom_op("sonar_kernels::linear_cross_entropy", mutates_args=())
def linear_cross_entropy_op(
    hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None,
    ignore_index: int, reduction: str, label_smoothing: float, z_loss: float, backend: str,
    grad_in_forward: bool, chunk_size: int, validate_targets: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, lse [N], d_hidden_unit [N, D] or [0], count []); `chunk_size` 0 = the backend's default."""
    if validate_targets:
        check_targets(target, weight.shape[0], ignore_index)
    mod = backend_module(backend)
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


@linear_cross_entropy_op.register_fake
def _(hidden, weight, target, bias, ignore_index, reduction, label_smoothing, z_loss, backend, grad_in_forward,
      chunk_size, validate_targets):
    n = hidden.shape[0]
    acc = _acc_dtype(hidden.dtype)
    loss = hidden.new_empty(n, dtype=acc) if reduction == "none" else hidden.new_empty((), dtype=acc)
    d_hidden = hidden.new_empty(hidden.shape) if grad_in_forward else hidden.new_empty(0)
    return loss, hidden.new_empty(n, dtype=acc), d_hidden, hidden.new_empty((), dtype=acc)


@torch.library.custom_op("sonar_kernels::linear_cross_entropy_backward", mutates_args=())
def linear_cross_entropy_backward_op(
    hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None,
    lse: torch.Tensor, grad_rows: torch.Tensor, ignore_index: int, label_smoothing: float, z_loss: float,
    need_hidden: bool, need_weight: bool, need_bias: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d_hidden, d_weight, d_bias) of sum_i grad_rows[i] * loss_i; a gradient not asked for is an empty [0]."""
    kw = {"z_loss": z_loss} if z_loss else {}
    with _autocast_off(hidden.device):
        dh, dw, db = backend_module(backend).backward(
            hidden, weight, target, bias, lse, grad_rows, ignore_index=ignore_index,
            label_smoothing=label_smoothing, need_hidden=need_hidden, need_weight=need_weight, need_bias=need_bias,
            **kw)
    empty = hidden.new_empty(0)
    return (dh.to(hidden.dtype) if need_hidden else empty,
            dw.to(weight.dtype) if need_weight else empty.clone(),
            db.to(bias.dtype) if need_bias else empty.clone())


@linear_cross_entropy_backward_op.register_fake
def _(hidden, weight, target, bias, lse, grad_rows, ignore_index, label_smoothing, z_loss, need_hidden,
      need_weight, need_bias, backend):
    return (hidden.new_empty(hidden.shape) if need_hidden else hidden.new_empty(0),
            weight.new_empty(weight.shape) if need_weight else hidden.new_empty(0),
            bias.new_empty(bias.shape) if need_bias else hidden.new_empty(0))


def _setup_context(ctx, inputs, output):
    (hidden, weight, target, bias, ignore_index, reduction, label_smoothing, z_loss, backend, grad_in_forward,
     _chunk, _validate) = inputs
    _, lse, d_hidden, count = output
    if grad_in_forward:
        ctx.save_for_backward(d_hidden, count)
    else:
        ctx.save_for_backward(hidden, weight, target, bias, lse, count)
    ctx.mark_non_differentiable(lse, d_hidden, count)
    ctx.settings = (ignore_index, reduction, float(label_smoothing), float(z_loss), backend, grad_in_forward,
                    bias is not None)


def _backward(ctx, grad_loss, _grad_lse, _grad_dh, _grad_count):
    ignore_index, reduction, label_smoothing, z_loss, backend, grad_in_forward, has_bias = ctx.settings
    none = (None,) * 12
    if grad_loss is None:
        return none
    if grad_in_forward:
        d_hidden_unit, count = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return none
        g = row_scale(grad_loss, count, reduction, d_hidden_unit.shape[0])
        d_hidden = (d_hidden_unit * g[:, None].to(d_hidden_unit.dtype) if d_hidden_unit.dtype == g.dtype
                    else (d_hidden_unit.to(g.dtype) * g[:, None]).to(d_hidden_unit.dtype))
        return (d_hidden,) + none[1:]
    hidden, weight, target, bias, lse, count = ctx.saved_tensors
    need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_b = has_bias and ctx.needs_input_grad[3]
    if not (need_h or need_w or need_b):
        return none
    g = row_scale(grad_loss, count, reduction, hidden.shape[0]).contiguous()
    dh, dw, db = linear_cross_entropy_backward_op(hidden, weight, target, bias, lse, g, ignore_index,
                                                  label_smoothing, z_loss, need_h, need_w, need_b, backend)
    return (dh if need_h else None, dw if need_w else None, None, db if need_b else None) + none[4:]


linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)
see_through(linear_cross_entropy_op)
see_through(linear_cross_entropy_backward_op)
