"""Plain-PyTorch linear cross-entropy, chunked over tokens so the [N, V] logits never exist at once.

This is the path CPU users and CI run, and the fallback wherever Triton cannot. It has no autograd of its
own (the autograd Function is in `functional/`). Two strategies:
* `forward_with_grad` (frozen weight, the default when d_hidden is needed): per chunk of tokens, the fp32
  logits (one GEMM), the row log-sum-exp and the softmax gradient in place, then d_hidden = dlogits @ W
  (a second GEMM) for a unit upstream gradient; the backward only scales those rows by grad_output.
  Two products in all, the floor for a frozen vocabulary.
* `forward` + `backward` (trainable weight or bias): the forward keeps the per-token loss and lse, the
  backward recomputes each chunk's logits from the saved lse (three products with d_weight).

Per non-ignored token i with logits z = h_i W^T + b, smoothing eps and V classes:
    lse_i  = log sum_c exp(z_c)
    loss_i = lse_i - (1 - eps) z_{t_i} - eps * mean_c z_c
    dloss_i/dz_c = softmax(z)_c - (1 - eps) [c == t_i] - eps / V
With a z-loss weight zeta (PaLM's auxiliary loss, zeta * lse_i^2 per token) the loss gains zeta lse_i^2 and
the softmax term of the gradient is multiplied by (1 + 2 zeta lse_i).
Ignored tokens have loss 0 and no gradient. All reductions accumulate in float32.
"""
from __future__ import annotations

import torch

# Calls so far; "backward_dweight" counts backward passes that computed a weight gradient (tests assert
# that a frozen weight costs none).
LAUNCH_COUNTS = {"forward": 0, "backward": 0, "backward_dweight": 0, "forward_with_grad": 0}

MAX_CHUNK_BYTES = 256 * 1024 * 1024  # cap of one fp32 [rows, V] chunk of logits
CHUNK_FRACTION = 8  # and at most 1/8 of the full fp32 logits [N, V]


