"""Concept models on one backbone: SONAR-LLM, Base-LCM, Two-Tower LCM, and the token LLM baseline."""
from .backbone import (
    Attention,
    Backbone,
    BackboneConfig,
    KVCache,
    RMSNorm,
    RotaryEmbedding,
    SwiGLU,
    TransformerLayer,
)

__all__ = [
    "Attention",
    "Backbone",
    "BackboneConfig",
    "KVCache",
    "RMSNorm",
    "RotaryEmbedding",
    "SwiGLU",
    "TransformerLayer",
]
