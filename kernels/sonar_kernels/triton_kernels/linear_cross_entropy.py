"""Triton kernels for the fused linear cross-entropy (no autograd here; see `functional/`).

The launchers (`forward`, `forward_with_grad`, `backward`) are the bodies of the `torch.library.triton_op`s
in ops/linear_cross_entropy.py, so they launch every kernel through `wrap_triton` and use torch ops only:
compiled graphs trace them and see the kernels (on a GPU; ops/triton_op.py for the interpreter).
`LAUNCH_COUNTS` counts launcher calls (when compiled, at trace time).

Forward: a program owns BLOCK_N tokens and one contiguous split of the vocabulary. It walks that split in
BLOCK_V tiles, builds each [BLOCK_N, BLOCK_V] logit tile with tl.dot over BLOCK_D slices of D, and keeps
an online log-sum-exp, the target logit and (for label smoothing) the sum of logits per token. Only those
per-token partials are written ([splits, N] each); a tiny torch reduction merges the splits. No [N, V]
tensor is ever formed.

Gradient in the forward (`forward_with_grad`, frozen weight: the default of `linear_cross_entropy` when
d_hidden is needed): per chunk of tokens cuBLAS writes the fp32 logits [chunk, V] (half inputs, fp32
output: never rounded before the softmax), `_lce_softmax_grad_kernel` (one program per token row) reads
the row twice: an online max / sum-exp (plus the target logit and, with smoothing, the row sum) gives the
lse and the loss, then the row becomes the unit dlogits c softmax - (1 - eps) onehot - eps / V (c = 1 +
2 zeta lse with a z-loss), written in place (fp32) or into a half buffer for the tensor-core GEMM; cuBLAS
forms d_hidden = dlogits @ W. Two GEMMs in all; the autograd backward only scales rows of d_hidden.

Backward after a plain forward (trainable weight), two strategies (`backward(..., strategy=...)`,
default `BACKWARD_STRATEGY`):
* "dlogits" (default): tokens go in chunks of at most `DLOGITS_CHUNK_BYTES` of dlogits. For each chunk,
  `_lce_dlogits_kernel` recomputes the logit tiles (one program per token block x vocab block) and writes
  the unscaled dlogits = softmax - (1 - eps) onehot - eps / V in the input dtype to a [chunk, V] buffer;
  cuBLAS then forms d_hidden = (dlogits @ W) * g (fp32 output) and, only when asked, d_weight += (g *
  dlogits)^T @ h and d_bias. No atomics; the buffer bounds memory at the chunk size, never [N, V].
* "atomic": one program per (token block, vocab block) tile recomputes the logit tile, forms dlogits in
  registers and adds dlogits @ W into an fp32 d_hidden with atomic adds (BLOCK_D columns at a time), and
  dlogits^T @ hidden into d_weight / column sums into d_bias only when asked (constexpr flags).
Why "dlogits" is the default (by counting bytes; not yet measured on a GPU): at the SONAR shape
(N=16k tokens, V=256k, D=1024) the atomic strategy adds N x D x V / BLOCK_V fp32 atomic updates (about 67 GB
at BLOCK_V=256) to a 64 MB d_hidden that does not stay in a 60 MB L2, while the dlogits strategy writes
and reads N x V bf16 once (about 17 GB) and leaves the d_hidden GEMM to cuBLAS. `bench/` times both.
In both, the row scale g (about 1/N) is applied after the dot so fp16 dlogits cannot underflow, and a
frozen weight runs no weight-gradient work (`LAUNCH_COUNTS["backward_dweight"]` stays 0).

Precision: accumulation is always fp32. Under the Triton interpreter (and for fp32 inputs) tiles are
converted to fp32 as they are loaded, because bf16 arithmetic is wrong in the interpreter. On a GPU,
fp16/bf16 tiles go to tl.dot as they are (tensor cores, fp32 accumulator); everything after the dot is
fp32. fp32 inputs use plain TF32 only when `torch.backends.cuda.matmul.allow_tf32` is on, like torch,
and 3xTF32 (about fp32 accuracy) otherwise.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from ..backend import interpret_mode

# torch >= 2.6: the launchers are the bodies of triton_ops (ops/linear_cross_entropy.py), so every kernel is
# launched through wrap_triton; older torch launches the kernels directly (the custom op then runs them)
wrap_triton = getattr(torch.library, "wrap_triton", lambda kernel: kernel)
from ..torch_ops.linear_cross_entropy import z_loss_shifted_lse

# Launcher calls so far; tests assert that a frozen weight never launches weight-gradient work.
LAUNCH_COUNTS = {"forward": 0, "backward": 0, "backward_dweight": 0, "forward_with_grad": 0}

_INTERPRET = interpret_mode()

if _INTERPRET:  # one small config: autotuning in the interpreter would be far too slow
    _FWD_CONFIGS = [triton.Config({"BLOCK_N": 32, "BLOCK_V": 64, "BLOCK_D": 32}, num_warps=4, num_stages=1)]
    _BWD_CONFIGS = list(_FWD_CONFIGS)
    _SPLIT_ALIGN = 128  # vocab split boundaries are multiples of this (and of every BLOCK_V)
else:
    # Ampere (A100) and Hopper (H100/H200) friendly tiles; BLOCK_D 64 = 128-byte rows for bf16. Chosen with
    # `python -m sonar_kernels.aot_check` (bench/results/aot/): none of these spills registers on sm_90 in
    # bf16, and the last one (the SONAR_KERNELS_AUTOTUNE=0 choice) fits fp32 tiles on A100 and H100 too.
    _FWD_CONFIGS = [
        triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_D": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 64, "BLOCK_V": 256, "BLOCK_D": 64}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_N": 128, "BLOCK_V": 64, "BLOCK_D": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_D": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_D": 32}, num_warps=4, num_stages=3),
    ]
    _BWD_CONFIGS = [
        triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_D": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 128, "BLOCK_V": 256, "BLOCK_D": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 64, "BLOCK_V": 256, "BLOCK_D": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_D": 64}, num_warps=4, num_stages=4),
        # small shared-memory footprint: the one that fits fp32 (3xTF32) tiles on every GPU
        triton.Config({"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_D": 32}, num_warps=4, num_stages=2),
    ]
    _SPLIT_ALIGN = 256
    if os.environ.get("SONAR_KERNELS_AUTOTUNE", "1") == "0":
        # one config each, the last (smallest shared-memory footprint, fits fp32 tiles on A100 and H100):
        # a fast start for correctness runs, where a dozen autotuned compilations per shape would dominate
        _FWD_CONFIGS, _BWD_CONFIGS = _FWD_CONFIGS[-1:], _BWD_CONFIGS[-1:]
# the dlogits kernel: a logit tile and one store, no D loop after it (the same tiles as the forward)
_DLOGITS_CONFIGS = list(_FWD_CONFIGS)
# the row softmax-gradient kernel of `forward_with_grad`: memory-bound, one program per token row
SOFTMAX_GRAD_BLOCK_V = 128 if _INTERPRET else 2048
SOFTMAX_GRAD_WARPS = 8

BACKWARD_STRATEGIES = ("dlogits", "atomic")
BACKWARD_STRATEGY = "dlogits"
DLOGITS_CHUNK_BYTES = 1 << 30  # the [chunk, V] dlogits buffer of the "dlogits" backward


def smem_estimate(config, elem_bytes: int) -> int:
    """Shared memory of one config's pipelined h and W tiles: stages x (BLOCK_N + BLOCK_V) x BLOCK_D elements
    (what Triton allocates for the forward and dlogits kernels in bf16 on sm_90, per `aot_check`)."""
    kw = config.kwargs
    return config.num_stages * (kw["BLOCK_N"] + kw["BLOCK_V"]) * kw["BLOCK_D"] * elem_bytes


@functools.lru_cache(maxsize=None)
def _smem_limit(device_index: int) -> int | None:
    props = torch.cuda.get_device_properties(device_index)
    return getattr(props, "shared_memory_per_block_optin", None)


def prune_configs_by_smem(configs, named_args, **kwargs):
    """Autotune pre-filter: drop the configs whose tiles cannot fit the GPU's shared memory (fp32 inputs
    with the larger tiles), instead of compiling them only to fail at load; keeps at least the smallest."""
    h = named_args.get("h_ptr")
    if not isinstance(h, torch.Tensor) or not h.is_cuda:
        return configs
    limit = _smem_limit(h.device.index if h.device.index is not None else torch.cuda.current_device())
    if not limit:
        return configs
    elem = h.element_size()
    keep = [c for c in configs if smem_estimate(c, elem) <= limit]
    return keep or [min(configs, key=lambda c: smem_estimate(c, elem))]


_PRUNE = {"early_config_prune": prune_configs_by_smem}


@triton.jit
def _logit_tile(h_ptr, w_ptr, b_ptr, offs_n, offs_v, n_mask, v_mask, D, stride_hn, stride_hd, stride_wv,
                stride_wd, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """fp32 logits [BLOCK_N, BLOCK_V] = h[offs_n] @ w[offs_v]^T (+ bias); masked entries are 0."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        h = tl.load(h_ptr + offs_n[:, None] * stride_hn + offs_d[None, :] * stride_hd,
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        w = tl.load(w_ptr + offs_v[:, None] * stride_wv + offs_d[None, :] * stride_wd,
                    mask=v_mask[:, None] & d_mask[None, :], other=0.0)
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        b = tl.load(b_ptr + offs_v, mask=v_mask, other=0.0).to(tl.float32)
        acc += b[None, :]
    return acc


