"""Tests of the SONAR decoder fast-path kernel ops against float64 references.

Covers: fold_cross_attention / stack_folded / cross_attention_constants (closed form, grads, frozen weight),
add_layer_norm (torch and Triton-interpreter paths, forward + all grads, fp16, ragged row counts, unused
outputs), varlen_causal_attention (per-sequence float64 causal attention, length-1 segments, GQA, grouping,
flash-attn absent) and the nn wrappers.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import sonar_kernels.functional.varlen_attention as va_mod
import sonar_kernels.torch_ops.varlen_attention as va_ops
from sonar_kernels.backend import interpret_mode, triton_available
from sonar_kernels.functional.add_layer_norm import add_layer_norm
from sonar_kernels.functional.cross_attention_constants import (
    cross_attention_constants,
    fold_cross_attention,
    stack_folded,
)
from sonar_kernels.functional.varlen_attention import varlen_causal_attention
from sonar_kernels.nn.decoder_ops import AddLayerNorm, CrossAttentionConstants

from _devices import triton_device

needs_triton = pytest.mark.skipif(
    not (triton_available() and (torch.cuda.is_available() or interpret_mode())),
    reason="Triton needs a GPU or TRITON_INTERPRET=1",
)


# ----------------------------------------------------------------------------- cross-attention constants
def test_fold_matches_two_projections_float64():
    g = torch.Generator().manual_seed(1)
    e_dim, d = 12, 8
    v = torch.nn.Linear(e_dim, d).float()
    o = torch.nn.Linear(d, d).float()
    with torch.no_grad():
        for p in (*v.parameters(), *o.parameters()):
            p.copy_(torch.randn(p.shape, generator=g))
    w, b = fold_cross_attention(v.weight, v.bias, o.weight, o.bias)
    assert w.shape == (d, e_dim) and b.shape == (d,) and w.dtype == torch.float32
    assert not w.requires_grad
    e = torch.randn(5, e_dim, generator=g, dtype=torch.float64)
    ref = F.linear(F.linear(e, v.weight.double(), v.bias.double()), o.weight.double(), o.bias.double())
    torch.testing.assert_close((e @ w.double().T + b.double()), ref, atol=1e-5, rtol=1e-5)


def test_fold_without_biases():
    g = torch.Generator().manual_seed(2)
    wv = torch.randn(6, 4, generator=g, dtype=torch.float64)
    wo = torch.randn(3, 6, generator=g, dtype=torch.float64)
    w, b = fold_cross_attention(wv, None, wo, None)
    torch.testing.assert_close(w, wo @ wv)
    assert torch.equal(b, torch.zeros(3, dtype=torch.float64))


def test_fold_shape_errors():
    with pytest.raises(ValueError, match="o_weight.shape"):
        fold_cross_attention(torch.zeros(4, 3), None, torch.zeros(2, 5), None)
    with pytest.raises(ValueError, match="v_bias"):
        fold_cross_attention(torch.zeros(4, 3), torch.zeros(3), torch.zeros(2, 4), None)


def test_cross_attention_constants_value_and_grad():
    g = torch.Generator().manual_seed(3)
    num_layers, d, e_dim, batch = 3, 8, 8, 5
    folded = [(torch.randn(d, e_dim, generator=g), torch.randn(d, generator=g)) for _ in range(num_layers)]
    weight, bias = stack_folded(folded)
    assert weight.shape == (num_layers * d, e_dim) and bias.shape == (num_layers * d,)
    emb = torch.randn(batch, e_dim, generator=g, requires_grad=True)
    out = cross_attention_constants(emb, weight, bias)
    assert out.shape == (batch, num_layers, d)
    ref = torch.stack([emb.detach().double() @ w.double().T + b.double() for w, b in folded], dim=1)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    up = torch.randn(batch, num_layers, d, generator=g)
    (ge,) = torch.autograd.grad((out * up).sum(), emb)
    ref_g = sum(up[:, i].double() @ folded[i][0].double() for i in range(num_layers))
    torch.testing.assert_close(ge.double(), ref_g, atol=1e-5, rtol=1e-5)
    assert weight.grad is None and not weight.requires_grad


def test_cross_attention_constants_d_ne_e_and_dtype_cast():
    g = torch.Generator().manual_seed(4)
    weight = torch.randn(2 * 5, 4, generator=g, dtype=torch.float64)
    bias = torch.randn(10, generator=g, dtype=torch.float64)
    emb = torch.randn(3, 4, generator=g, dtype=torch.float32, requires_grad=True)
    with pytest.raises(ValueError, match="num_layers"):
        cross_attention_constants(emb, weight, bias)  # 10 rows: not a multiple of E=4, L cannot be inferred
    with pytest.raises(ValueError, match="num_layers=3"):
        cross_attention_constants(emb, weight, bias, num_layers=3)
    out = cross_attention_constants(emb, weight, bias, num_layers=2)
    assert out.shape == (3, 2, 5) and out.dtype == torch.float64
    torch.testing.assert_close(out.reshape(3, 10), emb.double() @ weight.T + bias)
    out.sum().backward()
    assert emb.grad.dtype == torch.float32


def test_cross_attention_constants_errors():
    with pytest.raises(ValueError, match="emb"):
        cross_attention_constants(torch.zeros(3), torch.zeros(4, 3), torch.zeros(4))
    with pytest.raises(ValueError, match="bias"):
        cross_attention_constants(torch.zeros(2, 3), torch.zeros(6, 3), torch.zeros(5))
    with pytest.raises(ValueError, match="at least one"):
        stack_folded([])


def test_cross_attention_constants_module():
    g = torch.Generator().manual_seed(5)
    pairs = []
    for _ in range(2):
        v, o = torch.nn.Linear(6, 6), torch.nn.Linear(6, 6)
        with torch.no_grad():
            for p in (*v.parameters(), *o.parameters()):
                p.copy_(torch.randn(p.shape, generator=g))
        pairs.append((v, o))
    mod = CrossAttentionConstants.from_projections(pairs)
    assert list(mod.parameters()) == [] and mod.state_dict() == {}
    emb = torch.randn(4, 6, generator=g)
    out = mod(emb)
    ref = torch.stack([o(v(emb)) for v, o in pairs], dim=1)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- add + LayerNorm
def _aln_reference(x, r, w, b, eps):
    s = x.double() + (r.double() if r is not None else 0)
    y = F.layer_norm(s, (x.shape[-1],), w.double() if w is not None else None,
                     b.double() if b is not None else None, eps)
    return y, s


def _check_add_layer_norm(impl, dtype, shape, atol, use_residual=True, affine=True, seed=0, eps=1e-5):
    g = torch.Generator().manual_seed(seed)
    n = shape[-1]
    dev = triton_device() if impl == "triton" else torch.device("cpu")  # the GPU when Triton runs natively
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(dev, dtype).requires_grad_()
    r = torch.randn(shape, generator=g).to(dev, dtype).requires_grad_() if use_residual else None
    w = (1 + 0.5 * torch.randn(n, generator=g)).to(dev, dtype).requires_grad_() if affine else None
    b = (0.5 * torch.randn(n, generator=g)).to(dev, dtype).requires_grad_() if affine else None
    y, s = add_layer_norm(x, r, w, b, eps, impl=impl)
    assert y.dtype == dtype and s.dtype == dtype and y.shape == x.shape and s.shape == x.shape
    gy = torch.randn(shape, generator=g).to(dev, dtype)
    gs = torch.randn(shape, generator=g).to(dev, dtype)
    inputs = [t for t in (x, r, w, b) if t is not None]
    grads = torch.autograd.grad((y.double() * gy.double()).sum() + (s.double() * gs.double()).sum(), inputs)
    y, s, gy, gs = y.cpu(), s.cpu(), gy.cpu(), gs.cpu()
    grads = [t.cpu() for t in grads]
    inputs = [t.detach().cpu() for t in inputs]

    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    it = iter(ref_inputs)
    xr = next(it)
    rr = next(it) if use_residual else None
    wr = next(it) if affine else None
    br = next(it) if affine else None
    yr, sr = _aln_reference(xr, rr, wr, br, eps)
    ref_grads = torch.autograd.grad((yr * gy.double()).sum() + (sr * gs.double()).sum(), ref_inputs)
    torch.testing.assert_close(y.double(), yr, atol=atol, rtol=atol)
    torch.testing.assert_close(s.double(), sr, atol=atol, rtol=atol)
    for got, ref in zip(grads, ref_grads):
        # weight/bias grads sum over rows: scale the tolerance with the row count
        tol = atol * (max(1, math.prod(shape[:-1])) ** 0.5 if got.dim() == 1 else 1)
        torch.testing.assert_close(got.double(), ref, atol=tol, rtol=atol)


@pytest.mark.parametrize("shape", [(3, 5, 48), (37, 40), (1, 7)])
def test_add_layer_norm_torch_fp32(shape):
    _check_add_layer_norm("torch", torch.float32, shape, atol=2e-5, seed=sum(shape))


def test_add_layer_norm_torch_fp64_tight():
    _check_add_layer_norm("torch", torch.float64, (9, 33), atol=1e-6, seed=11)


def test_add_layer_norm_torch_fp16():
    _check_add_layer_norm("torch", torch.float16, (17, 64), atol=1e-2, seed=12)


def test_add_layer_norm_no_residual_no_affine():
    _check_add_layer_norm("torch", torch.float32, (6, 24), atol=2e-5, use_residual=False, affine=False, seed=13)
    x = torch.randn(4, 8)
    y, s = add_layer_norm(x, None, None, None, impl="torch")
    assert s is x


@needs_triton
@pytest.mark.parametrize("shape", [(37, 40), (2, 3, 100), (1, 16)])
def test_add_layer_norm_triton_fp32(shape):
    # 37 and 6 rows are not multiples of the row block; 40 and 100 columns are not powers of two
    _check_add_layer_norm("triton", torch.float32, shape, atol=2e-5, seed=100 + sum(shape))


@needs_triton
def test_add_layer_norm_triton_fp16():
    _check_add_layer_norm("triton", torch.float16, (19, 64), atol=1e-2, seed=21)


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
def test_add_layer_norm_bf16(impl):
    # loads are converted to fp32 at once, so this is right even in the Triton interpreter
    _check_add_layer_norm(impl, torch.bfloat16, (11, 40), atol=4e-2, seed=26)


@needs_triton
def test_add_layer_norm_triton_no_residual_no_affine():
    _check_add_layer_norm("triton", torch.float32, (5, 24), atol=2e-5, use_residual=False, affine=False, seed=22)


@needs_triton
def test_add_layer_norm_triton_matches_torch_many_rows():
    # more rows than programs: each backward program loops over several row blocks
    g = torch.Generator().manual_seed(23)
    x, r = torch.randn(130, 32, generator=g), torch.randn(130, 32, generator=g)
    w, b = torch.randn(32, generator=g), torch.randn(32, generator=g)
    outs = {}
    for impl in ("torch", "triton"):
        dev = triton_device() if impl == "triton" else torch.device("cpu")
        ts = [t.to(dev).requires_grad_() for t in (x, r, w, b)]
        y, s = add_layer_norm(*ts, impl=impl)
        (y.sin().sum() + s.cos().sum()).backward()
        outs[impl] = [t.detach().cpu() for t in [y, s] + [t.grad for t in ts]]
    for a, c in zip(outs["torch"], outs["triton"]):
        torch.testing.assert_close(a, c, atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
def test_add_layer_norm_only_normed_used_and_frozen_affine(impl):
    """Unused `summed` output and weight/bias without grad: dx = LN'(dy), no weight grads produced."""
    g = torch.Generator().manual_seed(24)
    dev = triton_device() if impl == "triton" else torch.device("cpu")
    x = torch.randn(10, 20, generator=g).to(dev).requires_grad_()
    r = torch.randn(10, 20, generator=g).to(dev).requires_grad_()
    w, b = torch.randn(20, generator=g).to(dev), torch.randn(20, generator=g).to(dev)
    y, _ = add_layer_norm(x, r, w, b, impl=impl)
    gy = torch.randn(10, 20, generator=g).to(dev)
    gx, gr = (t.cpu() for t in torch.autograd.grad((y * gy).sum(), (x, r)))
    x, r, w, b, gy = (t.detach().cpu() for t in (x, r, w, b, gy))
    xs = (x.detach() + r.detach()).double().requires_grad_()
    (ref,) = torch.autograd.grad((F.layer_norm(xs, (20,), w.double(), b.double()) * gy.double()).sum(), xs)
    torch.testing.assert_close(gx.double(), ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(gr, gx)


def test_add_layer_norm_errors():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="residual shape"):
        add_layer_norm(x, torch.randn(4, 7), None, None)
    with pytest.raises(TypeError, match="residual dtype"):
        add_layer_norm(x, torch.randn(4, 8, dtype=torch.float64), None, None)
    with pytest.raises(ValueError, match="weight must have shape"):
        add_layer_norm(x, None, torch.ones(7), None)
    with pytest.raises(TypeError, match="floating point"):
        add_layer_norm(torch.ones(4, 8, dtype=torch.int64), None, None, None)
    with pytest.raises(ValueError, match="impl"):
        add_layer_norm(x, None, None, None, impl="cuda")


