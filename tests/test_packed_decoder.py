"""Tests of PackedSonarDecoder (packed, folded, fused SONAR decoder loss) against the padded reference.

The reference is `reference_loss` (full SonarTextDecoder.forward with real cross-attention, padded batch,
full logits, F.cross_entropy ignoring pad) and, independently, per-sentence decoder runs in float64.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sonar_kernels.backend import interpret_mode, triton_available

from _devices import triton_device
from sonar_llm.sonar.config import decoder_preset
from sonar_llm.sonar.decoder import SonarTextDecoder
from sonar_llm.sonar.packed_decoder import PackedSonarDecoder, PreparedTargets, gather_sentences, pack_targets


def _decoder(dtype=torch.float64, seed=0, **overrides) -> SonarTextDecoder:
    torch.manual_seed(seed)
    cfg = decoder_preset("toy", **{"num_layers": 3, "dropout_p": 0.1, **overrides})
    dec = SonarTextDecoder(cfg).to(dtype)
    with torch.no_grad():
        for name, p in dec.named_parameters():
            if "layer_norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
    return dec


def _batch(lengths, vocab, seed, lang=80):
    """Target-mode sentences [3, lang, w.., 3] of the given lengths (>= 2: length 2 is [3, lang])."""
    g = torch.Generator().manual_seed(seed)
    parts = []
    for n in lengths:
        words = torch.randint(4, lang, (max(n - 3, 0),), generator=g)
        sent = torch.cat([torch.tensor([3, lang]), words, torch.tensor([3])])[:n]
        parts.append(sent)
    tokens = torch.cat(parts)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    return tokens, cu


LENGTHS = [2, 6, 3, 11, 5, 4]


def _loss_and_grad(fn, emb):
    e = emb.clone().requires_grad_()
    loss = fn(e)
    (grad,) = torch.autograd.grad(loss, e)
    return loss.detach(), grad


def test_pack_targets_matches_python_loop():
    tokens, cu = _batch(LENGTHS, 96, seed=1)
    inputs, labels, positions, sids, in_cu, max_len = pack_targets(tokens, cu)
    exp_in, exp_lab, exp_pos, exp_sid = [], [], [], []
    for s, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        sent = tokens[a:b].tolist()
        exp_in += sent[:-1]
        exp_lab += sent[1:]
        exp_pos += list(range(len(sent) - 1))
        exp_sid += [s] * (len(sent) - 1)
    assert inputs.tolist() == exp_in and labels.tolist() == exp_lab
    assert positions.tolist() == exp_pos and sids.tolist() == exp_sid
    assert in_cu.dtype == torch.int32
    assert in_cu.tolist() == [0] + torch.tensor([n - 1 for n in LENGTHS]).cumsum(0).tolist()
    assert max_len == max(LENGTHS) - 1


def test_pack_targets_errors():
    tokens, cu = _batch([3, 4], 96, seed=2)
    with pytest.raises(ValueError, match="sentence 1 has 1"):
        pack_targets(tokens[:4], torch.tensor([0, 3, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match="end at len"):
        pack_targets(tokens, torch.tensor([0, 3, 6], dtype=torch.int32))
    with pytest.raises(TypeError, match="tokens must be int64"):
        pack_targets(tokens.float(), cu)
    with pytest.raises(ValueError, match="1-D"):
        pack_targets(tokens[None], cu)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 2e-5)])
def test_loss_and_grad_match_reference(dtype, tol):
    """Packed loss (and d loss / d pred_emb) == padded full-logits reference with real cross-attention.
    float64 decoder: the fused cross-entropy keeps its log-sum-exp in fp32, hence 1e-6, not 1e-12."""
    dec = _decoder(dtype, seed=3)
    packed = PackedSonarDecoder(dec, impl="torch")
    tokens, cu = _batch(LENGTHS, dec.cfg.vocab_size, seed=4)
    emb = torch.randn(len(LENGTHS), dec.cfg.encoder_dim, dtype=dtype, generator=torch.Generator().manual_seed(5))
    prepared = packed.prepare(tokens, cu)
    loss, grad = _loss_and_grad(lambda e: packed.loss(e, prepared), emb)
    ref, ref_grad = _loss_and_grad(lambda e: packed.reference_loss(e, tokens, cu), emb)
    assert loss.shape == () and torch.isfinite(loss)
    torch.testing.assert_close(loss.double(), ref.double(), atol=tol, rtol=tol)
    torch.testing.assert_close(grad.double(), ref_grad.double(), atol=tol * grad.abs().max().item(), rtol=10 * tol)
    assert grad.abs().max() > 0


def test_reference_loss_matches_per_sentence_float64():
    """Independent check of the baseline itself: one unpadded decoder call per sentence, float64."""
    dec = _decoder(torch.float64, seed=6)
    packed = PackedSonarDecoder(dec, impl="torch")
    tokens, cu = _batch(LENGTHS, dec.cfg.vocab_size, seed=7)
    emb = torch.randn(len(LENGTHS), dec.cfg.encoder_dim, dtype=torch.float64)
    total, count = 0.0, 0
    for s, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        logits = dec(tokens[a:b - 1][None], emb[s:s + 1])[0]
        total = total + F.cross_entropy(logits, tokens[a + 1:b], reduction="sum")
        count += b - a - 1
    torch.testing.assert_close(packed.reference_loss(emb, tokens, cu), total / count, atol=1e-12, rtol=1e-12)


def test_hidden_states_and_first_block_match_decoder():
    dec = _decoder(torch.float64, seed=8)
    packed = PackedSonarDecoder(dec, impl="torch")
    tokens, cu = _batch(LENGTHS, dec.cfg.vocab_size, seed=9)
    emb = torch.randn(len(LENGTHS), dec.cfg.encoder_dim, dtype=torch.float64)
    prepared = packed.prepare(tokens, cu)
    assert isinstance(prepared, PreparedTargets)
    assert prepared.num_sentences == len(LENGTHS) and prepared.num_tokens == sum(LENGTHS) - len(LENGTHS)
    assert not prepared.first_block.requires_grad
    hidden = packed.hidden_states(emb, prepared)
    layer0 = dec.decoder.layers[0]
    for s, (a, b) in enumerate(zip(prepared.cu_seqlens[:-1].tolist(), prepared.cu_seqlens[1:].tolist())):
        inp = prepared.inputs[a:b][None]
        x0 = dec.embed_tokens(inp)
        torch.testing.assert_close(prepared.embeddings[a:b], x0[0], atol=1e-12, rtol=1e-12)
        x1 = x0 + layer0.self_attn(layer0.self_attn_layer_norm(x0), causal=True)
        torch.testing.assert_close(prepared.first_block[a:b], x1[0], atol=1e-10, rtol=1e-10)
        ref = dec.hidden_states(inp, emb[s:s + 1])[0]
        torch.testing.assert_close(hidden[a:b], ref, atol=1e-9, rtol=1e-9)


def test_reductions_and_lse():
    dec = _decoder(torch.float64, seed=10)
    packed = PackedSonarDecoder(dec, impl="torch")
    tokens, cu = _batch(LENGTHS, dec.cfg.vocab_size, seed=11)
    emb = torch.randn(len(LENGTHS), dec.cfg.encoder_dim, dtype=torch.float64)
    prepared = packed.prepare(tokens, cu)
    per_tok, lse = packed.loss(emb, prepared, reduction="none", return_lse=True)
    n = prepared.num_tokens
    assert per_tok.shape == (n,) and lse.shape == (n,)
    logits = packed.hidden_states(emb, prepared) @ dec.decoder_frontend.embed.weight.T
    torch.testing.assert_close(lse.double(), torch.logsumexp(logits, -1), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(per_tok.double(), F.cross_entropy(logits, prepared.labels, reduction="none"),
                               atol=1e-5, rtol=1e-6)
    total = packed.loss(emb, prepared, reduction="sum")
    torch.testing.assert_close(total.double(), per_tok.double().sum(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(packed.loss(emb, prepared).double(), total.double() / n, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(total, packed.reference_loss(emb, tokens, cu, reduction="sum"), atol=1e-5, rtol=1e-6)


def test_frozen_no_trainable_parameters_and_eval_mode():
    dec = _decoder(torch.float32, seed=12)
    dec.train()
    packed = PackedSonarDecoder(dec)
    assert [n for n, p in packed.named_parameters() if p.requires_grad] == []
    assert not dec.training
    packed.train()
    assert packed.training and not dec.training
    assert not any("cross_weight" in k or "qkv" in k for k in packed.state_dict())
    # dropout is configured (p=0.1) but never applied: two calls agree exactly
    tokens, cu = _batch(LENGTHS, dec.cfg.vocab_size, seed=13)
    emb = torch.randn(len(LENGTHS), dec.cfg.encoder_dim, requires_grad=True)
    prepared = packed.prepare(tokens, cu)
    a, b = packed.loss(emb, prepared), packed.loss(emb, prepared)
    assert torch.equal(a, b)
    a.backward()
    assert emb.grad is not None and all(p.grad is None for p in dec.parameters())


def test_refresh_after_weight_change():
    dec = _decoder(torch.float64, seed=14)
    packed = PackedSonarDecoder(dec, impl="torch", fuse_qkv=True)
    tokens, cu = _batch([4, 7], dec.cfg.vocab_size, seed=15)
    emb = torch.randn(2, dec.cfg.encoder_dim, dtype=torch.float64)
    with torch.no_grad():
        for p in dec.parameters():
            p.mul_(1.1)
    packed.refresh()
    loss = packed.loss(emb, packed.prepare(tokens, cu))
    torch.testing.assert_close(loss, packed.reference_loss(emb, tokens, cu), atol=1e-6, rtol=1e-6)


def test_unfused_qkv_matches():
    dec = _decoder(torch.float64, seed=16)
    tokens, cu = _batch(LENGTHS, dec.cfg.vocab_size, seed=17)
    emb = torch.randn(len(LENGTHS), dec.cfg.encoder_dim, dtype=torch.float64)
    a = PackedSonarDecoder(dec, impl="torch", fuse_qkv=True)
    b = PackedSonarDecoder(dec, impl="torch", fuse_qkv=False)
    torch.testing.assert_close(a.loss(emb, a.prepare(tokens, cu)), b.loss(emb, b.prepare(tokens, cu)),
                               atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_loss_and_grad_match_float64(dtype):
    """A half-precision decoder (and embedding): loss and d loss / d pred_emb against the float64 padded
    reference on the same rounded weights and embedding. Tolerance from the dtype and the depth: every stage
    (embedding, each of the L layers, output) rounds its activations to the dtype once, relative error
    <= (L + 2) * eps in norm (measured on this case: fp16 1.0 eps, bf16 2.3 eps, gradient). A gradient that
    misses a layer's cross-attention path is off by far more; shape and finiteness alone would not see it."""
    import copy

    dec = _decoder(torch.float64, seed=3).to(dtype)
    packed = PackedSonarDecoder(dec, impl="torch")
    reference = PackedSonarDecoder(copy.deepcopy(dec).double(), impl="torch")
    tokens, cu = _batch(LENGTHS, dec.cfg.vocab_size, seed=4)
    emb = torch.randn(len(LENGTHS), dec.cfg.encoder_dim, generator=torch.Generator().manual_seed(5)).to(dtype)
    loss, grad = _loss_and_grad(lambda e: packed.loss(e, packed.prepare(tokens, cu)), emb)
    ref, ref_grad = _loss_and_grad(lambda e: reference.reference_loss(e, tokens, cu), emb.double())
    assert grad.dtype == dtype and grad.shape == emb.shape
    tol = (dec.cfg.num_layers + 2) * torch.finfo(dtype).eps
    assert abs(loss.double() - ref).item() <= tol * ref.abs().item(), (loss, ref)
    rel = ((grad.double() - ref_grad).norm() / ref_grad.norm()).item()
    assert rel <= tol, f"{dtype}: gradient relative error {rel:.2e} > {tol:.2e}"