@triton.jit
def _dlogits_tile(z, lse, cols, tgt, target_weight, uniform_weight, SMOOTH: tl.constexpr):
    """Unscaled dlogits of a logit tile: softmax - target_weight [col == target] - uniform_weight."""
    p = tl.exp(z - lse[:, None])
    if SMOOTH:
        p = p - uniform_weight
    return tl.where(cols[None, :] == tgt[:, None], p - target_weight, p)


@triton.autotune(configs=_FWD_CONFIGS, key=["N_BUCKET", "V", "D"], prune_configs_by=_PRUNE)
@triton.jit
def _lce_fwd_kernel(h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, zt_ptr, zsum_ptr,
                    N, V, D, V_PER_SPLIT, N_BUCKET,
                    stride_hn, stride_hd, stride_wv, stride_wd,
                    HAS_BIAS: tl.constexpr, SMOOTH: tl.constexpr, UPCAST: tl.constexpr,
                    DOT_PRECISION: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    n_mask = offs_n < N
    tgt = tl.load(t_ptr + offs_n, mask=n_mask, other=-1)
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    zt = tl.zeros((BLOCK_N,), dtype=tl.float32)
    zsum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    v_begin = pid_s * V_PER_SPLIT
    v_end = tl.minimum(v_begin + V_PER_SPLIT, V)
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        v_mask = offs_v < v_end
        z = _logit_tile(h_ptr, w_ptr, b_ptr, offs_n, offs_v, n_mask, v_mask, D, stride_hn, stride_hd,
                        stride_wv, stride_wd, HAS_BIAS, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D)
        zm = tl.where(v_mask[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(zm, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(zm - m_new[:, None]), axis=1)
        m = m_new
        zt += tl.sum(tl.where(offs_v[None, :] == tgt[:, None], z, 0.0), axis=1)
        if SMOOTH:
            zsum += tl.sum(tl.where(v_mask[None, :], z, 0.0), axis=1)
    out = pid_s * N + offs_n
    tl.store(lse_ptr + out, m + tl.log(s), mask=n_mask)
    tl.store(zt_ptr + out, zt, mask=n_mask)
    if SMOOTH:
        tl.store(zsum_ptr + out, zsum, mask=n_mask)


# The outputs accumulate atomically: autotuning zeroes them between trials. Each is always a tensor (the
# launcher passes a 1-element placeholder for one not requested; COMPUTE_* skips it): Triton 3.6 called
# `.zero_()` on a None listed here, and inductor's autotuner asserts a tensor. Not a pre_hook: `wrap_triton`
# (the triton_op path, ops/linear_cross_entropy.py) refuses those, and accepts reset_to_zero.
_BWD_OUTPUTS = ["dh_ptr", "dw_ptr", "db_ptr"]


@triton.autotune(configs=_BWD_CONFIGS, key=["N_BUCKET", "V", "D"], reset_to_zero=_BWD_OUTPUTS,
                 prune_configs_by=_PRUNE)
@triton.jit
def _lce_bwd_kernel(h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, g_ptr, dh_ptr, dw_ptr, db_ptr,
                    N, V, D, N_BUCKET, target_weight, uniform_weight,
                    stride_hn, stride_hd, stride_wv, stride_wd,
                    HAS_BIAS: tl.constexpr, SMOOTH: tl.constexpr, UPCAST: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, COMPUTE_DH: tl.constexpr, COMPUTE_DW: tl.constexpr,
                    COMPUTE_DB: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    num_n_blocks = tl.cdiv(N, BLOCK_N)
    # Token blocks vary fastest: programs running together share the same W tile through L2.
    pid_n = pid % num_n_blocks
    pid_v = pid // num_n_blocks
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_v = (pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    n_mask = offs_n < N
    v_mask = offs_v < V
    g = tl.load(g_ptr + offs_n, mask=n_mask, other=0.0)  # 0 on ignored rows (set by the launcher)
    if tl.max(tl.abs(g), axis=0) != 0.0:
        z = _logit_tile(h_ptr, w_ptr, b_ptr, offs_n, offs_v, n_mask, v_mask, D, stride_hn, stride_hd,
                        stride_wv, stride_wd, HAS_BIAS, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D)
        lse = tl.load(lse_ptr + offs_n, mask=n_mask, other=0.0)
        tgt = tl.load(t_ptr + offs_n, mask=n_mask, other=-1)
        p = _dlogits_tile(z, lse, offs_v, tgt, target_weight, uniform_weight, SMOOTH)
        # dlogits without the per-row scale g: values stay in [-1, 1], so casting them to fp16 for the
        # d_hidden dot cannot underflow the way g-scaled values (g ~ 1/N) would; g is applied after the dot.
        dz_u = tl.where(v_mask[None, :] & n_mask[:, None], p, 0.0)
        if UPCAST:
            dz_u_dot = dz_u
        else:
            dz_u_dot = dz_u.to(w_ptr.dtype.element_ty)
        if COMPUTE_DW:
            dz = dz_u * g[:, None]
            if UPCAST:
                dz_dot = dz
            else:
                dz_dot = dz.to(w_ptr.dtype.element_ty)
        if COMPUTE_DB:
            tl.atomic_add(db_ptr + offs_v, tl.sum(dz_u * g[:, None], axis=0), mask=v_mask, sem="relaxed")
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_mask = offs_d < D
            if COMPUTE_DH:
                w = tl.load(w_ptr + offs_v[:, None] * stride_wv + offs_d[None, :] * stride_wd,
                            mask=v_mask[:, None] & d_mask[None, :], other=0.0)
                if UPCAST:
                    w = w.to(tl.float32)
                dh = tl.dot(dz_u_dot, w, input_precision=DOT_PRECISION) * g[:, None]
                tl.atomic_add(dh_ptr + offs_n[:, None] * D + offs_d[None, :], dh,
                              mask=n_mask[:, None] & d_mask[None, :], sem="relaxed")
            if COMPUTE_DW:
                h = tl.load(h_ptr + offs_n[:, None] * stride_hn + offs_d[None, :] * stride_hd,
                            mask=n_mask[:, None] & d_mask[None, :], other=0.0)
                if UPCAST:
                    h = h.to(tl.float32)
                dw = tl.dot(tl.trans(dz_dot), h, input_precision=DOT_PRECISION)
                tl.atomic_add(dw_ptr + offs_v[:, None] * D + offs_d[None, :], dw,
                              mask=v_mask[:, None] & d_mask[None, :], sem="relaxed")


@triton.autotune(configs=_DLOGITS_CONFIGS, key=["N_BUCKET", "V", "D"], prune_configs_by=_PRUNE)
@triton.jit
def _lce_dlogits_kernel(h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, g_ptr, out_ptr,
                        N, V, D, N_BUCKET, target_weight, uniform_weight,
                        stride_hn, stride_hd, stride_wv, stride_wd, stride_on,
                        HAS_BIAS: tl.constexpr, SMOOTH: tl.constexpr, UPCAST: tl.constexpr,
                        DOT_PRECISION: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[n, v] = softmax(z_n)_v - target_weight [v == t_n] - uniform_weight, 0 on rows with g == 0."""
    pid = tl.program_id(0)
    num_n_blocks = tl.cdiv(N, BLOCK_N)
    pid_n = pid % num_n_blocks  # token blocks fastest: programs running together share a W tile in L2
    pid_v = pid // num_n_blocks
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_v = (pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    n_mask = offs_n < N
    v_mask = offs_v < V
    g = tl.load(g_ptr + offs_n, mask=n_mask, other=0.0)  # 0 on ignored rows (set by the launcher)
    if tl.max(tl.abs(g), axis=0) != 0.0:
        z = _logit_tile(h_ptr, w_ptr, b_ptr, offs_n, offs_v, n_mask, v_mask, D, stride_hn, stride_hd,
                        stride_wv, stride_wd, HAS_BIAS, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D)
        # everything tile-shaped below is formed after the dot, with 32-bit column indices (V < 2^31),
        # so no [BLOCK_N, BLOCK_V] index tile stays live across the D loop (register pressure, spills)
        cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        lse = tl.load(lse_ptr + offs_n, mask=n_mask, other=0.0)
        tgt = tl.load(t_ptr + offs_n, mask=n_mask, other=-1).to(tl.int32)
        p = _dlogits_tile(z, lse, cols, tgt, target_weight, uniform_weight, SMOOTH)
        p = tl.where(g[:, None] != 0.0, p, 0.0)
        rows = out_ptr + offs_n * stride_on
        tl.store(rows[:, None] + cols[None, :], p.to(out_ptr.dtype.element_ty),
                 mask=n_mask[:, None] & (cols < V)[None, :])
    else:  # the buffer is uninitialised: a tile of ignored rows still writes its zeros
        cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        rows = out_ptr + offs_n * stride_on
        tl.store(rows[:, None] + cols[None, :], tl.zeros((BLOCK_N, BLOCK_V), dtype=out_ptr.dtype.element_ty),
                 mask=n_mask[:, None] & (cols < V)[None, :])


def _dot_settings(dtype: torch.dtype, native_half_dot: bool | None = None) -> tuple[bool, str]:
    """(UPCAST, DOT_PRECISION) for an input dtype; see the module docstring.

    `native_half_dot` forces (True) or forbids (False) fp16/bf16 tiles going to tl.dot unconverted;
    None picks the default (native on GPUs, converted in the interpreter). Tests use True with fp16 to
    run the GPU code path in the interpreter (fp16 arithmetic is correct there, bf16 is not).
    """
    if dtype == torch.float32:
        if _INTERPRET:
            return True, "ieee"
        # 3xTF32 keeps fp32 accuracy on tensor cores ("ieee" would be slow and compiles for minutes)
        return True, "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"
    if dtype in (torch.float16, torch.bfloat16):
        native = (not _INTERPRET) if native_half_dot is None else native_half_dot
        return not native, "ieee" if _INTERPRET else "tf32"
    raise TypeError(f"triton linear_cross_entropy supports float16/bfloat16/float32 inputs, got {dtype}")


def _n_bucket(n: int) -> int:
    """Autotune key bucket for the token count (next power of two, at least 16)."""
    return max(16, triton.next_power_of_2(n))


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_splits(n: int, v: int, device: torch.device) -> int:
    """How many vocab splits the forward uses so that small N still fills the GPU."""
    max_splits = triton.cdiv(v, _SPLIT_ALIGN)
    if _INTERPRET or device.type != "cuda":
        return min(2, max_splits)
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    token_blocks = triton.cdiv(n, 128)
    return max(1, min(max_splits, triton.cdiv(4 * sms, token_blocks)))


def forward(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None = None,
            *, ignore_index: int = -100, label_smoothing: float = 0.0, num_splits: int | None = None,
            native_half_dot: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss [N] (0 on ignored rows) and lse [N], float32. Inputs are assumed validated.

    `num_splits` overrides how many vocab splits run in parallel; `native_half_dot`: see `_dot_settings`.
    """
    n, d = hidden.shape
    v = weight.shape[0]
    upcast, precision = _dot_settings(hidden.dtype, native_half_dot)
    if n == 0:
        empty = torch.empty(0, dtype=torch.float32, device=hidden.device)
        return empty, empty.clone()
    splits = num_splits if num_splits is not None else _num_splits(n, v, hidden.device)
    splits = max(1, min(int(splits), triton.cdiv(v, _SPLIT_ALIGN)))
    v_per_split = triton.cdiv(triton.cdiv(v, splits), _SPLIT_ALIGN) * _SPLIT_ALIGN
    splits = triton.cdiv(v, v_per_split)
    smooth = label_smoothing != 0.0
    part_lse = torch.empty(splits, n, dtype=torch.float32, device=hidden.device)
    part_zt = torch.empty_like(part_lse)
    part_zsum = torch.empty_like(part_lse) if smooth else None
    target = target.contiguous()
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), splits)  # noqa: E731
    wrap_triton(_lce_fwd_kernel)[grid](
        hidden, weight, bias, target, part_lse, part_zt, part_zsum,
        n, v, d, v_per_split, _n_bucket(n),
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        HAS_BIAS=bias is not None, SMOOTH=smooth, UPCAST=upcast, DOT_PRECISION=precision,
    )
    LAUNCH_COUNTS["forward"] += 1
    lse = part_lse[0] if splits == 1 else torch.logsumexp(part_lse, dim=0)
    z_t = part_zt.sum(dim=0)
    if smooth:
        loss = lse - (1.0 - label_smoothing) * z_t - (label_smoothing / v) * part_zsum.sum(dim=0)
    else:
        loss = lse - z_t
    loss = torch.where(target != ignore_index, loss, torch.zeros_like(loss))
    return loss, lse


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with an fp32 result (half inputs: fp32 straight out of the GEMM where torch supports it, else
    an fp32 GEMM of the upcast inputs: the result is never rounded to half precision)."""
    if a.dtype in (torch.float16, torch.bfloat16):
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError, NotImplementedError):  # older torch, or no such kernel here
            return torch.mm(a.float(), b.float())
    return torch.mm(a, b).float()


def dlogits_chunk_rows(v: int, elem_bytes: int, chunk_bytes: int | None = None) -> int:
    """Tokens per chunk of the "dlogits" backward: the [rows, V] buffer within `chunk_bytes` (default
    DLOGITS_CHUNK_BYTES), rounded down to a multiple of 128 tokens, at least 128."""
    budget = DLOGITS_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    if budget <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {budget}")
    return max(128, budget // (v * elem_bytes) // 128 * 128)


def backward(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None,
             lse: torch.Tensor, grad_rows: torch.Tensor, *, ignore_index: int = -100,
             label_smoothing: float = 0.0, need_hidden: bool = True, need_weight: bool = False,
             need_bias: bool = False, native_half_dot: bool | None = None, strategy: str | None = None,
             chunk_rows: int | None = None, z_loss: float = 0.0,
             ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(d_hidden, d_weight, d_bias) of sum_i grad_rows[i] * loss_i, each None unless requested.

    Gradients come back in the dtype of the tensor they belong to (accumulated in fp32). `strategy` is
    "dlogits" or "atomic" (see the module docstring; default BACKWARD_STRATEGY, or the environment
    variable SONAR_KERNELS_LCE_BACKWARD); `chunk_rows` overrides the "dlogits" chunk. `z_loss` adds the
    gradient of z_loss * lse^2, whose softmax factor c = 1 + 2 z_loss lse enters the kernels as a shifted
    lse (c softmax = exp(z - (lse - log c))); that needs c > 0, i.e. lse > -1 / (2 z_loss), checked.
    """
    strategy = strategy or os.environ.get("SONAR_KERNELS_LCE_BACKWARD") or BACKWARD_STRATEGY
    if strategy not in BACKWARD_STRATEGIES:
        raise ValueError(f"strategy (or SONAR_KERNELS_LCE_BACKWARD) must be one of {BACKWARD_STRATEGIES}, "
                         f"got {strategy!r}")
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    n, d = hidden.shape
    v = weight.shape[0]
    if not (need_hidden or need_weight or need_bias) or n == 0:
        d_hidden = torch.zeros_like(hidden) if need_hidden else None
        d_weight = torch.zeros_like(weight) if need_weight else None
        d_bias = torch.zeros_like(bias) if need_bias else None
        return d_hidden, d_weight, d_bias
    upcast, precision = _dot_settings(hidden.dtype, native_half_dot)
    valid = target != ignore_index
    g = torch.where(valid, grad_rows.float(), torch.zeros((), dtype=torch.float32, device=hidden.device))
    g = g.contiguous()
    target = target.contiguous()
    lse = lse.float().contiguous()
    if z_loss:
        lse = z_loss_shifted_lse(lse, z_loss)
    if strategy == "atomic":
        dh, dw, db = _backward_atomic(hidden, weight, target, bias, lse, g, label_smoothing, upcast, precision,
                                      need_hidden, need_weight, need_bias)
    else:
        dh, dw, db = _backward_dlogits(hidden, weight, target, bias, lse, g, label_smoothing, upcast, precision,
                                       need_hidden, need_weight, need_bias, chunk_rows)
    LAUNCH_COUNTS["backward"] += 1
    if need_weight:
        LAUNCH_COUNTS["backward_dweight"] += 1
    return (
        dh.to(hidden.dtype) if need_hidden else None,
        dw.to(weight.dtype) if need_weight else None,
        db.to(bias.dtype) if need_bias else None,
    )


def _backward_atomic(hidden, weight, target, bias, lse, g, label_smoothing, upcast, precision,
                     need_hidden, need_weight, need_bias):
    """fp32 (dh, dw, db) from one launch of `_lce_bwd_kernel` (atomic adds). An output not requested is a
    1-element placeholder, never None (the kernel's reset_to_zero zeroes every listed argument; COMPUTE_*
    keeps the kernel off it)."""
    n, d = hidden.shape
    v = weight.shape[0]

    def zeros(need, *shape):
        return torch.zeros(*(shape if need else (1,)), dtype=torch.float32, device=hidden.device)

    dh, dw, db = zeros(need_hidden, n, d), zeros(need_weight, v, d), zeros(need_bias, v)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(v, meta["BLOCK_V"]),)  # noqa: E731
    wrap_triton(_lce_bwd_kernel)[grid](
        hidden, weight, bias, target, lse, g, dh, dw, db,
        n, v, d, _n_bucket(n), 1.0 - label_smoothing, label_smoothing / v,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        HAS_BIAS=bias is not None, SMOOTH=label_smoothing != 0.0, UPCAST=upcast, DOT_PRECISION=precision,
        COMPUTE_DH=need_hidden, COMPUTE_DW=need_weight, COMPUTE_DB=need_bias,
    )
    return dh, dw, db


def write_dlogits(out: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                  bias: torch.Tensor | None, lse: torch.Tensor, g: torch.Tensor, label_smoothing: float,
                  upcast: bool, precision: str) -> None:
    """Fill out [N, V] (row stride free, unit column stride) with the unscaled dlogits of every token:
    softmax - (1 - eps) onehot - eps / V, and zeros on rows whose g is 0. Every element is written."""
    m, d = hidden.shape
    v = weight.shape[0]
    if out.shape != (m, v) or out.stride(1) != 1:
        raise ValueError(f"out must be [{m}, {v}] with unit column stride, got {tuple(out.shape)} "
                         f"strides {out.stride()}")
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_N"]) * triton.cdiv(v, meta["BLOCK_V"]),)  # noqa: E731
    wrap_triton(_lce_dlogits_kernel)[grid](
        hidden, weight, bias, target, lse, g, out,
        m, v, d, _n_bucket(m), 1.0 - label_smoothing, label_smoothing / v,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), out.stride(0),
        HAS_BIAS=bias is not None, SMOOTH=label_smoothing != 0.0, UPCAST=upcast, DOT_PRECISION=precision,
    )


def _backward_dlogits(hidden, weight, target, bias, lse, g, label_smoothing, upcast, precision,
                      need_hidden, need_weight, need_bias, chunk_rows):
    """fp32 (dh, dw, db): per token chunk, `_lce_dlogits_kernel` writes the unscaled dlogits, GEMMs do the rest."""
    n, d = hidden.shape
    v = weight.shape[0]
    # the buffer feeds the GEMMs: the input dtype on GPUs (tensor cores), fp32 where tiles are upcast
    buf_dtype = torch.float32 if upcast else hidden.dtype
    w = weight if weight.dtype == buf_dtype else weight.to(buf_dtype)
    rows = min(n, chunk_rows or dlogits_chunk_rows(v, torch.finfo(buf_dtype).bits // 8))
    buf = torch.empty(rows, v, dtype=buf_dtype, device=hidden.device)
    dh = torch.empty(n, d, dtype=torch.float32, device=hidden.device) if need_hidden else None
    dw = torch.zeros(v, d, dtype=torch.float32, device=hidden.device) if need_weight else None
    db = torch.zeros(v, dtype=torch.float32, device=hidden.device) if need_bias else None
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        m = stop - start
        h = hidden[start:stop]
        dl = buf[:m]
        write_dlogits(dl, h, weight, target[start:stop], bias, lse[start:stop], g[start:stop], label_smoothing,
                      upcast, precision)
        g_chunk = g[start:stop, None]
        if need_hidden:
            dh[start:stop] = _mm_f32(dl, w).mul_(g_chunk)
        if need_weight or need_bias:
            scaled = dl.float().mul_(g_chunk)
            if need_weight:
                dw += _mm_f32(scaled.to(buf_dtype).t(), h if h.dtype == buf_dtype else h.to(buf_dtype))
            if need_bias:
                db += scaled.sum(dim=0)
    return dh, dw, db


@triton.jit
def _lce_softmax_grad_kernel(z_ptr, out_ptr, t_ptr, loss_ptr, lse_ptr, V, stride_z, stride_o, ignore_index,
                             target_weight, uniform_weight, z_loss,
                             SMOOTH: tl.constexpr, ZLOSS: tl.constexpr, BLOCK_V: tl.constexpr):
    """Row `pid` of fp32 logits z [rows, V]: lse, loss (with z-loss) and the unit dlogits into out.

    out may alias z (every element is read before the same program overwrites it). Ignored rows get loss 0
    and dlogits 0; a target outside [0, V) is never read (the host checks targets)."""
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    o_row = out_ptr + row * stride_o
    tgt = tl.load(t_ptr + row)
    valid = tgt != ignore_index
    in_range = (tgt >= 0) & (tgt < V)
    m = tl.full((BLOCK_V,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_V,), dtype=tl.float32)
    zsum = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        z = tl.load(z_row + cols, mask=cols < V, other=float("-inf"))
        m_new = tl.maximum(m, z)
        live = m_new != float("-inf")
        s = tl.where(live, s * tl.exp(m - m_new) + tl.exp(z - m_new), 0.0)
        m = m_new
        if SMOOTH:
            zsum += tl.where(cols < V, z, 0.0)
    m_row = tl.max(m, axis=0)
    lse = m_row + tl.log(tl.sum(s * tl.exp(m - m_row), axis=0))
    z_t = tl.load(z_row + tgt, mask=in_range, other=0.0)
    loss = lse - target_weight * z_t
    if SMOOTH:
        loss -= uniform_weight * tl.sum(zsum, axis=0)
    c = 1.0
    if ZLOSS:
        loss += z_loss * lse * lse
        c = 1.0 + 2.0 * z_loss * lse
    tl.store(lse_ptr + row, lse)
    tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))
    keep = tl.where(valid, 1.0, 0.0)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        v_mask = cols < V
        z = tl.load(z_row + cols, mask=v_mask, other=0.0)
        p = tl.exp(z - lse) * c
        if SMOOTH:
            p = p - uniform_weight
        p = tl.where(cols == tgt, p - target_weight, p) * keep
        tl.store(o_row + cols, p.to(out_ptr.dtype.element_ty), mask=v_mask)


def softmax_grad_rows(z: torch.Tensor, out: torch.Tensor, target: torch.Tensor, *, ignore_index: int,
                      label_smoothing: float, z_loss: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch `_lce_softmax_grad_kernel` on fp32 logits z [rows, V]; out [rows, V] (may be z) receives
    the unit dlogits. Returns (loss, lse), float32 [rows]."""
    rows, v = z.shape
    if z.dtype != torch.float32 or z.stride(1) != 1 or out.shape != z.shape or out.stride(1) != 1:
        raise ValueError("softmax_grad_rows needs fp32 z and out of one shape with unit column stride, got "
                         f"{z.dtype} {tuple(z.shape)} {z.stride()} and {out.dtype} {tuple(out.shape)} {out.stride()}")
    loss = torch.empty(rows, dtype=torch.float32, device=z.device)
    lse = torch.empty_like(loss)
    if rows:
        wrap_triton(_lce_softmax_grad_kernel)[(rows,)](
            z, out, target, loss, lse, v, z.stride(0), out.stride(0), ignore_index,
            1.0 - label_smoothing, label_smoothing / v, float(z_loss),
            SMOOTH=label_smoothing != 0.0, ZLOSS=z_loss != 0.0, BLOCK_V=SOFTMAX_GRAD_BLOCK_V,
            num_warps=SOFTMAX_GRAD_WARPS)
    return loss, lse


GRAD_IN_FORWARD_MAX_BYTES = 256 * 1024 * 1024
GRAD_IN_FORWARD_FRACTION = 8


def grad_in_forward_chunk_rows(n: int, v: int, half_buffer: bool) -> int:
    """Tokens per chunk of `forward_with_grad`: the fp32 logits (plus the half dlogits buffer on GPUs) of a
    chunk within min(1/8 of the full fp32 [N, V] logits, 256 MB); at least 1."""
    budget = min(GRAD_IN_FORWARD_MAX_BYTES, n * v * 4 // GRAD_IN_FORWARD_FRACTION)
    return max(1, budget // (v * (6 if half_buffer else 4)))


def forward_with_grad(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                      bias: torch.Tensor | None = None, *, ignore_index: int = -100, label_smoothing: float = 0.0,
                      z_loss: float = 0.0, chunk_size: int | None = None, native_half_dot: bool | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss [N], lse [N], d_hidden [N, D]) with d_hidden for a unit upstream gradient, in hidden's dtype.

    Per chunk of `chunk_size` tokens (default `grad_in_forward_chunk_rows`): cuBLAS fp32 logits, the row
    kernel, cuBLAS d_hidden. `native_half_dot`: see `_dot_settings` (decides the dlogits buffer dtype)."""
    n, d = hidden.shape
    v = weight.shape[0]
    upcast, _ = _dot_settings(hidden.dtype, native_half_dot)
    dev = hidden.device
    loss = torch.empty(n, dtype=torch.float32, device=dev)
    lse = torch.empty_like(loss)
    d_hidden = torch.empty(n, d, dtype=hidden.dtype, device=dev)
    if n == 0:
        return loss, lse, d_hidden
    half_buffer = not upcast  # GPU half inputs: dlogits in the input dtype feed the tensor-core GEMM
    rows = min(n, chunk_size or grad_in_forward_chunk_rows(n, v, half_buffer))
    w_gemm = weight if (half_buffer or weight.dtype == torch.float32) else weight.float()
    dl_buf = torch.empty(rows, v, dtype=hidden.dtype, device=dev) if half_buffer else None
    target = target.contiguous()
    b32 = bias.float() if bias is not None else None
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        h = hidden[start:stop]
        z = _mm_f32(h if half_buffer or h.dtype == torch.float32 else h.float(), w_gemm.t())
        if b32 is not None:
            z += b32
        out = dl_buf[: stop - start] if half_buffer else z
        loss[start:stop], lse[start:stop] = softmax_grad_rows(
            z, out, target[start:stop], ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss)
        d_hidden[start:stop] = _mm_f32(out, w_gemm)
        del z
    LAUNCH_COUNTS["forward_with_grad"] += 1
    return loss, lse, d_hidden
