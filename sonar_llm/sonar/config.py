"""Configurations of the SONAR text encoder and decoder, with named presets.

Presets:
- ``basic``: the released SONAR text models (24 layers, d=1024, 16 heads, FFN 8192, vocabulary 256,206;
  encoder position table of 514 rows, decoder of 512).
- ``toy``: a very small model for unit tests.
- ``tiny``: the embedded default model (d=128, 2 layers, 4 heads, FFN 512); its vocabulary size comes
  from its own SentencePiece model, so pass ``vocab_size=...``.

Token-id conventions (fairseq2 layout): pad 0, unk 1, bos 2, eos 3. The released checkpoints declare a
model pad index of 1; that legacy value only sets the sinusoid offset (steps start at pad+1 = 2), which
is ``pos_start_step`` here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

__all__ = [
    "SonarEncoderConfig",
    "SonarDecoderConfig",
    "encoder_preset",
    "decoder_preset",
    "PRESET_NAMES",
    "SONAR_VOCAB_SIZE",
    "SONAR_LANG_OFFSET",
]

SONAR_VOCAB_SIZE = 256_206
SONAR_LANG_OFFSET = 256_001
PRESET_NAMES = ("basic", "toy", "tiny")

_C = TypeVar("_C", bound="_SonarConfigBase")


@dataclass
class _SonarConfigBase:
    model_dim: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    ffn_dim: int = 8192
    vocab_size: int = SONAR_VOCAB_SIZE
    max_seq_len: int = 512  # number of rows of the sinusoid table = longest input (prompt included)
    pad_idx: int = 0
    unk_idx: int = 1
    bos_idx: int = 2
    eos_idx: int = 3
    pos_start_step: int = 2  # fairseq legacy: sinusoid steps start at model pad (1) + 1
    dropout_p: float = 0.1
    layer_norm_eps: float = 1e-5
    lang_offset: int = SONAR_LANG_OFFSET  # id of the first language tag (informative; the tokenizer decides)

    _PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}

    def __post_init__(self) -> None:
        for name in ("model_dim", "num_layers", "num_heads", "ffn_dim", "vocab_size", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{type(self).__name__}.{name} must be a positive int, got {value!r}")
        if self.model_dim % self.num_heads != 0:
            raise ValueError(
                f"{type(self).__name__}: model_dim ({self.model_dim}) must be divisible by "
                f"num_heads ({self.num_heads})"
            )
        if self.model_dim % 2 != 0:
            raise ValueError(f"{type(self).__name__}: model_dim must be even for sinusoids, got {self.model_dim}")
        if not 0.0 <= self.dropout_p < 1.0:
            raise ValueError(f"{type(self).__name__}.dropout_p must be in [0, 1), got {self.dropout_p}")
        if self.layer_norm_eps <= 0:
            raise ValueError(f"{type(self).__name__}.layer_norm_eps must be > 0, got {self.layer_norm_eps}")
        for name in ("pad_idx", "unk_idx", "bos_idx", "eos_idx"):
            value = getattr(self, name)
            if not 0 <= value < self.vocab_size:
                raise ValueError(
                    f"{type(self).__name__}.{name}={value} is outside the vocabulary [0, {self.vocab_size})"
                )
        if self.pos_start_step < 0:
            raise ValueError(f"{type(self).__name__}.pos_start_step must be >= 0, got {self.pos_start_step}")

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    @classmethod
    def from_preset(cls: type[_C], name: str, **overrides: Any) -> _C:
        """Build the preset ``name`` (one of ``basic``, ``toy``, ``tiny``) with field ``overrides``."""
        if name not in cls._PRESETS:
            raise ValueError(f"unknown {cls.__name__} preset {name!r}; known: {sorted(cls._PRESETS)}")
        fields = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(overrides) - fields)
        if bad:
            raise TypeError(f"unknown {cls.__name__} field(s) {bad}; known: {sorted(fields)}")
        return cls(**{**cls._PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class SonarEncoderConfig(_SonarConfigBase):
    """Text encoder configuration. ``max_seq_len`` = 514 for the released model (512 + legacy pad + 1)."""

    max_seq_len: int = 514
    pooling: str = "mean"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pooling != "mean":
            raise ValueError(f"SonarEncoderConfig.pooling must be 'mean', got {self.pooling!r}")


@dataclass
class SonarDecoderConfig(_SonarConfigBase):
    """Text decoder configuration. ``encoder_dim`` is the size of the sentence embedding it reads."""

    max_seq_len: int = 512
    encoder_dim: int | None = None  # None -> model_dim
    trained_target_len: int | None = None
    """Longest target the decoder was trained on: tokens after the ``[</s>, lang]`` prompt, final ``</s>``
    included (the tiny SONAR records it; None = unknown, e.g. the released models). The decoding length guard
    (``GenerationConfig.length_guard``) caps a sentence relative to it."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.encoder_dim is None:
            self.encoder_dim = self.model_dim
        if self.trained_target_len is not None and (
                not isinstance(self.trained_target_len, int) or isinstance(self.trained_target_len, bool)
                or self.trained_target_len < 1):
            raise ValueError(f"SonarDecoderConfig.trained_target_len must be a positive int or None, "
                             f"got {self.trained_target_len!r}")
        if self.encoder_dim <= 0:
            raise ValueError(f"SonarDecoderConfig.encoder_dim must be positive, got {self.encoder_dim}")


_BASIC: dict[str, Any] = dict(
    model_dim=1024, num_layers=24, num_heads=16, ffn_dim=8192, vocab_size=SONAR_VOCAB_SIZE,
    lang_offset=SONAR_LANG_OFFSET,
)
_TOY: dict[str, Any] = dict(
    model_dim=32, num_layers=2, num_heads=4, ffn_dim=64, vocab_size=96, lang_offset=80, dropout_p=0.0,
)
_TINY: dict[str, Any] = dict(
    model_dim=128, num_layers=2, num_heads=4, ffn_dim=512, vocab_size=2206, lang_offset=2206 - 205,
)

SonarEncoderConfig._PRESETS = {
    "basic": {**_BASIC, "max_seq_len": 514},
    "toy": {**_TOY, "max_seq_len": 66},
    "tiny": {**_TINY, "max_seq_len": 514},
}
SonarDecoderConfig._PRESETS = {
    "basic": {**_BASIC, "max_seq_len": 512},
    "toy": {**_TOY, "max_seq_len": 64},
    "tiny": {**_TINY, "max_seq_len": 512},
}


def encoder_preset(name: str, **overrides: Any) -> SonarEncoderConfig:
    """Shortcut for ``SonarEncoderConfig.from_preset(name, **overrides)``."""
    return SonarEncoderConfig.from_preset(name, **overrides)


def decoder_preset(name: str, **overrides: Any) -> SonarDecoderConfig:
    """Shortcut for ``SonarDecoderConfig.from_preset(name, **overrides)``."""
    return SonarDecoderConfig.from_preset(name, **overrides)
