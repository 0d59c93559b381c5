"""Beam search / greedy decoding: KV-cache path vs brute-force full forward, scores, length rules, bans."""
from __future__ import annotations

import pytest
import torch

from fixtures_sonar import toy_decoder
from sonar_llm.sonar import GenerationConfig, beam_search, generate, greedy_decode
from sonar_llm.sonar.generation import greedy_reads

LANG = 80  # toy preset: first language tag id


def gen_decoder():
    """A toy decoder whose outputs vary in length (EOS row enlarged, other rows shrunk)."""
    dec = toy_decoder(seed=0, std=0.5, dtype=torch.float64)
    with torch.no_grad():
        dec.decoder_frontend.embed.weight.mul_(0.3)
        dec.decoder_frontend.embed.weight[3].mul_(3.0)
    return dec


def embeddings(n=4, seed=0):
    return torch.randn(n, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def full_lprobs(dec, prefix, emb):
    """log-probabilities of the next token after ``prefix`` (list of ids), by a full forward."""
    with torch.no_grad():
        logits = dec(torch.tensor([prefix]), emb[None])[0, -1]
    return torch.log_softmax(logits.double(), dim=-1)


@pytest.mark.parametrize("beam", [1, 2, 5])
def test_cache_matches_brute_force(beam):
    dec, emb = gen_decoder(), embeddings()
    fast = beam_search(dec, emb, LANG, GenerationConfig(beam_size=beam, max_gen_len=12))
    slow = beam_search(dec, emb, LANG, GenerationConfig(beam_size=beam, max_gen_len=12, use_cache=False))
    assert [[h.tokens for h in hs] for hs in fast] == [[h.tokens for h in hs] for hs in slow]
    for hs_f, hs_s in zip(fast, slow):
        for hf, hsl in zip(hs_f, hs_s):
            assert abs(hf.score - hsl.score) < 1e-5  # scores are accumulated in fp32, as in fairseq2
    # the search is not trivial: lengths differ and some sentence stops before the cap
    best = [hs[0].tokens for hs in fast]
    assert len({len(t) for t in best}) > 1


def test_greedy_matches_independent_loop():
    dec, emb = gen_decoder(), embeddings(seed=1)
    max_gen_len = 10
    expected = []
    for b in range(emb.size(0)):
        seq = [3, LANG]
        out = []
        for step in range(max_gen_len):
            lp = full_lprobs(dec, seq, emb[b])
            if step == max_gen_len - 1:
                tok = 3
            else:
                lp[0] = lp[1] = float("-inf")
                tok = int(lp.argmax())
            if tok == 3:
                break
            out.append(tok)
            seq.append(tok)
        expected.append(out)
    old_bans = GenerationConfig(max_gen_len=max_gen_len, banned_ids=(0, 1))  # the reference above bans 0 and 1
    assert greedy_decode(dec, emb, LANG, cfg=old_bans) == expected
    assert any(len(e) < max_gen_len - 1 for e in expected) and any(e for e in expected)


def test_hypothesis_scores_and_length_rules():
    dec, emb = gen_decoder(), embeddings(seed=2)
    max_gen_len, beam = 6, 3
    results = beam_search(dec, emb, LANG, GenerationConfig(beam_size=beam, max_gen_len=max_gen_len,
                                                            banned_ids=(0, 1)))
    for b, hyps in enumerate(results):
        assert 1 <= len(hyps) <= beam
        assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
        for h in hyps:
            assert 1 <= len(h.tokens) <= max_gen_len and h.tokens[-1] == 3
            assert 0 not in h.tokens and 1 not in h.tokens and 3 not in h.tokens[:-1]
            # fairseq2 score: (log p(lang | eos) + sum of generated log-probs) / (sequence length - 1)
            seq = [3, LANG] + h.tokens
            total = float(full_lprobs(dec, [3], emb[b])[LANG])
            for i in range(2, len(seq)):
                total += float(full_lprobs(dec, seq[:i], emb[b])[seq[i]])
            assert abs(h.score - total / (len(seq) - 1)) < 1e-5


def test_last_step_forces_eos_and_output_strips_it():
    dec, emb = gen_decoder(), embeddings(seed=3)
    out = generate(dec, emb, LANG, beam_size=2, max_gen_len=3)
    assert all(len(t) <= 2 and 3 not in t for t in out)


def test_min_gen_len_bans_early_eos():
    dec, emb = gen_decoder(), embeddings(seed=0)
    with torch.no_grad():
        dec.decoder_frontend.embed.weight[3].mul_(3.0)  # EOS now wins almost at once
    free = beam_search(dec, emb, LANG, GenerationConfig(beam_size=2, max_gen_len=8))
    assert min(len(h.tokens) for hs in free for h in hs) < 3
    held = beam_search(dec, emb, LANG, GenerationConfig(beam_size=2, max_gen_len=8, min_gen_len=3))
    assert all(len(h.tokens) >= 3 for hs in held for h in hs)


def test_pad_and_unk_never_emitted():
    """The former default (ban the tokenizer's pad 0 and unk 1), now asked for explicitly."""
    dec, emb = gen_decoder(), embeddings(seed=4)
    with torch.no_grad():
        dec.decoder_frontend.embed.weight[0:2].mul_(50.0)
    for beam in (1, 3):
        out = generate(dec, emb, LANG, cfg=GenerationConfig(beam_size=beam, max_gen_len=8, banned_ids=(0, 1)))
        assert all(0 not in t and 1 not in t for t in out)


def test_batch_rows_are_independent_and_langs_per_row():
    dec, emb = gen_decoder(), embeddings(n=3, seed=5)
    langs = [80, 81, 82]
    batched = generate(dec, emb, langs, beam_size=3, max_gen_len=10)
    single = [generate(dec, emb[i:i + 1], langs[i], beam_size=3, max_gen_len=10)[0] for i in range(3)]
    assert batched == single
    with pytest.raises(ValueError, match="lang_ids"):
        generate(dec, emb, [80, 81], beam_size=2)


def test_generation_argument_errors():
    dec = gen_decoder()
    with pytest.raises(ValueError, match="beam_size"):
        GenerationConfig(beam_size=0)
    with pytest.raises(ValueError, match="embeddings"):
        generate(dec, torch.randn(32, dtype=torch.float64), LANG)
    with pytest.raises(ValueError, match="encoder_dim"):
        generate(dec, torch.randn(2, 16, dtype=torch.float64), LANG)


@pytest.mark.parametrize("cfg,tempting", [
    (GenerationConfig(max_gen_len=12), False),  # SONAR's bans
    (GenerationConfig(max_gen_len=12, min_gen_len=4, banned_ids=(0, 1)), False),  # EOS banned early
    (GenerationConfig(max_gen_len=12, banned_ids=(0, 1)), True),  # banned ids would win every step
    (GenerationConfig(max_gen_len=5, do_sample=True, temperature=0.7, top_p=0.9), False),  # the cap forces EOS;
    # sampling fields are ignored: the check is about the greedy reading
], ids=["sonar", "min-len", "bans", "cap"])
def test_greedy_reads_agrees_with_greedy_decoding(cfg, tempting):
    """greedy_reads(target) is True exactly where greedy decoding gives `target`, for each row's own reading and
    for near misses (a token dropped, added or changed), without decoding."""
    dec, emb = gen_decoder(), embeddings(n=12, seed=10)
    if tempting:
        with torch.no_grad():
            dec.decoder_frontend.embed.weight[0:2].mul_(50.0)
    readings = greedy_decode(dec, emb, LANG, cfg=cfg)
    cap = cfg.token_cap(dec.cfg, emb.size(1))
    assert any(len(r) < cap - 1 for r in readings) and any(len(r) == cap - 1 for r in readings)  # EOS chosen, forced
    assert len({tuple(r) for r in readings}) > 1
    targets = []
    for r in readings:
        targets += [r, r[:-1], r + [r[-1] if r else 5], r[:1] + [(r[1] + 1) if len(r) > 1 else 7] + r[2:]]
    for target in targets:
        want = [r == target for r in readings]
        got = greedy_reads(dec, emb, LANG, target, cfg)
        assert got.tolist() == want, target
    assert greedy_reads(dec, emb, LANG, [5] * cap, cfg).tolist() == [False] * emb.size(0)  # longer than the cap
    assert greedy_reads(dec, emb[:0], LANG, readings[0], cfg).shape == (0,)