def test_mixed_dtype_embedding_into_fp32_decoder_float64_emb():
    """A float64 pred_emb into a float32 decoder: cast inside, gradient returned in float64."""
    dec = _decoder(torch.float32, seed=18)
    packed = PackedSonarDecoder(dec, impl="torch")
    tokens, cu = _batch([5, 3], dec.cfg.vocab_size, seed=19)
    emb = torch.randn(2, dec.cfg.encoder_dim, dtype=torch.float64, requires_grad=True)
    packed.loss(emb, packed.prepare(tokens, cu)).backward()
    assert emb.grad.dtype == torch.float64 and torch.isfinite(emb.grad).all()
    # and its value: the float64 reference on the same fp32 weights (fp32 arithmetic inside: 1e-4 relative)
    ref_grad = _loss_and_grad(lambda e: PackedSonarDecoder(dec.double(), impl="torch").reference_loss(e, tokens, cu),
                              emb.detach())[1]
    rel = ((emb.grad - ref_grad).norm() / ref_grad.norm()).item()
    assert rel <= 1e-4, rel


def test_errors():
    dec = _decoder(torch.float32, seed=20)
    packed = PackedSonarDecoder(dec)
    tokens, cu = _batch([4, 5], dec.cfg.vocab_size, seed=21)
    prepared = packed.prepare(tokens, cu)
    with pytest.raises(ValueError, match="pred_emb must be"):
        packed.loss(torch.randn(3, dec.cfg.encoder_dim), prepared)
    with pytest.raises(TypeError, match="PreparedTargets"):
        packed.loss(torch.randn(2, dec.cfg.encoder_dim), (tokens, cu))
    with pytest.raises(ValueError, match="token ids"):
        packed.prepare(tokens + 1000, cu)
    with pytest.raises(TypeError, match="SonarTextDecoder"):
        PackedSonarDecoder(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="impl"):
        PackedSonarDecoder(dec, impl="cuda")


