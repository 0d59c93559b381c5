"""User-facing functions for folded single-key cross-attention (SONAR decoder fast path).

`fold_cross_attention` folds one layer's value and output projections; `stack_folded` stacks the folded
layers into one `[L*D, E]` matrix; `cross_attention_constants` evaluates every layer's constant for a
batch of sentence embeddings with a single GEMM. Gradients flow to `emb`; the weights are frozen
(autograd does no weight-gradient work unless the caller makes them require grad).
`cross_attention_constants` runs the custom op `sonar_kernels::cross_attention_constants` (ops/); the folding
helpers run once at setup, on weights, outside any training graph.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..ops.cross_attention_constants import cross_attention_constants_op
from ..torch_ops.cross_attention_constants import fold_cross_attention_torch


def fold_cross_attention(
    v_weight: Tensor, v_bias: Tensor | None, o_weight: Tensor, o_bias: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Fold `o_proj(v_proj(e))` into `(W[D,E], b[D])`: `W = o_weight @ v_weight`, `b = o_weight @ v_bias + o_bias`.

    Shapes: `v_weight [Dv, E]`, `v_bias [Dv]`, `o_weight [D, Dv]`, `o_bias [D]`. Computed in float64 and cast
    back to `v_weight.dtype`; the result carries no autograd history.
    """
    for name, t in (("v_weight", v_weight), ("o_weight", o_weight)):
        if not isinstance(t, Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor, got {getattr(t, 'shape', type(t))}")
    if o_weight.shape[1] != v_weight.shape[0]:
        raise ValueError(
            f"o_weight.shape[1] ({o_weight.shape[1]}) must equal v_weight.shape[0] ({v_weight.shape[0]})"
        )
    if v_bias is not None and tuple(v_bias.shape) != (v_weight.shape[0],):
        raise ValueError(f"v_bias must have shape ({v_weight.shape[0]},), got {tuple(v_bias.shape)}")
    if o_bias is not None and tuple(o_bias.shape) != (o_weight.shape[0],):
        raise ValueError(f"o_bias must have shape ({o_weight.shape[0]},), got {tuple(o_bias.shape)}")
    return fold_cross_attention_torch(v_weight, v_bias, o_weight, o_bias)


def stack_folded(folded: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Stack per-layer `(W[D,E], b[D])` pairs into `(weight[L*D, E], bias[L*D])`, layer-major."""
    if len(folded) == 0:
        raise ValueError("stack_folded needs at least one (W, b) pair, got an empty sequence")
    shape = tuple(folded[0][0].shape)
    for i, (w, b) in enumerate(folded):
        if tuple(w.shape) != shape or w.dim() != 2:
            raise ValueError(f"folded[{i}] weight has shape {tuple(w.shape)}, expected {shape}")
        if tuple(b.shape) != (shape[0],):
            raise ValueError(f"folded[{i}] bias has shape {tuple(b.shape)}, expected ({shape[0]},)")
    weight = torch.cat([w.detach() for w, _ in folded], dim=0)
    bias = torch.cat([b.detach() for _, b in folded], dim=0)
    return weight, bias


def cross_attention_constants(emb: Tensor, weight: Tensor, bias: Tensor, num_layers: int | None = None) -> Tensor:
    """Every layer's cross-attention output for each embedding: `[B, L, D]` from `emb[B, E]`.

    `weight [L*D, E]` and `bias [L*D]` come from `stack_folded`. `num_layers` (L) defaults to
    `L*D // E`, i.e. it assumes D == E (true for SONAR); pass it when D != E. One `torch.addmm`
    covers all layers. `emb` is cast to `weight.dtype` (differentiably). Differentiable with respect to `emb`.
    """
    if emb.dim() != 2:
        raise ValueError(f"emb must be [B, E], got shape {tuple(emb.shape)}")
    if weight.dim() != 2 or weight.shape[1] != emb.shape[1]:
        raise ValueError(f"weight must be [L*D, {emb.shape[1]}], got shape {tuple(weight.shape)}")
    if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
        raise ValueError(f"bias must be [{weight.shape[0]}], got shape {tuple(bias.shape)}")
    if num_layers is None:
        if weight.shape[0] % emb.shape[1] != 0:
            raise ValueError(
                f"cannot infer num_layers: weight rows {weight.shape[0]} not a multiple of E={emb.shape[1]}; "
                "pass num_layers"
            )
        num_layers = weight.shape[0] // emb.shape[1]
    if num_layers <= 0 or weight.shape[0] % num_layers != 0:
        raise ValueError(f"num_layers={num_layers} does not divide weight rows {weight.shape[0]}")
    if bias.dtype != weight.dtype:
        raise TypeError(f"bias dtype {bias.dtype} must equal weight dtype {weight.dtype}")
    if not emb.is_floating_point():
        raise TypeError(f"emb must be a floating-point tensor, got {emb.dtype}")
    if emb.dtype != weight.dtype:
        emb = emb.to(weight.dtype)  # differentiable cast; gradients come back in emb's dtype
    return cross_attention_constants_op(emb, weight, bias, num_layers)
