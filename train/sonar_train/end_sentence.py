"""Before training: can the SONAR of this run decode the training data's end-of-document sentence?

A concept model learns to predict the end sentence's embedding where a document ends, and generation stops
when the decoded prediction is that sentence; if the SONAR decoder turns the stored end embedding into some
other text, no model trained on the data can ever stop by itself. `warn_if_end_sentence_lost` decodes the
embedding stored beside the training shards with the run's SONAR decoder (the family's frozen one, else
`[sonar] decoder` when set) and warns, naming the sentence and what it became, when the text does not come
back exactly (`sonar_llm.sonar.round_trip`). Without a decoder or a tokenizer there is nothing to check.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from torch import nn

from sonar_train.config import RunConfig

__all__ = ["warn_if_end_sentence_lost"]


def _decoder(model: nn.Module, cfg: RunConfig):
    try:
        return model.sonar_decoder  # SONAR-LLM's frozen decoder (the one its loss reads)
    except (AttributeError, ValueError):
        pass
    if cfg.sonar.decoder:
        from sonar_llm.sonar.checkpoint import load_sonar_decoder

        return load_sonar_decoder(cfg.sonar.decoder)
    return None


def warn_if_end_sentence_lost(model: nn.Module, cfg: RunConfig, warn: Callable[[str], None] | None = None, *,
                              tokenizer=None) -> str | None:
    """The warning (also passed to `warn`, default: stderr) when the end sentence does not round-trip; None when it
    does or cannot be checked (no manifest at `data.path`, no decoder, no tokenizer). `tokenizer`: an
    `NllbTokenizer` (default: `[sonar] tokenizer`, else the registry's)."""
    from sonar_llm.data.shards import ShardedDataset
    from sonar_llm.sonar.registry import resolve_asset
    from sonar_llm.sonar.round_trip import round_trip, sonar_decode_fn
    from sonar_llm.sonar.tokenizer import NllbTokenizer

    if not cfg.data.path or not (Path(cfg.data.path) / "manifest.json").is_file():
        return None
    decoder = _decoder(model, cfg)
    if decoder is None:
        return None
    if tokenizer is None:
        try:
            tokenizer = NllbTokenizer(resolve_asset("tokenizer", cfg.sonar.tokenizer or None))
        except FileNotFoundError:
            return None
    data = ShardedDataset(cfg.data.path)
    if not data.embed_dim or not data.end_of_doc_text:  # whole-document token streams: no end sentence to check
        return None
    result = round_trip(data.end_of_doc_text, sonar_decode_fn(decoder, tokenizer, cfg.sonar.lang),
                        embedding=data.end_of_doc_embedding().float())
    if result.exact:
        return None
    message = f"warning: {result.message(f'the end-of-document sentence of {cfg.data.path}')}"
    (warn or (lambda m: print(m, file=sys.stderr, flush=True)))(message)
    return message
