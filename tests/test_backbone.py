"""Tests for sonar_llm.models.backbone: packed vs padded vs KV-cache equality, GQA, RoPE conventions,
llama3 scaling, the masked-attention path, LCM key names, init and activation checkpointing.

References are independent: a hand-written float64 Transformer (explicit softmax, explicit 2x2
rotations) and closed-form formulas."""
import math

import pytest
import torch

from sonar_llm.activation_checkpointing import apply_activation_checkpointing, checkpointed_indices
from sonar_llm.models.backbone import (
    Backbone,
    BackboneConfig,
    RotaryEmbedding,
    llama3_scaled_inv_freq,
    positions_from_cu_seqlens,
)


def tiny_cfg(**kw):
    base = dict(model_dim=32, num_layers=2, num_heads=4, ffn_dim=48, max_seq_len=64)
    base.update(kw)
    return BackboneConfig(**base)


def make_model(seed, **kw):
    torch.manual_seed(seed)
    model = Backbone(tiny_cfg(**kw)).double().eval()
    # Random (non-unit) norm weights and biases so every parameter matters.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layer_norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model


# ------------------------------------------------------------------ independent reference ----


def ref_rotate(x, positions, theta, interleaved, inv_freq=None):
    """x[T,H,Dh] float64, explicit 2x2 rotation of each pair by pos * freq_i."""
    T, H, Dh = x.shape
    out = x.clone()
    for t in range(T):
        for i in range(Dh // 2):
            freq = inv_freq[i] if inv_freq is not None else theta ** (-2.0 * i / Dh)
            a = float(positions[t]) * float(freq)
            c, s = math.cos(a), math.sin(a)
            j, k = (2 * i, 2 * i + 1) if interleaved else (i, i + Dh // 2)
            out[t, :, j] = c * x[t, :, j] - s * x[t, :, k]
            out[t, :, k] = s * x[t, :, j] + c * x[t, :, k]
    return out


def ref_forward_doc(model, x):
    """One document x[S,d] through the model's weights with plain float64 math."""
    cfg = model.cfg
    sd = {k: v.detach().double() for k, v in model.state_dict().items()}
    S, H, Hkv, Dh = x.shape[0], cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    pos = torch.arange(S)

    def lin(h, name):
        y = h @ sd[name + ".weight"].T
        return y + sd[name + ".bias"] if name + ".bias" in sd else y

    def rms(h, name):
        return h / torch.sqrt((h * h).mean(-1, keepdim=True) + cfg.norm_eps) * sd[name]

    inv = RotaryEmbedding(
        Dh, theta=cfg.rope_theta, scaling=cfg.rope_scaling, scaling_factor=cfg.rope_scaling_factor
    )._inv_freq
    for n in range(cfg.num_layers):
        p = f"layers.{n}."
        h = rms(x, p + "self_attn_layer_norm.weight")
        q = lin(h, p + "self_attn.q_proj").view(S, H, Dh)
        k = lin(h, p + "self_attn.k_proj").view(S, Hkv, Dh)
        v = lin(h, p + "self_attn.v_proj").view(S, Hkv, Dh)
        q = ref_rotate(q, pos, cfg.rope_theta, cfg.rope_interleaved, inv)
        k = ref_rotate(k, pos, cfg.rope_theta, cfg.rope_interleaved, inv)
        heads = []
        for hh in range(H):
            kv = hh // (H // Hkv)
            scores = q[:, hh] @ k[:, kv].T / math.sqrt(Dh)
            scores = scores.masked_fill(torch.triu(torch.ones(S, S, dtype=torch.bool), 1), float("-inf"))
            heads.append(torch.softmax(scores, -1) @ v[:, kv])
        x = x + lin(torch.cat(heads, -1), p + "self_attn.output_proj")
        h = rms(x, p + "ffn_layer_norm.weight")
        g = lin(h, p + "ffn.gate_proj")
        x = x + lin(g * torch.sigmoid(g) * lin(h, p + "ffn.inner_proj"), p + "ffn.output_proj")
    return rms(x, "layer_norm.weight")


# ------------------------------------------------------------------------------- tests ----


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(num_kv_heads=2, rope_interleaved=True, attn_bias=True, output_proj_bias=True, ffn_bias=True),
        dict(num_kv_heads=1, rope_scaling="llama3", rope_theta=1e4),
        dict(num_heads=2, head_dim=24, rope_scaling="llama3", rope_scaling_factor=32.0),  # attn 48 != d 32
    ],
)
def test_packed_forward_matches_independent_reference(kw):
    model = make_model(0, **kw)
    lengths = [3, 1, 5]
    x = torch.randn(sum(lengths), 32, dtype=torch.float64)
    cu = torch.tensor([0, 3, 4, 9], dtype=torch.int32)
    out = model(x, cu, max(lengths))
    start = 0
    for n in lengths:
        ref = ref_forward_doc(model, x[start : start + n])
        torch.testing.assert_close(out[start : start + n], ref, rtol=1e-10, atol=1e-10)
        start += n


