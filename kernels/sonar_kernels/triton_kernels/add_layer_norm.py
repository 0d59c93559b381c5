"""Triton kernels for fused residual-add + LayerNorm (forward and backward) and their launchers.

Rows are processed in tiles of `BLOCK_M` rows x `BLOCK_N >= N` columns (a whole row per tile, which is
what decoder widths up to a few thousand need). Statistics are fp32; fp16/bf16 loads are converted to
fp32 at once. The backward computes `d_summed = d_x = d_residual` and, when asked, per-program partial
sums of `d_weight` / `d_bias` that the launcher reduces. No autograd here: see
`functional/add_layer_norm.py`. The launchers are the bodies of the `torch.library.triton_op`s in
ops/add_layer_norm.py, so they call the kernels through `wrap_triton` and use torch ops only (compiled graphs
trace them and see the kernels).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# torch >= 2.6; older torch launches the kernels directly (the ops then stay torch.library custom ops)
wrap_triton = getattr(torch.library, "wrap_triton", lambda kernel: kernel)

MAX_FUSED_COLS = 65536


@triton.jit
def _add_ln_fwd_kernel(
    X, R, W, B, Y, S, Mean, Rstd,
    M, N, eps,
    HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, STORE_SUM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    s = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        s += tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)
    if STORE_SUM:
        tl.store(S + offs, s.to(S.dtype.element_ty), mask=mask)
    mean = tl.sum(s, axis=1) / N
    diff = tl.where(mask, s - mean[:, None], 0.0)
    var = tl.sum(diff * diff, axis=1) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    y = diff * rstd[:, None]
    if HAS_W:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
        y = y * w[None, :]
    if HAS_B:
        b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
        y = y + b[None, :]
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + rows, mean, mask=row_ok)
    tl.store(Rstd + rows, rstd, mask=row_ok)


@triton.jit
def _add_ln_bwd_kernel(
    DY, DS, S, W, Mean, Rstd, DX, DW_PART, DB_PART,
    M, N, rows_per_prog,
    HAS_DS: tl.constexpr, HAS_W: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row_start = pid * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, M)
    for m0 in range(row_start, row_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        mask = row_ok[:, None] & col_ok[None, :]
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        s = tl.load(S + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(Mean + rows, mask=row_ok, other=0.0)
        rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)
        xhat = tl.where(mask, (s - mean[:, None]) * rstd[:, None], 0.0)
        if HAS_W:
            wdy = dy * w[None, :]
        else:
            wdy = dy
        if COMPUTE_DW:
            dw_acc += tl.sum(dy * xhat, axis=0)
        if COMPUTE_DB:
            db_acc += tl.sum(dy, axis=0)
        c1 = tl.sum(xhat * wdy, axis=1) / N
        c2 = tl.sum(wdy, axis=1) / N
        dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DS:
            dx += tl.load(DS + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
    if COMPUTE_DW:
        tl.store(DW_PART + pid * N + cols, dw_acc, mask=col_ok)
    if COMPUTE_DB:
        tl.store(DB_PART + pid * N + cols, db_acc, mask=col_ok)


def _block_sizes(n: int) -> tuple[int, int]:
    if n > MAX_FUSED_COLS:
        raise ValueError(f"add_layer_norm Triton path supports rows up to {MAX_FUSED_COLS} features, got {n}")
    block_n = triton.next_power_of_2(n)
    block_m = max(1, min(16, 4096 // block_n))
    return block_m, block_n


def add_layer_norm_fwd_triton(
    x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None, eps: float,
    store_sum: bool,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """x, residual: contiguous [M, N].

    Returns (normed [M, N] in x.dtype, summed or None, mean fp32 [M], rstd fp32 [M]).
    """
    m, n = x.shape
    block_m, block_n = _block_sizes(n)
    y = torch.empty_like(x)
    s = torch.empty_like(x) if store_sum else None
    mean = torch.empty(m, dtype=torch.float32, device=x.device)
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    if m == 0:
        return y, s, mean, rstd
    grid = (triton.cdiv(m, block_m),)
    wrap_triton(_add_ln_fwd_kernel)[grid](
        x, residual if residual is not None else x, weight if weight is not None else x,
        bias if bias is not None else x, y, s if s is not None else y, mean, rstd,
        m, n, eps,
        HAS_RES=residual is not None, HAS_W=weight is not None, HAS_B=bias is not None,
        STORE_SUM=store_sum, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=4 if block_n <= 2048 else 8,
    )
    return y, s, mean, rstd


def _num_programs(m: int, device: torch.device) -> int:
    if device.type == "cuda":
        target = torch.cuda.get_device_properties(device).multi_processor_count * 4
    else:
        target = 4  # interpreter: few programs, each looping over many rows
    return max(1, min(target, m))


def add_layer_norm_bwd_triton(
    dy: Tensor, dsum: Tensor | None, summed: Tensor, weight: Tensor | None, mean: Tensor, rstd: Tensor,
    need_dw: bool, need_db: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Backward of add + LayerNorm on contiguous [M, N]. Returns (d_summed, d_weight or None, d_bias or None)."""
    m, n = summed.shape
    block_m, block_n = _block_sizes(n)
    dx = torch.empty_like(summed)
    nprog = _num_programs(m, summed.device)
    rows_per_prog = triton.cdiv(max(m, 1), nprog)
    rows_per_prog = triton.cdiv(rows_per_prog, block_m) * block_m
    nprog = triton.cdiv(max(m, 1), rows_per_prog)
    dw_part = torch.empty((nprog, n), dtype=torch.float32, device=summed.device) if need_dw else None
    db_part = torch.empty((nprog, n), dtype=torch.float32, device=summed.device) if need_db else None
    if m == 0:
        zero = torch.zeros(n, dtype=torch.float32, device=summed.device)
        return dx, (zero if need_dw else None), (zero.clone() if need_db else None)
    wrap_triton(_add_ln_bwd_kernel)[(nprog,)](
        dy, dsum if dsum is not None else dy, summed, weight if weight is not None else summed,
        mean, rstd, dx, dw_part if dw_part is not None else mean, db_part if db_part is not None else mean,
        m, n, rows_per_prog,
        HAS_DS=dsum is not None, HAS_W=weight is not None, COMPUTE_DW=need_dw, COMPUTE_DB=need_db,
        BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=4 if block_n <= 2048 else 8,
    )
    dw = dw_part.sum(0) if need_dw else None
    db = db_part.sum(0) if need_db else None
    return dx, dw, db
