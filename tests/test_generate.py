"""Tests for sonar_llm.models.generate: stop rules (end-of-document cosine, sentence limit), KV-cached
batched loops == uncached references (SONAR-LLM, Base-LCM, token LLM), re-encoding, LCM noise flag.

The SONAR decoder/encoder are replaced by a codebook: decode = nearest codebook entry by cosine,
encode = that entry's vector; "END" is the end-of-document entry."""
import pytest
import torch
import torch.nn.functional as F

from sonar_llm.models.backbone import BackboneConfig
from sonar_llm.models.base_lcm import BaseLCM, BaseLCMConfig
from sonar_llm.models.generate import (
    generate_base_lcm,
    generate_sonar_llm,
    generate_sonar_llm_reference,
    generate_token_llm,
)
from sonar_llm.models.sonar_llm import SonarLLM, SonarLLMConfig
from sonar_llm.models.token_llm import TokenLLM

E = 16


def backbone_cfg(**kw):
    return BackboneConfig(model_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=48, **kw)


class Codebook:
    def __init__(self, size, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.names = [f"s{i}" for i in range(size)] + ["END"]
        self.vectors = F.normalize(torch.randn(size + 1, E, generator=g, dtype=torch.float64), dim=-1)
        self.calls = 0

    @property
    def eos(self):
        return self.vectors[-1]

    def decode(self, emb):
        self.calls += 1
        sims = F.normalize(emb.double(), dim=-1) @ self.vectors.T
        return [self.names[i] for i in sims.argmax(-1).tolist()]

    def encode(self, texts):
        return torch.stack([self.vectors[self.names.index(t)] for t in texts])


def sonar_model(seed=0):
    torch.manual_seed(seed)
    model = SonarLLM(SonarLLMConfig(backbone_cfg(), sonar_dim=E)).double()
    with torch.no_grad():
        model.output_proj.weight.mul_(30.0)  # make predictions depend strongly on the context
    return model


def prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, E, generator=g, dtype=torch.float64) for n in lengths]


def test_sonar_llm_cached_equals_reference_and_stops():
    book = Codebook(4, seed=2)
    model = sonar_model(seed=4)
    ps = prompts([1, 3, 2, 5, 4, 2], seed=7)
    kw = dict(max_sentences=8, eos_embedding=book.eos, eos_threshold=0.98)
    fast = generate_sonar_llm(model, ps, book.decode, book.encode, **kw)
    ref = generate_sonar_llm_reference(model, ps, book.decode, book.encode, **kw)
    for a, b, p in zip(fast, ref, ps):
        assert a.texts == b.texts and a.stopped_by_eos == b.stopped_by_eos
        torch.testing.assert_close(a.embeddings, b.embeddings)
        assert "END" not in a.texts
        # appended vectors are the re-encoded codebook entries of the texts
        if a.texts:
            torch.testing.assert_close(a.embeddings, book.encode(a.texts).float())
        if not a.stopped_by_eos:
            assert p.shape[0] + len(a.texts) == 9  # generated while the story had <= 8 sentences
    # The fixture exercises both rules, with stories stopping by EOS after generating something.
    assert any(not a.stopped_by_eos for a in fast)
    assert any(a.stopped_by_eos and len(a.texts) == 2 for a in fast)


def test_sonar_llm_stop_rule_is_a_cosine_on_unnormalised_embeddings():
    """The re-encoded sentences have norm 0.5 here (the codebook vectors are unit): the end-of-document rule
    must compare the cosine, not a dot product. The reference shares no helper with the cached loop."""
    book = Codebook(4, seed=2)

    def encode_half(texts):
        return 0.5 * book.encode(texts)

    model = sonar_model(seed=4)
    ps = prompts([1, 3, 2, 5, 4, 2], seed=7)
    kw = dict(max_sentences=8, eos_embedding=book.eos, eos_threshold=0.98)
    fast = generate_sonar_llm(model, ps, book.decode, encode_half, **kw)
    ref = generate_sonar_llm_reference(model, ps, book.decode, encode_half, **kw)
    for a, b in zip(fast, ref):
        assert a.texts == b.texts and a.stopped_by_eos == b.stopped_by_eos
        torch.testing.assert_close(a.embeddings, b.embeddings)
        if a.texts:
            torch.testing.assert_close(a.embeddings, 0.5 * book.encode(a.texts).float())
    assert any(a.stopped_by_eos for a in fast) and any(not a.stopped_by_eos for a in fast)


