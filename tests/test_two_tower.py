"""Tests for the Two-Tower diffusion LCM: LCM key layout, masks, CFG dropout, loss, generation."""
import math

import pytest
import torch
import torch.nn.functional as F

from sonar_llm.data.batch import ConceptBatch
from sonar_llm.models.diffusion import DDIMScheduler, cfg_combine
from sonar_llm.models.two_tower import (
    DocLayout,
    TwoTowerConfig,
    TwoTowerLCM,
    cfg_dropout_rows,
    load_lcm_state_dict,
    shifted_causal_mask,
    two_tower_1_6B,
    two_tower_tiny,
)


def _batch(lengths, E, generator, dtype=torch.float32):
    S = sum(lengths)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32)
    emb = torch.randn(S, E, generator=generator, dtype=dtype) * 0.05 + 0.01
    return ConceptBatch(emb, cu, torch.full((2 * S,), 3, dtype=torch.long),
                        torch.arange(0, 2 * S + 1, 2, dtype=torch.int32), max(lengths), 2).validate()


def _expected_keys(n_ctx, n_den):
    """The Two-Tower key list as written in the reference (sonar_and_lcm.md C7)."""
    keys = ["sonar_normalizer.center", "sonar_normalizer.scale",
            "encoder_frontend.pre_linear.weight", "encoder_frontend.pre_linear.bias",
            "context_encoder.layer_norm.weight",
            "denoiser.embed_time.fc1.weight", "denoiser.embed_time.fc1.bias",
            "denoiser.embed_time.fc2.weight", "denoiser.embed_time.fc2.bias",
            "denoiser.initial_proj.fc.weight", "denoiser.initial_proj.fc.bias",
            "denoiser.final_proj.fc.weight", "denoiser.final_proj.fc.bias",
            "denoiser.layer_norm.weight"]
    for n in range(n_ctx):
        p = f"context_encoder.layers.{n}."
        keys += [p + "self_attn_layer_norm.weight", p + "ffn_layer_norm.weight"]
        keys += [p + f"self_attn.{m}.{w}" for m in ("q_proj", "k_proj", "v_proj", "output_proj") for w in ("weight", "bias")]
        keys += [p + f"ffn.{m}.{w}" for m in ("gate_proj", "inner_proj", "output_proj") for w in ("weight", "bias")]
    for n in range(n_den):
        p = f"denoiser.layers.{n}."
        keys += [p + f"{m}.weight" for m in ("self_attn_layer_norm", "cross_attention_layer_norm", "ffn_layer_norm")]
        keys += [p + f"{a}.{m}.{w}" for a in ("self_attn", "cross_attention")
                 for m in ("q_proj", "k_proj", "v_proj", "output_proj") for w in ("weight", "bias")]
        keys += [p + f"ffn.{m}.{w}" for m in ("gate_proj", "inner_proj", "output_proj") for w in ("weight", "bias")]
        keys += [p + "modulator.fc.weight", p + "modulator.fc.bias"]
    return keys


def test_tiny_key_set_and_strict_load():
    cfg = two_tower_tiny()
    model = TwoTowerLCM(cfg)
    sd = model.state_dict()
    assert sorted(sd) == sorted(_expected_keys(cfg.context_layers, cfg.denoiser_layers))
    g = torch.Generator().manual_seed(0)
    fresh = {k: torch.randn(v.shape, generator=g) for k, v in sd.items()}
    other = TwoTowerLCM(cfg)
    load_lcm_state_dict(other, {"model": fresh})
    for k, v in other.state_dict().items():
        assert torch.equal(v, fresh[k]), k
    bad = dict(fresh)
    bad.pop("denoiser.layers.0.modulator.fc.bias")
    bad["denoiser.layers.0.modulator.bias"] = torch.zeros(1)
    with pytest.raises(ValueError, match="modulator"):
        load_lcm_state_dict(other, bad)