@pytest.mark.skipif(not (triton_available() and (torch.cuda.is_available() or interpret_mode())),
                    reason="Triton needs a GPU or TRITON_INTERPRET=1")
def test_triton_impl_matches_reference():
    dev = triton_device()  # the GPU when Triton runs natively there, else the interpreter on the CPU
    dec = _decoder(torch.float32, seed=22, num_layers=2).to(dev)
    packed = PackedSonarDecoder(dec, impl="triton")
    tokens, cu = (t.to(dev) for t in _batch([5, 2, 7], dec.cfg.vocab_size, seed=23))
    emb = torch.randn(3, dec.cfg.encoder_dim).to(dev)
    loss, grad = _loss_and_grad(lambda e: packed.loss(e, packed.prepare(tokens, cu)), emb)
    ref, ref_grad = _loss_and_grad(lambda e: packed.reference_loss(e, tokens, cu), emb)
    torch.testing.assert_close(loss, ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(grad, ref_grad, atol=2e-5 * ref_grad.abs().max().item(), rtol=2e-4)


def test_checkpoint_matches_plain():
    dec = _decoder(torch.float64, seed=24)
    tokens, cu = _batch(LENGTHS, dec.cfg.vocab_size, seed=25)
    emb = torch.randn(len(LENGTHS), dec.cfg.encoder_dim, dtype=torch.float64)
    plain = PackedSonarDecoder(dec, impl="torch")
    ckpt = PackedSonarDecoder(dec, impl="torch", activation_checkpointing="full")
    a, ga = _loss_and_grad(lambda e: plain.loss(e, plain.prepare(tokens, cu)), emb)
    b, gb = _loss_and_grad(lambda e: ckpt.loss(e, ckpt.prepare(tokens, cu)), emb)
    torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(ga, gb, atol=1e-12, rtol=1e-12)


def test_gather_sentences():
    tokens, cu = _batch([3, 5, 2, 4], 96, seed=26)
    index = torch.tensor([2, 0, 3, 0])
    sel, sel_cu = gather_sentences(tokens, cu, index)
    pieces = [tokens[cu[i]:cu[i + 1]] for i in index.tolist()]
    assert torch.equal(sel, torch.cat(pieces))
    assert sel_cu.dtype == torch.int32 and sel_cu.tolist() == [0, 2, 5, 9, 12]
    empty, empty_cu = gather_sentences(tokens, cu, torch.zeros(0, dtype=torch.long))
    assert empty.numel() == 0 and empty_cu.tolist() == [0]
    with pytest.raises(ValueError, match="index"):
        gather_sentences(tokens, cu, torch.zeros(2, 2, dtype=torch.long))
