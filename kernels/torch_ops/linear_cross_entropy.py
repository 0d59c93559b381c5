"""Plain-PyTorch linear cross-entropy, chunked over tokens so the [N, V] logits never exist at once.

This is the path CPU users and CI run, and the fallback wherever Triton cannot. It has no autograd of its
own: `forward` returns per-token loss and log-sum-exp, `backward` recomputes each chunk's logits from the
saved lse and returns the requested gradients (the weight gradient only when asked for).

Per non-ignored token i with logits z = h_i W^T + b, smoothing eps and V classes:
    lse_i  = log sum_c exp(z_c)
    loss_i = lse_i - (1 - eps) z_{t_i} - eps * mean_c z_c
    dloss_i/dz_c = softmax(z)_c - (1 - eps) [c == t_i] - eps / V
Ignored tokens have loss 0 and no gradient. All reductions accumulate in float32.
"""
from __future__ import annotations

import torch

# Calls so far; "backward_dweight" counts backward passes that computed a weight gradient (tests assert
# that a frozen weight costs none).
LAUNCH_COUNTS = {"forward": 0, "backward": 0, "backward_dweight": 0}

_DEFAULT_CHUNK_BYTES = 256 * 1024 * 1024


def chunk_rows(num_classes: int, chunk_bytes: int = _DEFAULT_CHUNK_BYTES) -> int:
    """Tokens per chunk so that one fp32 chunk of logits [rows, V] stays within `chunk_bytes`."""
    if num_classes <= 0:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    return max(1, chunk_bytes // (4 * num_classes))


def _compute_weight(weight: torch.Tensor) -> torch.Tensor:
    """The weight in the dtype the matmuls run in: fp32 on the CPU (half matmuls are slow there)."""
    if weight.device.type == "cpu" and weight.dtype != torch.float32 and weight.dtype != torch.float64:
        return weight.float()
    return weight


def _logits(h: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """fp32 (or fp64) logits of one chunk: h @ w^T + bias, accumulated in fp32 at least."""
    if h.dtype != w.dtype:
        h = h.to(w.dtype)
    if h.dtype in (torch.float16, torch.bfloat16):
        try:  # CUDA: half inputs, fp32 output straight from the GEMM (no half rounding of logits)
            z = torch.mm(h, w.t(), out_dtype=torch.float32)
        except (RuntimeError, TypeError, NotImplementedError):
            z = torch.mm(h, w.t()).float()
        if bias is not None:
            z += bias.float()
        return z
    if bias is not None:
        return torch.addmm(bias.to(h.dtype), h, w.t())
    return torch.mm(h, w.t())


def forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss [N] (0 for ignored rows) and lse [N], both float32 (float64 for float64 inputs).

    Inputs are assumed validated by the caller (`sonar_kernels.functional.linear_cross_entropy`).
    """
    LAUNCH_COUNTS["forward"] += 1
    n, _ = hidden.shape
    v = weight.shape[0]
    acc_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    loss = torch.empty(n, dtype=acc_dtype, device=hidden.device)
    lse = torch.empty(n, dtype=acc_dtype, device=hidden.device)
    if n == 0:
        return loss, lse
    rows = chunk_size or chunk_rows(v)
    w = _compute_weight(weight)
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        z = _logits(hidden[start:stop], w, bias)
        z_lse = torch.logsumexp(z, dim=-1)
        z_t = z.gather(1, safe_target[start:stop, None]).squeeze(1)
        if label_smoothing:
            row_loss = z_lse - (1.0 - label_smoothing) * z_t - (label_smoothing / v) * z.sum(dim=-1)
        else:
            row_loss = z_lse - z_t
        lse[start:stop] = z_lse
        loss[start:stop] = row_loss
        del z
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    return loss, lse


def backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None,
    lse: torch.Tensor,
    grad_rows: torch.Tensor,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    need_hidden: bool = True,
    need_weight: bool = False,
    need_bias: bool = False,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(d_hidden, d_weight, d_bias) of sum_i grad_rows[i] * loss_i, each None unless requested.

    `grad_rows` [N] already holds the upstream gradient times the reduction's scale; it is zeroed here
    on ignored rows. Gradients come back in the dtypes of the tensors they belong to.
    """
    LAUNCH_COUNTS["backward"] += 1
    n, d = hidden.shape
    v = weight.shape[0]
    if not (need_hidden or need_weight or need_bias):
        return None, None, None
    acc_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    w = _compute_weight(weight)
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    g = torch.where(valid, grad_rows.to(acc_dtype), torch.zeros((), dtype=acc_dtype, device=hidden.device))
    d_hidden = torch.empty(n, d, dtype=hidden.dtype, device=hidden.device) if need_hidden else None
    d_weight = torch.zeros(v, d, dtype=acc_dtype, device=hidden.device) if need_weight else None
    d_bias = torch.zeros(v, dtype=acc_dtype, device=hidden.device) if need_bias else None
    if need_weight:
        LAUNCH_COUNTS["backward_dweight"] += 1
    rows = chunk_size or chunk_rows(v)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        h = hidden[start:stop]
        z = _logits(h, w, bias)
        # z becomes dloss/dz in place: softmax - (1-eps) onehot - eps/V (times the row scale g below).
        z.sub_(lse[start:stop, None].to(z.dtype)).exp_()
        if label_smoothing:
            z.sub_(label_smoothing / v)
        idx = safe_target[start:stop, None]
        z.scatter_add_(1, idx, torch.full(idx.shape, -(1.0 - label_smoothing), dtype=z.dtype, device=z.device))
        g_chunk = g[start:stop, None].to(z.dtype)
        if need_hidden:
            # unscaled dlogits are in [-1, 1]: no fp16 underflow when cast; the row scale comes after
            dz = z if w.dtype == z.dtype else z.to(w.dtype)
            d_hidden[start:stop] = torch.mm(dz, w).to(z.dtype).mul_(g_chunk).to(hidden.dtype)
        z.mul_(g_chunk)
        if need_weight:
            d_weight.addmm_(z.t(), h.to(z.dtype))
        if need_bias:
            d_bias += z.sum(dim=0)
        del z
    return (
        d_hidden,
        d_weight.to(weight.dtype) if need_weight else None,
        d_bias.to(bias.dtype) if need_bias else None,
    )