def test_1_6B_layout_on_meta_device():
    with torch.device("meta"):
        model = TwoTowerLCM(two_tower_1_6B())
    assert sum(p.numel() for p in model.parameters()) == 1_645_538_304
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sorted(shapes) == sorted(_expected_keys(5, 13))
    assert shapes["sonar_normalizer.center"] == (1024,)
    assert shapes["encoder_frontend.pre_linear.weight"] == (2048, 1024)
    assert shapes["context_encoder.layers.4.ffn.gate_proj.weight"] == (5632, 2048)
    assert shapes["context_encoder.layers.4.ffn.output_proj.weight"] == (2048, 5632)
    assert shapes["denoiser.embed_time.fc1.weight"] == (2048, 256)
    assert shapes["denoiser.embed_time.fc2.weight"] == (2048, 2048)
    assert shapes["denoiser.initial_proj.fc.weight"] == (2048, 1024)
    assert shapes["denoiser.final_proj.fc.weight"] == (1024, 2048)
    assert shapes["denoiser.layers.12.modulator.fc.weight"] == (18432, 2048)
    assert shapes["denoiser.layers.12.modulator.fc.bias"] == (18432,)
    assert shapes["denoiser.layers.12.cross_attention.k_proj.bias"] == (2048,)
    # a strict load of a checkpoint-shaped state dict (meta tensors: no memory)
    ckpt = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    load_lcm_state_dict(model, {"model": ckpt})
    model.load_state_dict(ckpt, strict=True, assign=True)
    assert len(model.transformer_blocks()) == 18


def test_shifted_causal_mask_semantics():
    cu = torch.tensor([0, 3, 4, 9], dtype=torch.int32)
    lay = DocLayout(cu, 9, 5)
    mask = shifted_causal_mask(lay)
    assert mask.shape == (3, 5, 6)
    for d in range(3):
        for i in range(5):
            allowed = set(torch.nonzero(mask[d, i]).flatten().tolist())
            assert allowed == {0} | {1 + c for c in range(i)}  # key 0 and context < i
    with pytest.raises(ValueError, match="max_doc_len"):
        DocLayout(cu, 9, 4)
    with pytest.raises(ValueError, match="doc_cu_seqlens"):
        DocLayout(cu, 8, 5)
    dropped = torch.zeros(9, dtype=torch.bool)
    dropped[[2, 7]] = True  # doc 0 row 2, doc 2 row 3
    mask = shifted_causal_mask(lay, dropped)
    assert torch.nonzero(mask[0, 2]).flatten().tolist() == [0]
    assert torch.nonzero(mask[2, 3]).flatten().tolist() == [0]
    assert torch.nonzero(mask[2, 4]).flatten().tolist() == [0, 1, 2, 3, 4]


def test_cfg_dropout_counts_and_row_zero():
    lengths = [1, 2, 7, 8, 21, 40, 128]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    lay = DocLayout(cu, sum(lengths), max(lengths))
    hits = torch.zeros(sum(lengths))
    for seed in range(200):
        g = torch.Generator().manual_seed(seed)
        rows = cfg_dropout_rows(lay, 0.15, g)
        for d, L in enumerate(lengths):
            doc_rows = rows[cu[d]:cu[d + 1]]
            assert int(doc_rows.sum()) == math.floor((L - 1) * 0.15)
            assert not bool(doc_rows[0])
        hits += rows.float()
    # every non-first row of the 40-row document is picked sometimes (uniform choice, ~15% each)
    start = int(cu[5])
    assert bool((hits[start + 1:start + 40] > 0).all())
    assert hits[start].item() == 0


def _ref_denoiser_doc(model, x_t, t, ctx, dropped):
    """float64 reference of the denoiser on one document, straight from the description: full
    multi-head attention with an explicit diagonal mask; query i cross-attends to [0; ctx_<i]."""
    den = model.denoiser
    d = model.cfg.model_dim
    H = model.cfg.num_heads
    Dh = d // H

    def lin(m, x):
        return x @ m.weight.T + m.bias

    def rms(m, x):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + m.eps) * m.weight

    def mha(attn, q_in, kv_in, allowed):
        q = lin(attn.q_proj, q_in).view(-1, H, Dh).transpose(0, 1)
        k = lin(attn.k_proj, kv_in).view(-1, H, Dh).transpose(0, 1)
        v = lin(attn.v_proj, kv_in).view(-1, H, Dh).transpose(0, 1)
        s = q @ k.transpose(1, 2) / math.sqrt(Dh)
        s = s.masked_fill(~allowed, float("-inf"))
        return lin(attn.output_proj, (s.softmax(-1) @ v).transpose(0, 1).reshape(-1, H * Dh))

    L = x_t.shape[0]
    half = den.embed_time.freq_dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
    args = t.double()[:, None] * freqs
    temb = lin(den.embed_time.fc2, F.silu(lin(den.embed_time.fc1, torch.cat([args.cos(), args.sin()], -1))))
    h = lin(den.initial_proj.fc, x_t)
    keys = torch.cat([torch.zeros(1, d, dtype=torch.float64), ctx])
    cross_allowed = torch.zeros(L, L + 1, dtype=torch.bool)
    for i in range(L):
        cross_allowed[i, 0] = True
        if not dropped[i]:
            cross_allowed[i, 1:i + 1] = True
    for layer in den.layers:
        mod = lin(layer.modulator.fc, F.silu(temb))
        (s1, c1, g1, s2, c2, g2, s3, c3, g3) = mod.chunk(9, -1)
        a = rms(layer.self_attn_layer_norm, h) * (1 + c1) + s1
        h = h + g1 * mha(layer.self_attn, a, a, torch.eye(L, dtype=torch.bool))
        a = rms(layer.cross_attention_layer_norm, h) * (1 + c2) + s2
        h = h + g2 * mha(layer.cross_attention, a, keys, cross_allowed)
        a = rms(layer.ffn_layer_norm, h) * (1 + c3) + s3
        f = layer.ffn
        h = h + g3 * lin(f.output_proj, F.silu(lin(f.gate_proj, a)) * lin(f.inner_proj, a))
    return lin(den.final_proj.fc, rms(den.layer_norm, h))


