"""The LCM families' defaults reproduce Meta's runs (issue 22), each against the rule written out here:
the normalizer against scikit-learn's RobustScaler called with Meta's arguments, the fitting sample (every
5th embedding of each batch until more than max samples), a default Two-Tower build fitting on it, the
stop rule on a model whose every concept is the end-of-text embedding, the validation loss with Meta's
batch-level condition dropout against a hand-built mask and a float64 denoiser, the sum reductions, and
the trainer's gradient under sum reduction (2 micro-batches == one big batch's per-target mean)."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sonar_llm.data.batch import ConceptBatch
from sonar_llm.data.shards import DatasetWriter, ShardArrays

sklearn_preprocessing = pytest.importorskip("sklearn.preprocessing")  # test-only reference (dev extra)


# ------------------------------------------------------------------------------------------ normalizer
def _skewed(n, e, seed):
    """Heavy-tailed and skewed columns (where the 0.25%-0.75% range and the IQR differ most), one constant."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, e, generator=g) * 0.01
    x[:, 1] = torch.distributions.Exponential(torch.tensor(30.0)).sample((n,))  # skewed, lower tail near 0
    x[:, 2] = torch.randn(n, generator=g).pow(3) * 0.01  # heavy tails
    x[:, 3] = 0.25  # constant: RobustScaler's zero-range rule
    return x


