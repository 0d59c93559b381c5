"""Evaluation metrics on hand-computed cases."""
import math

import pytest
import torch

from sonar_llm.eval import metrics as M


def test_bleu_identity_and_disjoint():
    refs = ["the cat sat on the red mat today", "a dog ran into the big old park"]
    assert M.bleu(refs, refs) == pytest.approx(100.0)
    assert M.bleu(["zz yy xx ww vv uu tt", "qq pp oo nn mm ll kk"], refs) == pytest.approx(0.0)


def test_bleu_hand_computed_brevity():
    # hypothesis = first 4 tokens of a 8-token reference: all n-gram precisions are 1, BP = exp(1 - 8/4)
    ref = "one two three four five six seven eight"
    hyp = "one two three four"
    assert M.bleu([hyp], [ref]) == pytest.approx(100.0 * math.exp(1 - 8 / 4), rel=1e-6)


def test_rouge_hand_computed():
    # unigram overlap 2 of 3 (hyp) and 2 of 4 (ref): F1 = 2*(2/3)*(1/2)/((2/3)+(1/2)) = 4/7
    r = M.rouge(["cat sat down"], ["the cat sat up"])
    assert r["rouge1"] == pytest.approx(100 * 4 / 7, rel=1e-6)
    # bigram: hyp {cat sat, sat down}, ref {the cat, cat sat, sat up}: 1 match, P=1/2, R=1/3 -> F=0.4
    assert r["rouge2"] == pytest.approx(40.0, rel=1e-6)
    # LCS "cat sat" = 2 -> same as unigram here
    assert r["rougeL"] == pytest.approx(100 * 4 / 7, rel=1e-6)


def test_meteor_exact_match_formula():
    # identical 4-word sentences: P=R=1, one chunk of 4 matches: penalty 0.5*(1/4)^3
    s = M.meteor_no_wordnet(["a b c d"], ["a b c d"])
    fmean = 1.0
    assert s == pytest.approx(100 * fmean * (1 - 0.5 * (1 / 4) ** 3), rel=1e-6)
    assert M.meteor_no_wordnet(["x y"], ["a b"]) == pytest.approx(0.0)


def test_repetition_and_overlap():
    # 4-grams of "a b c d a b c d": 5 grams, distinct {abcd, bcda, cdab, dabc} = 4 -> 1 - 4/5
    assert M.repetition_n("a b c d a b c d", 4) == pytest.approx(0.2)
    assert M.repetition_n("a b c", 4) == 0.0
    assert M.ngram_overlap("the cat sat", "the cat ran", 2) == pytest.approx(0.5)
    assert M.ngram_overlap("x", "the cat ran", 2) == 0.0
    with pytest.raises(ValueError, match="n must be"):
        M.repetition_n("a", 0)


def test_overlap_counts_generated_ngrams_with_multiplicity():
    # generation bigrams: (a b), (b a), (a b), (b c): (a b) occurs in the prompt, twice in the generation
    # -> 2 of 4 = 0.5 with multiplicity (1 of 4 = 0.25 if repeated n-grams counted once)
    assert M.ngram_overlap("a b", "a b a b c", 2) == pytest.approx(0.5)
    # REP-n with multiplicity too: "a a a a a" has 4 bigrams, 1 distinct -> 1 - 1/4
    assert M.repetition_n("a a a a a", 2) == pytest.approx(0.75)


def test_round_trip_closed_form():
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(5, 8, generator=g)
    noise = torch.randn(5, 8, generator=g) * 0.1
    table = {}

    def decode(e):
        out = []
        for i in range(e.shape[0]):
            table[str(i)] = e[i] + noise[i]
            out.append(str(i))
        return out

    def encode(texts):
        return torch.stack([table[t] for t in texts])

    r = M.round_trip(emb, decode, encode)
    assert r["round_trip_l2"] == pytest.approx(float(noise.norm(dim=-1).mean()), rel=1e-5)
    cos = torch.nn.functional.cosine_similarity(emb, emb + noise, dim=-1).mean()
    assert r["round_trip_cos"] == pytest.approx(float(cos), rel=1e-5)
    with pytest.raises(ValueError, match="embeddings must be"):
        M.round_trip(emb[0], decode, encode)


def test_errors_and_nll():
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        M.bleu(["a", "b"], ["a"])
    s = M.token_nll_summary(10.0, 4)
    assert s["token_nll"] == 2.5 and s["token_ppl"] == pytest.approx(math.exp(2.5))
    with pytest.raises(ValueError, match="num_tokens"):
        M.token_nll_summary(1.0, 0)


def test_protocol_prompt_split_and_scoring():
    from sonar_llm.eval.protocol import ProtocolConfig, make_items, run_protocol

    stories = [[f"s{j} of story {n} says word{j * n}." for j in range(n)] for n in (2, 5, 8, 40)]
    items = make_items(stories, ProtocolConfig(prompt_mode="start"))
    assert [len(it.prompt) for it in items] == [2, 2]  # 2- and 40-sentence stories are excluded
    assert items[0].reference == stories[1][2:]
    half = make_items(stories, ProtocolConfig(prompt_mode="half"))
    assert [len(it.prompt) for it in half] == [2, 4]

    # a perfect "model" that returns the reference continuation scores 100 BLEU and 0 REP-4
    lookup = {tuple(s[:2]): s[2:] for s in stories}
    res = run_protocol(stories, lambda prompts: [lookup[tuple(p)] for p in prompts], ProtocolConfig())
    assert res["metrics"]["bleu"] == pytest.approx(100.0)
    assert res["metrics"]["rouge1"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="prompt_mode"):
        make_items(stories, ProtocolConfig(prompt_mode="middle"))
    with pytest.raises(ValueError, match="returned 0 continuations"):
        run_protocol(stories, lambda prompts: [], ProtocolConfig())