def test_sonar_llm_stop_rules():
    book = Codebook(4)
    model = sonar_model()
    ps = prompts([2, 6, 3])
    # Every decoded sentence is the end sentence: nothing is generated, all stopped by EOS.
    always_end = lambda emb: ["END"] * emb.shape[0]  # noqa: E731
    res = generate_sonar_llm(model, ps, always_end, book.encode, eos_embedding=book.eos)
    assert all(r.stopped_by_eos and r.texts == [] and r.embeddings.shape == (0, E) for r in res)
    # Never the end sentence: limit max_sentences; a prompt longer than the limit gets nothing.
    never_end = lambda emb: ["s0"] * emb.shape[0]  # noqa: E731
    res = generate_sonar_llm(model, ps, never_end, book.encode, max_sentences=4, eos_embedding=book.eos)
    assert [len(r.texts) for r in res] == [3, 0, 2]
    assert not any(r.stopped_by_eos for r in res)
    # reencode=False: the predicted vector itself is appended and checked.
    res = generate_sonar_llm(model, ps[:1], never_end, None, max_sentences=3, eos_embedding=book.eos,
                             eos_threshold=1.5, reencode=False)
    pred = model.output_proj(model.backbone.forward_padded(model.input_proj(ps[0])[None])[0, -1])
    torch.testing.assert_close(res[0].embeddings[0], pred.detach().float())
    res = generate_sonar_llm(model, ps[:1], never_end, None, eos_embedding=book.eos, eos_threshold=-1.0,
                             reencode=False)
    assert res[0].stopped_by_eos and res[0].texts == []
    with pytest.raises(ValueError, match="encode_fn"):
        generate_sonar_llm(model, ps, never_end, None, eos_embedding=book.eos)
    with pytest.raises(ValueError, match="prompt_embeddings\\[1\\]"):
        generate_sonar_llm(model, [ps[0], torch.zeros(0, E)], never_end, book.encode, eos_embedding=book.eos)


def lcm_model(seed=0):
    torch.manual_seed(seed)
    model = BaseLCM(BaseLCMConfig(backbone_cfg(), sonar_dim=E)).double()
    model.normalizer.fit(torch.randn(100, E, dtype=torch.float64) * 0.5 + 0.1)
    return model


def lcm_reference(model, prompt, max_sentences, eos, threshold):
    embs, out = prompt, []
    while embs.shape[0] <= max_sentences:
        h = model.lcm.forward_padded(model.embed_inputs(embs)[None])[0, -1]
        nxt = model.normalizer.denormalize(model.postnet.fc(h))
        if F.cosine_similarity(nxt.float(), eos.float(), dim=0) >= threshold:
            return out, True
        out.append(nxt)
        embs = torch.cat([embs, nxt[None]])
    return out, False


def test_base_lcm_cached_equals_reference():
    model = lcm_model()
    ps = prompts([1, 4, 2], seed=2)
    eos = torch.randn(E, dtype=torch.float64)
    with torch.no_grad():
        first = generate_base_lcm(model, ps, max_sentences=6, eos_embedding=eos, eos_threshold=2.0)
        for r, p in zip(first, ps):
            want, stopped = lcm_reference(model, p, 6, eos, 2.0)
            assert not stopped and not r.stopped_by_eos
            torch.testing.assert_close(r.embeddings, torch.stack(want).float())
        # Use story 0's third prediction as the end embedding: it stops exactly there.
        eos = first[0].embeddings[2].double()
        res = generate_base_lcm(model, ps[:1], max_sentences=6, eos_embedding=eos, eos_threshold=0.999)
        assert res[0].stopped_by_eos and res[0].embeddings.shape[0] == 2