def test_add_layer_norm_module():
    g = torch.Generator().manual_seed(25)
    mod = AddLayerNorm(16, eps=1e-6, impl="torch")
    with torch.no_grad():
        mod.weight.copy_(torch.randn(16, generator=g))
        mod.bias.copy_(torch.randn(16, generator=g))
    x, r = torch.randn(3, 16, generator=g), torch.randn(3, 16, generator=g)
    y, s = mod(x, r)
    ref = F.layer_norm(x + r, (16,), mod.weight, mod.bias, 1e-6)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    y.sum().backward()
    assert mod.weight.grad is not None and mod.bias.grad is not None


# ----------------------------------------------------------------------------- varlen attention
def _varlen_reference(q, k, v, lengths, scale=None):
    """Per-sequence causal attention in float64."""
    h, hkv, dh = q.shape[1], k.shape[1], q.shape[2]
    scale = 1 / math.sqrt(dh) if scale is None else scale
    outs, start = [], 0
    for n in lengths:
        qq = q[start:start + n].double().transpose(0, 1)
        kk = k[start:start + n].double().repeat_interleave(h // hkv, 1).transpose(0, 1)
        vv = v[start:start + n].double().repeat_interleave(h // hkv, 1).transpose(0, 1)
        s = (qq @ kk.transpose(-1, -2)) * scale
        s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), -math.inf)
        outs.append((s.softmax(-1) @ vv).transpose(0, 1))
        start += n
    return torch.cat(outs, dim=0)


