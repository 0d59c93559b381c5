"""The common interface of the model families, their registry, and shared batch helpers.

Every family (SONAR-LLM, Base-LCM, Two-Tower LCM, token LLM) is an `nn.Module` with
  * `loss(batch: ConceptBatch) -> (loss scalar, metrics dict)`
  * `flops_per_batch(batch) -> float` (forward + backward FLOPs of one training step on `batch`)
  * `transformer_blocks() -> list[nn.Module]` (what FSDP2 shards one by one)
`ConceptFamily` provides the defaults (`transformer_blocks` = the backbone's layers,
`trainable_parameters`). `build_family(name, cfg, **deps)` constructs a family by registry name;
the registry holds import paths, so a family is imported only when used.

Helpers shared by the concept families: `next_sentence_pairs` (which rows predict which) and
`causal_attention_flops`.
"""
from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "ConceptFamily",
    "FAMILIES",
    "family_class",
    "build_family",
    "next_sentence_pairs",
    "causal_attention_flops",
    "select_segments",
]

FAMILIES: dict[str, str] = {
    "sonar_llm": "sonar_llm.models.sonar_llm:SonarLLM",
    "base_lcm": "sonar_llm.models.base_lcm:BaseLCM",
    "two_tower": "sonar_llm.models.two_tower:TwoTowerLCM",
    "token_llm": "sonar_llm.models.token_llm:TokenLLM",
}


def family_class(name: str) -> type[nn.Module]:
    """The class registered under `name` (imported on first use)."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; choose one of {sorted(FAMILIES)}")
    module_name, _, attr = FAMILIES[name].partition(":")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, attr)
    except AttributeError as err:
        raise ImportError(f"{module_name} does not define {attr} (registry entry {name!r})") from err


def build_family(name: str, cfg: Any, **deps: Any) -> nn.Module:
    """Construct family `name` as `cls(cfg, **deps)`, e.g. `build_family("sonar_llm", cfg, decoder=dec)`,
    `build_family("token_llm", cfg, vocab_size=V)`."""
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
