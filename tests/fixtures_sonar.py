"""Test helpers for SONAR models: tiny random encoders/decoders and a tiny SentencePiece tokenizer.

Reusable by any test: ``from fixtures_sonar import toy_decoder, toy_tokenizer, ...`` (the tests folder is
on ``sys.path`` under pytest).
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import torch

from sonar_llm.sonar import (
    NllbTokenizer,
    SonarDecoderConfig,
    SonarEncoderConfig,
    SonarTextDecoder,
    SonarTextEncoder,
    decoder_preset,
    encoder_preset,
)

TOY_LANGS = ("deu_Latn", "eng_Latn", "fra_Latn")

_WORDS = (
    "the a small big red blue green old young happy sad cat dog bird fish tree house river road city "
    "sun moon star rain snow wind morning evening night day week year friend teacher child mother "
    "father walks runs sees finds likes wants builds reads writes sings plays sleeps eats drinks "
    "quickly slowly often never always under over near behind with without because when while "
    "Paul Marie London Paris garden kitchen window letter story song music paper water bread"
).split()


def corpus_lines(n: int = 400, seed: int = 0) -> list[str]:
    """Deterministic pseudo-sentences (a few KB) for training a tiny SentencePiece model."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 12))]
        lines.append(" ".join(words).capitalize() + rng.choice([".", "!", "?", ","]))
    return lines


def make_spm_model(directory: str | os.PathLike, vocab_size: int = 200, model_type: str = "bpe",
                   seed: int = 0) -> Path:
    """Train a tiny SentencePiece model (raw ids <unk>=0, <s>=1, </s>=2) and return the .model path."""
    import sentencepiece as spm

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    text = directory / "corpus.txt"
    text.write_text("\n".join(corpus_lines(seed=seed)) + "\n", encoding="utf-8")
    prefix = directory / f"toy_{model_type}_{vocab_size}"
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(prefix), vocab_size=vocab_size, model_type=model_type,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1,
        minloglevel=2, hard_vocab_limit=False,
    )
    return prefix.with_suffix(".model")


def toy_tokenizer(directory: str | os.PathLike, vocab_size: int = 200,
                  langs: tuple[str, ...] = TOY_LANGS) -> NllbTokenizer:
    """NllbTokenizer over a freshly trained tiny SentencePiece model with a few languages."""
    return NllbTokenizer(make_spm_model(directory, vocab_size), langs=langs)


def _randomize(model: torch.nn.Module, seed: int, std: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layer_norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(std * torch.randn(p.shape, generator=gen))


def toy_encoder(seed: int = 0, std: float = 0.2, dtype: torch.dtype = torch.float32,
                **overrides) -> SonarTextEncoder:
    """A randomly initialised ``toy`` encoder in eval mode (overrides go to the config)."""
    cfg: SonarEncoderConfig = encoder_preset("toy", **overrides)
    model = SonarTextEncoder(cfg)
    _randomize(model, seed, std)
    return model.to(dtype).eval()


def toy_decoder(seed: int = 0, std: float = 0.2, dtype: torch.dtype = torch.float32,
                **overrides) -> SonarTextDecoder:
    """A randomly initialised ``toy`` decoder in eval mode (tied projection kept)."""
    cfg: SonarDecoderConfig = decoder_preset("toy", **overrides)
    model = SonarTextDecoder(cfg)
    _randomize(model, seed, std)
    return model.to(dtype).eval()
