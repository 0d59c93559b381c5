"""Batched generation == one prompt at a time, for every family, with prompts of different lengths in one batch.

Each family's generation goes through the registry (`FamilySpec.generate`; the token LLM, which has none, through
`generate_token_llm`) on a tiny random model, first with all prompts in one batch (ragged prefill into the KV
caches), then once per prompt. Deterministic paths must give the same sentences/tokens and the same concepts
(float64 models: within 1e-10; the Two-Tower runs its latents in fp32: within 1e-5). The Two-Tower samples noise:
with one seeded generator per prompt, a prompt's draws do not depend on the batch, so the comparison is exact
in the draws (also with DDIM eta > 0, whose per-step noise comes from the same generators); with one shared
generator the batch does change the draws (checked, so the per-prompt test is not vacuous).

SONAR is replaced by a codebook (decode = the nearest entry by cosine, encode = the entry's vector; "END" is the
end-of-document entry), so texts are a discrete function of the predicted embeddings.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sonar_llm.models.family import get_family
from sonar_llm.models.generate import GenerationSettings, generate_token_llm
from sonar_llm.models.generate_two_tower import generate_two_tower

E = 16
LENGTHS = (3, 1, 5, 2)


class Book:
    def __init__(self, size: int = 12, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.names = [f"w{i}" for i in range(size)] + ["END"]
        self.vectors = F.normalize(torch.randn(size + 1, E, generator=g, dtype=torch.float64), dim=-1)

    def decode(self, emb):
        sims = F.normalize(emb.double(), dim=-1) @ self.vectors.T.to(emb.device)
        return [self.names[i] for i in sims.argmax(-1).tolist()]

    def encode(self, texts):
        return torch.stack([self.vectors[self.names.index(t)] for t in texts])


def _prompts(seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, E, generator=g, dtype=torch.float64).to(dtype) for n in LENGTHS]


def _model(family: str, dtype=torch.float64):
    from sonar_llm.models.backbone import BackboneConfig

    torch.manual_seed(0)
    bb = BackboneConfig(model_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=48)
    if family == "sonar_llm":
        from sonar_llm.models.sonar_llm import SonarLLM, SonarLLMConfig

        model = SonarLLM(SonarLLMConfig(bb, sonar_dim=E))
        with torch.no_grad():
            model.output_proj.weight.mul_(30.0)  # predictions depend strongly on the context
    elif family == "base_lcm":
        from sonar_llm.models.base_lcm import BaseLCM, BaseLCMConfig

        model = BaseLCM(BaseLCMConfig(bb, sonar_dim=E))
        with torch.no_grad():
            model.postnet.fc.weight.mul_(30.0)
    else:
        from sonar_llm.models.two_tower import TwoTowerLCM, two_tower_tiny

        model = TwoTowerLCM(two_tower_tiny())
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.to(dtype).eval()


def _settings(book, **kw):
    return GenerationSettings(eos_embedding=book.vectors[-1], max_sentences=7, eos_threshold=0.9,
                              decode_fn=book.decode, encode_fn=book.encode, num_inference_steps=6, **kw)


@pytest.mark.parametrize("family", ["sonar_llm", "base_lcm"])
def test_concept_families_batched_equal_one_at_a_time(family):
    book = Book()
    model = _model(family)
    gen = get_family(family).generate
    ps = _prompts()
    batched = gen(model, ps, _settings(book))
    single = [gen(model, [p], _settings(book))[0] for p in ps]
    assert len(batched) == len(ps)
    lengths = []
    for b, s in zip(batched, single):
        assert b.texts == s.texts and b.stopped_by_eos == s.stopped_by_eos
        assert b.embeddings.shape == s.embeddings.shape
        torch.testing.assert_close(b.embeddings, s.embeddings, rtol=0, atol=1e-10)
        lengths.append(b.embeddings.shape[0])
    assert max(lengths) > 0 and len(set(map(tuple, (b.texts for b in batched)))) > 1  # not all the same story


def _gens(seed, n):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_two_tower_batched_equals_one_at_a_time_with_per_prompt_generators(eta):
    model = _model("two_tower", torch.float32)
    ps = _prompts(dtype=torch.float32)
    eos = ps[1][0]
    limits = [4, 6, 2, 5]
    kw = dict(eos_embedding=eos, eos_threshold=0.999, num_inference_steps=6, ddim_eta=eta, initial_noise_scale=0.6)
    batched = generate_two_tower(model, ps, limits, generator=_gens(10, 4), **kw)
    single = [generate_two_tower(model, [p], [m], generator=[g], **kw)
              for p, m, g in zip(ps, limits, _gens(10, 4))]
    for i, s in enumerate(single):
        assert batched.embeddings[i].shape == s.embeddings[0].shape == (limits[i], E)
        assert batched.stopped_on_eos[i] == s.stopped_on_eos[0]
        torch.testing.assert_close(batched.embeddings[i], s.embeddings[0], rtol=0, atol=1e-5)
    # the equal-length [B, P, E] form is the same computation as the list form
    same = generate_two_tower(model, torch.stack([ps[0], ps[0]]), 3, generator=_gens(10, 2), **kw)
    alone = generate_two_tower(model, ps[0], 3, generator=_gens(10, 1), **kw)
    torch.testing.assert_close(same.embeddings[0], alone.embeddings[0], rtol=0, atol=1e-5)
    # a shared generator: the batch changes a prompt's draws (what per-prompt generators avoid)
    shared = generate_two_tower(model, ps, limits, generator=torch.Generator().manual_seed(10), **kw)
    alone = generate_two_tower(model, [ps[1]], [limits[1]], generator=torch.Generator().manual_seed(10), **kw)
    assert not torch.allclose(shared.embeddings[1], alone.embeddings[0], atol=1e-3)


def test_two_tower_family_generation_batched_equals_one_at_a_time():
    """Through the spec (`two_tower_concepts`): story limits per prompt, the end concept dropped, decoded texts."""
    book = Book(seed=3)
    model = _model("two_tower", torch.float32)
    gen = get_family("two_tower").generate
    ps = _prompts(dtype=torch.float32)

    def settings(generators):
        return GenerationSettings(eos_embedding=book.vectors[-1].float(), max_sentences=5, eos_threshold=0.9,
                                  decode_fn=book.decode, num_inference_steps=6, generator=generators)

    batched = gen(model, ps, settings(_gens(7, 4)))
    for i, p in enumerate(ps):
        s = gen(model, [p], settings([torch.Generator().manual_seed(7 + i)]))[0]
        b = batched[i]
        assert b.texts == s.texts and b.stopped_by_eos == s.stopped_by_eos
        torch.testing.assert_close(b.embeddings, s.embeddings, rtol=0, atol=1e-5)
        # the story limit: max_sentences + 1 - prompt length new concepts at most (at least one)
        assert b.embeddings.shape[0] <= max(1, 6 - LENGTHS[i])


def test_two_tower_on_step_sees_every_kept_concept_once():
    model = _model("two_tower", torch.float32)
    ps = _prompts(dtype=torch.float32)
    seen: dict[int, list] = {i: [] for i in range(len(ps))}

    def on_step(idx, concepts, texts):
        assert texts is None and concepts.shape == (len(idx), E)
        for i, c in zip(idx, concepts):
            seen[i].append(c)

    res = generate_two_tower(model, ps, [3, 1, 2, 4], num_inference_steps=4, generator=_gens(1, 4), on_step=on_step)
    for i, e in enumerate(res.embeddings):
        torch.testing.assert_close(torch.stack(seen[i]), e, rtol=0, atol=0)


def test_token_llm_batched_equals_one_at_a_time():
    from sonar_llm.models.backbone import BackboneConfig
    from sonar_llm.models.token_llm import TokenLLM

    torch.manual_seed(0)
    model = TokenLLM(BackboneConfig(model_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=48),
                     vocab_size=50).double().eval()
    g = torch.Generator().manual_seed(2)
    ps = [torch.randint(4, 50, (n,), generator=g) for n in (7, 2, 11, 4)]
    batched = generate_token_llm(model, ps, max_new_tokens=9, stop_ids=(3, 5))
    single = [generate_token_llm(model, [p], max_new_tokens=9, stop_ids=(3, 5))[0] for p in ps]
    assert batched == single
    assert len({tuple(t) for t in batched}) > 1


@pytest.mark.parametrize("family", ["sonar_llm", "base_lcm", "two_tower", "token_llm"])
def test_caches_that_grow_give_what_full_caches_give(family, monkeypatch):
    """The loops' KV caches start with room for the prompts and CACHE_STRETCH more positions and grow as the
    stories run (a huge cap costs no memory up front). With a stretch of 1 they grow at almost every step; the
    stories must not change."""
    import sonar_llm.models.generate as G
    import sonar_llm.models.generate_two_tower as GT

    book = Book()

    def run():
        if family == "token_llm":
            from sonar_llm.models.backbone import BackboneConfig
            from sonar_llm.models.token_llm import TokenLLM

            torch.manual_seed(0)
            model = TokenLLM(BackboneConfig(model_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=48),
                             vocab_size=50).double().eval()
            g = torch.Generator().manual_seed(2)
            return generate_token_llm(model, [torch.randint(4, 50, (n,), generator=g) for n in (7, 2, 11, 4)],
                                      max_new_tokens=9, stop_ids=(3,))
        model = _model(family, torch.float32 if family == "two_tower" else torch.float64)
        extra = {"generator": _gens(3, len(LENGTHS))} if family == "two_tower" else {}
        ps = _prompts(dtype=torch.float32 if family == "two_tower" else torch.float64)
        return [(r.embeddings, r.stop_reason) for r in get_family(family).generate(model, ps, _settings(book, **extra))]

    full = run()
    for module in (G, GT):
        monkeypatch.setattr(module, "CACHE_STRETCH", 1)
    grown = run()
    if family == "token_llm":
        assert grown == full and max(map(len, full)) > 1
        return
    for (e1, r1), (e2, r2) in zip(grown, full):
        assert r1 == r2 and e1.shape == e2.shape
        torch.testing.assert_close(e1, e2, rtol=0, atol=1e-5)
    assert max(e.shape[0] for e, _ in full) > 2  # stories ran past the first stretch