def chunk_rows(num_classes: int, chunk_bytes: int = MAX_CHUNK_BYTES, num_tokens: int | None = None) -> int:
    """Tokens per chunk so that one fp32 chunk of logits [rows, V] stays within `chunk_bytes` and, when
    `num_tokens` is given, within 1/CHUNK_FRACTION of the full [num_tokens, V] fp32 logits (at least 1 row)."""
    if num_classes <= 0:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    rows = chunk_bytes // (4 * num_classes)
    if num_tokens is not None:
        rows = min(rows, num_tokens // CHUNK_FRACTION)
    return max(1, rows)


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
        z = _mm_acc(h, w.t())  # CUDA: half inputs, fp32 output (no half rounding of the logits)
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
    rows = chunk_size or chunk_rows(v, num_tokens=n)
    w = _compute_weight(weight)
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target)).clamp_(0, v - 1)  # never out of bounds
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
    z_loss: float = 0.0,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(d_hidden, d_weight, d_bias) of sum_i grad_rows[i] * loss_i, each None unless requested.

    `grad_rows` [N] already holds the upstream gradient times the reduction's scale; it is zeroed here
    on ignored rows. Gradients come back in the dtypes of the tensors they belong to. `z_loss`: the weight
    of the z-loss term whose gradient is included (the forward's loss rows do not include it; the caller adds it).
    """
    LAUNCH_COUNTS["backward"] += 1
    n, d = hidden.shape
    v = weight.shape[0]
    if not (need_hidden or need_weight or need_bias):
        return None, None, None
    acc_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    w = _compute_weight(weight)
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target)).clamp_(0, v - 1)  # never out of bounds
    g = torch.where(valid, grad_rows.to(acc_dtype), torch.zeros((), dtype=acc_dtype, device=hidden.device))
    d_hidden = torch.empty(n, d, dtype=hidden.dtype, device=hidden.device) if need_hidden else None
    d_weight = torch.zeros(v, d, dtype=acc_dtype, device=hidden.device) if need_weight else None
    d_bias = torch.zeros(v, dtype=acc_dtype, device=hidden.device) if need_bias else None
    if need_weight:
        LAUNCH_COUNTS["backward_dweight"] += 1
    rows = chunk_size or chunk_rows(v, num_tokens=n)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        h = hidden[start:stop]
        z = _logits(h, w, bias)
        # z becomes dloss/dz in place: softmax - (1-eps) onehot - eps/V (times the row scale g below).
        z.sub_(lse[start:stop, None].to(z.dtype)).exp_()
        if z_loss:
            z.mul_((1.0 + 2.0 * z_loss * lse[start:stop, None]).to(z.dtype))
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


def _softmax_(z: torch.Tensor) -> torch.Tensor:
    """Row softmax of a contiguous fp32/fp64 [rows, V] tensor, written over it (one fused row-wise pass)."""
    try:
        return torch.ops.aten._softmax.out(z, 1, False, out=z)
    except (RuntimeError, NotImplementedError):  # a backend that refuses the aliasing: out of place
        return z.copy_(torch.softmax(z, dim=1))


def forward_with_grad(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss [N], lse [N], d_hidden [N, D]): the forward and, for a frozen weight, the whole backward.

    d_hidden[i] = d loss_i / d hidden_i for a unit upstream gradient (0 on ignored rows), in hidden's dtype;
    the autograd backward multiplies row i by its upstream gradient. loss includes the z-loss term.
    Per chunk of `chunk_size` tokens (default `chunk_rows(V, num_tokens=N)`): z = h W^T (+ b) in fp32, its
    row max, softmax in place, lse = max - log(softmax at the max), then z <- c softmax - (1-eps) onehot
    - eps/V with c = 1 + 2 zeta lse, and d_hidden = z @ W. One [chunk, V] buffer is reused throughout.
    """
    LAUNCH_COUNTS["forward_with_grad"] += 1
    n, d = hidden.shape
    v = weight.shape[0]
    acc_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    dev = hidden.device
    loss = torch.empty(n, dtype=acc_dtype, device=dev)
    lse = torch.empty(n, dtype=acc_dtype, device=dev)
    d_hidden = torch.empty(n, d, dtype=hidden.dtype, device=dev)
    if n == 0:
        return loss, lse, d_hidden
    w = _compute_weight(weight)
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target)).clamp_(0, v - 1)  # never out of bounds
    rows = min(n, chunk_size or chunk_rows(v, num_tokens=n))
    buf = torch.empty(rows, v, dtype=acc_dtype, device=dev)
    half_gemm = w.dtype in (torch.float16, torch.bfloat16)
    w_acc = w if w.dtype == acc_dtype else None  # the second GEMM's weight when it runs in fp32
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        m = stop - start
        z = buf[:m]
        h = hidden[start:stop]
        if half_gemm:
            z.copy_(_logits(h, w, bias))  # CUDA half GEMM with fp32 output (see _logits)
        else:
            h = h if h.dtype == w.dtype else h.to(w.dtype)
            if bias is not None:
                torch.addmm(bias.to(w.dtype), h, w.t(), out=z)
            else:
                torch.mm(h, w.t(), out=z)
        idx = safe_target[start:stop, None]
        z_t = z.gather(1, idx).squeeze(1)
        z_mean = z.mean(dim=1) if label_smoothing else None
        z_max, arg = z.max(dim=1)
        _softmax_(z)
        # lse from the softmax at the row maximum (>= 1/V, so no underflow): lse = max - log p_max
        z_lse = z_max - z.gather(1, arg[:, None]).squeeze(1).log()
        row_loss = z_lse - (1.0 - label_smoothing) * z_t
        if label_smoothing:
            row_loss -= label_smoothing * z_mean
        if z_loss:
            row_loss += z_loss * z_lse * z_lse
            z.mul_(1.0 + 2.0 * z_loss * z_lse[:, None])
        if label_smoothing:
            z.sub_(label_smoothing / v)
        z.scatter_add_(1, idx, torch.full(idx.shape, -(1.0 - label_smoothing), dtype=z.dtype, device=dev))
        lse[start:stop] = z_lse
        loss[start:stop] = row_loss
        dh = d_hidden[start:stop]
        if w_acc is not None and dh.dtype == acc_dtype:
            torch.mm(z, w_acc, out=dh)
        elif half_gemm:  # unit-scale dlogits lie in [-1, 1]: safe to round to half for the tensor-core GEMM
            dh.copy_(_mm_acc(z.to(w.dtype), w))
        else:
            dh.copy_(torch.mm(z, w if w.dtype == acc_dtype else w.to(acc_dtype)))
    zero = torch.zeros((), dtype=acc_dtype, device=dev)
    loss = torch.where(valid, loss, zero)
    d_hidden.masked_fill_(~valid[:, None], 0)
    return loss, lse, d_hidden


def _mm_acc(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for half inputs with an fp32 result: straight from the GEMM where torch supports it (CUDA), else
    an fp32 GEMM of the upcast inputs (never a half-precision result)."""
    try:
        return torch.mm(a, b, out_dtype=torch.float32)
    except (RuntimeError, TypeError, NotImplementedError):
        return torch.mm(a.float(), b.float())


def z_loss_shifted_lse(lse: torch.Tensor, z_loss: float) -> torch.Tensor:
    """lse - log(1 + 2 z_loss lse), for backwards that form exp(z - lse): with the shifted lse they form
    (1 + 2 z_loss lse) softmax, the softmax term of the z-loss gradient (Triton and native "recompute").
    Needs 1 + 2 z_loss lse > 0, i.e. lse > -1 / (2 z_loss): checked (CPU: ValueError; CUDA: an
    asynchronous device-side assert)."""
    c = 1.0 + 2.0 * z_loss * lse
    if lse.device.type == "cpu":
        if bool((c <= 0).any()):
            raise ValueError(f"z_loss={z_loss} with a log-sum-exp <= -1/(2 z_loss) is not supported by the "
                             "recomputing backward (sonar_kernels linear_cross_entropy)")
    else:
        torch._assert_async((c > 0).all(), "linear_cross_entropy: z_loss with a log-sum-exp <= -1/(2 z_loss)")
    return lse - torch.log(c)
