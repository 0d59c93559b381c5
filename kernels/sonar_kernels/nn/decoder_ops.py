"""nn.Module wrappers for the SONAR decoder fast-path ops.

- `AddLayerNorm(dim, eps)`: LayerNorm with weight/bias that also takes a residual and returns
  `(normed, summed)` (fused add + LayerNorm).
- `CrossAttentionConstants`: the frozen, stacked folded cross-attention weights (buffers, not
  parameters) of L decoder layers; `forward(emb[B,E]) -> [B, L, D]`.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..functional.add_layer_norm import add_layer_norm
from ..functional.cross_attention_constants import cross_attention_constants, fold_cross_attention, stack_folded


class AddLayerNorm(nn.Module):
    """`forward(x, residual=None) -> (LayerNorm(x + residual), x + residual)` over the last dim."""

    def __init__(self, dim: int, eps: float = 1e-5, *, impl: str = "auto", device=None, dtype=None) -> None:
        super().__init__()
        if not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if eps <= 0:
            raise ValueError(f"eps must be positive, got {eps}")
        self.dim, self.eps, self.impl = dim, float(eps), impl
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(dim, device=device, dtype=dtype))

    def forward(self, x: Tensor, residual: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return add_layer_norm(x, residual, self.weight, self.bias, self.eps, impl=self.impl)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, impl={self.impl!r}"


class CrossAttentionConstants(nn.Module):
    """Frozen stacked folded cross-attention weights: `weight [L*D, E]`, `bias [L*D]` (non-persistent
    buffers, rebuilt from the decoder's weights rather than checkpointed)."""

    weight: Tensor
    bias: Tensor

    def __init__(self, weight: Tensor, bias: Tensor, num_layers: int) -> None:
        super().__init__()
        if weight.dim() != 2 or bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
            raise ValueError(
                f"weight must be [L*D, E] and bias [L*D], got {tuple(weight.shape)} and {tuple(bias.shape)}"
            )
        if num_layers <= 0 or weight.shape[0] % num_layers != 0:
            raise ValueError(f"num_layers={num_layers} must divide weight rows {weight.shape[0]}")
        self.num_layers = num_layers
        self.register_buffer("weight", weight.detach().clone(), persistent=False)
        self.register_buffer("bias", bias.detach().clone(), persistent=False)

    @classmethod
    def from_projections(cls, pairs: Sequence[tuple[nn.Linear, nn.Linear]]) -> "CrossAttentionConstants":
        """Build from per-layer `(v_proj, output_proj)` Linear pairs (folded in float64)."""
        folded = [fold_cross_attention(v.weight, v.bias, o.weight, o.bias) for v, o in pairs]
        weight, bias = stack_folded(folded)
        return cls(weight, bias, len(folded))

    @property
    def model_dim(self) -> int:
        return self.weight.shape[0] // self.num_layers

    def forward(self, emb: Tensor) -> Tensor:
        return cross_attention_constants(emb, self.weight, self.bias, self.num_layers)

    def extra_repr(self) -> str:
        return f"num_layers={self.num_layers}, model_dim={self.model_dim}, emb_dim={self.weight.shape[1]}"
