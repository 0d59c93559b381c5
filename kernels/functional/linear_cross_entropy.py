"""User-facing fused linear cross-entropy: `linear_cross_entropy(hidden, weight, target, ...)`.

Same value and gradients as `F.cross_entropy(hidden @ weight.T + bias, target, ...)` without ever
materialising the [N, V] logits: the forward saves only the per-token log-sum-exp and the backward
recomputes logits tile by tile (Triton) or chunk by chunk (PyTorch). Gradients w.r.t. `weight`/`bias` are
computed only when those tensors require grad, so a frozen output projection costs no weight-gradient work.

Differences from F.cross_entropy: "mean" over a batch whose targets are all `ignore_index` is 0 (with zero
gradients) instead of NaN; the loss is float32 whatever the input dtype (float64 for float64 inputs).
"""
from __future__ import annotations

import torch

from ..backend import use_triton
from ..torch_ops import linear_cross_entropy as _torch_lce

REDUCTIONS = ("mean", "sum", "none")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _backend_module(backend: str):
    """The module with `forward(...)`/`backward(...)` for a backend: "torch", "triton" or "native"."""
    if backend == "triton":
        from ..triton_kernels import linear_cross_entropy as _triton_lce

        return _triton_lce
    if backend == "native":
        from .. import native as _native

        return _native
    return _torch_lce


def _validate(hidden, weight, target, bias, ignore_index, reduction, label_smoothing) -> None:
    """Raise TypeError/ValueError naming the offending argument."""
    for name, t in (("hidden", hidden), ("weight", weight), ("target", target)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be 2-D [N, D], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [V, D], got shape {tuple(weight.shape)}")
    n, d = hidden.shape
    v = weight.shape[0]
    if weight.shape[1] != d:
        raise ValueError(
            f"hidden [N, D] = {tuple(hidden.shape)} and weight [V, D] = {tuple(weight.shape)} disagree on D"
        )
    if v == 0 or d == 0:
        raise ValueError(f"weight must have V >= 1 and D >= 1, got shape {tuple(weight.shape)}")
    if target.shape != (n,):
        raise ValueError(f"target must have shape [N] = ({n},) to match hidden, got {tuple(target.shape)}")
    if bias is not None and bias.shape != (v,):
        raise ValueError(f"bias must have shape [V] = ({v},) to match weight, got {tuple(bias.shape)}")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"hidden must be float16/bfloat16/float32/float64, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    if bias is not None and bias.dtype != hidden.dtype:
        raise TypeError(f"bias dtype {bias.dtype} must match hidden dtype {hidden.dtype}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"target must be an integer tensor (int64), got {target.dtype}")
    devices = {t.device for t in (hidden, weight, target, bias) if t is not None}
    if len(devices) != 1:
        names = ", ".join(
            f"{nm}={t.device}" for nm, t in (("hidden", hidden), ("weight", weight), ("target", target), ("bias", bias))
            if t is not None
        )
        raise ValueError(f"all tensors must be on one device, got {names}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if target.device.type == "cpu" and n > 0:  # cheap here; on a GPU this check would force a sync
        valid = target != ignore_index
        if bool(((target < 0) | (target >= v)).logical_and_(valid).any()):
            bad = target[valid & ((target < 0) | (target >= v))][0].item()
            raise ValueError(f"target values must be in [0, {v}) or ignore_index={ignore_index}, found {bad}")


class LinearCrossEntropyFunction(torch.autograd.Function):
    """autograd.Function: (loss, lse) from hidden/weight/bias; lse is not differentiable."""

    @staticmethod
    def forward(ctx, hidden, weight, target, bias, ignore_index, reduction, label_smoothing, backend):
        rows, lse = _backend_module(backend).forward(hidden, weight, target, bias, ignore_index=ignore_index,
                                 label_smoothing=label_smoothing)
        valid = target != ignore_index
        count = valid.sum().clamp_min(1).to(rows.dtype)
        if reduction == "none":
            loss = rows
        elif reduction == "sum":
            loss = rows.sum()
        else:
            loss = rows.sum() / count
        ctx.save_for_backward(hidden, weight, target, bias, lse, count)
        ctx.ignore_index = ignore_index
        ctx.reduction = reduction
        ctx.label_smoothing = label_smoothing
        ctx.backend = backend
        ctx.mark_non_differentiable(lse)
        return loss, lse

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        hidden, weight, target, bias, lse, count = ctx.saved_tensors
        need_h, need_w, _, need_b = ctx.needs_input_grad[:4]
        need_b = need_b and bias is not None
        if grad_loss is None or not (need_h or need_w or need_b):
            return (None,) * 8
        n = hidden.shape[0]
        acc = lse.dtype
        if ctx.reduction == "none":
            grad_rows = grad_loss.to(acc)
        elif ctx.reduction == "sum":
            grad_rows = grad_loss.to(acc).expand(n)
        else:
            grad_rows = (grad_loss.to(acc) / count).expand(n)
        d_hidden, d_weight, d_bias = _backend_module(ctx.backend).backward(
            hidden, weight, target, bias, lse, grad_rows.contiguous(), ignore_index=ctx.ignore_index,
            label_smoothing=ctx.label_smoothing, need_hidden=need_h, need_weight=need_w, need_bias=need_b,
        )
        return d_hidden, d_weight, None, d_bias, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    return_lse: bool = False,
    impl: str = "auto",
):
    """Cross-entropy of `hidden @ weight.T + bias` against `target` without materialising the logits.

    hidden [N, D] and weight [V, D] share a float dtype (fp16/bf16/fp32; fp64 on the PyTorch path),
    target [N] holds class ids or `ignore_index`, bias [V] is optional. Returns the loss (scalar for
    "mean"/"sum", [N] for "none" with 0 on ignored rows), float32, and with `return_lse=True` also the
    per-token log-sum-exp [N] (float32; not differentiable), from which perplexity or the probability
    of any class follows without a second pass. `impl` is "auto" | "triton" | "torch" | "native" (see backend.py;
    "native" is the optional compiled CPU library, see kernels/native.py; "auto" does not pick it).
    """
    _validate(hidden, weight, target, bias, ignore_index, reduction, label_smoothing)
    from .. import native as _native  # imported here so `python -m sonar_kernels.native` runs cleanly

    if target.dtype != torch.int64:
        target = target.long()
    if hidden.dtype == torch.float64 and impl == "triton":
        raise TypeError("impl='triton' does not support float64 inputs; use impl='torch' or 'auto'")
    if (impl == "native" or hidden.dtype != torch.float64) and _native.use_native(impl, hidden, weight, target, bias):
        backend = "native"  # "auto" sends float64 (reference computations) to the PyTorch path
    elif hidden.dtype != torch.float64 and use_triton(impl, hidden, weight, target, bias):
        backend = "triton"
    else:
        backend = "torch"
    loss, lse = LinearCrossEntropyFunction.apply(
        hidden, weight, target, bias, ignore_index, reduction, float(label_smoothing), backend
    )
    return (loss, lse) if return_lse else loss
