"""User-facing fused linear cross-entropy: `linear_cross_entropy(hidden, weight, target, ...)`.

Same value and gradients as `F.cross_entropy(hidden @ weight.T + bias, target, ...)` without ever
materialising the [N, V] logits. Two strategies: with a frozen weight (the SONAR case) the forward already
computes d_hidden per chunk of tokens for a unit upstream gradient ("grad_in_forward": two matrix products,
the floor) and the backward only scales it; with a trainable weight the forward saves the per-token
log-sum-exp and the backward recomputes logits tile by tile (Triton) or chunk by chunk (PyTorch, native)
("recompute": three products with d_weight). Gradients w.r.t. `weight`/`bias` are computed only when
those tensors require grad.

Differences from F.cross_entropy: "mean" over a batch whose targets are all `ignore_index` is 0 (with zero
gradients) instead of NaN; the loss is float32 whatever the input dtype (float64 for float64 inputs).
"""
from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class _Options:
    """The non-tensor settings of one call (see `linear_cross_entropy`)."""

    ignore_index: int
    reduction: str
    label_smoothing: float
    z_loss: float
    backend: str  # "torch" | "triton" | "native"
    grad_in_forward: bool
    chunk_size: int | None  # tokens per chunk of the grad-in-forward strategy (None: the backend's default)


