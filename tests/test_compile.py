"""torch.compile readiness (issue 28): the sonar_kernels ops as custom ops, and the training step compiled
per transformer block with fullgraph=True.

- `torch.library.opcheck` on every op (forward and backward ops): schema, fake (meta) implementation,
  autograd registration, AOT dispatch with static and dynamic shapes.
- Every public op compiled with inductor in ONE fullgraph function (one forward, one backward graph: the
  C++ compile is paid once) matches the same calls run eagerly, outputs and gradients, at the ops' own test
  tolerances (fp32: 1e-5); a bad cu_seqlens still raises its clear error inside a compiled function.
- Each family's training step (sonar_llm, base_lcm, two_tower, token_llm; tiny presets), compiled per block as
  `train.compile` does, over 100 packed batches of varying lengths: 0 graph breaks, <= 2 recompiles (the
  code objects' dynamo cache entries, minus one each). These use the "aot_eager" backend: graph breaks and
  recompiles are decided by dynamo before any backend runs, and aot_eager still runs the fake
  implementations and the AOT autograd partition; code generation is what it skips.
- 20 optimizer steps of SONAR-LLM (backbone blocks + packed decoder + fused linear cross-entropy) compiled
  with inductor give the eager losses to fp32 tolerance; the same with FSDP2 (a one-process gloo group,
  compile per block then fully_shard).
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.eval_frame import _debug_get_cache_entry_list
from torch._dynamo.utils import counters

from _devices import triton_device
from fixtures_sonar import toy_decoder
from sonar_kernels.functional.add_layer_norm import add_layer_norm
from sonar_kernels.functional.cross_attention_constants import cross_attention_constants
from sonar_kernels.functional.linear_cross_entropy import linear_cross_entropy
from sonar_kernels.functional.varlen_attention import varlen_causal_attention
from sonar_kernels.backend import interpret_mode, triton_available
from sonar_kernels.ops.add_layer_norm import add_layer_norm_backward_op, add_layer_norm_op
from sonar_kernels.ops.add_layer_norm import triton_ops as add_layer_norm_triton_ops
from sonar_kernels.ops.cross_attention_constants import cross_attention_constants_op
from sonar_kernels.ops.triton_op import HAVE_TRITON_OP
from sonar_kernels.ops.linear_cross_entropy import linear_cross_entropy_backward_op, linear_cross_entropy_op
from sonar_kernels.ops.linear_cross_entropy import triton_ops as lce_triton_ops
from sonar_kernels.ops.varlen_attention import varlen_causal_attention_backward_op, varlen_causal_attention_op
from sonar_llm.data.batch import ConceptBatch
from sonar_llm.models.backbone import TransformerLayer
from sonar_llm.models.build import ModelConfig, build_model
from sonar_llm.sonar.packed_decoder import PackedSonarDecoder
from sonar_train.config import RunConfig
from sonar_train.parallel import compile_model

E, LANG = 32, 80  # the toy SONAR decoder's width and language-tag id


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _rand(*shape, g, grad=False, dtype=torch.float32):
    return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(grad)


needs_triton = pytest.mark.skipif(
    not (triton_available() and (torch.cuda.is_available() or interpret_mode())),
    reason="Triton needs a GPU or TRITON_INTERPRET=1")
needs_triton_op = pytest.mark.skipif(
    not (HAVE_TRITON_OP and triton_available() and (torch.cuda.is_available() or interpret_mode())),
    reason="the Triton path as a triton_op needs torch >= 2.6 and Triton on a GPU or TRITON_INTERPRET=1")


@needs_triton
def test_backend_choice_traces_without_warnings():
    """torch.compile traces the backend choice (use_triton -> triton_available) without a warning: it used to be
    functools.lru_cache-wrapped, which dynamo warns about on every compile ("Dynamo detected a call to a
    `functools.lru_cache`-wrapped function")."""
    import warnings

    from sonar_kernels.backend import use_triton

    torch._dynamo.reset()

    @torch.compile(backend="eager", fullgraph=True)
    def pick(x):
        return x + 1 if use_triton("triton", x) else x - 1

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = pick(torch.zeros(2))
    assert torch.equal(out, torch.ones(2))  # the Triton branch: forced, and runnable here
    assert [str(w.message) for w in caught] == []


# ------------------------------------------------------------------------------------------------ opcheck
def _opcheck(op, args):
    result = torch.library.opcheck(op, args)
    assert all(v == "SUCCESS" for v in result.values()), result


def test_opcheck_varlen_attention():
    g = torch.Generator().manual_seed(0)
    cu = _cu([3, 1, 5])
    for heads, kv in ((4, 4), (4, 2)):
        q, k, v = _rand(9, heads, 8, g=g, grad=True), _rand(9, kv, 8, g=g, grad=True), _rand(9, kv, 8, g=g, grad=True)
        _opcheck(varlen_causal_attention_op, (q, k, v, cu, 0.35, "sdpa"))
        _opcheck(varlen_causal_attention_backward_op, (_rand(9, heads, 8, g=g), q.detach(), k.detach(), v.detach(),
                                                       cu, 0.35))


def test_opcheck_add_layer_norm():
    g = torch.Generator().manual_seed(1)
    x, r = _rand(6, 16, g=g, grad=True), _rand(6, 16, g=g, grad=True)
    w, b = _rand(16, g=g, grad=True), _rand(16, g=g, grad=True)
    _opcheck(add_layer_norm_op, (x, r, w, b, 1e-5, False))
    _opcheck(add_layer_norm_op, (x, None, None, None, 1e-5, False))
    y, s, mean, rstd = add_layer_norm_op(x.detach(), r.detach(), w.detach(), b.detach(), 1e-5, False)
    _opcheck(add_layer_norm_backward_op, (_rand(6, 16, g=g), _rand(6, 16, g=g), s, w.detach(), mean, rstd,
                                          True, True, False))


def test_opcheck_cross_attention_constants():
    g = torch.Generator().manual_seed(2)
    emb, w, b = _rand(3, 8, g=g, grad=True), _rand(2 * 8, 8, g=g, grad=True), _rand(2 * 8, g=g)
    _opcheck(cross_attention_constants_op, (emb, w, b, 2))


@pytest.mark.parametrize("path", ["custom_op", pytest.param("triton_op", marks=needs_triton_op)])
@pytest.mark.parametrize("grad_in_forward", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_opcheck_linear_cross_entropy(grad_in_forward, reduction, path):
    """The custom ops (PyTorch backend) and the Triton path's triton_ops (the same arguments without `backend`)."""
    g = torch.Generator().manual_seed(3)
    h, w = _rand(7, 16, g=g, grad=True), _rand(11, 16, g=g, grad=not grad_in_forward)
    bias = None if grad_in_forward else _rand(11, g=g, grad=True)
    t = torch.randint(0, 11, (7,), generator=g)
    t[2] = -100
    rows = _rand(7, g=g)
    if path == "triton_op":
        fwd, bwd = lce_triton_ops()
        h, w, t, rows, bias = (x if x is None else x.detach().to(triton_device()).requires_grad_(x.requires_grad)
                               for x in (h, w, t, rows, bias))
        fwd_backend, bwd_backend = (), ()
    else:
        fwd, bwd = linear_cross_entropy_op, linear_cross_entropy_backward_op
        fwd_backend, bwd_backend = ("torch",), ("torch",)
    _opcheck(fwd, (h, w, t, bias, -100, reduction, 0.1, 1e-3, *fwd_backend, grad_in_forward, 0, True))
    if not grad_in_forward:
        _, lse, _, _ = fwd(h.detach(), w.detach(), t, bias.detach(), -100, "none", 0.1, 0.0, *fwd_backend, False, 0,
                           True)
        _opcheck(bwd, (h.detach(), w.detach(), t, bias.detach(), lse, rows, -100, 0.1, 0.0, True, True, True,
                       *bwd_backend))


# ----------------------------------------------------------------------- every public op, compiled
def _all_ops(x, res, ln_w, ln_b, q, k, v, cu, emb, cw, cb, h, vocab, target):
    normed, summed = add_layer_norm(x, res, ln_w, ln_b, 1e-5, impl="torch")
    attn = varlen_causal_attention(q, k, v, cu, 5, impl="sdpa")
    consts = cross_attention_constants(emb, cw, cb, 2)
    loss = linear_cross_entropy(h, vocab, target, impl="torch", label_smoothing=0.1)
    return normed, summed, attn, consts, loss


def test_every_public_op_compiled_fullgraph_matches_eager():
    g = torch.Generator().manual_seed(4)
    lengths = [2, 5, 1, 4]
    t = sum(lengths)
    inputs = dict(
        x=_rand(6, 16, g=g, grad=True), res=_rand(6, 16, g=g, grad=True), ln_w=_rand(16, g=g, grad=True),
        ln_b=_rand(16, g=g, grad=True), q=_rand(t, 4, 8, g=g, grad=True), k=_rand(t, 2, 8, g=g, grad=True),
        v=_rand(t, 2, 8, g=g, grad=True), cu=_cu(lengths), emb=_rand(3, 8, g=g, grad=True),
        cw=_rand(16, 8, g=g), cb=_rand(16, g=g), h=_rand(9, 16, g=g, grad=True), vocab=_rand(13, 16, g=g),
        target=torch.randint(0, 13, (9,), generator=g))
    ups = [_rand(6, 16, g=g), _rand(6, 16, g=g), _rand(t, 4, 8, g=g), _rand(3, 2, 8, g=g)]
    leaves = [k for k, val in inputs.items() if val.requires_grad]

    def run(fn):
        ins = {k: (val.detach().clone().requires_grad_(val.requires_grad)) for k, val in inputs.items()}
        outs = fn(**ins)
        total = sum((o * u).sum() for o, u in zip(outs[:4], ups)) + outs[4]
        grads = torch.autograd.grad(total, [ins[k] for k in leaves])
        return [o.detach() for o in outs], grads

    counters.clear()
    compiled = torch.compile(_all_ops, fullgraph=True, dynamic=True)
    got, got_grads = run(compiled)
    exp, exp_grads = run(_all_ops)
    assert not counters["graph_break"]
    for name, a, b in zip(("normed", "summed", "attention", "constants", "loss"), got, exp):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    for name, a, b in zip(leaves, got_grads, exp_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"d {n}: {m}")
    # the value checks moved into the ops: a bad cu_seqlens still raises its clear error when compiled
    bad = dict(inputs, cu=torch.tensor([0, 3, 2, 12], dtype=torch.int32))
    with pytest.raises(Exception, match="non-decreasing"):
        compiled(**bad)
    bad_target = dict(inputs, target=torch.full((9,), 13))
    with pytest.raises(Exception, match="target values must be in"):
        compiled(**bad_target)


# ------------------------------------------------------------------------- the families' training steps
def _model(family, seed=0):
    cfg = RunConfig()
    cfg.model.family, cfg.model.preset = family, "tiny"
    if family == "sonar_llm":
        cfg.model.overrides = {"decoder_impl": "torch", "sonar_dim": E}
    elif family == "token_llm":
        cfg.model.overrides = {"vocab_size": LANG + 10}
    else:
        cfg.model.overrides = {"sonar_dim": E}
    deps = {"decoder": toy_decoder()} if family == "sonar_llm" else {}
    torch.manual_seed(seed)
    model = build_model(ModelConfig.from_sections(cfg.model, cfg.sonar, cfg.data), **deps)
    if family == "sonar_llm":
        model.decoder_to("cpu")
    return model


def _batch(g, min_docs=1):
    """A packed batch of 1-3 documents (2-5 sentences, 3-7 tokens each): every length varies."""
    doc_lens = torch.randint(2, 6, (int(torch.randint(min_docs, 4, (1,), generator=g)),), generator=g).tolist()
    sents, cu = [], [0]
    for _ in range(sum(doc_lens)):
        s = [3, LANG] + torch.randint(4, LANG, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
        sents.append(s + [3])
        cu.append(cu[-1] + len(s) + 1)
    return ConceptBatch(torch.randn(sum(doc_lens), E, generator=g), _cu(doc_lens),
                        torch.tensor(sum(sents, []), dtype=torch.int64), torch.tensor(cu, dtype=torch.int32),
                        max(doc_lens), max(len(s) for s in sents)).validate()


def _compiled_codes(model):
    codes = {type(b).forward.__code__ for b in model.transformer_blocks()}
    if isinstance(getattr(model, "_packed", None), PackedSonarDecoder):
        codes |= {PackedSonarDecoder._layer_step.__code__, PackedSonarDecoder._last_step.__code__}
    return codes


@pytest.mark.parametrize("family", ["sonar_llm", "base_lcm", "two_tower", "token_llm"])
def test_training_step_compiles_without_breaks_or_recompiles(family):
    torch._dynamo.reset()
    model = _model(family)
    compile_model(model, list(model.transformer_blocks()), backend="aot_eager")
    counters.clear()
    g = torch.Generator().manual_seed(5)
    tokens_seen = set()
    for _ in range(100):
        batch = _batch(g)
        tokens_seen.add(int(batch.tokens.numel()))
        loss, _ = model.loss(batch)
        loss.backward()
    assert len(tokens_seen) > 20  # the lengths really varied
    assert not counters["graph_break"], dict(counters["graph_break"])
    codes = _compiled_codes(model)
    entries = {c.co_qualname: len(_debug_get_cache_entry_list(c)) for c in codes}
    assert all(n >= 1 for n in entries.values()), entries  # every block ran compiled
    recompiles = sum(n - 1 for n in entries.values())
    assert recompiles <= 2, entries
    if family == "two_tower":
        assert TransformerLayer.forward.__code__ in codes  # its contextualizer's blocks and the denoiser's


def _train(model, batches, steps):
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=3e-3)
    losses = []
    for batch in batches[:steps]:
        loss, _ = model.loss(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def test_compiled_training_matches_eager_losses_over_20_steps():
    g = torch.Generator().manual_seed(6)
    batches = [_batch(g, min_docs=2) for _ in range(20)]
    eager = _model("sonar_llm")
    compiled = copy.deepcopy(eager)
    compiled.set_decoder(copy.deepcopy(eager.packed_decoder))
    compile_model(compiled, list(compiled.transformer_blocks()))  # inductor, as train.compile
    exp = _train(eager, batches, 20)
    got = _train(compiled, batches, 20)
    assert all(math.isfinite(x) for x in got)
    assert exp[0] != exp[-1]  # it trained
    torch.testing.assert_close(torch.tensor(got), torch.tensor(exp), atol=1e-5, rtol=1e-4)


def test_fsdp2_compiled_per_block_matches_eager(tmp_path, monkeypatch):
    import torch.distributed as dist

    from sonar_llm import compile as sonar_compile
    from sonar_train.parallel import DistInfo, parallelize

    monkeypatch.setattr(sonar_compile, "DEFAULT_BACKEND", "aot_eager")
    g = torch.Generator().manual_seed(7)
    batches = [_batch(g, min_docs=2) for _ in range(3)]
    eager = _model("base_lcm")
    exp = _train(copy.deepcopy(eager), batches, 3)
    cfg = RunConfig()
    cfg.train.compile, cfg.train.precision, cfg.parallel.fsdp = True, "fp32", True
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = parallelize(eager, cfg, DistInfo())
        assert all(getattr(b.forward, "_sonar_compiled", False) for b in model.transformer_blocks())
        got = _train(model, batches, 3)
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(torch.tensor(got), torch.tensor(exp), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------- the Triton path as torch.library.triton_op


def _ln_inputs(seed, m=7, n=24, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    ins = [_rand(m, n, g=g, dtype=dtype), _rand(m, n, g=g, dtype=dtype), 1 + 0.1 * _rand(n, g=g, dtype=dtype),
           _rand(n, g=g, dtype=dtype)]
    return [t.to(triton_device()).requires_grad_() for t in ins], _rand(m, n, g=g), _rand(m, n, g=g)


def _ln_float64(x, r, w, b, eps=1e-5):
    """LayerNorm(x + r) * w + b and x + r in float64, written out (mean, biased variance)."""
    s = x.double() + r.double()
    mu = s.mean(-1, keepdim=True)
    var = ((s - mu) ** 2).mean(-1, keepdim=True)
    return (s - mu) / torch.sqrt(var + eps) * w.double() + b.double(), s


class _Calls(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@needs_triton
def test_triton_path_runs_as_triton_op():
    if not HAVE_TRITON_OP:
        pytest.skip("torch without torch.library.triton_op: the Triton path stays a custom op")
    fwd, bwd = add_layer_norm_triton_ops()
    assert isinstance(fwd, torch._library.custom_ops.CustomOpDef) and str(fwd._opoverload) == "sonar_kernels.add_layer_norm_triton.default"
    (x, r, w, b), up, _ = _ln_inputs(30)
    with _Calls() as calls:
        normed, summed = add_layer_norm(x, r, w, b, 1e-5, impl="triton")
        (normed.cpu() * up).sum().backward()
    assert "sonar_kernels.add_layer_norm_triton.default" in calls.names, calls.names
    assert "sonar_kernels.add_layer_norm_triton_backward.default" in calls.names, calls.names
    assert not any(n.startswith("sonar_kernels.add_layer_norm.") for n in calls.names)  # not the custom op
    fwd, bwd = lce_triton_ops()
    assert str(fwd._opoverload) == "sonar_kernels.linear_cross_entropy_triton.default"
    (h, w, b, t), _ = _lce_inputs(36)
    for frozen in (True, False):  # "grad_in_forward" (backward scales rows) and "recompute" (the backward op)
        with _Calls() as calls:
            linear_cross_entropy(h, w.detach().requires_grad_(not frozen), t, impl="triton").backward()
        assert "sonar_kernels.linear_cross_entropy_triton.default" in calls.names, calls.names
        assert ("sonar_kernels.linear_cross_entropy_triton_backward.default" in calls.names) is not frozen
        assert not any(n.startswith("sonar_kernels.linear_cross_entropy.") for n in calls.names)


@needs_triton
def test_opcheck_add_layer_norm_triton_ops():
    if not HAVE_TRITON_OP:
        pytest.skip("torch without torch.library.triton_op")
    fwd, bwd = add_layer_norm_triton_ops()
    (x, r, w, b), _, _ = _ln_inputs(31)
    _opcheck(fwd, (x, r, w, b, 1e-5))
    _opcheck(fwd, (x, None, None, None, 1e-5))
    y, s, mean, rstd = fwd(*(t.detach() for t in (x, r, w, b)), 1e-5)
    dy, ds = (t.to(x.device) for t in _ln_inputs(32)[1:])
    _opcheck(bwd, (dy, ds, s, w.detach(), mean, rstd, True, True))
    _opcheck(bwd, (dy, None, s, None, mean, rstd, False, False))


@needs_triton
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_add_layer_norm_triton_compiled_fullgraph_matches(backend):
    """Compiled with fullgraph=True (dynamic shapes, two row counts): outputs and all four gradients equal the
    eager Triton op's and a float64 closed form at the op's own fp32 tolerances (test_decoder_ops: 2e-5;
    weight/bias gradients sum over rows, so sqrt(M) times that)."""
    torch._dynamo.reset()
    counters.clear()

    def fn(x, r, w, b):
        return add_layer_norm(x, r, w, b, 1e-5, impl="triton")

    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend=backend)
    for seed, m in ((33, 7), (34, 12)):
        (x, r, w, b), up_n, up_s = _ln_inputs(seed, m=m)
        results = []
        for f in (compiled, fn):
            ins = [t.detach().clone().requires_grad_() for t in (x, r, w, b)]
            normed, summed = f(*ins)
            loss = (normed.cpu().double() * up_n).sum() + (summed.cpu().double() * up_s).sum()
            results.append(([normed.detach().cpu(), summed.detach().cpu()],
                            [t.cpu() for t in torch.autograd.grad(loss, ins)]))
        (got, got_g), (exp, exp_g) = results
        ins64 = [t.detach().cpu().double().requires_grad_() for t in (x, r, w, b)]
        ref_n, ref_s = _ln_float64(*ins64)
        ref_g = torch.autograd.grad((ref_n * up_n.double()).sum() + (ref_s * up_s.double()).sum(), ins64)
        for name, a, e, ref in zip(("normed", "summed"), got, exp, (ref_n, ref_s)):
            torch.testing.assert_close(a, e, atol=2e-5, rtol=2e-5, msg=lambda msg, n=name: f"{n}: {msg}")
            torch.testing.assert_close(a.double(), ref.detach(), atol=2e-5, rtol=2e-5)
        for name, a, e, ref in zip("xrwb", got_g, exp_g, ref_g):
            tol = 2e-5 * (m ** 0.5 if a.dim() == 1 else 1)
            torch.testing.assert_close(a, e, atol=tol, rtol=2e-5, msg=lambda msg, n=name: f"d{n}: {msg}")
            torch.testing.assert_close(a.double(), ref, atol=tol, rtol=2e-5, msg=lambda msg, n=name: f"d{n}: {msg}")
    assert not counters["graph_break"]


def _lce_inputs(seed, n=40, d=48, v=300):
    """(hidden, weight, bias, target) on the Triton device, hidden requiring grad; a quarter of the targets
    ignored (-100); and an upstream gradient [N] for reduction="none"."""
    g = torch.Generator().manual_seed(seed)
    h, w, b = _rand(n, d, g=g), _rand(v, d, g=g) / d ** 0.5, _rand(v, g=g)
    t = torch.randint(0, v, (n,), generator=g)
    t[torch.rand(n, generator=g) < 0.25] = -100
    h, w, b, t = (x.to(triton_device()) for x in (h, w, b, t))
    return (h.requires_grad_(), w, b, t), _rand(n, g=g)


def _lce_float64(h, w, b, t, reduction, smoothing, z_loss):
    """Cross-entropy of h @ w.T + b in float64 from the full logits: (1 - eps) (lse - z_t) + eps (lse - mean z),
    plus z_loss lse^2, on non-ignored rows; "mean" over those rows."""
    z = h @ w.t() + (b if b is not None else 0.0)
    lse = torch.logsumexp(z, -1)
    valid = t != -100
    z_t = z.gather(1, t.clamp_min(0)[:, None])[:, 0]
    rows = (1 - smoothing) * (lse - z_t) + smoothing * (lse - z.mean(-1)) + z_loss * lse ** 2
    rows = torch.where(valid, rows, torch.zeros_like(rows))
    return rows if reduction == "none" else rows.sum() / valid.sum()


@needs_triton_op
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("frozen", [True, False], ids=["grad_in_forward", "recompute"])
def test_linear_cross_entropy_triton_compiled_fullgraph_matches(backend, frozen):
    """The Triton path (its triton_ops) compiled with fullgraph=True (dynamic shapes, two token counts): loss and
    gradients (hidden; weight and bias when trainable) equal the eager triton_op's and a float64 reference from
    the full logits, at test_linear_cross_entropy's fp32 tolerances (loss 2e-5 / 1e-5, gradients 2e-5 / 1e-4)."""
    torch._dynamo.reset()
    counters.clear()
    kw = dict(label_smoothing=0.1, z_loss=1e-3)

    def fn(h, w, b, t):
        return linear_cross_entropy(h, w, t, bias=b, impl="triton", reduction="none", **kw)

    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend=backend)
    for seed, n in ((37, 40), (38, 29)):
        (h, w, b, t), up = _lce_inputs(seed, n=n)
        trainable = (True, not frozen, not frozen)  # hidden, weight, bias
        results = []
        for f in (compiled, fn):
            ins = [x.detach().clone().requires_grad_(grad) for x, grad in zip((h, w, b), trainable)]
            loss = f(*ins, t)
            grads = torch.autograd.grad((loss.cpu().double() * up.double()).sum(), [x for x in ins if x.requires_grad])
            results.append([loss.detach().cpu(), *(x.cpu() for x in grads)])
        ins64 = [x.detach().cpu().double().requires_grad_(grad) for x, grad in zip((h, w, b), trainable)]
        ref = _lce_float64(*ins64, t.cpu(), "none", kw["label_smoothing"], kw["z_loss"])
        ref_g = torch.autograd.grad((ref * up.double()).sum(), [x for x in ins64 if x.requires_grad])
        for i, (name, got, exp, want) in enumerate(zip(("loss", "d hidden", "d weight", "d bias"), *results,
                                                       [ref.detach(), *ref_g])):
            atol, rtol = (2e-5, 1e-5) if i == 0 else (2e-5, 1e-4)
            torch.testing.assert_close(got, exp, atol=atol, rtol=rtol, msg=lambda m, nm=name: f"{nm} vs eager: {m}")
            torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol,
                                       msg=lambda m, nm=name: f"{nm} vs float64: {m}")
    assert not counters["graph_break"]


@needs_triton
def test_wrap_triton_accepts_every_linear_cross_entropy_kernel():
    """torch's traceable wrapper (what `wrap_triton` builds for a compiled kernel; on the CPU, where the
    interpreter's kernels skip it, built directly) accepts each LCE kernel: the atomic backward zeroes its
    outputs by `reset_to_zero`, not by an autotune pre_hook, which the wrapper refuses (checked here too)."""
    import triton
    from torch._higher_order_ops.triton_kernel_wrap import TraceableTritonKernelWrapper

    from sonar_kernels.triton_kernels import linear_cross_entropy as tri

    kernels = [getattr(tri, name) for name in dir(tri) if name.startswith("_lce_") and name.endswith("_kernel")]
    assert len(kernels) == 4
    for kernel in kernels:
        TraceableTritonKernelWrapper(kernel, None, None)
    hooked = triton.autotune(configs=tri._BWD_CONFIGS, key=["N"], pre_hook=lambda *a, **k: None)
    hooked = hooked(tri._lce_bwd_kernel.fn)
    with pytest.raises(RuntimeError, match="pre_hook and post_hook are not supported"):
        TraceableTritonKernelWrapper(hooked, None, None)


@pytest.mark.skipif(not (torch.cuda.is_available() and triton_available() and not interpret_mode()),
                    reason="the decomposition into kernel nodes needs Triton on a GPU (ops/triton_op.py)")
@pytest.mark.parametrize("case", ["add_layer_norm", "linear_cross_entropy_grad_in_forward",
                                  "linear_cross_entropy_recompute"])
def test_inductor_sees_the_triton_kernels(case):
    """Compiled with inductor, the Triton paths' triton_ops decompose: the generated code (forward and backward)
    launches their Triton kernels and never calls the ops opaquely (run by bench/run_gpu.sh's compile stage)."""
    from torch._inductor.utils import run_and_get_code

    if not HAVE_TRITON_OP:
        pytest.skip("torch without torch.library.triton_op")
    torch._dynamo.reset()
    if case == "add_layer_norm":
        (x, r, w, b), _, _ = _ln_inputs(35)
        compiled = torch.compile(lambda *a: add_layer_norm(*a, 1e-5, impl="triton")[0] * 2, fullgraph=True)
        _, codes = run_and_get_code(compiled, x.detach(), r.detach(), w.detach(), b.detach())
        kernels, op = ["_add_ln_fwd_kernel"], "sonar_kernels.add_layer_norm_triton"
    else:
        frozen = case.endswith("grad_in_forward")
        (h, w, b, t), _ = _lce_inputs(39)
        w, b = (x.detach().requires_grad_(not frozen) for x in (w, b))
        compiled = torch.compile(lambda *a: linear_cross_entropy(*a[:3], bias=a[3], impl="triton") * 2,
                                 fullgraph=True)
        _, codes = run_and_get_code(lambda: compiled(h, w, t, b).backward())
        kernels = ["_lce_softmax_grad_kernel"] if frozen else ["_lce_fwd_kernel", "_lce_dlogits_kernel"]
        op = "sonar_kernels.linear_cross_entropy_triton"
    for kernel in kernels:
        assert any(kernel in c for c in codes), kernel
    assert not any(op in c for c in codes)  # decomposed, not called opaquely


def test_cpu_inductor_saves_relu_output_not_a_bool_mask():
    """sonar_llm.compile's inductor keeps ReLU's backward as the ATen kernel on the CPU, so the graph saves ReLU's
    output; torch's stock inductor saves a bool mask there (inductor's AVX2 C++ stores it ~18x slower than ATen:
    the cause of the compiled SONAR decoder's CPU slowdown, docs/benchmarks.md). Both compiled gradients equal eager's."""
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.utils import run_and_get_code

    from sonar_llm.compile import compile_fullgraph

    g = torch.Generator().manual_seed(40)
    w1, w2 = _rand(64, 16, g=g), _rand(16, 64, g=g)
    x = _rand(10, 16, g=g)

    def ffn(h):
        return F.linear(F.relu(F.linear(h, w1)), w2)

    def grads(fn):
        h = x.clone().requires_grad_()
        fn(h).pow(2).sum().backward()
        return h.grad

    expected = grads(ffn)
    for name, compiled in (("project", compile_fullgraph(ffn)),
                           ("stock", torch.compile(ffn, fullgraph=True, dynamic=True, backend=compile_fx))):
        torch._dynamo.reset()
        got, codes = run_and_get_code(grads, compiled)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        code = "\n".join(codes)
        bool_buffers = "bool*" in code
        assert bool_buffers == (name == "stock"), (name, code)
        assert ("aten.threshold_backward.default(" in code) == (name == "project"), (name, code)
