"""Tests of the fused linear cross-entropy (sonar_kernels.linear_cross_entropy), both implementations.

Reference: float64 full logits + F.cross_entropy (and float64 autograd for gradients) on fresh random
inputs. The Triton path runs in the CPU interpreter (TRITON_INTERPRET=1 from the root conftest), so its
shapes stay tiny (N <= 64, V <= 600, D <= 64); on a GPU machine the same tests run the kernels on the GPU
(inputs moved by `tests/_devices.for_triton`, results compared on the CPU).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sonar_kernels.functional.linear_cross_entropy import linear_cross_entropy
from sonar_kernels.nn.linear_cross_entropy import LinearCrossEntropy, LinearCrossEntropyConfig
from sonar_kernels.torch_ops import linear_cross_entropy as torch_lce
from sonar_kernels.backend import interpret_mode

from _devices import for_triton

IMPLS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not (torch.cuda.is_available() or interpret_mode()), reason="triton needs CUDA or TRITON_INTERPRET=1"))]


def _inputs(seed, n, d, v, dtype=torch.float32, bias=False, ignore_frac=0.25, ignore_index=-100, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, d, generator=g) * scale).to(dtype)
    weight = (torch.randn(v, d, generator=g) / d ** 0.5).to(dtype)
    b = torch.randn(v, generator=g).to(dtype) if bias else None
    target = torch.randint(0, v, (n,), generator=g)
    drop = torch.rand(n, generator=g) < ignore_frac
    target[drop] = ignore_index
    return hidden, weight, target, b


def _reference(hidden, weight, target, bias, *, ignore_index=-100, reduction="mean", label_smoothing=0.0,
               grad_weight=False, grad_bias=False, grad_out=None):
    """float64 loss, lse and gradients (hidden, weight, bias) through full logits."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_(grad_weight)
    b = bias.detach().double().requires_grad_(grad_bias) if bias is not None else None
    logits = h @ w.t() + (b if b is not None else 0.0)
    loss = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)
    if reduction == "mean" and bool((target == ignore_index).all()):
        loss = (logits * 0.0).sum()  # our documented convention: 0, not NaN
    go = grad_out if grad_out is not None else torch.ones_like(loss)
    loss.backward(go.double())
    return (loss.detach(), torch.logsumexp(logits.detach(), -1), h.grad,
            w.grad if grad_weight else None, b.grad if (b is not None and grad_bias) else None)


def _run(impl, hidden, weight, target, bias, *, grad_weight=False, grad_bias=False, grad_out=None, **kw):
    if impl == "triton":
        hidden, weight, target, bias, grad_out = for_triton(hidden, weight, target, bias, grad_out)
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_(grad_weight)
    b = bias.detach().clone().requires_grad_(grad_bias) if bias is not None else None
    loss, lse = linear_cross_entropy(h, w, target, bias=b, return_lse=True, impl=impl, **kw)
    go = grad_out if grad_out is not None else torch.ones_like(loss)
    loss.backward(go.to(loss.dtype))
    out = (loss.detach(), lse, h.grad, w.grad, (b.grad if b is not None else None))
    return tuple(t if t is None else t.cpu() for t in out)


