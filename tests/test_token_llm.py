"""Tests for sonar_llm.models.token_llm: document token streams against a Python-list reference, and
the fused-LCE loss (values and gradients) against F.cross_entropy on explicit logits per document."""
import pytest
import torch
import torch.nn.functional as F

from sonar_llm.data.batch import ConceptBatch
from sonar_llm.models.backbone import BackboneConfig
from sonar_llm.models.family import build_family
from sonar_llm.models.token_llm import TokenLLM, TokenLLMConfig, document_token_streams

V = 50


def make_batch(doc_lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    sents, cu = [], [0]
    for _ in range(sum(doc_lens)):
        n = int(torch.randint(1, 5, (1,), generator=g))
        s = [3, 45] + torch.randint(4, 40, (n,), generator=g).tolist() + [3]
        sents.append(s)
        cu.append(cu[-1] + len(s))
    dcu = [0]
    for n in doc_lens:
        dcu.append(dcu[-1] + n)
    batch = ConceptBatch(torch.randn(sum(doc_lens), 8), torch.tensor(dcu, dtype=torch.int32),
                         torch.tensor(sum(sents, []), dtype=torch.int64), torch.tensor(cu, dtype=torch.int32),
                         max(doc_lens), max(len(s) for s in sents)).validate()
    return batch, sents, dcu


def reference_streams(sents, dcu, bos):
    streams = []
    for d in range(len(dcu) - 1):
        s = [bos] if bos is not None else []
        for k in range(dcu[d], dcu[d + 1]):
            s += sents[k][2:]
        streams.append(s)
    return streams


@pytest.mark.parametrize("bos", [2, None])
def test_document_streams_match_reference(bos):
    batch, sents, dcu = make_batch([2, 1, 3])
    stream, cu, max_len = document_token_streams(batch.tokens, batch.tok_cu_seqlens, batch.doc_cu_seqlens,
                                                 prefix_len=2, bos_id=bos)
    want = reference_streams(sents, dcu, bos)
    assert stream.tolist() == sum(want, [])
    assert cu.tolist() == [0] + torch.tensor([len(s) for s in want]).cumsum(0).tolist()
    assert max_len == max(len(s) for s in want) and cu.dtype == torch.int32


@pytest.mark.parametrize("tie", [True, False])
def test_loss_matches_cross_entropy_on_explicit_logits(tie):
    batch, sents, dcu = make_batch([2, 3, 1], seed=1)
    torch.manual_seed(2)
    cfg = TokenLLMConfig(BackboneConfig(model_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=48),
                         tie_embeddings=tie, lce_impl="torch")
    model = TokenLLM(cfg, vocab_size=V).double()
    loss, metrics = model.loss(batch)
    logits_all, labels_all = [], []
    for s in reference_streams(sents, dcu, 2):
        ids = torch.tensor(s)
        h = model.backbone.forward_padded(model.embed(ids)[None])[0]
        w = model.embed.weight if tie else model.output_proj.weight
        logits_all.append((h @ w.T)[:-1])
        labels_all.append(ids[1:])
    want = F.cross_entropy(torch.cat(logits_all), torch.cat(labels_all))
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-10)
    assert metrics["target_tokens"] == sum(len(lab) for lab in labels_all)
    params = list(model.parameters())
    for a, b in zip(torch.autograd.grad(loss, params), torch.autograd.grad(want, params)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)
    keys = set(model.state_dict())
    assert ("output_proj.weight" in keys) == (not tie) and "embed.weight" in keys


def test_flops_and_registry():
    batch, _, _ = make_batch([2, 2])
    cfg = BackboneConfig(model_dim=32, num_layers=1, num_heads=4, ffn_dim=32)
    model = build_family("token_llm", cfg, vocab_size=V)
    assert isinstance(model, TokenLLM)
    stream, cu, _ = model.streams(batch)
    params = sum(p.numel() for p in model.backbone.parameters()) + V * 32
    lens = (cu[1:] - cu[:-1]).double()
    attn = 4 * 1 * 4 * 8 * float((lens * (lens + 1) / 2).sum())
    assert model.flops_per_batch(batch) == pytest.approx(6 * params * stream.numel() + 3 * attn, rel=1e-12)
    with pytest.raises(ValueError, match="vocab_size"):
        TokenLLM(cfg, vocab_size=0)
    with pytest.raises(ValueError, match="prefix_len"):
        document_token_streams(batch.tokens, batch.tok_cu_seqlens, batch.doc_cu_seqlens, prefix_len=10)