def test_default_fit_is_robust_scaler_with_metas_arguments():
    from sonar_llm.models.normalizer import SonarNormalizer

    x = _skewed(4000, 8, 0)
    ours = SonarNormalizer(8).fit(x)  # the default: Meta's fit
    # lcm/models/sonar_normalizer/builder.py: RobustScaler(unit_variance=method == "gaussian_robust",
    # quantile_range=(quantile_min, quantile_max)) with 0.25 / 0.75, fitted on float32 numpy data
    ref = sklearn_preprocessing.RobustScaler(unit_variance=True, quantile_range=(0.25, 0.75)).fit(x.float().numpy())
    np.testing.assert_allclose(ours.center.numpy(), ref.center_, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(ours.scale.numpy(), ref.scale_, rtol=1e-5, atol=1e-9)  # fp32 data
    assert ours.scale[3].item() == pytest.approx(ref.scale_[3]) and ref.scale_[3] != 1.0  # 1 / normal range
    rob = SonarNormalizer(8).fit(x, method="robust")
    ref = sklearn_preprocessing.RobustScaler(unit_variance=False, quantile_range=(0.25, 0.75)).fit(x.numpy())
    np.testing.assert_allclose(rob.scale.numpy(), ref.scale_, rtol=1e-5, atol=1e-9)
    # the option: the true interquartile range = RobustScaler's own default range (25, 75) percent
    iqr = SonarNormalizer(8).fit(x, quantile_quirk=False)
    ref = sklearn_preprocessing.RobustScaler(unit_variance=True, quantile_range=(25.0, 75.0)).fit(x.numpy())
    keep = [0, 1, 2, 4, 5, 6, 7]  # the constant column's zero rule differs on purpose (1 after the division)
    np.testing.assert_allclose(iqr.scale.numpy()[keep], ref.scale_[keep], rtol=1e-5, atol=1e-9)
    ratio = (ours.scale / iqr.scale)[[1, 2]]
    assert bool(((ratio < 0.5) | (ratio > 2.0)).all())  # the two readings really differ on these columns


def _write_docs(path, doc_lengths, e=4):
    """Shards whose sentence i (over the whole dataset) has every embedding value equal to i."""
    s = sum(doc_lengths)
    w = DatasetWriter(path, embed_dim=e, dtype="fp16", end_of_doc_text="End of text.",
                      end_of_doc_tokens=[3, 9, 5, 3], end_of_doc_embedding=np.zeros(e))
    emb = np.repeat(np.arange(s, dtype=np.float16)[:, None], e, axis=1)
    tokens = np.tile(np.array([3, 9, 5, 3], dtype=np.int32), s)
    sent_offsets = np.arange(0, 4 * s + 1, 4, dtype=np.int64)
    doc_offsets = np.concatenate([[0], np.cumsum(doc_lengths)]).astype(np.int64)
    w.add_shard(0, ShardArrays(emb, tokens, sent_offsets, doc_offsets))
    w.finish(1)


def test_fitting_sample_follows_metas_script(tmp_path):
    from sonar_llm.models.build import normalizer_sample

    # documents [3, 4, 2, 6, 5, 7] in batches of <= 8 sentences: {0..6}, {7..14}, {15..19}, {20..26}
    _write_docs(tmp_path / "d", [3, 4, 2, 6, 5, 7])
    rows = lambda t: t[:, 0].long().tolist()  # noqa: E731
    # scripts/fit_embedding_normalizer.py: vecs = flat[::down_sample] per batch; stop once the count > max
    assert rows(normalizer_sample(str(tmp_path / "d"), 100, 3, 8)) == [0, 3, 6, 7, 10, 13, 15, 18, 20, 23, 26]
    assert rows(normalizer_sample(str(tmp_path / "d"), 5, 3, 8)) == [0, 3, 6, 7, 10, 13]  # 6 > 5: the batch stays
    assert rows(normalizer_sample(str(tmp_path / "d"), 6, 3, 8)) == [0, 3, 6, 7, 10, 13, 15, 18]  # 6 is not > 6
    assert rows(normalizer_sample(str(tmp_path / "d"), 100, 1, 100)) == list(range(27))
    with pytest.raises(ValueError, match="down_sample"):
        normalizer_sample(str(tmp_path / "d"), 10, 0)


def test_default_two_tower_build_fits_as_metas_script(tmp_path):
    from sonar_llm.models.build import ModelConfig, build_model

    e, lengths = 8, [40, 25, 60, 33]
    s = sum(lengths)
    g = np.random.default_rng(0)
    w = DatasetWriter(tmp_path / "d", embed_dim=e, dtype="fp16", end_of_doc_text="End of text.",
                      end_of_doc_tokens=[3, 9, 5, 3], end_of_doc_embedding=np.zeros(e))
    emb = (g.standard_normal((s, e)) ** 3 * 0.01).astype(np.float16)
    w.add_shard(0, ShardArrays(emb, np.tile(np.array([3, 9, 5, 3], dtype=np.int32), s),
                               np.arange(0, 4 * s + 1, 4, dtype=np.int64),
                               np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)))
    w.finish(1)
    model = build_model(ModelConfig(family="two_tower", preset="tiny", data_path=str(tmp_path / "d")))
    sample = emb.astype(np.float32)[::5]  # one batch (158 <= 10,000 sentences): every 5th embedding
    ref = sklearn_preprocessing.RobustScaler(unit_variance=True, quantile_range=(0.25, 0.75)).fit(sample)
    np.testing.assert_allclose(model.sonar_normalizer.center.numpy(), ref.center_, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(model.sonar_normalizer.scale.numpy(), ref.scale_, rtol=1e-5, atol=1e-9)
    assert model.cfg.loss_reduction == "sum" and model.cfg.cfg_dropout_rows == "batch"
    assert model.cfg.cfg_dropout_in_eval
    # the option through [model.overrides]: the true IQR
    iqr = build_model(ModelConfig(family="two_tower", preset="tiny", data_path=str(tmp_path / "d"),
                                  overrides={"normalizer_true_iqr": True}))
    ref = sklearn_preprocessing.RobustScaler(unit_variance=True, quantile_range=(25.0, 75.0)).fit(sample)
    np.testing.assert_allclose(iqr.sonar_normalizer.scale.numpy(), ref.scale_, rtol=1e-5, atol=1e-9)


# ------------------------------------------------------------------------------------------ stop rule
def _metas_stop_length(cosines, threshold, max_gen_len, min_gen_len=1):
    """lcm/inference/.../generator.py finalize_step for one unpadded prompt of length P: at step_nr (the
    concept written at position step_nr), stop on EOS iff cos >= threshold and step_nr - P >= min_gen_len,
    or when step_nr - P + 1 >= max_gen_len; returns how many concepts were generated."""
    P = 5  # any prompt length
    for step_nr in range(P, P + max_gen_len):
        eos = cosines[step_nr - P] >= threshold and (step_nr - P) >= min_gen_len
        if eos or (step_nr - P + 1) >= max_gen_len:
            return step_nr - P + 1, eos
    raise AssertionError("unreachable")


def _eos_model():
    """A tiny Two-Tower LCM whose denoiser always predicts the same x0, so every concept is one vector."""
    from sonar_llm.models.two_tower import TwoTowerLCM, two_tower_tiny

    torch.manual_seed(0)
    model = TwoTowerLCM(two_tower_tiny()).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.denoiser.final_proj.fc.weight.zero_()
        model.denoiser.final_proj.fc.bias.copy_(torch.randn(16, generator=g))
        model.sonar_normalizer.center.copy_(torch.randn(16, generator=g) * 0.01)
        model.sonar_normalizer.scale.copy_(torch.rand(16, generator=g) * 0.02 + 0.01)
        eos = model.sonar_normalizer.denormalize(model.denoiser.final_proj.fc.bias.clone())
    return model, eos


def test_two_tower_cannot_stop_on_the_first_generated_concept():
    from sonar_llm.models.generate import GenerationSettings
    from sonar_llm.models.generate_two_tower import two_tower_concepts

    model, eos = _eos_model()
    prompt = torch.randn(3, 16, generator=torch.Generator().manual_seed(2)) * 0.02
    out = model.generate(prompt, 6, eos_embedding=eos, num_inference_steps=10,
                         generator=torch.Generator().manual_seed(3))
    cos = F.cosine_similarity(out.embeddings[0], eos[None], dim=-1)
    assert bool((cos > 0.999).all())  # the first generated concept is the end-of-text embedding
    n_meta, eos_meta = _metas_stop_length([1.0] * 6, 0.9, 6)
    assert (out.embeddings[0].shape[0], out.stopped_on_eos[0]) == (n_meta, eos_meta) == (2, True)
    # the option that departs from Meta: the first concept may stop it
    early = model.generate(prompt, 6, eos_embedding=eos, num_inference_steps=10, min_sentences=1,
                           generator=torch.Generator().manual_seed(3))
    assert early.embeddings[0].shape[0] == 1 and early.stopped_on_eos == [True]
    # the evaluation command's path (FamilySpec.generate with GenerationSettings): the same default
    res = two_tower_concepts(model, [prompt, prompt[:2]], GenerationSettings(eos_embedding=eos, max_sentences=6,
                                                                             num_inference_steps=10))
    assert [r.embeddings.shape[0] for r in res] == [1, 1]  # the first concept kept, the EOS one dropped
    assert all(r.stopped_by_eos for r in res)


def test_base_lcm_cannot_stop_on_the_first_generated_concept():
    from sonar_llm.models.backbone import BackboneConfig
    from sonar_llm.models.base_lcm import BaseLCM, BaseLCMConfig
    from sonar_llm.models.generate import base_lcm_concepts, generate_base_lcm, GenerationSettings

    torch.manual_seed(0)
    model = BaseLCM(BaseLCMConfig(BackboneConfig(model_dim=16, num_layers=1, num_heads=2, ffn_dim=32),
                                  sonar_dim=16)).eval()
    with torch.no_grad():  # every prediction is the same vector: the end-of-text embedding
        model.postnet.fc.weight.zero_()
        model.postnet.fc.bias.copy_(torch.randn(16, generator=torch.Generator().manual_seed(1)))
        eos = model.normalizer.denormalize(model.postnet.fc.bias.clone())
    prompts = [torch.randn(n, 16, generator=torch.Generator().manual_seed(n)) for n in (1, 3)]
    n_meta, eos_meta = _metas_stop_length([1.0] * 6, 0.9, 6)  # Meta keeps the stopping concept; we drop it
    for r in generate_base_lcm(model, prompts, max_sentences=8, eos_embedding=eos):
        assert (r.embeddings.shape[0] + 1, r.stopped_by_eos) == (n_meta, eos_meta) == (2, True)
    early = generate_base_lcm(model, prompts, max_sentences=8, eos_embedding=eos, min_sentences=1)
    assert [r.embeddings.shape[0] for r in early] == [0, 0] and all(r.stopped_by_eos for r in early)
    res = base_lcm_concepts(model, prompts, GenerationSettings(eos_embedding=eos, max_sentences=8))
    assert [r.embeddings.shape[0] for r in res] == [1, 1]  # the evaluation command's path


# ------------------------------------------------------------------------------------------ validation loss
def _batch(lengths, e, g):
    s = sum(lengths)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    emb = torch.randn(s, e, generator=g, dtype=torch.float64) * 0.05 + 0.01
    return ConceptBatch(emb, cu, torch.full((2 * s,), 3, dtype=torch.long),
                        torch.arange(0, 2 * s + 1, 2, dtype=torch.int32), max(lengths), 2).validate()


def _denoiser_f64(model, x_t, t, ctx, cross_allowed):
    """float64 denoiser of one document with an explicit cross-attention mask [L, L+1] over [0 ; ctx]."""
    den, d, H = model.denoiser, model.cfg.model_dim, model.cfg.num_heads
    dh = d // H

    def lin(m, x):
        return x @ m.weight.T + m.bias

    def rms(m, x):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + m.eps) * m.weight

    def mha(attn, q_in, kv_in, allowed):
        q = lin(attn.q_proj, q_in).view(-1, H, dh).transpose(0, 1)
        k = lin(attn.k_proj, kv_in).view(-1, H, dh).transpose(0, 1)
        v = lin(attn.v_proj, kv_in).view(-1, H, dh).transpose(0, 1)
        sc = (q @ k.transpose(1, 2) / math.sqrt(dh)).masked_fill(~allowed, float("-inf"))
        return lin(attn.output_proj, (sc.softmax(-1) @ v).transpose(0, 1).reshape(-1, d))

    L = x_t.shape[0]
    half = den.embed_time.freq_dim // 2
    args = t.double()[:, None] * torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
    temb = lin(den.embed_time.fc2, F.silu(lin(den.embed_time.fc1, torch.cat([args.cos(), args.sin()], -1))))
    h = lin(den.initial_proj.fc, x_t)
    keys = torch.cat([torch.zeros(1, d, dtype=torch.float64), ctx])
    for layer in den.layers:
        s1, c1, g1, s2, c2, g2, s3, c3, g3 = lin(layer.modulator.fc, F.silu(temb)).chunk(9, -1)
        a = rms(layer.self_attn_layer_norm, h) * (1 + c1) + s1
        h = h + g1 * mha(layer.self_attn, a, a, torch.eye(L, dtype=torch.bool))
        a = rms(layer.cross_attention_layer_norm, h) * (1 + c2) + s2
        h = h + g2 * mha(layer.cross_attention, a, keys, cross_allowed)
        a = rms(layer.ffn_layer_norm, h) * (1 + c3) + s3
        f = layer.ffn
        h = h + g3 * lin(f.output_proj, F.silu(lin(f.gate_proj, a)) * lin(f.inner_proj, a))
    return lin(den.final_proj.fc, rms(den.layer_norm, h))


