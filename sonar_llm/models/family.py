"""The model-family spec and registry (the ONLY place that names the families), and shared batch helpers.

A family is a `ConceptFamily` (an `nn.Module`) plus a `FamilySpec` that says, in the spirit of
torchtitan's TrainSpec, everything the trainer, the evaluator and the benchmarks need, so that none of
them ever compares a family name:
  * `build(cfg: ModelConfig, **deps) -> model`      how it is built from a model config (models/build.py)
  * `model.loss(batch) -> (loss, metrics)`         its loss (`spec.loss(model, batch)`)
  * `model.flops_per_batch(batch) -> float`        its FLOP count, forward + backward (`spec.flops`)
  * `model.transformer_blocks() -> [nn.Module]`    what FSDP2 shards and activation checkpointing wraps
  * `model.apply_activation_checkpointing(mode)`   the one checkpointing knob (blocks, + frozen decoder)
  * `generate(model, prompts, settings)`           its concept-level generation (models/generate.py),
                                                   None for a model without sentence embeddings
  * `story_generator(model, ctx)`                  text-in/text-out generation for the evaluation protocol
                                                   (models/stories.py)
  * `eos_threshold`, `token_nll`                   what its evaluation reports: the default cosine stop
                                                   of the end-of-document rule; the per-batch token NLL
                                                   function (None: no token distribution, no NLL); the
                                                   round-trip metrics exist iff `generate` is not None
  * `trained_overrides(state) -> dict`             config values a trained state dict implies (the
                                                   SONAR width, the vocabulary size)
  * `needs_decoder`, `title`, `loss_name`          takes the frozen SONAR decoder; names for reports
`FAMILIES` maps a name to the import path of its spec (imported on first use). Adding a family: write one
module (a ConceptFamily subclass + `SPEC = FamilySpec(...)`), add one line to `FAMILIES`.

Helpers shared by the concept families: `next_sentence_pairs` (which rows predict which),
`select_segments` and `causal_attention_flops`.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

__all__ = [
    "ConceptFamily",
    "FamilySpec",
    "FAMILIES",
    "get_family",
    "family_class",
    "build_family",
    "no_trained_overrides",
    "next_sentence_pairs",
    "causal_attention_flops",
    "select_segments",
]

FAMILIES: dict[str, str] = {
    "sonar_llm": "sonar_llm.models.sonar_llm:SPEC",
    "base_lcm": "sonar_llm.models.base_lcm:SPEC",
    "two_tower": "sonar_llm.models.two_tower:SPEC",
    "token_llm": "sonar_llm.models.token_llm:SPEC",
}


def no_trained_overrides(state: dict[str, Tensor]) -> dict[str, Any]:
    """A family whose config needs nothing from its trained weights."""
    return {}


@dataclass(frozen=True)
class FamilySpec:
    """What one model family declares (see the module docstring for each field's contract)."""

    model_cls: type[nn.Module]  # the ConceptFamily subclass; `model_cls(cfg, **deps)` builds from its own config
    build: Callable[..., nn.Module]  # build(cfg: ModelConfig, **deps) -> model (fp32)
    story_generator: Callable[..., Callable[[list[list[str]]], list[list[str]]]]  # (model, StoryContext)
    generate: Callable[..., list] | None = None  # (model, prompts: list[Tensor[n_i, E]], GenerationSettings)
    eos_threshold: float = 0.9  # default cosine threshold of the end-of-document stop
    token_nll: Callable[..., tuple[float, int]] | None = None  # (model, ConceptBatch, context_sentences)
    trained_overrides: Callable[[dict[str, Tensor]], dict[str, Any]] = no_trained_overrides
    needs_decoder: bool = False  # build(cfg, decoder=...) takes the frozen SONAR decoder (else reads the config's)
    title: str = ""  # display name (reports, plots)
    loss_name: str = ""  # what its training loss measures (reports)

    @property
    def concept_level(self) -> bool:
        """Whether the family generates sentence embeddings (and so reports the round-trip metrics)."""
        return self.generate is not None

    @staticmethod
    def loss(model: nn.Module, batch) -> tuple[Tensor, dict[str, Any]]:
        """The family's training loss on `batch` (its `loss` method)."""
        return model.loss(batch)

    @staticmethod
    def flops(model: nn.Module, batch) -> float:
        """Forward + backward FLOPs of one training step on `batch` (its `flops_per_batch` method)."""
        return float(model.flops_per_batch(batch))


def get_family(name: str) -> FamilySpec:
    """The spec registered under `name` (its module is imported on first use)."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; choose one of {sorted(FAMILIES)}")
    module_name, _, attr = FAMILIES[name].partition(":")
    module = importlib.import_module(module_name)
    try:
        spec = getattr(module, attr)
    except AttributeError as err:
        raise ImportError(f"{module_name} does not define {attr} (registry entry {name!r})") from err
    if not isinstance(spec, FamilySpec):
        raise TypeError(f"{module_name}.{attr} is a {type(spec).__name__}, not a FamilySpec (registry entry {name!r})")
    return spec


def family_class(name: str) -> type[nn.Module]:
    """The model class registered under `name` (imported on first use)."""
    return get_family(name).model_cls


def build_family(name: str, cfg: Any, **deps: Any) -> nn.Module:
    """Construct family `name` from its own config as `cls(cfg, **deps)`, e.g.
    `build_family("sonar_llm", cfg, decoder=dec)`, `build_family("token_llm", cfg, vocab_size=V)`."""
    return family_class(name)(cfg, **deps)


class ConceptFamily(nn.Module):
    """Base class of the families: holds `backbone` (a `Backbone`) and the default helpers."""

    backbone: nn.Module

    def loss(self, batch) -> tuple[Tensor, dict[str, Any]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def flops_per_batch(self, batch) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def transformer_blocks(self) -> list[nn.Module]:
        """The backbone's layers, in order."""
        return list(self.backbone.layers)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the optimizer should update (requires_grad True)."""
        return [p for p in self.parameters() if p.requires_grad]

    def apply_activation_checkpointing(self, mode: str) -> None:
        """The one activation-checkpointing knob (`train.activation_checkpointing`: none | selective | full):
        recompute the chosen transformer blocks in the backward pass (sonar_llm.activation_checkpointing)."""
        from sonar_llm.activation_checkpointing import apply_activation_checkpointing

        apply_activation_checkpointing(self.transformer_blocks(), mode)

    def decoder_to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        """Move/cast frozen modules kept outside the module tree (none by default; SONAR-LLM's decoder)."""

    def num_parameters(self, trainable_only: bool = True) -> int:
        params = self.trainable_parameters() if trainable_only else list(self.parameters())
        return sum(p.numel() for p in params)


def next_sentence_pairs(doc_cu_seqlens: Tensor, num_sentences: int) -> tuple[Tensor, Tensor]:
    """Row indices (pred_rows, target_rows) of next-sentence prediction in packed documents:
    the hidden state of sentence k-1 predicts sentence k, for k >= 1 inside each document.

    Both are sorted int64 tensors of length S - (number of non-empty documents); pred_rows[i] + 1 ==
    target_rows[i]."""
    if doc_cu_seqlens.dim() != 1 or doc_cu_seqlens.numel() < 1:
        raise ValueError(f"doc_cu_seqlens must be 1-D [D+1], got shape {tuple(doc_cu_seqlens.shape)}")
    cu = doc_cu_seqlens.to(torch.int64)
    device = cu.device
    is_first = torch.zeros(num_sentences + 1, dtype=torch.bool, device=device)
    is_first[cu[:-1]] = True  # empty documents mark the next start (or the sentinel) again: harmless
    rows = torch.arange(num_sentences, device=device)
    targets = rows[~is_first[:num_sentences]]
    return targets - 1, targets


def select_segments(values: Tensor, cu_seqlens: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    """Gather segments `index` of a packed tensor: values[T, ...] with boundaries cu_seqlens[S+1] ->
    (packed values of the chosen segments in `index` order, their int32 cu_seqlens)."""
    cu = cu_seqlens.to(torch.int64)
    index = index.to(device=cu.device, dtype=torch.int64)
    lengths = (cu[1:] - cu[:-1]).index_select(0, index)
    new_cu = torch.zeros(index.numel() + 1, dtype=torch.int64, device=cu.device)
    torch.cumsum(lengths, 0, out=new_cu[1:])
    total = int(new_cu[-1])
    starts = torch.repeat_interleave(cu[:-1].index_select(0, index) - new_cu[:-1], lengths, output_size=total)
    gather = torch.arange(total, device=cu.device) + starts
    return values.index_select(0, gather), new_cu.to(torch.int32)


def causal_attention_flops(cu_seqlens: Tensor, num_layers: int, num_heads: int, head_dim: int) -> float:
    """Forward FLOPs of causal self-attention scores and mixing (QK^T and AV) over packed segments:
    2 matmuls x 2 FLOPs x heads x head_dim x sum_segments L(L+1)/2, per layer."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.float64)
    pairs = float((lengths * (lengths + 1) / 2).sum())
    return 4.0 * num_layers * num_heads * head_dim * pairs
