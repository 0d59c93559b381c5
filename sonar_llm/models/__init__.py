"""Concept models on one backbone: SONAR-LLM, Base-LCM, Two-Tower LCM, and the token LLM baseline.

`backbone` (shared Transformer), `presets` (named sizes), `normalizer` (SONAR normalizer), the family
modules (`sonar_llm`, `base_lcm`, `two_tower` + `diffusion`, `token_llm`, each ending in its `SPEC`),
`family` (ConceptFamily, FamilySpec and the registry: the only place naming the families), `build`
(model config -> model; trained weights -> model), `generate` / `generate_two_tower` (concept-level
generation loops), `stories` (text-level generation for evaluation) and `token_nll` (per-batch token NLL).
"""
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
from .base_lcm import BaseLCM, BaseLCMConfig
from .family import FAMILIES, ConceptFamily, FamilySpec, build_family, family_class, get_family
from .generate import (
    ConceptGeneration,
    GenerationSettings,
    generate_base_lcm,
    generate_sonar_llm,
    generate_sonar_llm_reference,
    generate_token_llm,
    sonar_text_functions,
)
from .normalizer import SonarNormalizer
from .sonar_llm import SonarLLM, SonarLLMConfig
from .token_llm import TokenLLM, TokenLLMConfig

__all__ = [
    "Attention",
    "Backbone",
    "BackboneConfig",
    "BaseLCM",
    "BaseLCMConfig",
    "ConceptFamily",
    "ConceptGeneration",
    "FAMILIES",
    "FamilySpec",
    "GenerationSettings",
    "KVCache",
    "PRESETS",
    "RMSNorm",
    "RotaryEmbedding",
    "SonarLLM",
    "SonarLLMConfig",
    "SonarNormalizer",
    "SwiGLU",
    "TokenLLM",
    "TokenLLMConfig",
    "TransformerLayer",
    "backbone_config",
    "build_family",
    "count_parameters",
    "family_class",
    "generate_base_lcm",
    "generate_sonar_llm",
    "generate_sonar_llm_reference",
    "generate_token_llm",
    "get_family",
    "sonar_text_functions",
]


def __getattr__(name):
    # presets are imported on first use, so that `python -m sonar_llm.models.presets` runs cleanly
    if name in ("PRESETS", "backbone_config", "count_parameters"):
        from . import presets

        return getattr(presets, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