def _close(got, want, atol, rtol=0.0, what=""):
    assert got is not None and want is not None, what
    torch.testing.assert_close(got.double(), want.double(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def _half_grad_bounds(hidden, weight, target, bias, row_scale, label_smoothing, dtype, ignore_index=-100):
    """Element-wise error bounds of (d_hidden, d_weight, d_bias) computed from half inputs, derived from the
    dtype's unit roundoff u and the problem size, with the standard dot-product bound |fl(a.b) - a.b| <=
    gamma_K sum_k |a_k b_k|: the dlogits G = row_scale * (softmax - (1-eps) onehot - eps/V) (float64 from the
    rounded inputs) may be rounded to the half dtype (u), are summed over K = V (d_hidden) or N (d_weight,
    d_bias) terms in fp32 (K u32, plus u32 |z| for the fp32 log-sum-exp), and the result is rounded to the
    half dtype (u |result|). Returns (bound_h, bound_w, bound_b) = 2 x that (margin), float64."""
    h, w = hidden.double(), weight.double()
    z = h @ w.t() + (bias.double() if bias is not None else 0.0)
    n, v = z.shape
    valid = target != ignore_index
    g = torch.softmax(z, dim=-1) - label_smoothing / v
    g[valid, target[valid]] -= 1.0 - label_smoothing
    g = (g * row_scale.double()[:, None]) * valid[:, None]
    u, u32 = torch.finfo(dtype).eps / 2, torch.finfo(torch.float32).eps / 2
    z_err = u32 * z.abs().max().item()  # fp32 lse / logits: relative error of the softmax
    a = g.abs()
    bound_h = (u + v * u32 + z_err) * (a @ w.abs()) + u * (g @ w).abs()
    bound_w = (u + n * u32 + z_err) * (a.t() @ h.abs()) + u * (g.t() @ h).abs()
    bound_b = (u + n * u32 + z_err) * a.sum(0) + u * g.sum(0).abs()
    return 2 * bound_h, 2 * bound_w, 2 * bound_b


def _within(got, want, bound, what):
    """|got - want| <= bound element-wise (bound from `_half_grad_bounds`)."""
    err = (got.double() - want.double()).abs()
    worst = (err - bound).argmax()
    assert bool((err <= bound).all()), (f"{what}: error {err.flatten()[worst].item():.3e} exceeds the derived bound "
                                        f"{bound.flatten()[worst].item():.3e} at flat index {worst.item()}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_matches_float64_reference(impl, reduction, label_smoothing):
    seed = {"mean": 1, "sum": 2, "none": 3}[reduction] + int(label_smoothing * 100)
    hidden, weight, target, bias = _inputs(seed, n=40, d=48, v=300, bias=True)
    assert (target == -100).any() and (target != -100).any()
    go = torch.randn(40, generator=torch.Generator().manual_seed(seed)) if reduction == "none" else None
    kw = dict(reduction=reduction, label_smoothing=label_smoothing)
    ref = _reference(hidden, weight, target, bias, grad_weight=True, grad_bias=True, grad_out=go, **kw)
    got = _run(impl, hidden, weight, target, bias, grad_weight=True, grad_bias=True, grad_out=go, **kw)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    if reduction == "none":
        assert bool((got[0][target == -100] == 0).all())
    # fp32 accumulation over D=48 and V=300: errors of a few 1e-6 are expected
    _close(got[0], ref[0], atol=2e-5, rtol=1e-5, what="loss")
    _close(got[1], ref[1], atol=2e-5, rtol=1e-5, what="lse")
    for i, name in ((2, "grad hidden"), (3, "grad weight"), (4, "grad bias")):
        _close(got[i], ref[i], atol=2e-5, rtol=1e-4, what=name)


@pytest.mark.parametrize("impl", IMPLS)
def test_custom_ignore_index_and_unsmoothed_mean(impl):
    hidden, weight, target, _ = _inputs(11, n=24, d=32, v=200, ignore_index=0, ignore_frac=0.4)
    ref = _reference(hidden, weight, target, None, ignore_index=0)
    got = _run(impl, hidden, weight, target, None, ignore_index=0)
    _close(got[0], ref[0], atol=1e-5, what="loss")
    _close(got[2], ref[2], atol=1e-5, rtol=1e-4, what="grad hidden")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_batch_is_zero_with_zero_grads(impl, reduction):
    hidden, weight, target, bias = _inputs(5, n=8, d=32, v=150, bias=True)
    target.fill_(-100)
    loss, _, gh, gw, gb = _run(impl, hidden, weight, target, bias, grad_weight=True, grad_bias=True,
                               reduction=reduction, label_smoothing=0.2)
    assert torch.isfinite(loss).all() and bool((loss == 0).all())
    for g in (gh, gw, gb):
        assert g is not None and bool((g == 0).all())


@pytest.mark.parametrize("impl,n,v", [("torch", 33, 1007), ("triton", 37, 519), ("torch", 1, 300),
                                      ("triton", 1, 300)])
def test_odd_vocab_and_single_token(impl, n, v):
    if impl == "triton" and not (torch.cuda.is_available() or interpret_mode()):
        pytest.skip("triton needs CUDA or TRITON_INTERPRET=1")
    hidden, weight, target, bias = _inputs(20 + n + v, n=n, d=40, v=v, bias=True, ignore_frac=0.0)
    target[-1] = v - 1  # the last (masked-tile) column as a target
    ref = _reference(hidden, weight, target, bias, label_smoothing=0.05)
    got = _run(impl, hidden, weight, target, bias, label_smoothing=0.05)
    _close(got[0], ref[0], atol=2e-5, rtol=1e-5, what="loss")
    _close(got[1], ref[1], atol=2e-5, rtol=1e-5, what="lse")
    _close(got[2], ref[2], atol=2e-5, rtol=1e-4, what="grad hidden")


@pytest.mark.parametrize("impl", IMPLS)
def test_huge_logits_stay_finite_and_correct(impl):
    # logits of magnitude ~1e4: a naive exp would overflow
    hidden, weight, target, _ = _inputs(7, n=16, d=32, v=200, scale=1.0, ignore_frac=0.0)
    hidden = hidden * (1e4 / (hidden @ weight.t()).abs().max())
    ref = _reference(hidden, weight, target, None, reduction="none", label_smoothing=0.1)
    got = _run(impl, hidden, weight, target, None, reduction="none", label_smoothing=0.1)
    assert (hidden @ weight.t()).abs().max() > 5e3
    for g in got[:3]:
        assert torch.isfinite(g).all()
    # fp32 logits of size 1e4 carry ~1e-3 absolute rounding; the loss is a difference of such values
    _close(got[0], ref[0], atol=2e-2, rtol=1e-5, what="loss")
    _close(got[1], ref[1], atol=2e-2, rtol=1e-6, what="lse")
    _close(got[2], ref[2], atol=5e-3, rtol=1e-3, what="grad hidden")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(impl, dtype):
    hidden, weight, target, bias = _inputs(30, n=32, d=64, v=256, dtype=dtype, bias=True)
    # the reference sees the same rounded half inputs, computed in float64
    ref = _reference(hidden, weight, target, bias, grad_weight=True, grad_bias=True, label_smoothing=0.1)
    got = _run(impl, hidden, weight, target, bias, grad_weight=True, grad_bias=True, label_smoothing=0.1)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    assert got[2].dtype == dtype and got[3].dtype == dtype and got[4].dtype == dtype
    # fp32 accumulation: the loss is near-exact; gradients are rounded to the half dtype on output
    _close(got[0], ref[0], atol=1e-4, rtol=1e-5, what="loss")
    _close(got[1], ref[1], atol=1e-4, rtol=1e-5, what="lse")
    rel = 1e-2 if dtype == torch.bfloat16 else 2e-3
    for i, name in ((2, "grad hidden"), (3, "grad weight"), (4, "grad bias")):
        _close(got[i], ref[i], atol=rel * ref[i].abs().max().item(), rtol=rel, what=name)
    # tight: the dtype's roundoff and the problem size (catches a dropped eps/V smoothing term)
    n_valid = int((target != -100).sum())
    bounds = _half_grad_bounds(hidden, weight, target, bias, torch.full((target.numel(),), 1.0 / n_valid), 0.1, dtype)
    for i, name in ((2, "grad hidden"), (3, "grad weight"), (4, "grad bias")):
        _within(got[i], ref[i], bounds[i - 2], f"{impl} {dtype} {name}")


def test_gradcheck_torch_path_float64():
    hidden, weight, target, bias = _inputs(40, n=6, d=5, v=11, dtype=torch.float64, bias=True, ignore_frac=0.3)
    target[0] = 3
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    for reduction in ("mean", "none"):
        fn = lambda h, w, b: linear_cross_entropy(  # noqa: E731
            h, w, target, bias=b, reduction=reduction, label_smoothing=0.15, impl="torch")
        assert torch.autograd.gradcheck(fn, (h, w, b), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("impl", IMPLS)
def test_frozen_weight_launches_no_weight_gradient(impl):
    from sonar_kernels.triton_kernels import linear_cross_entropy as triton_lce

    counts = torch_lce.LAUNCH_COUNTS if impl == "torch" else triton_lce.LAUNCH_COUNTS
    before = dict(counts)
    hidden, weight, target, bias = _inputs(50, n=16, d=32, v=130, bias=True)
    # default: the gradient is computed in the forward, the backward launches nothing
    loss, _, gh, gw, gb = _run(impl, hidden, weight, target, bias)
    assert gw is None and gb is None and gh is not None
    assert counts["forward_with_grad"] == before["forward_with_grad"] + 1
    assert counts["backward"] == before["backward"]
    # the recomputing strategy: one backward, still no weight-gradient work
    loss, _, gh, gw, gb = _run(impl, hidden, weight, target, bias, strategy="recompute")
    assert gw is None and gb is None and gh is not None
    assert counts["backward"] == before["backward"] + 1
    assert counts["backward_dweight"] == before["backward_dweight"]
    # and when the weight does require grad, exactly one weight-gradient launch happens
    _run(impl, hidden, weight, target, bias, grad_weight=True)
    assert counts["backward_dweight"] == before["backward_dweight"] + 1


@pytest.mark.parametrize("impl", IMPLS)
def test_return_lse_values(impl):
    hidden, weight, target, bias = _inputs(60, n=20, d=24, v=170, bias=True)
    args = for_triton(hidden, weight, target, bias) if impl == "triton" else (hidden, weight, target, bias)
    loss, lse = linear_cross_entropy(*args[:3], bias=args[3], return_lse=True, impl=impl, reduction="none")
    loss, lse = loss.cpu(), lse.cpu()
    want = torch.logsumexp(hidden.double() @ weight.double().t() + bias.double(), dim=-1)
    assert lse.shape == (20,) and lse.dtype == torch.float32 and not lse.requires_grad
    _close(lse, want, atol=1e-5, rtol=1e-6, what="lse")
    # the probability of the target class follows from loss and lse: log p_t = -loss (no smoothing)
    valid = target != -100
    logits = hidden.double() @ weight.double().t() + bias.double()
    _close(-loss[valid], (logits[valid].gather(1, target[valid, None]).squeeze(1) - want[valid]), atol=1e-5)


def test_triton_vocab_splits_agree():
    if not (torch.cuda.is_available() or interpret_mode()):
        pytest.skip("triton needs CUDA or TRITON_INTERPRET=1")
    from sonar_kernels.triton_kernels import linear_cross_entropy as triton_lce

    hidden, weight, target, _ = _inputs(70, n=20, d=32, v=450, ignore_frac=0.0)
    # non-contiguous hidden exercises the strides
    hidden_t = hidden.t().contiguous().t()
    assert not hidden_t.is_contiguous()
    ref = _reference(hidden, weight, target, None, reduction="none", label_smoothing=0.1)[0]
    hidden_t, weight, target = for_triton(hidden_t, weight, target)
    for splits in (1, 2, 4):
        loss, _ = triton_lce.forward(hidden_t, weight, target, None, label_smoothing=0.1, num_splits=splits)
        _close(loss.cpu(), ref, atol=2e-5, rtol=1e-5, what=f"{splits} splits")


def test_torch_chunking_matches_unchunked():
    hidden, weight, target, bias = _inputs(80, n=29, d=16, v=90, bias=True)
    ref = _reference(hidden, weight, target, bias, reduction="none", label_smoothing=0.1)
    loss, lse = torch_lce.forward(hidden, weight, target, bias, label_smoothing=0.1, chunk_size=4)
    _close(loss, ref[0], atol=1e-5, what="chunked loss")
    go = torch.randn(29, generator=torch.Generator().manual_seed(1))
    ref = _reference(hidden, weight, target, bias, reduction="none", label_smoothing=0.1, grad_weight=True,
                     grad_out=go)
    dh, dw, db = torch_lce.backward(hidden, weight, target, bias, lse, go, label_smoothing=0.1,
                                    need_weight=True, chunk_size=4)
    assert db is None
    _close(dh, ref[2], atol=1e-5, rtol=1e-4, what="chunked grad hidden")
    _close(dw, ref[3], atol=1e-5, rtol=1e-4, what="chunked grad weight")
    # chunk size keeps one fp32 logit chunk within the budget
    assert torch_lce.chunk_rows(256206) * 256206 * 4 <= 256 * 2 ** 20
    assert torch_lce.chunk_rows(10, chunk_bytes=1) == 1


def test_module_reshapes_leading_dims():
    hidden, weight, target, _ = _inputs(90, n=12, d=16, v=50)
    mod = LinearCrossEntropy(LinearCrossEntropyConfig(reduction="none", return_lse=True, impl="torch"))
    loss, lse = mod(hidden.view(3, 4, 16), weight, target.view(3, 4))
    assert loss.shape == (3, 4) and lse.shape == (3, 4)
    ref = _reference(hidden, weight, target, None, reduction="none")
    _close(loss.reshape(-1), ref[0], atol=1e-5, what="module loss")
    mean = LinearCrossEntropy(impl="torch", label_smoothing=0.1)(hidden, weight, target)
    _close(mean, _reference(hidden, weight, target, None, label_smoothing=0.1)[0], atol=1e-5, what="mean")
    with pytest.raises(ValueError, match="reduction"):
        LinearCrossEntropyConfig(reduction="avg")
    with pytest.raises(ValueError, match="leading shape"):
        mod(hidden.view(3, 4, 16), weight, target)


def test_error_messages():
    hidden, weight, target, bias = _inputs(100, n=6, d=8, v=20, bias=True, ignore_frac=0.0)
    with pytest.raises(ValueError, match="disagree on D"):
        linear_cross_entropy(hidden, weight[:, :7], target)
    with pytest.raises(ValueError, match="hidden must be 2-D"):
        linear_cross_entropy(hidden[None], weight, target)
    with pytest.raises(ValueError, match=r"target must have shape \[N\]"):
        linear_cross_entropy(hidden, weight, target[:5])
    with pytest.raises(ValueError, match=r"bias must have shape \[V\]"):
        linear_cross_entropy(hidden, weight, target, bias=bias[:3])
    with pytest.raises(TypeError, match="target must be an integer"):
        linear_cross_entropy(hidden, weight, target.float())
    with pytest.raises(TypeError, match="weight dtype"):
        linear_cross_entropy(hidden, weight.double(), target)
    with pytest.raises(TypeError, match="bias dtype"):
        linear_cross_entropy(hidden, weight, target, bias=bias.half())
    with pytest.raises(ValueError, match="reduction must be one of"):
        linear_cross_entropy(hidden, weight, target, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        linear_cross_entropy(hidden, weight, target, label_smoothing=1.5)
    with pytest.raises(ValueError, match="impl must be one of"):
        linear_cross_entropy(hidden, weight, target, impl="cuda")
    bad = target.clone()
    bad[2] = 20
    with pytest.raises(ValueError, match=r"target values must be in \[0, 20\).*found 20"):
        linear_cross_entropy(hidden, weight, bad)
    bad[2] = -1
    with pytest.raises(ValueError, match="found -1"):
        linear_cross_entropy(hidden, weight, bad)
    with pytest.raises(ValueError, match="one device"):
        linear_cross_entropy(hidden, weight.to("meta"), target)
    with pytest.raises(TypeError, match="float64"):
        linear_cross_entropy(hidden.double(), weight.double(), target, impl="triton")
    # int32 targets are accepted and mean the same as int64
    a = linear_cross_entropy(hidden, weight, target.int(), impl="torch")
    b = linear_cross_entropy(hidden, weight, target, impl="torch")
    assert torch.equal(a, b)


@pytest.mark.parametrize("impl", IMPLS)
def test_weight_grad_without_hidden_grad(impl):
    hidden, weight, target, bias = _inputs(110, n=20, d=32, v=140, bias=True)
    ref = _reference(hidden, weight, target, bias, reduction="sum", grad_weight=True)
    if impl == "triton":
        hidden, weight, target, bias = for_triton(hidden, weight, target, bias)
    w = weight.clone().requires_grad_()
    loss = linear_cross_entropy(hidden, w, target, bias=bias, impl=impl, reduction="sum")
    loss.backward()
    assert not hidden.requires_grad
    _close(w.grad.cpu(), ref[3], atol=2e-5, rtol=1e-4, what="grad weight")


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_batch(impl):
    hidden, weight, target, _ = _inputs(120, n=0, d=16, v=40)
    loss, lse, gh, _, _ = _run(impl, hidden, weight, target, None)
    assert loss.item() == 0.0 and lse.shape == (0,) and gh.shape == (0, 16)
    if impl == "triton":
        hidden, weight, target = for_triton(hidden, weight, target)
    none = linear_cross_entropy(hidden, weight, target, reduction="none", impl=impl)
    assert none.shape == (0,)



def test_triton_native_fp16_dot_path():
    """The GPU code path (half tiles straight into tl.dot, half dlogits) run in the interpreter with fp16."""
    if not (torch.cuda.is_available() or interpret_mode()):
        pytest.skip("triton needs CUDA or TRITON_INTERPRET=1")
    from sonar_kernels.triton_kernels import linear_cross_entropy as triton_lce

    hidden, weight, target, bias = _inputs(140, n=40, d=48, v=300, dtype=torch.float16, bias=True)
    go = torch.randn(40, generator=torch.Generator().manual_seed(3))
    ref = _reference(hidden, weight, target, bias, reduction="none", label_smoothing=0.1, grad_weight=True,
                     grad_bias=True, grad_out=go)
    hidden, weight, target, bias, go = for_triton(hidden, weight, target, bias, go)
    loss, lse = triton_lce.forward(hidden, weight, target, bias, label_smoothing=0.1, native_half_dot=True)
    _close(loss.cpu(), ref[0], atol=1e-4, rtol=1e-5, what="loss")
    dh, dw, db = triton_lce.backward(hidden, weight, target, bias, lse, go, label_smoothing=0.1,
                                     need_weight=True, need_bias=True, native_half_dot=True)
    for got, want, name in ((dh, ref[2], "grad hidden"), (dw, ref[3], "grad weight"), (db, ref[4], "grad bias")):
        got = got.cpu()
        assert got.dtype == torch.float16
        # dlogits are rounded to fp16 before the products: a few fp16 ulps of error
        _close(got, want, atol=3e-3 * want.abs().max().item(), rtol=3e-3, what=name)
    bounds = _half_grad_bounds(hidden.cpu(), weight.cpu(), target.cpu(), bias.cpu(), go.cpu(), 0.1, torch.float16)
    for got, bound, name in ((dh, bounds[0], "grad hidden"), (dw, bounds[1], "grad weight"), (db, bounds[2], "grad bias")):
        _within(got.cpu(), ref[("grad hidden", "grad weight", "grad bias").index(name) + 2], bound, name)


def _triton_lce_or_skip():
    if not (torch.cuda.is_available() or interpret_mode()):
        pytest.skip("triton needs CUDA or TRITON_INTERPRET=1")
    from sonar_kernels.triton_kernels import linear_cross_entropy as triton_lce

    return triton_lce


@pytest.mark.parametrize("strategy,chunk_rows", [("atomic", None), ("dlogits", None), ("dlogits", 16)])
@pytest.mark.parametrize("half", [False, True])
def test_triton_backward_strategies_match_float64(strategy, chunk_rows, half):
    """Both backward strategies (and the dlogits one over several chunks, the last one short) against float64
    autograd, with smoothing, a bias, weight/bias gradients and a whole token block of ignored rows (the
    dlogits kernel must still write that tile's zeros into its uninitialised buffer)."""
    triton_lce = _triton_lce_or_skip()
    dtype = torch.float16 if half else torch.float32
    n, d, v = 72, 40, 260
    hidden, weight, target, bias = _inputs(150, n=n, d=d, v=v, dtype=dtype, bias=True, ignore_frac=0.2)
    target[:32] = -100  # the first BLOCK_N=32 tile (interpreter config) is all ignored
    go = torch.randn(n, generator=torch.Generator().manual_seed(4))
    ref = _reference(hidden, weight, target, bias, reduction="none", label_smoothing=0.05, grad_weight=True,
                     grad_bias=True, grad_out=go)
    hidden, weight, target, bias, go = for_triton(hidden, weight, target, bias, go)
    _, lse = triton_lce.forward(hidden, weight, target, bias, label_smoothing=0.05, native_half_dot=half)
    dh, dw, db = (t.cpu() for t in triton_lce.backward(hidden, weight, target, bias, lse, go, label_smoothing=0.05,
                                                       need_weight=True, need_bias=True, native_half_dot=half,
                                                       strategy=strategy, chunk_rows=chunk_rows))
    # fp32: fp32 arithmetic throughout; fp16: dlogits rounded to fp16 before the products (a few ulps)
    tol = 3e-3 if half else 1e-5
    for got, want, name in ((dh, ref[2], "grad hidden"), (dw, ref[3], "grad weight"), (db, ref[4], "grad bias")):
        assert got.dtype == dtype, name
        _close(got, want, atol=tol * want.abs().max().item(), rtol=tol, what=f"{strategy} {name}")
    assert dh[:32].abs().max().item() == 0.0, "ignored rows must get exactly zero gradient"
    if half:  # tight: the dtype's roundoff and the problem size (catches a dropped eps/V smoothing term)
        bounds = _half_grad_bounds(hidden.cpu(), weight.cpu(), target.cpu(), bias.cpu(), go.cpu(), 0.05, dtype)
        for got, want, bound, name in ((dh, ref[2], bounds[0], "grad hidden"), (dw, ref[3], bounds[1], "grad weight"),
                                       (db, ref[4], bounds[2], "grad bias")):
            _within(got, want, bound, f"{strategy} {name}")


def test_triton_backward_frozen_weight_and_strategy_errors(monkeypatch):
    triton_lce = _triton_lce_or_skip()
    hidden, weight, target, _ = _inputs(151, n=20, d=16, v=100)
    go = torch.full((20,), 0.05)
    hidden, weight, target, go = for_triton(hidden, weight, target, go)
    _, lse = triton_lce.forward(hidden, weight, target)
    before = dict(triton_lce.LAUNCH_COUNTS)
    dh, dw, db = triton_lce.backward(hidden, weight, target, None, lse, go, strategy="dlogits")
    assert dw is None and db is None and dh.shape == hidden.shape
    assert triton_lce.LAUNCH_COUNTS["backward_dweight"] == before["backward_dweight"]
    with pytest.raises(ValueError, match="strategy .* must be one of"):
        triton_lce.backward(hidden, weight, target, None, lse, go, strategy="scatter")
    monkeypatch.setenv("SONAR_KERNELS_LCE_BACKWARD", "nope")
    with pytest.raises(ValueError, match="SONAR_KERNELS_LCE_BACKWARD"):
        triton_lce.backward(hidden, weight, target, None, lse, go)
    monkeypatch.setenv("SONAR_KERNELS_LCE_BACKWARD", "atomic")
    dh_atomic, _, _ = triton_lce.backward(hidden, weight, target, None, lse, go)
    _close(dh_atomic.cpu(), dh.cpu(), atol=1e-6, what="atomic (from the environment) vs dlogits")
    with pytest.raises(ValueError, match="chunk_rows"):
        triton_lce.backward(hidden, weight, target, None, lse, go, chunk_rows=0)


def test_dlogits_chunk_rows_bounds_the_buffer():
    from sonar_kernels.triton_kernels import linear_cross_entropy as triton_lce

    v = 256_206
    for budget in (1 << 30, 300 << 20, 1 << 20):
        rows = triton_lce.dlogits_chunk_rows(v, 2, budget)
        assert rows % 128 == 0 and rows >= 128
        if rows > 128:  # the floor of 128 rows may exceed a tiny budget; otherwise the buffer fits it
            assert rows * v * 2 <= budget < (rows + 128) * v * 2
    with pytest.raises(ValueError, match="chunk_bytes"):
        triton_lce.dlogits_chunk_rows(v, 2, 0)


def test_dlogits_kernel_writes_every_element():
    """The dlogits kernel on a NaN-poisoned buffer: every element written, equal to the closed form
    softmax - (1 - eps) onehot - eps / V on live rows and exactly 0 on rows with g = 0."""
    triton_lce = _triton_lce_or_skip()
    n, d, v, eps = 70, 24, 300, 0.1
    hidden, weight, target, bias = _inputs(152, n=n, d=d, v=v, bias=True, ignore_frac=0.0)
    g = torch.rand(n, generator=torch.Generator().manual_seed(5)) + 0.5
    g[:32] = 0.0  # one whole token tile dead
    g[40] = 0.0
    z = hidden.double() @ weight.double().t() + bias.double()
    lse = torch.logsumexp(z, -1)
    want = torch.softmax(z, -1) - eps / v
    want[torch.arange(n), target] -= 1.0 - eps
    want[g == 0] = 0.0
    out = for_triton(torch.full((n, v + 5), float("nan")))[:, :v]  # a row stride wider than V
    upcast, precision = triton_lce._dot_settings(torch.float32)
    hidden, weight, target, bias, lse, g = for_triton(hidden, weight, target, bias, lse.float(), g)
    triton_lce.write_dlogits(out, hidden, weight, target, bias, lse, g, eps, upcast, precision)
    assert not torch.isnan(out).any(), "some dlogits elements were never written"
    out, g = out.cpu(), g.cpu()
    _close(out, want, atol=1e-5, what="dlogits")  # fp32 logits (3xTF32 on a GPU), values in [-1, 1]
    assert out[g == 0].abs().max().item() == 0.0
    with pytest.raises(ValueError, match="out must be"):
        triton_lce.write_dlogits(out.t(), hidden, weight, target, bias, lse, g, eps, upcast, precision)


def test_autotune_prunes_configs_that_cannot_fit_shared_memory(monkeypatch):
    """The pre-filter keeps the configs whose pipelined tiles fit the device's shared memory, at least one."""
    import triton

    from sonar_kernels.triton_kernels import linear_cross_entropy as triton_lce

    big = triton.Config({"BLOCK_N": 64, "BLOCK_V": 256, "BLOCK_D": 64}, num_warps=8, num_stages=4)
    small = triton.Config({"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_D": 32}, num_warps=4, num_stages=3)
    # closed form: stages x (BLOCK_N + BLOCK_V) x BLOCK_D x bytes per element
    assert triton_lce.smem_estimate(big, 2) == 4 * 320 * 64 * 2
    assert triton_lce.smem_estimate(small, 4) == 3 * 192 * 32 * 4

    class FakeCudaTensor(torch.Tensor):
        is_cuda = True

    h32 = torch.empty(2, 2).as_subclass(FakeCudaTensor)
    h16 = torch.empty(2, 2, dtype=torch.bfloat16).as_subclass(FakeCudaTensor)
    monkeypatch.setattr(triton_lce, "_smem_limit", lambda index: 232448)  # H100 / H200 per block
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert triton_lce.prune_configs_by_smem([big, small], {"h_ptr": h16}) == [big, small]
    assert triton_lce.prune_configs_by_smem([big, small], {"h_ptr": h32}) == [small]  # 327680 B > limit
    monkeypatch.setattr(triton_lce, "_smem_limit", lambda index: 1000)
    assert triton_lce.prune_configs_by_smem([big, small], {"h_ptr": h32}) == [small]  # never empty
    cpu = torch.empty(2, 2)
    assert triton_lce.prune_configs_by_smem([big, small], {"h_ptr": cpu}) == [big, small]  # interpreter


def test_atomic_backward_resets_its_outputs_by_reset_to_zero_on_tensors_only(monkeypatch):
    """Between autotune trials the atomic backward's accumulated outputs are zeroed by the autotuner's
    `reset_to_zero` (no pre_hook: `wrap_triton`, the triton_op path, refuses those). Every listed argument the
    launcher passes is a tensor, also when not requested (frozen weight, no bias: a distinct 1-element
    placeholder each; Triton 3.6 called .zero_() on None), and the kernel leaves the placeholders alone."""
    triton_lce = _triton_lce_or_skip()
    kernel = triton_lce._lce_bwd_kernel
    assert list(kernel.reset_to_zero) == ["dh_ptr", "dw_ptr", "db_ptr"]
    assert not kernel.user_defined_pre_hook and all(c.pre_hook is None for c in kernel.configs)
    launched, real_wrap = [], triton_lce.wrap_triton

    def spy(k):  # records the arguments of the atomic backward's launch
        launch = real_wrap(k)
        if k is not kernel:
            return launch

        class Recorder:
            def __getitem__(self, grid):
                def run(*args, **kwargs):
                    launched.append(dict(zip(kernel.arg_names, args)))
                    return launch[grid](*args, **kwargs)
                return run
        return Recorder()

    monkeypatch.setattr(triton_lce, "wrap_triton", spy)
    hidden, weight, target, _ = _inputs(153, n=20, d=16, v=100)
    go = torch.full((20,), 0.05)
    hidden, weight, target, go = for_triton(hidden, weight, target, go)
    _, lse = triton_lce.forward(hidden, weight, target)
    dh, dw, db = triton_lce.backward(hidden, weight, target, None, lse, go, strategy="atomic")
    assert dw is None and db is None and len(launched) == 1
    nargs = launched[0]
    spares = [nargs["dw_ptr"], nargs["db_ptr"]]
    assert all(isinstance(t, torch.Tensor) and t.numel() == 1 and t.item() == 0.0 for t in spares)
    assert spares[0].data_ptr() != spares[1].data_ptr()
    assert nargs["dh_ptr"].shape == dh.shape and nargs["dh_ptr"].abs().max().item() > 0
    kernel.pre_hook(nargs)  # the reset Triton runs before each trial: every listed output zeroed
    assert nargs["dh_ptr"].abs().max().item() == 0.0
