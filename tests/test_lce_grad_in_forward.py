"""Issue 14 behaviour of `linear_cross_entropy`: the gradient-in-forward strategy (FLOP count, chunk bound),
autocast safety, out-of-range targets and the z-loss, on the PyTorch path, the Triton path (CPU
interpreter: fp32/fp16 only, bf16 arithmetic is wrong there) and the native library (when built).

References are float64 full logits built here with plain torch ops (never the code under test).
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from sonar_kernels import native
from sonar_kernels.backend import interpret_mode
from sonar_kernels.functional.linear_cross_entropy import linear_cross_entropy
from sonar_kernels.torch_ops import linear_cross_entropy as torch_lce

from _devices import for_triton

TRITON = pytest.param("triton", marks=pytest.mark.skipif(
    not (torch.cuda.is_available() or interpret_mode()), reason="triton needs CUDA or TRITON_INTERPRET=1"))
NATIVE = pytest.param("native", marks=pytest.mark.skipif(
    not native.native_available(), reason=f"native library: {native.native_load_error()}"))
IMPLS = ["torch", TRITON, NATIVE]


def _inputs(seed, n=24, d=32, v=200, bias=False, ignore_every=5):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g)
    weight = torch.randn(v, d, generator=g) / d ** 0.5
    b = torch.randn(v, generator=g) if bias else None
    target = torch.randint(0, v, (n,), generator=g)
    target[::ignore_every] = -100
    return hidden, weight, target, b


def _reference(hidden, weight, target, bias=None, *, reduction="mean", label_smoothing=0.0, z_loss=0.0,
               grad_out=None, grad_weight=False):
    """float64 loss (CE + z_loss * lse^2 on valid rows) and d_hidden (, d_weight) through full logits."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_(grad_weight)
    logits = h @ w.t()
    if bias is not None:
        logits = logits + bias.detach().double()
    valid = target != -100
    rows = F.cross_entropy(logits, target, reduction="none", label_smoothing=label_smoothing)
    rows = rows + z_loss * torch.logsumexp(logits, -1).pow(2) * valid
    if reduction == "none":
        loss = rows
    elif reduction == "sum":
        loss = rows.sum()
    else:
        loss = rows.sum() / valid.sum().clamp_min(1)
    loss.backward(torch.ones_like(loss) if grad_out is None else grad_out.double())
    return loss.detach(), h.grad, (w.grad if grad_weight else None)


def _run(impl, hidden, weight, target, bias=None, *, dtype=torch.float32, grad_out=None, grad_weight=False,
         **kw):
    dev = for_triton(hidden).device if impl == "triton" else torch.device("cpu")
    h = hidden.to(dev, dtype).clone().requires_grad_()  # clone: `.to` may return the caller's tensor
    w = weight.to(dev, dtype).clone().requires_grad_(grad_weight)
    b = bias.to(dev, dtype) if bias is not None else None
    loss = linear_cross_entropy(h, w, target.to(dev), bias=b, impl=impl, **kw)
    loss.backward(torch.ones_like(loss) if grad_out is None else grad_out.to(dev, loss.dtype))
    return loss.detach().cpu(), h.grad.cpu(), (w.grad.cpu() if grad_weight else None)


