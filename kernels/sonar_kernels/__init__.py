"""sonar_kernels: fused, frozen-weight kernels for concept-level language models.

Importable on its own (depends on torch and, optionally, triton). Each op has a Triton path and a
plain-PyTorch path; `impl="auto"` picks Triton on CUDA and PyTorch elsewhere (see `backend.py`).

Ops (functional): `linear_cross_entropy`, `fold_cross_attention`, `stack_folded`,
`cross_attention_constants`, `add_layer_norm`, `varlen_causal_attention`.
Modules: `LinearCrossEntropy` (+ `LinearCrossEntropyConfig`), `AddLayerNorm`, `CrossAttentionConstants`.
"""
from .backend import interpret_mode, triton_available, use_triton
from .functional.add_layer_norm import add_layer_norm
from .functional.cross_attention_constants import cross_attention_constants, fold_cross_attention, stack_folded
from .functional.linear_cross_entropy import linear_cross_entropy
from .functional.varlen_attention import varlen_causal_attention
from .nn.decoder_ops import AddLayerNorm, CrossAttentionConstants
from .nn.linear_cross_entropy import LinearCrossEntropy, LinearCrossEntropyConfig

__all__ = [
    "AddLayerNorm",
    "CrossAttentionConstants",
    "LinearCrossEntropy",
    "LinearCrossEntropyConfig",
    "add_layer_norm",
    "cross_attention_constants",
    "fold_cross_attention",
    "interpret_mode",
    "linear_cross_entropy",
    "stack_folded",
    "triton_available",
    "use_triton",
    "varlen_causal_attention",
]