def test_packed_equals_padded_per_document():
    model = make_model(1, num_kv_heads=2)
    lengths = [4, 2, 6]
    cu = torch.tensor([0, 4, 6, 12], dtype=torch.int32)
    x = torch.randn(12, 32, dtype=torch.float64)
    out = model(x, cu, 6)
    padded = torch.zeros(3, 6, 32, dtype=torch.float64)
    for b, n in enumerate(lengths):
        padded[b, :n] = x[cu[b] : cu[b] + n]
        padded[b, n:] = torch.randn(6 - n, 32)  # garbage in the padding must not leak (causal)
    out_p = model.forward_padded(padded)
    for b, n in enumerate(lengths):
        torch.testing.assert_close(out[cu[b] : cu[b] + n], out_p[b, :n], rtol=1e-12, atol=1e-12)


def test_positions_restart_per_document():
    cu = torch.tensor([0, 3, 3, 7], dtype=torch.int32)  # includes an empty document
    assert positions_from_cu_seqlens(cu, 7).tolist() == [0, 1, 2, 0, 1, 2, 3]


@pytest.mark.parametrize("num_kv_heads", [4, 2])
def test_kv_cache_step_matches_full_forward(num_kv_heads):
    model = make_model(2, num_kv_heads=num_kv_heads)
    lengths = torch.tensor([2, 5, 3])
    total = 8
    x = torch.randn(3, total, 32, dtype=torch.float64)
    full = model.forward_padded(x)
    cache = model.new_cache(3, 16, dtype=torch.float64)
    # Ragged prefill (right-padded to 5), then each row continues from its own length.
    prefill = model.step(x[:, :5].clone(), cache, lengths=lengths)
    for b, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(prefill[b, :n], full[b, :n], rtol=1e-12, atol=1e-12)
    assert cache.seq_lens.tolist() == [2, 5, 3]
    # Feed each row's next inputs one step at a time; all rows advance together.
    for i in range(3):
        pos = cache.seq_lens.clone()
        nxt = x[torch.arange(3), pos].unsqueeze(1)
        out = model.step(nxt, cache)
        for b in range(3):
            torch.testing.assert_close(out[b, 0], full[b, pos[b]], rtol=1e-12, atol=1e-12)


def test_kv_cache_overflow_raises():
    model = make_model(3)
    cache = model.new_cache(1, 4, dtype=torch.float64)
    model.step(torch.randn(1, 3, 32, dtype=torch.float64), cache)
    with pytest.raises(ValueError, match="overflow"):
        model.step(torch.randn(1, 2, 32, dtype=torch.float64), cache)