def _close(got, want, atol, rtol=0.0, what=""):
    torch.testing.assert_close(got.double(), want.double(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


# ------------------------------------------------------------------------------- grad in forward

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_grad_in_forward_matches_float64(impl, reduction, label_smoothing):
    hidden, weight, target, bias = _inputs(1 + int(label_smoothing * 10), bias=True)
    go = torch.randn(24, generator=torch.Generator().manual_seed(7)) if reduction == "none" else None
    kw = dict(reduction=reduction, label_smoothing=label_smoothing)
    want = _reference(hidden, weight, target, bias, grad_out=go, **kw)
    for strategy in ("grad_in_forward", "recompute"):
        got = _run(impl, hidden, weight, target, bias, grad_out=go, strategy=strategy, **kw)
        _close(got[0], want[0], atol=2e-5, rtol=1e-5, what=f"{strategy} loss")
        _close(got[1], want[1], atol=2e-6, rtol=1e-4, what=f"{strategy} d_hidden")


@pytest.mark.parametrize("impl", IMPLS)
def test_grad_in_forward_chunk_sizes_agree(impl):
    """Chunks of 1, 7 and all tokens give the same loss and gradient (ragged last chunk included)."""
    hidden, weight, target, _ = _inputs(3, n=23)
    want = _reference(hidden, weight, target, reduction="sum")
    for chunk in (1, 7, 23, 100):
        got = _run(impl, hidden, weight, target, reduction="sum", strategy="grad_in_forward", chunk_size=chunk)
        _close(got[0], want[0], atol=5e-5, rtol=1e-5, what=f"chunk {chunk} loss")
        _close(got[1], want[1], atol=2e-6, rtol=1e-4, what=f"chunk {chunk} d_hidden")


def test_default_chunk_is_bounded():
    """The fp32 chunk of logits: at most 1/8 of the full [N, V] fp32 logits and at most 256 MB."""
    for n, v in ((16384, 256206), (8192, 32000), (64, 1000), (3, 50)):
        rows = torch_lce.chunk_rows(v, num_tokens=n)
        assert rows >= 1
        if n >= 8:
            assert rows * v * 4 <= min(256 * 2 ** 20, n * v * 4 / 8)
    from sonar_kernels.triton_kernels import linear_cross_entropy as triton_lce
    for half in (False, True):
        rows = triton_lce.grad_in_forward_chunk_rows(16384, 256206, half)
        assert rows * 256206 * (6 if half else 4) <= min(256 * 2 ** 20, 16384 * 256206 * 4 / 8)


def test_auto_strategy_choice():
    """auto: gradient in the forward for a frozen weight that needs d_hidden, else recompute."""
    hidden, weight, target, _ = _inputs(4)
    counts = torch_lce.LAUNCH_COUNTS
    before = dict(counts)
    _run("torch", hidden, weight, target)
    assert counts["forward_with_grad"] == before["forward_with_grad"] + 1 and counts["backward"] == before["backward"]
    _run("torch", hidden, weight, target, grad_weight=True)
    assert counts["forward_with_grad"] == before["forward_with_grad"] + 1
    assert counts["backward"] == before["backward"] + 1 and counts["backward_dweight"] == before["backward_dweight"] + 1
    with torch.no_grad():
        linear_cross_entropy(hidden, weight, target)
    assert counts["forward_with_grad"] == before["forward_with_grad"] + 1
    with pytest.raises(ValueError, match="frozen weight"):
        linear_cross_entropy(hidden.requires_grad_(), weight.requires_grad_(), target, strategy="grad_in_forward")
    with pytest.raises(ValueError, match="strategy must be one of"):
        linear_cross_entropy(hidden, weight, target, strategy="fast")
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(hidden, weight, target, chunk_size=0)


def test_flops_frozen_weight_at_the_floor():
    """forward + backward with a frozen weight: within 1.05 x 4 N D V (two GEMMs), on the PyTorch path;
    the recomputing strategy needs 6 N D V, and a trainable weight 6 N D V as well."""
    n, d, v = 256, 64, 1000
    hidden, weight, target, _ = _inputs(5, n=n, d=d, v=v)

    def count(**kw):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_(kw.pop("grad_weight", False))
        with FlopCounterMode(display=False) as fc:
            linear_cross_entropy(h, w, target, impl="torch", **kw).backward()
        return fc.get_total_flops()

    floor = 4 * n * d * v
    assert floor <= count() <= 1.05 * floor
    assert count(strategy="recompute") >= 1.5 * floor
    assert count(grad_weight=True) >= 1.5 * floor


# ------------------------------------------------------------------------------- autocast

def _autocast_cases():
    cases = []
    for impl in ("torch", "triton", "native"):
        for dtype in (torch.bfloat16, torch.float16):
            for grad_weight in (False, True):
                for mode in ("forward_inside", "both_inside"):
                    marks = ()
                    if impl == "native" and not native.native_available():
                        marks = pytest.mark.skip(reason=f"native library: {native.native_load_error()}")
                    if impl == "triton":
                        if not (torch.cuda.is_available() or interpret_mode()):
                            marks = pytest.mark.skip(reason="triton needs CUDA or TRITON_INTERPRET=1")
                        elif dtype == torch.bfloat16 and not torch.cuda.is_available():
                            marks = pytest.mark.skip(reason="the Triton interpreter computes bf16 wrongly")
                    cases.append(pytest.param(impl, dtype, grad_weight, mode, marks=marks))
    return cases


@pytest.mark.parametrize("impl,dtype,grad_weight,mode", _autocast_cases())
def test_autocast(impl, dtype, grad_weight, mode):
    """Inputs in the autocast dtype, forward under torch.autocast, backward inside or outside it: the loss
    and gradients match a float64 reference of the same (rounded) inputs, i.e. the logits and softmax are
    never computed in half precision and forward and backward agree."""
    hidden, weight, target, _ = _inputs(11, n=32, d=48, v=300)
    hidden, weight = hidden.to(dtype), weight.to(dtype)  # the reference sees the same rounded values
    want = _reference(hidden, weight, target, grad_weight=grad_weight)
    dev = for_triton(hidden).device if impl == "triton" else torch.device("cpu")
    h = hidden.to(dev).clone().requires_grad_()
    w = weight.to(dev).clone().requires_grad_(grad_weight)
    with torch.autocast(device_type=dev.type, dtype=dtype):
        loss = linear_cross_entropy(h, w, target.to(dev), impl=impl)
        if mode == "both_inside":
            loss.backward()
    if mode == "forward_inside":
        loss.backward()
    assert loss.dtype == torch.float32
    _close(loss.cpu(), want[0], atol=2e-5, rtol=1e-5, what="loss")  # fp32 math on exactly-rounded inputs
    # gradients come back in the input dtype: one rounding of the fp32 result
    tol = 2 ** -7 if dtype == torch.bfloat16 else 2 ** -10
    scale_h = want[1].abs().max()
    _close(h.grad.cpu(), want[1], atol=tol * scale_h, rtol=tol, what="d_hidden")
    if grad_weight:
        _close(w.grad.cpu(), want[2], atol=tol * want[2].abs().max(), rtol=tol, what="d_weight")


def test_autocast_mixed_dtypes_are_cast_to_the_autocast_dtype():
    """Under autocast an fp32 weight with bf16 hidden states (a frozen fp32 embedding) is accepted and both
    are cast to the autocast dtype, as F.linear would; outside autocast the mismatch stays an error."""
    hidden, weight, target, _ = _inputs(12)
    h = hidden.to(torch.bfloat16).requires_grad_()
    with pytest.raises(TypeError, match="weight dtype"):
        linear_cross_entropy(h, weight, target)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, weight, target, impl="torch")
    loss.backward()
    want = _reference(hidden.to(torch.bfloat16), weight.to(torch.bfloat16), target)
    _close(loss, want[0], atol=2e-5, rtol=1e-5, what="loss")
    assert h.grad.dtype == torch.bfloat16


# ------------------------------------------------------------------------------- targets

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bad_value", [200, -1, 10 ** 6])
def test_out_of_range_targets_raise(impl, bad_value):
    hidden, weight, target, _ = _inputs(13)
    target = target.clone()
    target[3] = bad_value
    args = for_triton(hidden, weight, target) if impl == "triton" else (hidden, weight, target)
    if args[0].is_cuda:  # a device-side assert ends the process's CUDA context: check it in a child process
        script = ("import torch; from sonar_kernels import linear_cross_entropy as f; "
                  "h = torch.randn(8, 16, device='cuda'); w = torch.randn(200, 16, device='cuda'); "
                  f"t = torch.zeros(8, dtype=torch.long, device='cuda'); t[3] = {bad_value}; "
                  "f(h, w, t, impl='triton'); torch.cuda.synchronize()")
        res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
        assert res.returncode != 0, "an out-of-range target passed on CUDA"
        assert any(m in res.stderr for m in ("outside", "device-side assert", "Assertion")), res.stderr[-2000:]
        return
    with pytest.raises(ValueError, match=r"in \[0, 200\) or ignore_index=-100, found"):
        linear_cross_entropy(*args, impl=impl)
    # the documented opt-out skips the check (the value is then meaningless, but nothing is read out of bounds)
    loss = linear_cross_entropy(*args, impl=impl, validate_targets=False)
    assert loss.shape == ()


# ------------------------------------------------------------------------------- z-loss

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("strategy", ["grad_in_forward", "recompute"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_z_loss_value_and_gradient(impl, strategy, reduction):
    hidden, weight, target, bias = _inputs(21, bias=True)
    hidden = hidden * 3  # logits of a few units: the z-loss term is not negligible
    go = torch.randn(24, generator=torch.Generator().manual_seed(3)) if reduction == "none" else None
    kw = dict(reduction=reduction, label_smoothing=0.05, z_loss=0.1)
    want = _reference(hidden, weight, target, bias, grad_out=go, **kw)
    plain = _reference(hidden, weight, target, bias, grad_out=go, reduction=reduction, label_smoothing=0.05)
    assert (want[1] - plain[1]).abs().max() > 1e-2  # the z-loss changes the gradient measurably
    got = _run(impl, hidden, weight, target, bias, grad_out=go, strategy=strategy, **kw)
    _close(got[0], want[0], atol=5e-5, rtol=1e-5, what="loss")
    _close(got[1], want[1], atol=1e-5, rtol=1e-4, what="d_hidden")
    if strategy == "recompute":
        got = _run(impl, hidden, weight, target, bias, grad_out=go, grad_weight=True, strategy=strategy, **kw)
        want = _reference(hidden, weight, target, bias, grad_out=go, grad_weight=True, **kw)
        _close(got[2], want[2], atol=1e-5, rtol=1e-4, what="d_weight")


def test_z_loss_gradcheck_float64():
    hidden, weight, target, bias = _inputs(22, n=6, d=5, v=9, bias=True, ignore_every=4)
    h = hidden.double().requires_grad_()
    w = weight.double().requires_grad_()
    b = bias.double().requires_grad_()
    for strategy in ("auto", "recompute"):
        fn = lambda h, w, b: linear_cross_entropy(h, w, target, bias=b, z_loss=0.3, impl="torch",  # noqa: E731
                                                  strategy=strategy)
        assert torch.autograd.gradcheck(fn, (h, w, b), eps=1e-6, atol=1e-7)
    fn = lambda h: linear_cross_entropy(h, weight.double(), target, z_loss=0.3, impl="torch")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (h,), eps=1e-6, atol=1e-7)  # frozen weight: grad in the forward
    with pytest.raises(ValueError, match="z_loss"):
        linear_cross_entropy(hidden, weight, target, z_loss=-1.0)
