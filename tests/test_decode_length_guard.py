"""The decoding length guard (sonar_llm.sonar.generation, issue 26): a decoder that records the longest target it
was trained on (SonarDecoderConfig.trained_target_len) decodes at most ceil(length_guard x that) tokens per
sentence; length_guard=None keeps SONAR's own length rule; the checkpoint carries the record."""
import math

import pytest
import torch
from fixtures_sonar import toy_decoder

from sonar_llm.sonar.checkpoint import load_sonar_decoder, save_fairseq2_checkpoint
from sonar_llm.sonar.generation import GenerationConfig, beam_search, generate, sample_hypotheses

LANG_ID = 81  # a language tag of the toy decoder (lang_offset 80)


NEVER = 10_000  # min_gen_len: EOS is banned until the forced final one, so every sentence runs to the cap
# (the 'The The The ...' case of issue 26)


def _no_eos_decoder(trained):
    return toy_decoder(seed=0, trained_target_len=trained)


def test_guard_caps_the_sentence_at_a_multiple_of_the_trained_length():
    dec = _no_eos_decoder(trained=6)
    emb = torch.randn(3, dec.cfg.encoder_dim, generator=torch.Generator().manual_seed(0))
    sonar_rule = GenerationConfig(beam_size=1, length_guard=None, min_gen_len=NEVER).max_new_tokens(dec.cfg.encoder_dim,
                                                                                 dec.cfg.max_seq_len)
    for guard in (1.0, 1.5, 2.5):
        want = math.ceil(guard * 6)  # tokens, final EOS included
        assert want < sonar_rule
        cfg = GenerationConfig(beam_size=1, length_guard=guard, min_gen_len=NEVER)
        assert cfg.token_cap(dec.cfg) == want and cfg.summary(dec.cfg)["max_new_tokens"] == want
        assert cfg.summary(dec.cfg)["guard_tokens"] == want and cfg.summary(dec.cfg)["trained_target_len"] == 6
        out = generate(dec, emb, LANG_ID, cfg=cfg)
        assert [len(t) for t in out] == [want - 1] * 3  # the final (forced) EOS is stripped
        hyps = beam_search(dec, emb, LANG_ID, GenerationConfig(beam_size=3, length_guard=guard, min_gen_len=NEVER))
        assert all(len(h.tokens) == want for hs in hyps for h in hs)
        samples = sample_hypotheses(dec, emb, LANG_ID, GenerationConfig(do_sample=True, seed=0, length_guard=guard, min_gen_len=NEVER))
        assert all(len(h.tokens) == want for hs in samples for h in hs)
    # None: SONAR's own rule (the guard is off), so the same decoder runs to SONAR's cap
    out = generate(dec, emb[:1], LANG_ID, cfg=GenerationConfig(beam_size=1, length_guard=None, min_gen_len=NEVER))
    assert len(out[0]) == sonar_rule - 1


def test_no_guard_without_a_recorded_length_and_the_tighter_cap_wins():
    dec = _no_eos_decoder(trained=None)  # e.g. the released SONAR: nothing recorded
    cfg = GenerationConfig(beam_size=1)
    assert cfg.guard_tokens(dec.cfg) is None
    assert cfg.token_cap(dec.cfg) == cfg.max_new_tokens(dec.cfg.encoder_dim, dec.cfg.max_seq_len)
    guarded = _no_eos_decoder(trained=40)
    assert GenerationConfig(max_gen_len=10).token_cap(guarded.cfg) == 10  # an explicit smaller cap still binds


def test_trained_length_survives_the_checkpoint(tmp_path):
    dec = toy_decoder(seed=1, trained_target_len=17)
    save_fairseq2_checkpoint(dec, tmp_path / "dec.pt")
    assert load_sonar_decoder(tmp_path / "dec.pt").cfg.trained_target_len == 17


@pytest.mark.parametrize("bad", [0.5, 0, -1.0, True, "2"])
def test_bad_guard_is_refused(bad):
    with pytest.raises(ValueError, match="length_guard"):
        GenerationConfig(length_guard=bad)
    with pytest.raises(ValueError, match="trained_target_len"):
        toy_decoder(trained_target_len=0)
