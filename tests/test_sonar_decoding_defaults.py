"""Issue 21: default SONAR decoding = SONAR's own ``EmbeddingToTextModelPipeline`` (fairseq2 v0.4.6
``BeamSearchSeq2SeqGenerator`` defaults), checked against the rules written out by hand:

- length: fairseq2's ``max_gen_len=(1, 128)`` applied to a source length equal to the embedding WIDTH
  (SONAR passes the [N, E] embedding batch as the source sequences), the whole sequence (2-token prompt
  included) capped by ``max_seq_len`` = the decoder's position table unless a smaller cap is given;
- banned ids: fairseq2 bans the model's ``pad_idx`` = 1 (SONAR's configs; the same id as unk), not id 0;
- beam step / scores: fairseq's 2*beam candidates, EOS finishing only among the first ``beam``, scores
  normalised by (sequence length incl. prompt - 1).

The reference decoder below is written independently of ``sonar_llm.sonar.generation``: one sentence at a
time, full forward passes in float64, plain Python lists.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from fixtures_sonar import toy_decoder
from sonar_llm.sonar import GenerationConfig, beam_search, decoder_preset, generate

EOS, LANG = 3, 80


# ----------------------------------------------------------------------------- the length rule, by hand
@pytest.mark.parametrize("width, rows, kwargs, expected", [
    (1024, 512, {}, 510),  # released SONAR: min(512, 2 + 1024 + 128) - 2
    (64, 512, {}, 192),  # the measurement: 64 + 128
    (32, 512, {}, 160),  # 32 + 128
    (32, 128, {}, 126),  # the 128-row table binds: 128 - 2
    (64, 128, {}, 126),
    (1024, 512, {"max_seq_len": 256}, 254),  # public SONAR-LLM generation: max_seq_len=256
    (1024, 512, {"max_seq_len": 1024}, 510),  # a cap above the table is cut to the table
    (32, 512, {"max_seq_len": 100}, 98),
    (1024, 512, {"max_gen_len": 129}, 129),  # this module's former default, now explicit
    (1024, 512, {"max_gen_len": (0, 128)}, 128),
    (1024, 512, {"max_gen_len": (0.5, 10)}, 510),  # int(0.5 * 1024 + 10) = 522 > 510: the table binds
    (100, 512, {"max_gen_len": (0.5, 10)}, 60),
    (1024, 512, {"max_gen_len": 129, "max_seq_len": 64}, 62),
])
def test_max_new_tokens_rule(width, rows, kwargs, expected):
    assert GenerationConfig(**kwargs).max_new_tokens(width, rows) == expected


def test_length_rule_errors():
    with pytest.raises(ValueError, match="max_gen_len"):
        GenerationConfig(max_gen_len=(0, 0)).max_new_tokens(1024, 512)
    with pytest.raises(ValueError, match="max_gen_len"):
        GenerationConfig(max_gen_len=(1, 2, 3))
    with pytest.raises(ValueError, match="max_seq_len"):
        GenerationConfig(max_seq_len=2)
    with pytest.raises(ValueError, match="prompt"):
        GenerationConfig().max_new_tokens(1024, 2)
    assert GenerationConfig(max_gen_len=[1, 128]).max_gen_len == (1, 128)  # a JSON round trip gives a list


def test_banned_set_and_summary():
    cfg = decoder_preset("basic")
    assert GenerationConfig().resolved_banned_ids(cfg) == (1,)  # fairseq2 bans SONAR's model pad_idx = 1
    assert GenerationConfig(banned_ids=[0, 1]).resolved_banned_ids(cfg) == (0, 1)
    with pytest.raises(ValueError, match="vocabulary"):
        GenerationConfig(banned_ids=(cfg.vocab_size,)).resolved_banned_ids(cfg)
    s = GenerationConfig().summary(cfg)
    assert (s["strategy"], s["beam_size"], s["max_new_tokens"], s["banned_ids"], s["max_gen_len"]) == \
        ("beam", 5, 510, [1], [1, 128])
    assert json.loads(json.dumps(s)) == s  # ready for a report's JSON
    s = GenerationConfig(beam_size=1, max_seq_len=256).summary(cfg)
    assert (s["strategy"], s["max_new_tokens"], s["decoder_positions"], s["width"]) == ("greedy", 254, 512, 1024)


# ----------------------------------------------------------------------------- independent reference
def ref_lprobs(dec, seqs: list[list[int]], e: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities after each sequence (all of one length), full forward, float64."""
    with torch.no_grad():
        logits = dec(torch.tensor(seqs), e[None].expand(len(seqs), -1))[:, -1]
    return torch.log_softmax(logits.double(), dim=-1)


