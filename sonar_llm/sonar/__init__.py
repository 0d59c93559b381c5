"""SONAR text encoder/decoder in plain PyTorch (no fairseq2): configs, models, tokenizer, checkpoints,
generation and pipelines."""
from .config import (
    PRESET_NAMES,
    SONAR_LANG_OFFSET,
    SONAR_VOCAB_SIZE,
    SonarDecoderConfig,
    SonarEncoderConfig,
    decoder_preset,
    encoder_preset,
)
from .decoder import DecoderState, SonarTextDecoder
from .encoder import SonarTextEncoder
from .layers import FeedForward, KVCache, MultiheadAttention, SinusoidalPositions, sinusoid_table
