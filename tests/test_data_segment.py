"""Tests for sonar_llm.data.segment: blingfire sentence splitting and over-long sentence re-splitting."""
import random
import re

import pytest

from sonar_llm.data.segment import SegmentConfig, resplit_long, split_sentences


def _norm(s):
    return re.sub(r"\s+", " ", s).strip()


def test_split_normalises_whitespace_and_respects_paragraphs():
    text = "  Hello   world.\tThis is Mr. Smith's house.\nIt is   big\n\n\n  A new paragraph without stop\n\n \n"
    assert split_sentences(text) == ["Hello world.", "This is Mr. Smith's house.", "It is big",
                                     "A new paragraph without stop"]
    assert split_sentences("   \n\n\t") == []
    assert split_sentences("line one\nline two", newline_is_boundary=True) == ["line one", "line two"]


def test_resplit_pieces_are_short_and_lossless():
    rng = random.Random(0)
    words = ["alpha", "be", "gamma,", "delta;", "epsilon.", "zeta", "eta!", "theta", "iota:", "kappa"]
    for limit in (16, 40, 256):
        for _ in range(20):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 200)))
            pieces = resplit_long(text, limit)
            assert all(0 < len(p) < limit for p in pieces)
            assert " ".join(pieces) == _norm(text)


def test_resplit_prefers_punctuation_then_commas_then_spaces():
    s = "aaaa bbbb; cccc, dddd eeee ffff gggg"  # 36 chars
    assert resplit_long(s, 30) == ["aaaa bbbb;", "cccc, dddd eeee ffff gggg"]
    assert resplit_long("aaaa bbbb, cccc dddd eeee ffff", 25) == ["aaaa bbbb,", "cccc dddd eeee ffff"]
    assert resplit_long("aaaa bbbb cccc dddd", 12) == ["aaaa bbbb", "cccc dddd"]
    hard = "x" * 70
    pieces = resplit_long(hard, 32)
    assert "".join(pieces) == hard and [len(p) for p in pieces] == [31, 31, 8]


def test_split_sentences_resplits_long_sentences_at_the_configured_limit():
    long_sentence = "word " * 80 + "end."  # one 404-character sentence
    out = split_sentences("Short one. " + long_sentence)
    assert out[0] == "Short one."
    assert all(len(p) < 256 for p in out) and len(out) == 3
    assert " ".join(out[1:]) == _norm(long_sentence)
    exactly = "y" * 255 + "."  # 256 characters: re-split (>= limit), 255 is kept
    assert all(len(p) < 256 for p in split_sentences(exactly))
    assert split_sentences("z" * 254 + ".") == ["z" * 254 + "."]
    with pytest.raises(ValueError, match="max_sentence_chars"):
        SegmentConfig(max_sentence_chars=1)
    with pytest.raises(TypeError, match="text must be str"):
        split_sentences(b"bytes")
