"""Benchmark: the native CPU linear cross-entropy against the plain-PyTorch chunked path it replaces.

Both run in the same pytest-benchmark group, side by side in one run:
  reference  sonar_kernels.torch_ops.linear_cross_entropy (the CPU path without the native library)
  ours       sonar_kernels.native (tiled GEMM + fused online log-sum-exp, C++)
Groups: "native lce fwd" (forward only, as in evaluation), "native lce fwd+bwd" (forward, then the
recomputing backward's d_hidden for a frozen weight: strategy "recompute") and "native lce grad-in-fwd"
(`forward_with_grad`: loss and d_hidden in one pass, two GEMMs, the default strategy for a frozen weight). CPU, fp32, torch's default thread count. Shapes: the
tiny-SONAR shape N=4096, V=4000, D=256 by default, N=256, V=4000, D=256 in quick mode
(`--benchmark-disable` or SONAR_BENCH_QUICK=1); SONAR_BENCH_NATIVE_SHAPE=N,V,D overrides (the SONAR-like
shape in docs/native.md is 512,65536,1024). Skipped when the native library is not built.
"""
from __future__ import annotations


import pytest
import torch

from common import shape_from_env
from sonar_kernels import native
from sonar_kernels.torch_ops import linear_cross_entropy as torch_lce

DEFAULT_SHAPE = (4096, 4000, 256)
QUICK_SHAPE = (256, 4000, 256)
IMPLS = {"reference": torch_lce, "ours": native}

pytestmark = pytest.mark.skipif(not native.native_available(), reason=str(native.native_load_error()))


def _shape(quick: bool) -> tuple[int, int, int]:
    env = shape_from_env("SONAR_BENCH_NATIVE_SHAPE", "N,V,D")
    if env:
        return env
    return QUICK_SHAPE if quick else DEFAULT_SHAPE


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd", "grad-in-fwd"])
@pytest.mark.parametrize("role", list(IMPLS))
def test_bench_native_lce(benchmark, bench_quick, role, mode):
    n, v, d = _shape(bench_quick)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, d, generator=g)
    weight = torch.randn(v, d, generator=g) / d ** 0.5  # frozen
    target = torch.randint(0, v, (n,), generator=g)
    target[::17] = -100
    impl = IMPLS[role]
    grad_rows = torch.full((n,), 1.0 / n)

    def step():
        if mode == "grad-in-fwd":
            return impl.forward_with_grad(hidden, weight, target, None)
        loss, lse = impl.forward(hidden, weight, target, None)
        if mode == "fwd":
            return loss, lse, None
        d_hidden, d_weight, _ = impl.backward(hidden, weight, target, None, lse, grad_rows)
        assert d_weight is None
        return loss, lse, d_hidden

    loss, lse, d_hidden = step()  # warm-up and a sanity check against the other path
    other = IMPLS["ours" if role == "reference" else "reference"]
    want_loss, want_lse = other.forward(hidden, weight, target, None)
    torch.testing.assert_close(lse, want_lse, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(loss, want_loss, atol=1e-4, rtol=1e-5)
    benchmark.group = f"native lce {mode}"
    benchmark.extra_info.update({
        "role": role, "impl": "native" if role == "ours" else "torch", "N": n, "V": v, "D": d,
        "dtype": "float32", "threads": torch.get_num_threads(),
    })
    benchmark(step)
