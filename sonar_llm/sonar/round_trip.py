"""Does a sentence survive SONAR? Encode it (or take its stored embedding), decode greedily, compare the text.

A concept model stops a document when its re-encoded prediction matches the end-of-document sentence
(cosine >= 0.98 with its embedding): that can only happen if the SONAR decoder turns the end sentence's
embedding back into that very sentence. This module is the one place that checks it; the callers decide
what a failure means:

- the embedded default pipeline stops before training SONAR-LLM (:func:`require_round_trip`, one line naming
  the sentence and what it decoded to);
- preprocess and training, for any SONAR and corpus, warn and carry on (:func:`round_trip` +
  :meth:`RoundTrip.message`).

"Round-trips" means the decoded text equals the sentence exactly (surrounding white space ignored).
Decoding is greedy with SONAR's own length rule, capped by the decoder's length guard when it records the
longest target it was trained on (``sonar_llm.sonar.generation``).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["END_OF_DOC_TEXT", "RoundTrip", "RoundTripError", "round_trip", "require_round_trip",
           "sonar_decode_fn"]

END_OF_DOC_TEXT = "End of sequence."  # the public SONAR-LLM code's end-of-document sentence

DecodeFn = Callable[[Tensor], list[str]]
EncodeFn = Callable[[list[str]], Tensor]


@dataclass(frozen=True)
class RoundTrip:
    """The outcome for one sentence."""

    text: str
    """The sentence checked."""
    decoded: str
    """What the SONAR decoder made of its embedding."""

    @property
    def exact(self) -> bool:
        """The decoded text is the sentence (surrounding white space ignored)."""
        return self.decoded.strip() == self.text.strip()

    def message(self, what: str = "the end-of-document sentence") -> str:
        """One line: ``what`` 'TEXT' does not round-trip through this SONAR (it decodes to 'DECODED') ..."""
        shown = self.decoded if len(self.decoded) <= 200 else self.decoded[:200] + "..."
        return (f"{what} {self.text!r} does not round-trip through this SONAR: it decodes to {shown!r}, so "
                "generation can never stop on it")


class RoundTripError(ValueError):
    """A sentence that must round-trip does not (the message names it and what it decoded to)."""

    def __init__(self, result: RoundTrip, what: str = "the end-of-document sentence") -> None:
        super().__init__(result.message(what))
        self.result = result


def round_trip(text: str, decode: DecodeFn, *, encode: EncodeFn | None = None,
               embedding: Tensor | None = None) -> RoundTrip:
    """Decode ``embedding`` (``[E]``), or ``encode([text])`` when no embedding is given, and compare."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"the sentence to round-trip must be a non-empty string, got {text!r}")
    if embedding is None:
        if encode is None:
            raise ValueError("round_trip needs encode or the sentence's embedding")
        embedding = encode([text])
    emb = embedding.detach().reshape(1, -1) if isinstance(embedding, Tensor) else None
    if emb is None:
        raise TypeError(f"embedding must be a tensor, got {type(embedding).__name__}")
    decoded = list(decode(emb))
    if len(decoded) != 1 or not isinstance(decoded[0], str):
        raise ValueError(f"decode returned {decoded!r} for one embedding; expected one text")
    return RoundTrip(text, decoded[0])


def require_round_trip(text: str, decode: DecodeFn, *, encode: EncodeFn | None = None,
                       embedding: Tensor | None = None, what: str = "the end-of-document sentence") -> RoundTrip:
    """:func:`round_trip`, raising :class:`RoundTripError` when the text does not come back exactly."""
    result = round_trip(text, decode, encode=encode, embedding=embedding)
    if not result.exact:
        raise RoundTripError(result, what)
    return result


def sonar_decode_fn(decoder, tokenizer, lang: str = "eng_Latn") -> DecodeFn:
    """Greedy decoding with a ``SonarTextDecoder`` and an ``NllbTokenizer`` (the check's decoder)."""
    from .generation import GenerationConfig, generate

    cfg = GenerationConfig(beam_size=1)
    lang_id = tokenizer.lang_id(lang)

    def decode(embeddings: Tensor) -> list[str]:
        w = decoder.decoder_frontend.embed.weight
        with torch.inference_mode():
            ids = generate(decoder, embeddings.to(device=w.device, dtype=w.dtype), lang_id, cfg=cfg)
        return tokenizer.decode(ids)

    return decode
