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
from .layers import FeedForward, LayerKVCache, MultiheadAttention, SinusoidalPositions, sinusoid_table
from .checkpoint import (
    convert_from_safetensors,
    convert_to_safetensors,
    infer_config,
    load_sonar_decoder,
    load_sonar_encoder,
    load_state_dict_file,
    save_fairseq2_checkpoint,
)
from .generation import (
    PROMPT_LEN,
    GenerationConfig,
    Hypothesis,
    beam_search,
    decode_hypotheses,
    generate,
    greedy_decode,
    greedy_reads,
    make_generator,
    sample_hypotheses,
)
from .pipeline import EmbeddingToText, TextToEmbedding
from .registry import resolve_asset, resolve_assets
from .tokenizer import SONAR_LANGS, NllbTokenizer

__all__ = [
    "PRESET_NAMES", "SONAR_LANG_OFFSET", "SONAR_VOCAB_SIZE", "SonarDecoderConfig", "SonarEncoderConfig",
    "decoder_preset", "encoder_preset", "DecoderState", "SonarTextDecoder", "SonarTextEncoder",
    "FeedForward", "LayerKVCache", "MultiheadAttention", "SinusoidalPositions", "sinusoid_table",
    "convert_from_safetensors", "convert_to_safetensors", "infer_config", "load_sonar_decoder",
    "load_sonar_encoder", "load_state_dict_file", "save_fairseq2_checkpoint", "GenerationConfig",
    "Hypothesis", "beam_search", "generate", "greedy_decode", "greedy_reads", "decode_hypotheses", "sample_hypotheses",
    "make_generator",
    "PROMPT_LEN", "EmbeddingToText", "TextToEmbedding",
    "resolve_asset", "resolve_assets", "SONAR_LANGS", "NllbTokenizer",
]
