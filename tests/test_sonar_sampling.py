"""Sampling in the SONAR decoder (issue 19 item 3): empirical token frequencies against the filtered,
renormalised softmax computed directly from a float64 full forward, exact top-k / top-p supports,
seeding, num_samples layout, bans, scores.

Statistics (fixed seeds, so every run draws the same samples; a wrong distribution still fails):
- chi-square goodness of fit over the tokens whose expected count is >= 5 (the rest pooled in one bin),
  rejected when the statistic exceeds the 1 - 1e-4 quantile of chi2(df) (Wilson-Hilferty approximation,
  within about 1% of the exact quantile for df >= 3);
- and every single token within 5 binomial standard deviations (+ 1 count) of its expected count.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from fixtures_sonar import toy_decoder, toy_tokenizer
from sonar_llm.sonar import (
    EmbeddingToText,
    GenerationConfig,
    generate,
    greedy_decode,
    make_generator,
    sample_hypotheses,
)

EOS, LANG, N = 3, 80, 20000


def sampling_decoder():
    dec = toy_decoder(seed=5, std=0.35, dtype=torch.float64)
    with torch.no_grad():
        dec.decoder_frontend.embed.weight[1].mul_(4.0)  # unk (banned by default) made likely: must never appear
    return dec


def emb_row(seed=3):
    return torch.randn(1, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def ref_probs(dec, prefix, e, temperature=1.0, banned=(1,), top_k=0, top_p=1.0):
    """The sampling distribution written out: float64 softmax(logits / T), banned ids -> 0, renormalise,
    keep the top_k most likely, renormalise, keep tokens whose preceding mass (descending order) is <= top_p,
    renormalise."""
    with torch.no_grad():
        logits = dec(torch.tensor([prefix]), e)[0, -1].double()
    p = torch.softmax(logits / temperature, dim=-1)
    p[list(banned)] = 0.0
    p /= p.sum()
    order = sorted(range(p.numel()), key=lambda i: -float(p[i]))
    if top_k:
        for i in order[top_k:]:
            p[i] = 0.0
        p /= p.sum()
    if top_p < 1.0:
        before = 0.0
        for i in order:
            mass = float(p[i])
            if before > top_p:
                p[i] = 0.0
            elif abs(before - top_p) < 1e-3:
                raise AssertionError("top_p within 1e-3 of a cumulative mass: pick another p")
            before += mass
        p /= p.sum()
    return p


def chi2_quantile(df: int, z: float = 3.719) -> float:  # z = Phi^-1(1 - 1e-4)
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def check_frequencies(tokens: torch.Tensor, p: torch.Tensor) -> None:
    n = tokens.numel()
    counts = torch.bincount(tokens, minlength=p.numel()).double()
    assert counts[p == 0].sum() == 0, f"sampled outside the support: {torch.nonzero(counts * (p == 0)).tolist()}"
    expected = n * p
    sigma = torch.sqrt(n * p * (1 - p))
    assert bool(((counts - expected).abs() <= 5 * sigma + 1).all())
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    df = int(keep.sum()) - 1
    if df >= 1:  # (one bin, e.g. top_k=1: the support check above is the whole test)
        assert stat < chi2_quantile(df), (stat, df)


def first_tokens(dec, e, **kw):
    cfg = GenerationConfig(do_sample=True, num_samples=N, max_gen_len=2, seed=1234, **kw)
    hyps = sample_hypotheses(dec, e, LANG, cfg)[0]
    assert len(hyps) == N
    return torch.tensor([h.tokens[0] for h in hyps])


@pytest.mark.parametrize("kw", [
    {},
    {"temperature": 0.6},
    {"temperature": 1.7},
])
def test_first_token_frequencies_match_softmax(kw):
    dec, e = sampling_decoder(), emb_row()
    p = ref_probs(dec, [EOS, LANG], e, **kw)
    assert int((p > 0).sum()) > 50  # many tokens in play: the test is not trivial
    check_frequencies(first_tokens(dec, e, **kw), p)


@pytest.mark.parametrize("kw", [
    {"top_k": 1},
    {"top_k": 7},
    {"top_k": 7, "temperature": 0.5},
    {"top_p": 0.5},
    {"top_p": 0.85, "temperature": 1.3},
    {"top_k": 20, "top_p": 0.7},
])
def test_top_k_top_p_support_and_frequencies(kw):
    dec, e = sampling_decoder(), emb_row()
    p = ref_probs(dec, [EOS, LANG], e, **kw)
    support = set(torch.nonzero(p).flatten().tolist())
    if "top_k" in kw and "top_p" not in kw:
        assert len(support) == kw["top_k"]
    if "top_p" in kw:  # the nucleus: the smallest prefix (descending) whose mass reaches top_p
        base = ref_probs(dec, [EOS, LANG], e, **{k: v for k, v in kw.items() if k != "top_p"})
        kept = sorted(support, key=lambda i: -float(base[i]))
        assert float(base[kept].sum()) >= kw["top_p"] > float(base[kept[:-1]].sum())
        assert 1 < len(support) < int((base > 0).sum())
    toks = first_tokens(dec, e, **kw)
    assert set(toks.tolist()) == support  # exact support: everything in it is drawn, nothing outside
    check_frequencies(toks, p)


def test_second_token_conditional_distribution():
    """Through the KV cache after the fan-out and the removal of finished rows: the token after the most
    frequent first token follows the softmax after [eos, lang, first]."""
    dec, e = sampling_decoder(), emb_row(seed=4)
    cfg = GenerationConfig(do_sample=True, num_samples=N, max_gen_len=3, seed=99, temperature=0.8)
    hyps = sample_hypotheses(dec, e, LANG, cfg)[0]
    firsts = torch.tensor([h.tokens[0] for h in hyps])
    t = int(torch.bincount(firsts).argmax())
    assert t != EOS
    seconds = torch.tensor([h.tokens[1] for h in hyps if h.tokens[0] == t])
    assert seconds.numel() > 2000
    check_frequencies(seconds, ref_probs(dec, [EOS, LANG, t], e, temperature=0.8))
    assert all(len(h.tokens) <= 3 and h.tokens[-1] == EOS and EOS not in h.tokens[:-1] for h in hyps)


def test_cached_sampling_matches_full_forward():
    """Same seed, same draws: the KV-cache path (fan-out, rows dropped as they finish) samples exactly what
    the full forward at every step samples."""
    dec = sampling_decoder()
    with torch.no_grad():
        dec.decoder_frontend.embed.weight[EOS].mul_(2.0)  # sentences end at different steps
    emb = torch.randn(3, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    cfg = GenerationConfig(do_sample=True, num_samples=8, max_gen_len=12, seed=21, temperature=1.2, top_p=0.95)
    fast = sample_hypotheses(dec, emb, [80, 81, 82], cfg)
    slow = sample_hypotheses(dec, emb, [80, 81, 82], dataclasses.replace(cfg, use_cache=False))
    assert [[h.tokens for h in hs] for hs in fast] == [[h.tokens for h in hs] for hs in slow]
    assert len({len(h.tokens) for hs in fast for h in hs}) >= 3


def test_top_k_one_is_greedy_and_samples_are_embedding_major():
    dec = sampling_decoder()
    emb = torch.randn(3, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    greedy = greedy_decode(dec, emb, LANG, max_gen_len=10)
    cfg = GenerationConfig(do_sample=True, top_k=1, num_samples=4, max_gen_len=10, seed=0)
    assert generate(dec, emb, LANG, cfg=cfg) == [g for g in greedy for _ in range(4)]
    assert len({tuple(g) for g in greedy}) == 3  # three different sentences: the order is checked


def test_seed_and_generator():
    dec = sampling_decoder()
    emb = torch.randn(2, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    cfg = GenerationConfig(do_sample=True, num_samples=3, max_gen_len=8, seed=7)
    a = generate(dec, emb, LANG, cfg=cfg)
    assert len(a) == 6
    assert generate(dec, emb, LANG, cfg=cfg) == a  # same seed, same batch: same samples
    assert generate(dec, emb, LANG, cfg=cfg, generator=torch.Generator().manual_seed(7)) == a
    other = generate(dec, emb, LANG, cfg=GenerationConfig(do_sample=True, num_samples=3, max_gen_len=8, seed=8))
    assert other != a
    assert len({tuple(t) for t in a}) > 1  # samples differ from each other
    gen = make_generator(cfg)
    first = generate(dec, emb, LANG, cfg=cfg, generator=gen)
    assert generate(dec, emb, LANG, cfg=cfg, generator=gen) != first  # a passed generator keeps its stream
    assert make_generator(GenerationConfig()) is None


def test_sampling_rules_and_scores():
    dec, e = sampling_decoder(), emb_row(seed=6)
    with torch.no_grad():
        dec.decoder_frontend.embed.weight[EOS].mul_(3.0)  # EOS likely: min_gen_len must hold it back
    cfg = GenerationConfig(do_sample=True, num_samples=200, max_gen_len=6, min_gen_len=3, seed=3,
                           temperature=0.9)
    hyps = sample_hypotheses(dec, e, LANG, cfg)[0]
    lengths = [len(h.tokens) for h in hyps]
    assert min(lengths) == 3 and max(lengths) <= 6
    assert all(1 not in h.tokens and h.tokens[-1] == EOS for h in hyps)
    for h in hyps[:20]:  # fairseq2's score: temperature log-probs (lang tag included) / (seq_len - 1)
        seq = [EOS, LANG] + h.tokens
        total = 0.0
        for i in range(1, len(seq)):
            with torch.no_grad():
                logits = dec(torch.tensor([seq[:i]]), e)[0, -1].double()
            total += float(torch.log_softmax(logits / 0.9, -1)[seq[i]])
        assert abs(h.score - total / (len(seq) - 1)) < 1e-4


def test_pipeline_sampling(tmp_path):
    tok = toy_tokenizer(tmp_path)
    dec = toy_decoder(seed=3, std=0.5, vocab_size=tok.vocab_size)
    emb = torch.randn(3, 32, generator=torch.Generator().manual_seed(3))
    cfg = GenerationConfig(do_sample=True, num_samples=2, max_gen_len=8, seed=5)
    pipe = EmbeddingToText(dec, tok, batch_size=8)
    ids = pipe.decode_ids(emb, "fra_Latn", cfg=cfg)
    assert ids == generate(dec, emb, tok.lang_id("fra_Latn"), cfg=cfg) and len(ids) == 6
    assert pipe.decode(emb, "fra_Latn", cfg=cfg) == tok.decode(ids)


def test_sampling_config_errors():
    for kw, match in [({"top_k": -1}, "top_k"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
                      ({"num_samples": 0}, "num_samples"), ({"num_samples": 2}, "do_sample"),
                      ({"temperature": 0.0}, "temperature"), ({"seed": -1}, "seed")]:
        with pytest.raises(ValueError, match=match):
            GenerationConfig(**kw)


def test_one_generator_per_embedding_draws_apart_from_the_batch(tmp_path):
    """Given one generator per embedding, each embedding's samples are what that embedding alone gives with that
    generator (the single-generator path, whose frequencies are tested above): the other rows, their lengths and
    the batch size change nothing. The pipeline splits the generators with its batches."""
    from sonar_llm.sonar.generation import story_generator

    dec = sampling_decoder()
    emb = torch.randn(5, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    cfg = GenerationConfig(do_sample=True, num_samples=2, max_gen_len=10, temperature=1.5)
    alone = [generate(dec, emb[k:k + 1], LANG, cfg=cfg, generator=story_generator(4, k)) for k in range(5)]
    batched = generate(dec, emb, LANG, cfg=cfg, generator=[story_generator(4, k) for k in range(5)])
    assert batched == [t for a in alone for t in a]
    assert len({len(t) for t in batched}) > 1  # rows stop at different steps: a row's draws must not shift
    order = [3, 0, 4]
    shuffled = generate(dec, emb[order], LANG, cfg=cfg, generator=[story_generator(4, k) for k in order])
    assert shuffled == [t for k in order for t in alone[k]]
    assert generate(dec, emb, LANG, cfg=cfg, generator=story_generator(4, 0)) != batched  # one stream differs

    tok = toy_tokenizer(tmp_path)
    pdec = toy_decoder(seed=3, std=0.5, vocab_size=tok.vocab_size, dtype=torch.float64)
    pemb = torch.randn(5, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    one = dataclasses.replace(cfg, num_samples=1)
    want = [generate(pdec, pemb[k:k + 1], tok.lang_id("fra_Latn"), cfg=one, generator=story_generator(1, k))[0]
            for k in range(5)]
    for batch_size in (2, 5):  # chunks of 2, 2, 1 and one chunk
        pipe = EmbeddingToText(pdec, tok, batch_size=batch_size)
        assert pipe.decode_ids(pemb, "fra_Latn", cfg=one, generator=[story_generator(1, k) for k in range(5)]) == want


def test_story_generators_and_their_errors():
    from sonar_llm.sonar.generation import story_generator

    def stream(*a):
        return torch.rand(4, generator=story_generator(*a)).tolist()

    assert stream(0, 1) == stream(0, 1)
    streams = [stream(0, 1), stream(1, 0), stream(0, 2), stream(0, 1, 1), stream(0, 0)]
    assert len({tuple(s) for s in streams}) == 5  # (seed, story) and (story, seed) are not one stream, nor neighbours
    dec = sampling_decoder()
    emb = torch.randn(3, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    cfg = GenerationConfig(do_sample=True, max_gen_len=6)
    for gens in ([story_generator(0, 0)] * 2, [story_generator(0, k) for k in range(4)], [None] * 3):
        with pytest.raises(ValueError, match="one per embedding"):
            sample_hypotheses(dec, emb, LANG, cfg, gens)
