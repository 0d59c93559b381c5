"""Turn `[model]` (+ `[sonar]`, `[data]`) of a run config into a model-family instance.

The trainer's side of `sonar_llm.models.build`: it passes its RunConfig's sections as a library
`ModelConfig`; what each family does with them (presets, overrides, the frozen SONAR decoder, normalizer
fitting) is in the family's module (see `sonar_llm.models.family` for the registry and the spec).
A resumed run then overwrites fitted normalizers with the checkpoint's buffers.
"""
from __future__ import annotations

from torch import nn

from sonar_llm.models.build import ModelConfig
from sonar_llm.models.build import build_model as build_library_model
from sonar_train.config import RunConfig


def model_config(cfg: RunConfig) -> ModelConfig:
    """The library's model config of a run: its `[model]`, `[sonar]` and `[data]` sections."""
    return ModelConfig.from_sections(cfg.model, cfg.sonar, cfg.data)


def build_model(cfg: RunConfig) -> nn.Module:
    """The family instance for `cfg` (fp32, on the CPU; the trainer moves and shards it)."""
    return build_library_model(model_config(cfg))