def _abar_closed_form(T: int, max_beta: float = 0.999) -> torch.Tensor:
    """alpha_bar of diffusers' DDIMScheduler(beta_schedule="squaredcos_cap_v2", rescale_betas_zero_snr=True),
    written out: Nichol & Dhariwal's cosine betas capped at max_beta, then Lin et al. (2023) Alg. 1."""
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    betas = torch.tensor([min(1 - f((i + 1) / T) / f(i / T), max_beta) for i in range(T)], dtype=torch.float64)
    sqrt_ab = torch.cumprod(1 - betas, 0).sqrt()
    s0, s_last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - s_last) * s0 / (s0 - s_last)  # shift to 0 at the last step, keep the first
    return sqrt_ab ** 2


def _context_f64(model, x0, cu):
    """float64 contextualizer (the LCM block: pre-norm, biases, RMSNorm, interleaved RoPE pairs (2i, 2i+1) with
    theta rope_theta, causal attention per document, SwiGLU, final RMSNorm) over each document of x0 [S, E]."""
    enc, cfg = model.context_encoder, model.cfg
    H = cfg.num_heads
    Hkv = cfg.num_kv_heads or H
    dh = cfg.model_dim // H

    def lin(m, x):
        return x @ m.weight.double().T + (m.bias.double() if m.bias is not None else 0.0)

    def rms(m, x):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + m.eps) * m.weight.double()

    def rope(x, n):  # x [n, heads, dh]
        inv = cfg.rope_theta ** (-torch.arange(0, dh, 2, dtype=torch.float64) / dh)
        ang = torch.arange(n, dtype=torch.float64)[:, None] * inv[None]  # [n, dh/2]
        c, s_ = ang.cos()[:, None], ang.sin()[:, None]
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack([a * c - b * s_, a * s_ + b * c], -1).flatten(-2)

    out = []
    for lo, hi in zip(cu[:-1].tolist(), cu[1:].tolist()):
        n = hi - lo
        h = lin(model.encoder_frontend.pre_linear, x0[lo:hi].double())
        for layer in enc.layers:
            a = rms(layer.self_attn_layer_norm, h)
            at = layer.self_attn
            q = rope(lin(at.q_proj, a).view(n, H, dh), n).transpose(0, 1)
            k = rope(lin(at.k_proj, a).view(n, Hkv, dh), n).transpose(0, 1).repeat_interleave(H // Hkv, 0)
            v = lin(at.v_proj, a).view(n, Hkv, dh).transpose(0, 1).repeat_interleave(H // Hkv, 0)
            sc = (q @ k.transpose(1, 2) / math.sqrt(dh)).masked_fill(
                ~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
            h = h + lin(at.output_proj, (sc.softmax(-1) @ v).transpose(0, 1).reshape(n, -1))
            a = rms(layer.ffn_layer_norm, h)
            f = layer.ffn
            h = h + lin(f.output_proj, F.silu(lin(f.gate_proj, a)) * lin(f.inner_proj, a))
        out.append(rms(enc.layer_norm, h))
    return torch.cat(out)


def test_validation_loss_drops_metas_rows_against_hand_built_mask():
    from sonar_llm.models.two_tower import TwoTowerLCM, two_tower_tiny

    torch.manual_seed(0)
    model = TwoTowerLCM(two_tower_tiny(cfg_dropout_prob=0.3)).double().eval()  # defaults otherwise: Meta's
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
        model.sonar_normalizer.center.copy_(torch.randn(16, generator=g, dtype=torch.float64) * 0.01)
        model.sonar_normalizer.scale.copy_(torch.rand(16, generator=g, dtype=torch.float64) * 0.05 + 0.02)
    lengths = [5, 9, 3]
    batch = _batch(lengths, 16, g)
    with torch.no_grad():
        loss, metrics = model.loss(batch, generator=torch.Generator().manual_seed(7))
    # the draws in Meta's order: timesteps, noise, then the mask's randperm over the padded length
    g2 = torch.Generator().manual_seed(7)
    S, L, T = sum(lengths), max(lengths), model.cfg.num_train_steps
    t = torch.randint(0, T, (S,), generator=g2)
    noise = torch.randn(S, 16, generator=g2).double()  # drawn in fp32, as the loss normalises in fp32
    n_drop = math.floor((L - 1) * 0.3)  # _get_shifted_causal_mask: floor((seq_len - 1) * cf_guidance_prob)
    rows = (1 + torch.randperm(L - 1, generator=g2)[:n_drop]).tolist()
    padded = torch.ones(L, L + 1).tril_(0)  # [seq_len, key_len]: query i sees key 0 and context < i
    padded[rows, 1:] = 0  # zero_vector=True: a dropped row keeps key 0 only, the same rows for every document
    # written out, not the model's normalize / add_noise / encode_context: x0 = (x - center) / scale (in fp32,
    # as the loss), x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, and a float64 contextualizer
    center, scale = model.sonar_normalizer.center.float(), model.sonar_normalizer.scale.float()
    x0 = ((batch.embeddings.float() - center) / scale).double()
    assert (model.cfg.beta_schedule, model.cfg.rescale_betas_zero_snr) == ("squaredcos_cap_v2", True)
    abar = _abar_closed_form(T)[t][:, None]
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    with torch.no_grad():
        ctx = _context_f64(model, x0, batch.doc_cu_seqlens)
        # the loss is not very sensitive to the context: the contextualizer is checked on its own too
        torch.testing.assert_close(model.encode_context(x0, batch.doc_cu_seqlens, L), ctx, rtol=1e-10, atol=1e-12)
        want = 0.0
        for d, (a, b) in enumerate(zip(batch.doc_cu_seqlens[:-1].tolist(), batch.doc_cu_seqlens[1:].tolist())):
            n = b - a
            pred = _denoiser_f64(model, x_t[a:b], t[a:b], ctx[a:b], padded[:n, :n + 1].bool())
            want += float(((pred - x0[a:b]) ** 2).sum())  # reduction: sum over positions
    assert metrics["loss_sum_targets"] == S
    assert int(metrics["cfg_dropped"]) == sum(sum(1 for r in rows if r < n) for n in lengths)
    assert abs(loss.item() - want) < 1e-5 * abs(want)  # the loss is accumulated in fp32
    # the option: no dropout outside training gives a different (mask-free) loss
    model.cfg.cfg_dropout_in_eval = False
    with torch.no_grad():
        plain, m2 = model.loss(batch, generator=torch.Generator().manual_seed(7))
    assert "cfg_dropped" not in m2 and abs(plain.item() - want) > 1e-6


def test_cfg_rows_per_batch_and_per_document():
    from sonar_llm.models.two_tower import DocLayout, cfg_dropout_rows

    lengths = [3, 12, 7, 12]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    lay = DocLayout(cu, sum(lengths), max(lengths))
    for seed in range(20):
        got = cfg_dropout_rows(lay, 0.25, torch.Generator().manual_seed(seed), per="batch")
        perm = torch.randperm(11, generator=torch.Generator().manual_seed(seed))
        rows = set((1 + perm[:math.floor(11 * 0.25)]).tolist())
        for d, n in enumerate(lengths):
            assert set(torch.nonzero(got[cu[d]:cu[d + 1]]).flatten().tolist()) == {r for r in rows if r < n}
        per_doc = cfg_dropout_rows(lay, 0.25, torch.Generator().manual_seed(seed), per="document")
        assert [int(per_doc[cu[d]:cu[d + 1]].sum()) for d in range(4)] == [math.floor((n - 1) * 0.25) for n in lengths]


def test_sum_reductions_are_the_defaults():
    from sonar_llm.models.backbone import BackboneConfig
    from sonar_llm.models.base_lcm import BaseLCM, BaseLCMConfig

    g = torch.Generator().manual_seed(4)
    torch.manual_seed(4)
    cfg = BaseLCMConfig(BackboneConfig(model_dim=16, num_layers=1, num_heads=2, ffn_dim=32), sonar_dim=16)
    assert cfg.reduction == "sum"
    model = BaseLCM(cfg).double().eval()
    batch = _batch([4, 6], 16, g)
    loss, metrics = model.loss(batch)
    with torch.no_grad():
        pred = model(batch.embeddings, batch.doc_cu_seqlens, batch.max_doc_len)
    tgt = model.normalizer.normalize(batch.embeddings)
    want = float(((pred[0:3] - tgt[1:4]) ** 2).sum() + ((pred[4:9] - tgt[5:10]) ** 2).sum())
    assert abs(loss.item() - want) < 1e-9 * want and metrics["loss_sum_targets"] == 8
    mean_model = BaseLCM(BaseLCMConfig(cfg.backbone, sonar_dim=16, reduction="mean")).double()
    mean_model.load_state_dict(model.state_dict())
    mean_loss, m = mean_model.loss(batch)
    assert abs(mean_loss.item() - want / 8) < 1e-9 * want and "loss_sum_targets" not in m


# ------------------------------------------------------------------------------------------ the trainer
class _Loader:
    """Micro-batch g is a fixed ConceptBatch; documents of different lengths so micro-batches differ in targets."""

    def __init__(self, batches):
        self.batches, self.k = batches, 0

    def __iter__(self):
        while True:
            b = self.batches[self.k % len(self.batches)]
            self.k += 1
            yield b

    def state_dict(self):
        return {"k": self.k}

    def load_state_dict(self, state):
        self.k = int(state["k"])


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_sum_reduction_accumulation_equals_one_big_batch(tmp_path, reduction):
    from sonar_llm.models.backbone import BackboneConfig
    from sonar_llm.models.base_lcm import BaseLCM, BaseLCMConfig
    from sonar_train.config import RunConfig
    from sonar_train.loop import run_training

    g = torch.Generator().manual_seed(5)
    small = [[2, 3], [7, 6, 9]]  # 3 and 19 targets
    batches = [_batch(lens, 16, g) for lens in small]
    batches = [ConceptBatch(b.embeddings.float(), b.doc_cu_seqlens, b.tokens, b.tok_cu_seqlens, b.max_doc_len,
                            b.max_sent_len) for b in batches]
    bb = BackboneConfig(model_dim=16, num_layers=1, num_heads=2, ffn_dim=32, dropout_p=0.0)

    def factory(cfg):
        return BaseLCM(BaseLCMConfig(bb, sonar_dim=16, reduction=reduction))

    cfg = RunConfig()
    cfg.model.family = "base_lcm"
    cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.weight_decay, cfg.optim.grad_clip = 1e-3, 0, 0.0, 0.0
    cfg.train.steps, cfg.train.grad_accum, cfg.train.precision = 1, 2, "fp32"
    cfg.train.log_every, cfg.train.out_dir, cfg.train.peak_flops = 1, str(tmp_path / "run"), 1e9
    torch.manual_seed(cfg.train.seed)
    ref = factory(cfg).double()  # the weights the run starts from (same seed before the factory)
    run_training(cfg, model_factory=factory, data_factory=lambda c, split, info: _Loader(batches))
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        rec = [r for r in map(json.loads, f) if r["kind"] == "train"][0]
    # one big batch holding both micro-batches' documents; Meta: sum over its targets / number of targets
    lens = small[0] + small[1]
    big = ConceptBatch(torch.cat([b.embeddings for b in batches]).double(),
                       torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32),
                       torch.cat([b.tokens for b in batches]), torch.arange(0, 2 * sum(lens) + 1, 2, dtype=torch.int32),
                       max(lens), 2)
    ref.cfg.reduction = "sum"
    total, m = ref.loss(big)
    (total / m["loss_sum_targets"]).backward()
    norm = torch.sqrt(sum((p.grad ** 2).sum() for p in ref.parameters() if p.grad is not None)).item()
    if reduction == "sum":
        assert abs(rec["grad_norm"] - norm) < 1e-5 * norm
        assert abs(rec["loss"] - total.item() / 22) < 1e-5 * rec["loss"]  # the per-target mean, as Meta logs it
    else:  # the option: the mean of the two micro-batch means weighs the 3-target batch like the 19-target one
        assert abs(rec["grad_norm"] - norm) > 1e-3 * norm