@pytest.mark.parametrize("num_train_steps", [8, 100])  # 8 < S exercises the timestep-table path
def test_denoiser_matches_float64_reference(num_train_steps):
    torch.manual_seed(0)
    model = TwoTowerLCM(two_tower_tiny(num_train_steps=num_train_steps)).double().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero modulators so every branch matters
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
    lengths = [4, 1, 6]
    S, E = sum(lengths), model.cfg.sonar_dim
    cu = torch.tensor([0, 4, 5, 11], dtype=torch.int32)
    x0 = torch.randn(S, E, generator=g, dtype=torch.float64)
    x_t = torch.randn(S, E, generator=g, dtype=torch.float64)
    t = torch.randint(0, num_train_steps, (S,), generator=g)
    dropped = torch.zeros(S, dtype=torch.bool)
    dropped[[3, 9]] = True
    with torch.no_grad():
        out = model(x0, x_t, t, cu, max(lengths), dropped)
        ctx = model.encode_context(x0, cu, max(lengths))
        for d in range(3):
            a, b = int(cu[d]), int(cu[d + 1])
            ref = _ref_denoiser_doc(model, x_t[a:b], t[a:b], ctx[a:b], dropped[a:b])
            torch.testing.assert_close(out[a:b], ref, rtol=1e-9, atol=1e-10)


def test_prediction_is_causal_in_the_context():
    torch.manual_seed(0)
    model = TwoTowerLCM(two_tower_tiny()).double().eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
    S, E = 6, model.cfg.sonar_dim
    cu = torch.tensor([0, S], dtype=torch.int32)
    x0 = torch.randn(S, E, generator=g, dtype=torch.float64)
    x_t = torch.randn(S, E, generator=g, dtype=torch.float64)
    t = torch.randint(0, 100, (S,), generator=g)
    x0b = x0.clone()
    x0b[3] += 1.0  # change clean concept 3: only predictions at positions > 3 may change
    with torch.no_grad():
        a = model(x0, x_t, t, cu, S)
        b = model(x0b, x_t, t, cu, S)
    assert torch.equal(a[:4], b[:4])
    assert (a[4:] - b[4:]).abs().amax(-1).min() > 1e-8


