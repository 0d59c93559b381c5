"""Tests for sonar_llm.models.sonar_llm.SonarLLM on a tiny random SONAR decoder ("toy" preset):
fast loss == reference loss == an independent per-document, per-sentence computation (values and
gradients, float64), the frozen decoder stays frozen and out of the parameters, the MSE ablation,
FLOPs accounting, and that a few optimizer steps lower the loss."""
import pytest
import torch
import torch.nn.functional as F

from sonar_llm.data.batch import ConceptBatch
from sonar_llm.models.backbone import BackboneConfig
from sonar_llm.models.family import build_family, next_sentence_pairs, select_segments
from sonar_llm.models.sonar_llm import SonarLLM, SonarLLMConfig
from sonar_llm.sonar.config import decoder_preset
from sonar_llm.sonar.decoder import SonarTextDecoder

E = 32  # the toy decoder's embedding width


def toy_decoder(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    dec = SonarTextDecoder(decoder_preset("toy")).to(dtype)
    with torch.no_grad():  # non-trivial LayerNorm parameters
        for name, p in dec.named_parameters():
            if "layer_norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return dec


def make_batch(doc_lens, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    num_sent = sum(doc_lens)
    toks, cu = [], [0]
    for _ in range(num_sent):
        n = int(torch.randint(1, 7, (1,), generator=g))
        sent = [3, 80] + torch.randint(4, 80, (n,), generator=g).tolist() + [3]
        toks += sent
        cu.append(cu[-1] + len(sent))
    doc_cu = [0]
    for n in doc_lens:
        doc_cu.append(doc_cu[-1] + n)
    return ConceptBatch(
        embeddings=torch.randn(num_sent, E, generator=g, dtype=dtype),
        doc_cu_seqlens=torch.tensor(doc_cu, dtype=torch.int32),
        tokens=torch.tensor(toks, dtype=torch.int64),
        tok_cu_seqlens=torch.tensor(cu, dtype=torch.int32),
        max_doc_len=max(doc_lens),
        max_sent_len=max(b - a for a, b in zip(cu, cu[1:])),
    ).validate()


def make_model(path="fast", mse_weight=0.0, seed=2, dtype=torch.float64, decoder=None):
    torch.manual_seed(seed)
    cfg = SonarLLMConfig(
        BackboneConfig(model_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=48),
        sonar_dim=E, path=path, mse_weight=mse_weight, decoder_impl="torch",
    )
    return SonarLLM(cfg, decoder if decoder is not None else toy_decoder(dtype=dtype)).to(dtype)


def independent_loss(model, batch):
    """Per document: padded backbone forward; per target sentence: the full decoder with real
    cross-attention on its own, summed token cross-entropy; divided by the number of target tokens."""
    dec = model.sonar_decoder
    total, count = 0.0, 0
    cu, tcu = batch.doc_cu_seqlens.tolist(), batch.tok_cu_seqlens.tolist()
    for d in range(len(cu) - 1):
        a, b = cu[d], cu[d + 1]
        hidden = model.backbone.forward_padded(model.input_proj(batch.embeddings[a:b])[None])[0]
        pred = model.output_proj(hidden)
        for k in range(a + 1, b):
            sent = batch.tokens[tcu[k] : tcu[k + 1]]
            logits = dec(sent[:-1][None], pred[k - 1 - a][None, None, :])[0]
            total = total + F.cross_entropy(logits, sent[1:], reduction="sum")
            count += sent.numel() - 1
    return total / count


def grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_next_sentence_pairs_and_select_segments():
    cu = torch.tensor([0, 3, 3, 4, 8], dtype=torch.int32)  # an empty and a one-sentence document
    pred, tgt = next_sentence_pairs(cu, 8)
    assert tgt.tolist() == [1, 2, 5, 6, 7] and pred.tolist() == [0, 1, 4, 5, 6]
    values = torch.arange(10)
    seg_cu = torch.tensor([0, 2, 5, 6, 10], dtype=torch.int32)
    out, out_cu = select_segments(values, seg_cu, torch.tensor([3, 1]))
    assert out.tolist() == [6, 7, 8, 9, 2, 3, 4] and out_cu.tolist() == [0, 4, 7]


def test_fast_reference_and_independent_losses_agree_with_grads():
    batch = make_batch([3, 1, 4, 2])
    model = make_model("fast")
    fast, metrics = model.loss(batch)
    g_fast = grads(model, fast)
    model.cfg.path = "reference"
    ref, _ = model.loss(batch)
    g_ref = grads(model, ref)
    indep = independent_loss(model, batch)
    g_ind = grads(model, indep)
    torch.testing.assert_close(fast, ref.to(fast.dtype), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fast, indep.to(fast.dtype), rtol=1e-10, atol=1e-10)
    for name in g_fast:
        torch.testing.assert_close(g_fast[name], g_ref[name], rtol=1e-8, atol=1e-10, msg=name)
        torch.testing.assert_close(g_fast[name], g_ind[name], rtol=1e-8, atol=1e-10, msg=name)
    assert metrics["target_sentences"] == 2 + 0 + 3 + 1
    assert metrics["target_tokens"] == sum(
        int(batch.tok_cu_seqlens[k + 1] - batch.tok_cu_seqlens[k]) - 1 for k in (1, 2, 5, 6, 7, 9)
    )


def test_decoder_frozen_and_outside_parameters():
    dec = toy_decoder()
    model = make_model(decoder=dec)
    dec_params = {id(p) for p in dec.parameters()}
    assert not dec_params & {id(p) for p in model.parameters()}
    assert all(not k.startswith(("decoder", "_packed", "sonar")) for k in model.state_dict())
    assert set(model.state_dict()) == {n for n, _ in model.named_parameters()}
    assert len(model.trainable_parameters()) == len(list(model.parameters()))
    loss, _ = model.loss(make_batch([4, 3]))
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in dec.parameters())
    assert all(p.grad is not None for p in model.parameters())
    assert model.transformer_blocks() == list(model.backbone.layers)


def test_mse_ablation_term():
    batch = make_batch([3, 3])
    model = make_model(mse_weight=0.5)
    loss, metrics = model.loss(batch)
    pred = model(batch.embeddings, batch.doc_cu_seqlens, batch.max_doc_len)
    rows = torch.tensor([0, 1, 3, 4])
    mse = ((pred[rows] - batch.embeddings[rows + 1]) ** 2).mean()
    torch.testing.assert_close(metrics["mse"], mse.detach())
    torch.testing.assert_close(loss, metrics["ce"] + 0.5 * mse, rtol=1e-12, atol=1e-12)


def test_single_sentence_documents_give_zero_loss():
    model = make_model()
    loss, metrics = model.loss(make_batch([1, 1]))
    assert loss.item() == 0.0 and metrics["target_tokens"] == 0
    loss.backward()
    assert all(float(p.grad.abs().max()) == 0.0 for p in model.parameters() if p.grad is not None)


def test_flops_per_batch_closed_form():
    batch = make_batch([3, 2])
    model = make_model()
    d, L, H, Dh, ffn = 32, 2, 4, 8, 48
    backbone = L * (2 * d + d * (H * Dh + 2 * 2 * Dh) + H * Dh * d + 3 * d * ffn) + d
    io = 2 * E * d
    flops = 6.0 * (backbone + io) * 5 + 3.0 * 4 * L * H * Dh * (6 + 3)  # docs of 3 and 2: 6 + 3 pairs
    dec = model.sonar_decoder.cfg
    tcu = batch.tok_cu_seqlens
    lens = [int(tcu[k + 1] - tcu[k]) - 1 for k in (1, 2, 4)]
    per_tok = 2 * (dec.num_layers * (4 * dec.model_dim**2 + 2 * dec.model_dim * dec.ffn_dim)
                   + dec.model_dim * dec.vocab_size)
    dec_fwd = per_tok * sum(lens) + 2 * dec.num_layers * dec.model_dim * E * 3
    attn = 4 * dec.num_layers * dec.model_dim * sum(n * (n + 1) / 2 for n in lens)
    dec_fwd += attn
    # backward: input gradients (= the forward's matmuls), attention twice its forward, nothing for layer 0's
    # self-attention (projections 4 x 2 x D^2 per token, attention backward 2 x its forward)
    layer0_self = 8 * dec.model_dim**2 * sum(lens) + 2 * attn / dec.num_layers
    assert model.flops_per_batch(batch) == pytest.approx(flops + 2 * dec_fwd + attn - layer0_self, rel=1e-12)


def test_loss_falls_with_training():
    torch.manual_seed(3)
    model = make_model(dtype=torch.float32, decoder=toy_decoder(dtype=torch.float32))
    batch = make_batch([4, 3], dtype=torch.float32)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    first = None
    for _ in range(25):
        loss, _ = model.loss(batch)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.8 * first


def test_errors_and_registry():
    cfg = BackboneConfig(model_dim=32, num_layers=1, num_heads=4, ffn_dim=32)
    model = SonarLLM(SonarLLMConfig(cfg, sonar_dim=E))
    with pytest.raises(ValueError, match="no SONAR decoder"):
        model.loss(make_batch([2]))
    with pytest.raises(ValueError, match="sonar_dim"):
        SonarLLM(SonarLLMConfig(cfg, sonar_dim=1024), toy_decoder())
    with pytest.raises(ValueError, match="path"):
        SonarLLMConfig(cfg, path="slow")
    built = build_family("sonar_llm", cfg, decoder=toy_decoder(dtype=torch.float32))
    assert isinstance(built, SonarLLM) and built.cfg.sonar_dim == E
    with pytest.raises(ValueError, match="unknown model family"):
        build_family("gpt", cfg)
