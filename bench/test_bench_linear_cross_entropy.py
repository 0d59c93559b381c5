"""Benchmark: fused linear cross-entropy (forward + backward through hidden, frozen weight).

Compares, side by side in one pytest-benchmark group:
  ours       sonar_kernels.linear_cross_entropy (impl="auto": Triton on CUDA, chunked PyTorch on the CPU) with
             its default strategy for a frozen weight: the gradient in the forward (two GEMMs: logits, then
             d_hidden from the in-place softmax gradient; the backward only scales rows)
  ours-dlogits-bwd  strategy="recompute" with the Triton "dlogits" backward (chunked dlogits + cuBLAS; CUDA only)
  ours-atomic-bwd   strategy="recompute" with the Triton "atomic" backward (CUDA only)
  torch-chunked     impl="torch", default strategy (CUDA only; on the CPU it is "ours")
  torch-recompute   impl="torch", strategy="recompute": forward saves the lse, backward recomputes the logits
  native     impl="native", the compiled CPU library's gradient-in-forward op (CPU only, when built)
  reference  full logits (hidden @ W^T, upcast to fp32) + F.cross_entropy, what the public code does
  liger      Liger-Kernel's fused linear cross-entropy (CUDA only; skipped when not importable)
  cce        Cut Cross-Entropy, exact gradients (filter_eps=None; CUDA only; skipped when not importable)
  cce-filtered  Cut Cross-Entropy with its default gradient filtering (approximate; CUDA only)
On CUDA the paper's shapes are used (N=16k target tokens, V=256,206, D=1024, bf16) unless quick mode
(`--benchmark-disable` or SONAR_BENCH_QUICK=1) asks for the small ones; the CPU always uses small shapes
(N=256, V=8192, D=256, fp32). `SONAR_BENCH_LCE_SHAPE=N,V,D` overrides. Peak CUDA memory of one step above
the inputs goes into `extra_info["peak_mem_bytes"]` (CUDA only; None on the CPU; the CPU's peak-memory
comparison is `bench/measure_lce_cpu.py`, one process per path).
"""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from common import peak_flops, record_throughput, shape_from_env
from sonar_kernels.functional.linear_cross_entropy import linear_cross_entropy

GROUP = "linear_cross_entropy fwd+bwd"
PAPER_SHAPE = (16384, 256206, 1024)
SMALL_SHAPE = (256, 8192, 256)


def _shape(quick: bool, device: torch.device) -> tuple[int, int, int]:
    env = shape_from_env("SONAR_BENCH_LCE_SHAPE", "N,V,D")
    if env:
        return env
    return SMALL_SHAPE if (quick or device.type != "cuda") else PAPER_SHAPE


def _reference(h, w, t):
    return F.cross_entropy((h @ w.t()).float(), t, ignore_index=-100)


def _ours(h, w, t):
    return linear_cross_entropy(h, w, t, ignore_index=-100)


def _liger():
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except Exception as exc:  # not installed, or its import fails on this machine
        pytest.skip(f"liger-kernel not importable: {exc}")
    return lambda h, w, t: liger_fused_linear_cross_entropy(h, w, t, ignore_index=-100)


def _cce(filter_eps=None):
    try:
        from cut_cross_entropy import linear_cross_entropy as cce_lce
    except Exception as exc:
        pytest.skip(f"cut-cross-entropy not importable: {exc}")
    # filter_eps=None: exact gradients, like ours; "high" (CCE's default) skips gradient blocks whose
    # softmax entries are all below a threshold: faster, approximate
    return lambda h, w, t: cce_lce(h, w, t, ignore_index=-100, filter_eps=filter_eps)


def _torch_chunked(strategy="auto"):
    return lambda h, w, t: linear_cross_entropy(h, w, t, ignore_index=-100, impl="torch", strategy=strategy)


def _recompute():
    return lambda h, w, t: linear_cross_entropy(h, w, t, ignore_index=-100, strategy="recompute")