def _reduce(rows: torch.Tensor, count: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return rows
    return rows.sum() if reduction == "sum" else rows.sum() / count


def _row_scale(grad_loss: torch.Tensor, count: torch.Tensor, reduction: str, n: int) -> torch.Tensor:
    """d loss / d loss_i for every row [N] (float32/64): the upstream gradient times the reduction's scale."""
    if reduction == "none":
        return grad_loss.to(count.dtype)
    if reduction == "sum":
        return grad_loss.to(count.dtype).expand(n)
    return (grad_loss.to(count.dtype) / count).expand(n)


def _autocast_off(device: torch.device):
    """A context that switches autocast off for this device's ops: the Function computes in the precision it
    documents (fp32 logits, fp32 softmax) whether or not the caller runs under torch.autocast."""
    return torch.autocast(device_type=device.type, enabled=False)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """autograd.Function: (loss, lse) from hidden/weight/bias; lse is not differentiable (see `z_loss`).

    With `opts.grad_in_forward` (frozen weight and bias) the forward also computes d_hidden for a unit
    upstream gradient and saves only that; the backward scales its rows by the upstream gradient.
    Otherwise the forward saves the lse and the backward recomputes the logits (and d_weight / d_bias).
    Autocast is off inside both: inputs arrive already cast by `linear_cross_entropy`.
    """

    @staticmethod
    def forward(ctx, hidden, weight, target, bias, opts: _Options):
        mod = _backend_module(opts.backend)
        with _autocast_off(hidden.device):
            if opts.grad_in_forward:
                kw = {} if opts.chunk_size is None else {"chunk_size": opts.chunk_size}
                rows, lse, d_hidden = mod.forward_with_grad(
                    hidden, weight, target, bias, ignore_index=opts.ignore_index,
                    label_smoothing=opts.label_smoothing, z_loss=opts.z_loss, **kw)
            else:
                rows, lse = mod.forward(hidden, weight, target, bias, ignore_index=opts.ignore_index,
                                        label_smoothing=opts.label_smoothing)
                if opts.z_loss:
                    rows = torch.where(target != opts.ignore_index, rows + opts.z_loss * lse * lse, rows)
                d_hidden = None
            count = (target != opts.ignore_index).sum().clamp_min(1).to(rows.dtype)
            loss = _reduce(rows, count, opts.reduction)
        if opts.grad_in_forward:
            ctx.save_for_backward(d_hidden, count)
        else:
            ctx.save_for_backward(hidden, weight, target, bias, lse, count)
        ctx.opts = opts
        ctx.mark_non_differentiable(lse)
        return loss, lse

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        opts: _Options = ctx.opts
        none = (None,) * 5
        if grad_loss is None:
            return none
        if opts.grad_in_forward:
            d_hidden_unit, count = ctx.saved_tensors
            if not ctx.needs_input_grad[0]:
                return none
            with _autocast_off(d_hidden_unit.device):
                g = _row_scale(grad_loss, count, opts.reduction, d_hidden_unit.shape[0])
                d_hidden = (d_hidden_unit * g[:, None].to(d_hidden_unit.dtype) if d_hidden_unit.dtype == g.dtype
                            else (d_hidden_unit.to(g.dtype) * g[:, None]).to(d_hidden_unit.dtype))
            return d_hidden, None, None, None, None
        hidden, weight, target, bias, lse, count = ctx.saved_tensors
        need_h, need_w, _, need_b = ctx.needs_input_grad[:4]
        need_b = need_b and bias is not None
        if not (need_h or need_w or need_b):
            return none
        with _autocast_off(hidden.device):
            g = _row_scale(grad_loss, count, opts.reduction, hidden.shape[0]).contiguous()
            kw = {"z_loss": opts.z_loss} if opts.z_loss else {}
            d_hidden, d_weight, d_bias = _backend_module(opts.backend).backward(
                hidden, weight, target, bias, lse, g, ignore_index=opts.ignore_index,
                label_smoothing=opts.label_smoothing, need_hidden=need_h, need_weight=need_w, need_bias=need_b,
                **kw)
        return d_hidden, d_weight, None, d_bias, None


STRATEGIES = ("auto", "grad_in_forward", "recompute")


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype for this device when autocast is on, else None."""
    if not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


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
    z_loss: float = 0.0,
    strategy: str = "auto",
    chunk_size: int | None = None,
    validate_targets: bool = True,
):
    """Cross-entropy of `hidden @ weight.T + bias` against `target` without materialising the logits.

    hidden [N, D] and weight [V, D] share a float dtype (fp16/bf16/fp32; fp64 on the PyTorch path),
    target [N] holds class ids or `ignore_index`, bias [V] is optional. Returns the loss (scalar for
    "mean"/"sum", [N] for "none" with 0 on ignored rows), float32, and with `return_lse=True` also the
    per-token log-sum-exp [N] (float32; not differentiable), from which perplexity or the probability
    of any class follows without a second pass. `impl` is "auto" | "triton" | "torch" | "native" (see backend.py;
    "native" is the optional compiled CPU library, see kernels/sonar_kernels/native.py; "auto" does not pick it).

    `z_loss` (default 0): adds z_loss * lse_i^2 to every non-ignored token's loss (PaLM's z-loss), with its
    gradient; use it rather than a loss built on the returned lse, which carries no gradient.
    `strategy`: "grad_in_forward" computes d_hidden already in the forward (two matrix products in all, the
    floor for a frozen weight) and keeps [N, D] of it until the backward; "recompute" keeps only the lse
    and recomputes the logits in the backward (three products); "auto" (default) takes "grad_in_forward"
    when a gradient w.r.t. hidden is needed and neither weight nor bias requires one. `chunk_size`: tokens
    per chunk of "grad_in_forward" (default: its fp32 [chunk, V] logits within min(1/8 of the full
    [N, V] fp32 logits, 256 MB)). `validate_targets` (default True): raise on a target outside [0, V)
    that is not ignore_index (on CUDA an asynchronous device-side assert, no host sync); False skips the
    check (out-of-range targets then give undefined losses).
    Under torch.autocast, hidden and weight (and bias) are cast to the autocast dtype when their dtypes
    differ; the computation itself never runs under autocast (fp32 logits and softmax in every case).
    """
    device = hidden.device if isinstance(hidden, torch.Tensor) else None
    cast = _autocast_dtype(device) if device is not None else None
    if cast is not None and isinstance(weight, torch.Tensor) and (
            weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype)):
        hidden, weight = hidden.to(cast), weight.to(cast)
        bias = bias.to(cast) if isinstance(bias, torch.Tensor) else bias
    _validate(hidden, weight, target, bias, ignore_index, reduction, label_smoothing)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if not (isinstance(z_loss, (int, float)) and z_loss >= 0.0):
        raise ValueError(f"z_loss must be a float >= 0, got {z_loss!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    from .. import native as _native  # imported here so `python -m sonar_kernels.native` runs cleanly

    if target.dtype != torch.int64:
        target = target.long()
    if validate_targets:
        check_targets(target, weight.shape[0], ignore_index)
    if hidden.dtype == torch.float64 and impl == "triton":
        raise TypeError("impl='triton' does not support float64 inputs; use impl='torch' or 'auto'")
    if (impl == "native" or hidden.dtype != torch.float64) and _native.use_native(impl, hidden, weight, target, bias):
        backend = "native"  # "auto" sends float64 (reference computations) to the PyTorch path
    elif hidden.dtype != torch.float64 and use_triton(impl, hidden, weight, target, bias):
        backend = "triton"
    else:
        backend = "torch"
    frozen = not weight.requires_grad and (bias is None or not bias.requires_grad)
    if strategy == "auto":
        grad_in_forward = torch.is_grad_enabled() and hidden.requires_grad and frozen
    elif strategy == "grad_in_forward":
        if not frozen and torch.is_grad_enabled():
            raise ValueError("strategy='grad_in_forward' needs a frozen weight and bias (requires_grad=False); "
                             "use 'recompute' or 'auto' for a trainable one")
        grad_in_forward = True
    else:
        grad_in_forward = False
    opts = _Options(ignore_index, reduction, float(label_smoothing), float(z_loss), backend, grad_in_forward,
                    chunk_size)
    loss, lse = LinearCrossEntropyFunction.apply(hidden, weight, target, bias, opts)
    return (loss, lse) if return_lse else loss
