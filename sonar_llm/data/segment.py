"""Sentence segmentation for concept-level training data.

Documents are split into paragraphs at blank lines, each paragraph is split into sentences with
blingfire (offline, rule based), whitespace is normalised (every run of whitespace becomes one space),
empty sentences are dropped, and sentences of `max_sentence_chars` characters or more (256, as the LCM's
data preparation) are re-split into pieces shorter than the limit: at sentence punctuation first, then
at commas, then at whitespace, and as a last resort at the limit itself.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["SegmentConfig", "split_sentences", "resplit_long"]

_WS = re.compile(r"\s+")
_PARA = re.compile(r"\n[^\S\n]*\n\s*")
# Split-point classes for over-long sentences, best first: (pattern, cut after the match?).
_SPLIT_LEVELS = (
    (re.compile(r"[.!?;:\u3002\uff01\uff1f\u2026]+[\"')\]\u201d\u2019]*(?=\s)"), True),  # clause punctuation
    (re.compile(r"[,\u3001\uff0c\u2013\u2014](?=\s)"), True),                          # commas and dashes
    (re.compile(r"\s"), False),                                                         # any whitespace
)


@dataclass(frozen=True)
class SegmentConfig:
    """Options of `split_sentences`.

    max_sentence_chars: sentences with this many characters or more are re-split (pieces are shorter).
    newline_is_boundary: treat every line break as a sentence boundary (e.g. for verse or lists);
        by default only blank lines (paragraph breaks) are hard boundaries.
    """

    max_sentence_chars: int = 256
    newline_is_boundary: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.max_sentence_chars, int) or self.max_sentence_chars < 2:
            raise ValueError(f"max_sentence_chars must be an int >= 2, got {self.max_sentence_chars!r}")


def _normalise(text: str) -> str:
    return _WS.sub(" ", text).strip()


def resplit_long(sentence: str, max_sentence_chars: int = 256) -> list[str]:
    """Split `sentence` into whitespace-normalised pieces of fewer than `max_sentence_chars` characters.

    Each cut is made at the rightmost split point within the limit of the best class that has one
    (punctuation, then commas/dashes, then whitespace); text without any is cut hard at the limit.
    """
    if max_sentence_chars < 2:
        raise ValueError(f"max_sentence_chars must be >= 2, got {max_sentence_chars}")
    limit = max_sentence_chars - 1  # pieces must be strictly shorter than max_sentence_chars
    rest = _normalise(sentence)
    pieces: list[str] = []
    while len(rest) > limit:
        window = rest[: limit + 1]  # a split point at index `limit` still leaves a piece of `limit` chars
        cut = 0
        for pattern, after in _SPLIT_LEVELS:
            points = (m.end() if after else m.start() for m in pattern.finditer(window))
            ends = [e for e in points if 0 < e <= limit]
            if ends:
                cut = ends[-1]
                break
        if cut <= 0:
            cut = limit
        head, rest = rest[:cut].strip(), rest[cut:].strip()
        if head:
            pieces.append(head)
    if rest:
        pieces.append(rest)
    return pieces


def split_sentences(text: str, max_sentence_chars: int = 256, *, newline_is_boundary: bool = False,
                    config: SegmentConfig | None = None) -> list[str]:
    """Split a document into normalised, non-empty sentences shorter than `max_sentence_chars`."""
    import blingfire

    if not isinstance(text, str):
        raise TypeError(f"split_sentences: text must be str, got {type(text).__name__}")
    if config is None:
        config = SegmentConfig(max_sentence_chars=max_sentence_chars, newline_is_boundary=newline_is_boundary)
    blocks = text.split("\n") if config.newline_is_boundary else _PARA.split(text)
    out: list[str] = []
    for block in blocks:
        block = _normalise(block)
        if not block:
            continue
        for sent in blingfire.text_to_sentences(block).split("\n"):
            sent = _normalise(sent)
            if not sent:
                continue
            if len(sent) >= config.max_sentence_chars:
                out.extend(resplit_long(sent, config.max_sentence_chars))
            else:
                out.append(sent)
    return out