def _native():
    from sonar_kernels import native

    if not native.native_available():
        pytest.skip(f"native library: {native.native_load_error()}")
    return lambda h, w, t: linear_cross_entropy(h, w, t, ignore_index=-100, impl="native")


ROLES = {"ours": lambda: _ours, "ours-dlogits-bwd": _recompute, "ours-atomic-bwd": _recompute,
         "torch-chunked": _torch_chunked, "torch-recompute": lambda: _torch_chunked("recompute"),
         "native": _native, "reference": lambda: _reference, "liger": _liger, "cce": _cce,
         "cce-filtered": lambda: _cce("high")}
# the Triton backward each recomputing role runs (SONAR_KERNELS_LCE_BACKWARD)
TRITON_BACKWARD = {"ours-dlogits-bwd": "dlogits", "ours-atomic-bwd": "atomic"}


def _backward_name(role: str, device: torch.device) -> str | None:
    """What the role's gradient costs (for the report)."""
    if role in TRITON_BACKWARD:
        return f"triton {TRITON_BACKWARD[role]} (recompute)"
    if role == "ours":
        return "triton grad-in-forward" if device.type == "cuda" else "torch grad-in-forward"
    if role == "torch-chunked":
        return "torch grad-in-forward"
    if role == "torch-recompute":
        return "torch recompute"
    if role == "native":
        return "native grad-in-forward"
    return None


CUDA_ONLY = {"ours-dlogits-bwd": "the Triton path is timed on CUDA only",
             "ours-atomic-bwd": "the Triton path is timed on CUDA only",
             "torch-chunked": "on the CPU the chunked PyTorch path is what 'ours' runs",
             "liger": "liger runs its Triton kernels on CUDA only (the CPU interpreter is too slow to time)",
             "cce": "cce runs its Triton kernels on CUDA only (the CPU interpreter is too slow to time)",
             "cce-filtered": "cce runs its Triton kernels on CUDA only (the CPU interpreter is too slow to time)"}
CPU_ONLY = {"native": "the native library is a CPU library"}


@pytest.mark.benchmark(group=GROUP)
@pytest.mark.parametrize("role", list(ROLES))
def test_bench_linear_cross_entropy(benchmark, bench_quick, bench_device, role, monkeypatch):
    device = bench_device
    if role in CUDA_ONLY and device.type != "cuda":
        pytest.skip(CUDA_ONLY[role])
    if role in CPU_ONLY and device.type != "cpu":
        pytest.skip(CPU_ONLY[role])
    if role in TRITON_BACKWARD:
        monkeypatch.setenv("SONAR_KERNELS_LCE_BACKWARD", TRITON_BACKWARD[role])
    fn = ROLES[role]()
    n, v, d = _shape(bench_quick, device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(n, d, generator=g).to(device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, d, generator=g) / d ** 0.5).to(device=device, dtype=dtype)  # frozen
    target = torch.randint(0, v, (n,), generator=g).to(device)
    target[::17] = -100

    def step():
        hidden.grad = None
        loss = fn(hidden, weight, target)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return loss

    try:
        loss = step()  # warm-up (Triton compilation / autotuning) and a sanity check
    except torch.cuda.OutOfMemoryError:
        pytest.skip(f"{role} runs out of GPU memory at N={n}, V={v}, D={d}")
    assert torch.isfinite(loss).item() and hidden.grad is not None and weight.grad is None
    peak = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        peak = torch.cuda.max_memory_allocated() - base
    benchmark.extra_info.update({
        "role": role, "N": n, "V": v, "D": d, "dtype": str(dtype).replace("torch.", ""),
        "peak_mem_bytes": peak, "full_logits_fp32_bytes": n * v * 4,
        "backward": _backward_name(role, device),
    })
    benchmark(step)
    # useful work: the logits GEMM and the d_hidden GEMM, 2*N*V*D each (the recomputing strategies also
    # recompute the logits in the backward: a third GEMM, not counted here)
    record_throughput(benchmark, flops=4.0 * n * v * d, peak=peak_flops(device), tokens=n)