def test_loss_value_and_decrease():
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    # the options that depart from Meta's defaults: no CFG dropout in eval mode, per-document rows, mean
    model = TwoTowerLCM(two_tower_tiny(cfg_dropout_prob=0.15, cfg_dropout_in_eval=False, cfg_dropout_rows="document",
                                       loss_reduction="mean"))
    batch = _batch([5, 9, 3], model.cfg.sonar_dim, g)
    # the loss is the summed-over-dims squared error, averaged over positions
    model.eval()
    loss, metrics = model.loss(batch, generator=torch.Generator().manual_seed(7))
    g2 = torch.Generator().manual_seed(7)
    S = batch.num_sentences
    t = torch.randint(0, 100, (S,), generator=g2)
    noise = torch.randn(S, model.cfg.sonar_dim, generator=g2)
    x0 = model.sonar_normalizer.normalize(batch.embeddings)
    with torch.no_grad():
        pred = model(x0, model.noise_scheduler.add_noise(x0, noise, t), t, batch.doc_cu_seqlens, batch.max_doc_len)
    torch.testing.assert_close(loss.detach(), ((pred - x0) ** 2).sum(-1).mean(), rtol=1e-5, atol=1e-6)
    model.cfg.loss_reduction = "sum"
    loss_sum, _ = model.loss(batch, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(loss_sum.detach(), loss.detach() * S, rtol=1e-5, atol=1e-5)
    model.cfg.loss_reduction = "mean"

    def eval_loss():
        model.eval()
        with torch.no_grad():
            return sum(model.loss(batch, generator=torch.Generator().manual_seed(s))[0].item() for s in range(4))

    before = eval_loss()
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(30):
        opt.zero_grad()
        loss, metrics = model.loss(batch)
        loss.backward()
        opt.step()
    assert int(metrics["cfg_dropped"]) == 0 + 1 + 0  # floor(4*.15)=0, floor(8*.15)=1, floor(2*.15)=0
    assert eval_loss() < 0.8 * before


def test_flops_per_batch_close_to_measured():
    from torch.utils.flop_counter import FlopCounterMode

    model = TwoTowerLCM(two_tower_tiny(model_dim=64, ffn_dim=128, sonar_dim=32, num_train_steps=8))
    g = torch.Generator().manual_seed(4)
    batch = _batch([12], model.cfg.sonar_dim, g)
    with FlopCounterMode(display=False) as counter:
        loss, _ = model.loss(batch, generator=g)
        loss.backward()
    measured = counter.get_total_flops()
    estimate = model.flops_per_batch(batch)
    assert 0.9 * measured < estimate < 1.1 * measured


def _reference_generate(model, prompt, n_new, steps, scale, rescale, noise_scale, g):
    """Generation without KV caches: every denoiser call is the training forward on the full sequence
    (ShiftedCausal mask: the new slot sees key 0 and all earlier concepts; unconditional = a CFG-dropped row)."""
    sched = DDIMScheduler()
    ts = sched.set_timesteps(steps).tolist()
    E = model.cfg.sonar_dim
    seq = model.sonar_normalizer.normalize(prompt)
    outs = []
    for _ in range(n_new):
        n = seq.shape[0] + 1
        cu = torch.tensor([0, n], dtype=torch.int32)
        z = (torch.randn((1, E), generator=g) * noise_scale).clamp(-100, 100)
        for t in ts:
            x0 = torch.cat([seq, torch.zeros(1, E)])
            x_t = torch.cat([torch.zeros(n - 1, E), z])
            tt = torch.full((n,), t)
            cond = model(x0, x_t, tt, cu, n)[-1:]
            if t == 99 or scale == 1.0:  # no CFG at t = T-1, nor anywhere when guidance_scale == 1
                z, px0 = sched.step(cond, t, z)
            else:
                dropped = torch.zeros(n, dtype=torch.bool)
                dropped[-1] = True
                unc = model(x0, x_t, tt, cu, n, dropped)[-1:]
                eps = cfg_combine(sched.to_epsilon(cond, z, t), sched.to_epsilon(unc, z, t), scale, rescale)
                z, px0 = sched.step(eps, t, z, prediction_type="epsilon")
        raw = model.sonar_normalizer.denormalize(px0)
        outs.append(raw[0])
        seq = torch.cat([seq, model.sonar_normalizer.normalize(raw)])
    return torch.stack(outs)


def _perturbed_tiny(seed):
    """A tiny Two-Tower LCM in eval mode with perturbed weights and a small normalizer; also the generator
    that drew them (the tests draw their prompts from it next)."""
    torch.manual_seed(seed)
    model = TwoTowerLCM(two_tower_tiny()).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        model.sonar_normalizer.center.copy_(torch.randn(16, generator=g) * 0.01)
        model.sonar_normalizer.scale.copy_(torch.rand(16, generator=g) * 0.02 + 0.01)
    return model, g


def test_generation_matches_uncached_reference_and_stops():
    model, g = _perturbed_tiny(5)
    prompt = torch.randn(3, 16, generator=g) * 0.02
    out = model.generate(prompt, 2, guidance_scale=3.0, guidance_rescale=0.7, initial_noise_scale=0.6,
                         generator=torch.Generator().manual_seed(9))
    assert out.num_denoiser_steps == 50 and out.timesteps == list(range(99, 0, -2))
    assert out.embeddings[0].shape == (2, 16) and out.stopped_on_eos == [False]
    with torch.no_grad():
        ref = _reference_generate(model, prompt, 2, 40, 3.0, 0.7, 0.6, torch.Generator().manual_seed(9))
    torch.testing.assert_close(out.embeddings[0], ref, rtol=1e-4, atol=1e-5)
    # determinism and batch consistency: the same seed gives the same concepts
    again = model.generate(prompt, 2, generator=torch.Generator().manual_seed(9))
    assert torch.equal(again.embeddings[0], out.embeddings[0])
    twice = model.generate(torch.stack([prompt, prompt]), 1, num_inference_steps=10,
                           generator=torch.Generator().manual_seed(9))
    assert not torch.equal(twice.embeddings[0], twice.embeddings[1])  # independent noise per prompt
    # stop rule: using the first generated concept as the EOS vector stops right after it
    eos = out.embeddings[0][0]
    stop = model.generate(prompt, 5, eos_embedding=eos, min_sentences=1,  # the option that departs from Meta
                          generator=torch.Generator().manual_seed(9))  # same seed
    assert stop.stopped_on_eos == [True] and stop.embeddings[0].shape == (1, 16)
    more = model.generate(prompt, 2, eos_embedding=eos, min_sentences=2, generator=torch.Generator().manual_seed(9))
    assert more.embeddings[0].shape[0] == 2  # the first concept may not stop it any more
    # exact step count without the quirk
    exact = model.generate(prompt, 1, reproduce_lcm_step_quirk=False, generator=torch.Generator().manual_seed(9))
    assert exact.num_denoiser_steps == 40


def test_batched_generation_and_no_cfg():
    torch.manual_seed(6)
    model = TwoTowerLCM(two_tower_tiny()).eval()
    g = torch.Generator().manual_seed(6)
    prompts = torch.randn(2, 1, 16, generator=g) * 0.05
    out = model.generate(prompts, 3, guidance_scale=1.0, num_inference_steps=10,
                         generator=torch.Generator().manual_seed(1))
    assert [e.shape for e in out.embeddings] == [(3, 16), (3, 16)]
    assert out.num_denoiser_steps == 10
    assert torch.isfinite(torch.stack(out.embeddings)).all()
    with pytest.raises(ValueError, match="prompt_embeddings"):
        model.generate(torch.randn(2, 3, 15), 1)
    with pytest.raises(ValueError, match="max_sentences"):
        model.generate(prompts, 0)


def test_batched_no_cfg_generation_matches_uncached_reference():
    """guidance_scale == 1 (no CFG) on a batch of two prompts with one generator each: every prompt's
    concepts equal the uncached one-prompt reference (the denoiser's training forward at every step)."""
    model, g = _perturbed_tiny(7)
    prompts = torch.randn(2, 3, 16, generator=g) * 0.02
    gens = [torch.Generator().manual_seed(20 + i) for i in range(2)]
    out = model.generate(prompts, 2, guidance_scale=1.0, num_inference_steps=10, initial_noise_scale=0.6,
                         generator=gens)
    assert out.num_denoiser_steps == 10
    with torch.no_grad():
        for i in range(2):
            ref = _reference_generate(model, prompts[i], 2, 10, 1.0, 0.0, 0.6, torch.Generator().manual_seed(20 + i))
            torch.testing.assert_close(out.embeddings[i], ref, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out.embeddings[0], out.embeddings[1], atol=1e-3)


def test_config_errors():
    with pytest.raises(ValueError, match="num_heads"):
        TwoTowerConfig(model_dim=30, num_heads=4)
    with pytest.raises(ValueError, match="cfg_dropout_prob"):
        two_tower_tiny(cfg_dropout_prob=1.5)
    with pytest.raises(TypeError, match="TwoTowerConfig"):
        TwoTowerLCM({"model_dim": 8})
    model = TwoTowerLCM(two_tower_tiny())
    bad = ConceptBatch(torch.randn(3, 15), torch.tensor([0, 3], dtype=torch.int32),
                       torch.zeros(3, dtype=torch.long), torch.arange(4, dtype=torch.int32), 3, 1)
    with pytest.raises(ValueError, match="embeddings"):
        model.loss(bad)


def test_activation_checkpointing_gives_the_same_gradients():
    g = torch.Generator().manual_seed(8)
    torch.manual_seed(8)
    plain = TwoTowerLCM(two_tower_tiny(num_train_steps=8))
    ckpt = TwoTowerLCM(two_tower_tiny(num_train_steps=8))
    ckpt.apply_activation_checkpointing("full")  # the contextualizer's and the denoiser's layers
    ckpt.load_state_dict(plain.state_dict())
    with torch.no_grad():
        for p in list(plain.parameters()):
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        ckpt.load_state_dict(plain.state_dict())
    batch = _batch([6, 4], 16, g)
    grads = []
    for model in (plain, ckpt):
        model.train()
        model.zero_grad()
        loss, _ = model.loss(batch, generator=torch.Generator().manual_seed(1))
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-7)