def _cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_varlen_sdpa_matches_reference_with_grads(heads, kv_heads):
    g = torch.Generator().manual_seed(30 + heads + kv_heads)
    lengths = [1, 5, 3, 1, 8, 2]
    t, dh = sum(lengths), 8
    q = torch.randn(t, heads, dh, generator=g, requires_grad=True)
    k = torch.randn(t, kv_heads, dh, generator=g, requires_grad=True)
    v = torch.randn(t, kv_heads, dh, generator=g, requires_grad=True)
    out = varlen_causal_attention(q, k, v, _cu(lengths), max(lengths), impl="sdpa")
    assert out.shape == (t, heads, dh)
    qr, kr, vr = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = _varlen_reference(qr, kr, vr, lengths)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    up = torch.randn(t, heads, dh, generator=g)
    got = torch.autograd.grad((out * up).sum(), (q, k, v))
    exp = torch.autograd.grad((ref * up.double()).sum(), (qr, kr, vr))
    for a, b in zip(got, exp):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5)


def test_varlen_sdpa_groups_and_scale(monkeypatch):
    """Tiny group budget: many groups, a segment longer than the budget, an explicit scale; auto on CPU."""
    g = torch.Generator().manual_seed(40)
    lengths = [3, 4, 9, 1, 2, 2]
    t = sum(lengths)
    q = torch.randn(t, 2, 4, generator=g)
    k = torch.randn(t, 2, 4, generator=g)
    v = torch.randn(t, 2, 4, generator=g)
    ref = _varlen_reference(q, k, v, lengths, scale=0.3)
    assert va_ops._group_segments(lengths, 5) == [(0, 1), (1, 2), (2, 3), (3, 6)]
    out = va_ops.varlen_attention_sdpa(q, k, v, _cu(lengths), 0.3, group_tokens=5)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    out_auto = varlen_causal_attention(q, k, v, _cu(lengths), 9, scale=0.3)
    torch.testing.assert_close(out_auto.double(), ref, atol=1e-5, rtol=1e-5)