def ref_decode(dec, e, lang, beam, max_new, banned=(1,)):
    """fairseq2's seq2seq beam search for one sentence (min_gen_len 1, len_penalty 1): returns the
    finished hypotheses (generated ids incl. EOS, normalised score), best first."""
    max_seq = 2 + max_new
    active = [([EOS, lang], float(ref_lprobs(dec, [[EOS]], e)[0, lang]))]
    finished = []
    for step in range(2, max_seq):
        lp = ref_lprobs(dec, [s for s, _ in active], e)
        if step == max_seq - 1:  # the last step forces EOS
            forced = torch.full_like(lp, -math.inf)
            forced[:, EOS] = lp[:, EOS]
            lp = forced
        else:
            lp[:, list(banned)] = -math.inf
        cands = sorted(((sc + float(lp[r, v]), r, v) for r, (_, sc) in enumerate(active)
                        for v in range(lp.size(1))), key=lambda c: -c[0])[:2 * beam]
        nxt = []
        for j, (score, r, v) in enumerate(cands):
            if v == EOS and j < beam:
                finished.append((active[r][0][2:] + [EOS], score / step))  # / (seq_len incl. prompt - 1)
                if len(finished) == beam:
                    return sorted(finished, key=lambda h: -h[1])
            elif v != EOS:
                nxt.append((active[r][0] + [v], score))
        active = nxt[:beam]
    return sorted(finished, key=lambda h: -h[1])


def long_decoder(rows: int, width: int, favour_zero: bool = False):
    """A toy decoder (float64) with ``rows`` positions reading ``width``-d embeddings whose EOS is unlikely
    (so sentences run into the length cap); ``favour_zero`` makes id 0 the most likely first token."""
    dec = toy_decoder(seed=7, std=0.5, dtype=torch.float64, max_seq_len=rows, encoder_dim=width, num_layers=1)
    with torch.no_grad():
        w = dec.decoder_frontend.embed.weight
        w[EOS].mul_(0.0)
        if favour_zero:
            e = torch.randn(width, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
            h = dec.hidden_states(torch.tensor([[EOS, LANG]]), e[None])[0, -1]
            w[0] = h  # the tied output row now points at the first step's hidden state
    return dec


def embeddings_for(width, n=2, seed=11):
    return torch.randn(n, width, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("rows, width", [(128, 32), (512, 64)])
@pytest.mark.parametrize("beam", [1, 5])
def test_default_decoding_matches_sonar_rule(rows, width, beam):
    dec, emb = long_decoder(rows, width), embeddings_for(width, n=2 if beam == 1 else 1)  # (a slow reference)
    cap = min(rows, 2 + width + 128) - 2  # written out: 126 for 128 rows, 192 for 512 rows and width 64
    results = beam_search(dec, emb, LANG, GenerationConfig(beam_size=beam))
    for b in range(emb.size(0)):
        ref = ref_decode(dec, emb[b], LANG, beam, cap)
        assert [h.tokens for h in results[b]] == [t for t, _ in ref]
        for h, (_, s) in zip(results[b], ref):
            assert abs(h.score - s) < 1e-4  # fp32 accumulation (as fairseq2) vs the float64 reference
        assert len(ref[0][0]) == cap  # the sentence ran into the cap: the rule is what is being tested
    assert generate(dec, emb, LANG, beam_size=beam) == [hs[0].tokens[:-1] for hs in results]
    old = generate(dec, emb, LANG, beam_size=beam, max_gen_len=129)  # the former 129-token cap
    assert all(len(t) == min(129, cap) - 1 for t in old)


@pytest.mark.parametrize("rows, width", [(128, 32), (512, 64)])
@pytest.mark.parametrize("beam", [1, 5])
def test_decoder_favouring_id_zero(rows, width, beam):
    dec = long_decoder(rows, width, favour_zero=True)
    emb = embeddings_for(width, n=2 if beam == 1 else 1)
    first = ref_lprobs(dec, [[EOS, LANG]], emb[0])[0]
    assert int(first.argmax()) == 0  # premise: id 0 is the most likely first token
    max_new = 12  # keep the float64 reference quick; the length rule is checked above
    got = beam_search(dec, emb, LANG, GenerationConfig(beam_size=beam, max_gen_len=max_new))
    for b in range(emb.size(0)):
        ref = ref_decode(dec, emb[b], LANG, beam, max_new)
        assert [h.tokens for h in got[b]] == [t for t, _ in ref]
    assert got[0][0].tokens[0] == 0  # SONAR emits id 0 here ...
    old = beam_search(dec, emb, LANG, GenerationConfig(beam_size=beam, max_gen_len=max_new, banned_ids=(0, 1)))
    assert old[0][0].tokens[0] != 0  # ... the former rule (ban 0 and 1) did not
    assert [h.tokens for h in old[0]] == [t for t, _ in ref_decode(dec, emb[0], LANG, beam, max_new, (0, 1))]