def test_base_lcm_latent_noise_flag():
    model = lcm_model()
    ps = prompts([2])
    eos = torch.randn(E, dtype=torch.float64)
    kw = dict(max_sentences=4, eos_embedding=eos, eos_threshold=2.0)
    det = generate_base_lcm(model, ps, **kw)[0].embeddings
    noisy1 = generate_base_lcm(model, ps, sample_latent_variable=True,
                               generator=torch.Generator().manual_seed(0), **kw)[0].embeddings
    noisy2 = generate_base_lcm(model, ps, sample_latent_variable=True,
                               generator=torch.Generator().manual_seed(0), **kw)[0].embeddings
    assert torch.equal(noisy1, noisy2) and not torch.allclose(noisy1, det)
    zero_temp = generate_base_lcm(model, ps, sample_latent_variable=True, temperature=0.0, **kw)[0].embeddings
    torch.testing.assert_close(zero_temp, det)


def test_token_llm_cached_equals_uncached():
    torch.manual_seed(0)
    model = TokenLLM(backbone_cfg(), vocab_size=12).double()
    ps = [torch.tensor([2, 5, 7]), torch.tensor([2]), torch.tensor([2, 9, 4, 4, 1])]
    fast = generate_token_llm(model, ps, max_new_tokens=7, stop_ids=(3,))
    slow = generate_token_llm(model, ps, max_new_tokens=7, stop_ids=(3,), use_cache=False)
    assert fast == slow
    assert all(len(o) <= 7 and 3 not in o for o in fast)
    free = generate_token_llm(model, ps, max_new_tokens=5)
    assert all(len(o) == 5 for o in free)
    # stop at the very first greedy token of each row
    firsts = [o[0] for o in free]
    stopped = generate_token_llm(model, ps, max_new_tokens=5, stop_ids=firsts)
    assert stopped == [[] for _ in ps]


def test_sonar_llm_end_to_end_with_toy_sonar_models(tmp_path):
    from fixtures_sonar import toy_decoder, toy_encoder, toy_tokenizer

    from sonar_llm.models.generate import sonar_text_functions
    from sonar_llm.sonar import EmbeddingToText, TextToEmbedding

    tok = toy_tokenizer(tmp_path / "spm")
    enc = toy_encoder(seed=1, vocab_size=tok.vocab_size)
    dec = toy_decoder(seed=2, std=0.5, vocab_size=tok.vocab_size)
    decode_fn, encode_fn = sonar_text_functions(TextToEmbedding(enc, tok), EmbeddingToText(dec, tok),
                                                "eng_Latn", beam_size=2, max_gen_len=6)
    torch.manual_seed(0)
    model = SonarLLM(SonarLLMConfig(backbone_cfg(), sonar_dim=32))
    ps = [encode_fn(["The dog sleeps.", "A red bird sings."]), encode_fn(["Paul reads a letter."])]
    eos = encode_fn(["The end."])[0]
    kw = dict(max_sentences=4, eos_embedding=eos, eos_threshold=0.98)
    fast = generate_sonar_llm(model, ps, decode_fn, encode_fn, **kw)
    ref = generate_sonar_llm_reference(model, ps, decode_fn, encode_fn, **kw)
    assert [r.texts for r in fast] == [r.texts for r in ref]
    assert [len(r.texts) for r in fast] == [3, 4]  # nothing decodes to "The end." in a random model
    for r in fast:
        assert all(isinstance(t, str) for t in r.texts)
        torch.testing.assert_close(r.embeddings, encode_fn(r.texts), rtol=1e-5, atol=1e-5)