def test_varlen_fp16_sdpa():
    g = torch.Generator().manual_seed(41)
    lengths = [4, 1, 6]
    t = sum(lengths)
    q, k, v = (torch.randn(t, 2, 8, generator=g).half() for _ in range(3))
    out = varlen_causal_attention(q, k, v, _cu(lengths), 6, impl="sdpa")
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.double(), _varlen_reference(q, k, v, lengths), atol=5e-3, rtol=5e-3)


def test_varlen_flex_forward_cpu():
    pytest.importorskip("torch.nn.attention.flex_attention")
    g = torch.Generator().manual_seed(42)
    lengths = [3, 1, 5]
    t = sum(lengths)
    q = torch.randn(t, 4, 8, generator=g)
    k = torch.randn(t, 2, 8, generator=g)
    v = torch.randn(t, 2, 8, generator=g)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager (uncompiled) flex attention warns about speed on CPU
        out = varlen_causal_attention(q, k, v, _cu(lengths), 5, impl="flex")
    torch.testing.assert_close(out.double(), _varlen_reference(q, k, v, lengths), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="flex"):
        varlen_causal_attention(q.requires_grad_(), k, v, _cu(lengths), 5, impl="flex")


def test_varlen_flash_absent(monkeypatch):
    """Without flash-attn, impl='flash' raises a clear error and 'auto' falls back to SDPA."""
    monkeypatch.setattr(va_mod, "flash_attn_varlen_available", lambda: False)
    g = torch.Generator().manual_seed(43)
    lengths = [2, 3]
    q, k, v = (torch.randn(5, 2, 4, generator=g) for _ in range(3))
    with pytest.raises(RuntimeError, match="flash_attn"):
        varlen_causal_attention(q, k, v, _cu(lengths), 3, impl="flash")
    out = varlen_causal_attention(q, k, v, _cu(lengths), 3, impl="auto")
    torch.testing.assert_close(out.double(), _varlen_reference(q, k, v, lengths), atol=1e-5, rtol=1e-5)
    assert va_mod._resolve_impl("auto", q) == "sdpa"