def test_gqa_equals_mha_with_repeated_kv_heads():
    gqa = make_model(4, num_kv_heads=2, attn_bias=True)
    mha = Backbone(tiny_cfg(attn_bias=True)).double().eval()
    sd = gqa.state_dict()
    rep = {}
    for k, v in sd.items():
        if ".k_proj." in k or ".v_proj." in k:  # [Hkv*Dh, ...] -> [H*Dh, ...], each kv head twice
            v = v.view(2, 8, *v.shape[1:]).repeat_interleave(2, dim=0).reshape(32, *v.shape[1:])
        rep[k] = v
    mha.load_state_dict(rep, strict=True)
    x = torch.randn(7, 32, dtype=torch.float64)
    cu = torch.tensor([0, 7], dtype=torch.int32)
    torch.testing.assert_close(gqa(x, cu, 7), mha(x, cu, 7), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_matches_closed_form_rotation(interleaved):
    torch.manual_seed(5)
    rope = RotaryEmbedding(8, theta=100.0, interleaved=interleaved)
    x = torch.randn(5, 3, 8, dtype=torch.float64)
    pos = torch.tensor([0, 3, 1, 7, 12])
    torch.testing.assert_close(rope.apply(x, pos), ref_rotate(x, pos, 100.0, interleaved), rtol=1e-12, atol=1e-12)
    # Relative-position property: <R(p)q, R(p+s)k> does not depend on p.
    q, k = torch.randn(1, 1, 8, dtype=torch.float64), torch.randn(1, 1, 8, dtype=torch.float64)
    dots = [
        (rope.apply(q, torch.tensor([p])) * rope.apply(k, torch.tensor([p + 4]))).sum().item()
        for p in (0, 5, 31)
    ]
    assert dots[0] == pytest.approx(dots[1], abs=1e-12) and dots[0] == pytest.approx(dots[2], abs=1e-12)
    # fp32 input: computed in fp32, same result to fp32 precision.
    torch.testing.assert_close(rope.apply(x.float(), pos), ref_rotate(x, pos, 100.0, interleaved).float())


def test_rope_conventions_differ_only_by_permutation():
    torch.manual_seed(6)
    half, inter = RotaryEmbedding(8, theta=1e4), RotaryEmbedding(8, theta=1e4, interleaved=True)
    x = torch.randn(4, 2, 8, dtype=torch.float64)
    pos = torch.arange(4)
    perm = torch.tensor([0, 4, 1, 5, 2, 6, 3, 7])  # half-split layout -> interleaved layout
    torch.testing.assert_close(inter.apply(x[..., perm], pos), half.apply(x, pos)[..., perm])


@pytest.mark.parametrize("factor", [8.0, 32.0])
def test_llama3_scaling_matches_formula(factor):
    head_dim, theta = 64, 5e5
    got = RotaryEmbedding(head_dim, theta=theta, scaling="llama3", scaling_factor=factor)._inv_freq
    low, high, old = 1.0, 4.0, 8192
    for i in range(head_dim // 2):
        f = theta ** (-2.0 * i / head_dim)
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            want = f
        elif wavelen > old / low:
            want = f / factor
        else:
            smooth = (old / wavelen - low) / (high - low)
            want = (1 - smooth) * f / factor + smooth * f
        assert got[i].item() == pytest.approx(want, rel=1e-12)
    base = RotaryEmbedding(head_dim, theta=theta)._inv_freq
    assert got[0] == base[0] and got[-1] == pytest.approx(base[-1].item() / factor, rel=1e-12)
    assert torch.equal(llama3_scaled_inv_freq(base, factor=factor), got)


def test_attend_with_mask_matches_manual_softmax():
    model = make_model(7, num_kv_heads=2, attn_bias=True)
    attn = model.layers[0].self_attn
    B, Tq, Tk, H, Dh = 2, 3, 5, 4, 8
    q_in = torch.randn(B, Tq, 32, dtype=torch.float64)
    kv_in = torch.randn(B, Tk, 32, dtype=torch.float64)
    mask = torch.rand(B, Tq, Tk) < 0.6
    mask[..., 0] = True  # every query sees at least one key
    out = attn.attend(q_in, kv_in, mask)
    q = attn.q_proj(q_in).view(B, Tq, H, Dh)
    k = attn.k_proj(kv_in).view(B, Tk, 2, Dh).repeat_interleave(2, dim=2)
    v = attn.v_proj(kv_in).view(B, Tk, 2, Dh).repeat_interleave(2, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(Dh)
    s = s.masked_fill(~mask[:, None], float("-inf"))
    ref = attn.output_proj(torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v).reshape(B, Tq, 32))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="attend"):
        attn.attend(q_in[0], kv_in, mask)


def test_lcm_state_dict_names_and_strict_load():
    model = Backbone(tiny_cfg(attn_bias=True, output_proj_bias=True, ffn_bias=True, num_layers=1))
    keys = set(model.state_dict())
    want = {"layer_norm.weight", "layers.0.self_attn_layer_norm.weight", "layers.0.ffn_layer_norm.weight"}
    for proj in ("q_proj", "k_proj", "v_proj", "output_proj"):
        want |= {f"layers.0.self_attn.{proj}.weight", f"layers.0.self_attn.{proj}.bias"}
    for proj in ("gate_proj", "inner_proj", "output_proj"):
        want |= {f"layers.0.ffn.{proj}.weight", f"layers.0.ffn.{proj}.bias"}
    assert keys == want
    no_bias = Backbone(tiny_cfg(num_layers=1))
    assert not any(k.endswith("bias") for k in no_bias.state_dict())


def test_init_scales_output_projections():
    torch.manual_seed(8)
    cfg = BackboneConfig(model_dim=128, num_layers=8, num_heads=4, ffn_dim=256, init_std=0.02)
    model = Backbone(cfg)
    layer = model.layers[3]
    assert layer.self_attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert layer.ffn.gate_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    for w in (layer.self_attn.output_proj.weight, layer.ffn.output_proj.weight):
        assert w.std().item() == pytest.approx(0.02 / 4.0, rel=0.05)  # 1/sqrt(2*8)
    assert torch.equal(layer.ffn_layer_norm.weight, torch.ones(128))


def test_activation_checkpointing_same_grads():
    model = make_model(9, num_layers=3)
    model_ckpt = make_model(9, num_layers=3)
    apply_activation_checkpointing(model_ckpt.layers, "full")
    model_every2 = make_model(9, num_layers=3)
    apply_activation_checkpointing(model_every2.layers, "selective")
    assert checkpointed_indices(model_ckpt.layers) == {0, 1, 2} and checkpointed_indices(model_every2.layers) == {0, 2}
    assert checkpointed_indices(model.layers) == set()
    x = torch.randn(6, 32, dtype=torch.float64)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    grads = []
    for m in (model, model_ckpt, model_every2):
        m.train()
        m.zero_grad()
        m(x, cu, 4).pow(2).sum().backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    for a, b, c in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="num_heads"):
        BackboneConfig(model_dim=30, num_layers=1, num_heads=4, ffn_dim=8)
    with pytest.raises(ValueError, match="num_kv_heads"):
        BackboneConfig(model_dim=32, num_layers=1, num_heads=4, num_kv_heads=3, ffn_dim=8)
    with pytest.raises(ValueError, match="rope_scaling"):
        BackboneConfig(model_dim=32, num_layers=1, num_heads=4, ffn_dim=8, rope_scaling="yarn")
    model = make_model(10)
    with pytest.raises(ValueError, match="x\\[T,32\\]"):
        model(torch.randn(2, 3, 32, dtype=torch.float64), torch.tensor([0, 2], dtype=torch.int32), 2)


