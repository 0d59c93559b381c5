"""User-facing fused linear cross-entropy: `linear_cross_entropy(hidden, weight, target, ...)`.

Same value and gradients as `F.cross_entropy(hidden @ weight.T + bias, target, ...)` without ever
materialising the [N, V] logits. Two strategies: with a frozen weight (the SONAR case) the forward already
computes d_hidden per chunk of tokens for a unit upstream gradient ("grad_in_forward": two matrix products,
the floor) and the backward only scales it; with a trainable weight the forward saves the per-token
log-sum-exp and the backward recomputes logits tile by tile (Triton) or chunk by chunk (PyTorch, native)
("recompute": three products with d_weight). Gradients w.r.t. `weight`/`bias` are computed only when
those tensors require grad.

The computation is the custom op `sonar_kernels::linear_cross_entropy`, or for the Triton backend the triton_op
`sonar_kernels::linear_cross_entropy_triton` (ops/linear_cross_entropy.py; target values are checked inside
them); this wrapper validates shapes and dtypes and picks the backend and strategy.

Differences from F.cross_entropy: "mean" over a batch whose targets are all `ignore_index` is 0 (with zero
gradients) instead of NaN; the loss is float32 whatever the input dtype (float64 for float64 inputs).
"""
from __future__ import annotations

import torch

from ..backend import use_triton
from ..ops.linear_cross_entropy import linear_cross_entropy_call

REDUCTIONS = ("mean", "sum", "none")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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


STRATEGIES = ("auto", "grad_in_forward", "recompute")


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype for this device when autocast is on, else None."""
    if not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


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
    from .. import native as _native  # imported here so `python -m sonar_kernels.native` runs cleanly (one-way:
    # functional -> native; native.py imports nothing from functional/ or ops/)

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
    loss, lse, _, _ = linear_cross_entropy_call(
        hidden, weight, target, bias, ignore_index, reduction, float(label_smoothing), float(z_loss), backend,
        grad_in_forward, chunk_size or 0, bool(validate_targets))
    return (loss, lse) if return_lse else loss


def linear_cross_entropy_native(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    return_lse: bool = False,
):
    """`linear_cross_entropy(..., impl="native")`: same arguments, values and gradients (kernels/sonar_kernels/native.py).

    CPU tensors only; fp16/bf16 inputs compute in float32 (their gradients come back in their dtype),
    float64 in float64. Raises RuntimeError when the library is not built.
    """
    return linear_cross_entropy(hidden, weight, target, bias=bias, ignore_index=ignore_index, reduction=reduction,
                                label_smoothing=label_smoothing, return_lse=return_lse, impl="native")