def test_varlen_flash_probe_matches_import():
    try:
        import flash_attn  # noqa: F401

        present = True
    except Exception:
        present = False
    va_ops.flash_attn_varlen_available.cache_clear()
    assert va_ops.flash_attn_varlen_available() == present


def test_varlen_errors():
    q = torch.randn(5, 4, 8)
    kv = torch.randn(5, 3, 8)
    with pytest.raises(ValueError, match="kv heads"):
        varlen_causal_attention(q, kv, kv, _cu([5]), 5)
    with pytest.raises(ValueError, match="end at T"):
        varlen_causal_attention(q, q, q, _cu([4]), 4)
    with pytest.raises(ValueError, match="non-decreasing"):
        varlen_causal_attention(q, q, q, torch.tensor([0, 3, 2, 5], dtype=torch.int32), 3)
    with pytest.raises(ValueError, match="impl"):
        varlen_causal_attention(q, q, q, _cu([5]), 5, impl="xformers")
    with pytest.raises(TypeError, match="cu_seqlens"):
        varlen_causal_attention(q, q, q, torch.tensor([0.0, 5.0]), 5)


def test_varlen_plan_cache_follows_cu_seqlens():
    """Masks are reused for the same cu_seqlens tensor, rebuilt for a new one or after an in-place edit."""
    g = torch.Generator().manual_seed(44)
    q, k, v = (torch.randn(9, 2, 4, generator=g) for _ in range(3))
    cu = _cu([4, 5])
    a = varlen_causal_attention(q, k, v, cu, 5, impl="sdpa")
    torch.testing.assert_close(a.double(), _varlen_reference(q, k, v, [4, 5]), atol=1e-5, rtol=1e-5)
    cu[1] = 2  # in place: the cached plan must not be used
    b = varlen_causal_attention(q, k, v, cu, 7, impl="sdpa")
    torch.testing.assert_close(b.double(), _varlen_reference(q, k, v, [2, 7]), atol=1e-5, rtol=1e-5)
    c = varlen_causal_attention(q, k, v, _cu([1, 8]), 8, impl="sdpa")
    torch.testing.assert_close(c.double(), _varlen_reference(q, k, v, [1, 8]), atol=1e-5, rtol=1e-5)
    with torch.inference_mode():
        cu_inf = _cu([3, 6])
        d = varlen_causal_attention(q, k, v, cu_inf, 6, impl="sdpa")
    torch.testing.assert_close(d.double(), _varlen_reference(q, k, v, [3, 6]), atol=1e-5, rtol=1e-5)


def test_plan_cache_lru():
    cache = va_ops._PlanCache(size=2)
    a, b, c = _cu([1]), _cu([2]), _cu([3])
    cache.put(a, (), "A")
    cache.put(b, (), "B")
    assert cache.get(a, ()) == "A"  # a becomes most recent
    cache.put(c, (), "C")  # evicts b
    assert cache.get(b, ()) is None and cache.get(a, ()) == "A" and cache.get(c, ()) == "C"
    assert cache.get(_cu([1]), ()) is None  # equal values, different tensor: no hit
    assert cache.get(a, ("other",)) is None