def test_shared_rope_cache_never_returns_stale_rotations():
    model = make_model(11)
    rope = model.rope
    assert all(layer.self_attn.rope is rope for layer in model.layers)
    x = torch.randn(4, 4, 8, dtype=torch.float64)
    p1, p2 = torch.tensor([0, 1, 2, 3]), torch.tensor([5, 6, 7, 8])
    out1 = rope.apply(x, p1)
    torch.testing.assert_close(rope.apply(x, p2), ref_rotate(x, p2, rope.theta, False))
    torch.testing.assert_close(rope.apply(x.float(), p1), out1.float())  # other dtype: recomputed
    torch.testing.assert_close(rope.apply(x, p1), out1)


def test_rope_cache_survives_inference_mode_then_training():
    model = make_model(12)
    x = torch.randn(5, 32, dtype=torch.float64)
    cu = torch.tensor([0, 5], dtype=torch.int32)
    pos = torch.arange(5)
    with torch.inference_mode():
        ref = model(x, cu, 5, positions=pos)
    out = model(x, cu, 5, positions=pos)  # same positions object, now with autograd
    out.sum().backward()
    torch.testing.assert_close(out.detach(), ref)


def test_kv_cache_reserve_grows_and_keeps_what_is_filled():
    """A cache that starts small and grows (`reserve`, used by the generation loops) gives the same outputs as one
    allocated for the whole length up front, step by step."""
    bb = make_model(5, num_kv_heads=2)
    x = torch.randn(3, 9, 32, dtype=torch.float64)
    big, small = bb.new_cache(3, 9, dtype=torch.float64), bb.new_cache(3, 2, dtype=torch.float64)
    with torch.no_grad():
        want = [bb.step(x[:, :2], big)] + [bb.step(x[:, i:i + 1], big) for i in range(2, 9)]
        got = [bb.step(x[:, :2], small)]
        for i in range(2, 9):
            small.reserve(small.upper + 1)
            got.append(bb.step(x[:, i:i + 1], small))
    assert small.max_len == 16  # 2 -> 4 -> 8 -> 16: doubled, not one position at a time
    torch.testing.assert_close(torch.cat(got, 1), torch.cat(want, 1), rtol=0, atol=1e-12)
    small.reserve(4)  # never shrinks
    assert small.max_len == 16
