"""nn.Module wrapper of the fused linear cross-entropy (a loss module, like nn.CrossEntropyLoss).

The module holds only the loss settings; the output projection is passed at call time, because in SONAR
it is the frozen decoder's tied embedding matrix, owned by another module:

    loss_fn = LinearCrossEntropy(LinearCrossEntropyConfig(ignore_index=0))
    loss = loss_fn(hidden[..., D], decoder.final_proj.weight, target[...])
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..functional.linear_cross_entropy import REDUCTIONS, linear_cross_entropy


@dataclass
class LinearCrossEntropyConfig:
    """Settings of `LinearCrossEntropy`; the meaning of each field follows `linear_cross_entropy`."""

    ignore_index: int = -100
    reduction: str = "mean"
    label_smoothing: float = 0.0
    return_lse: bool = False
    impl: str = "auto"
    z_loss: float = 0.0  # weight of z_loss * lse^2 per token (PaLM's auxiliary loss), with its gradient

    def __post_init__(self) -> None:
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        if not 0.0 <= float(self.label_smoothing) <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {self.label_smoothing}")
        if not float(self.z_loss) >= 0.0:
            raise ValueError(f"z_loss must be >= 0, got {self.z_loss}")
        if self.impl not in ("auto", "triton", "torch"):
            raise ValueError(f"impl must be 'auto', 'triton' or 'torch', got {self.impl!r}")


class LinearCrossEntropy(nn.Module):
    """Cross-entropy of `hidden @ weight.T + bias` without materialising logits.

    `forward(hidden[..., D], weight[V, D], target[...], bias=None)` accepts any leading shape; with
    reduction "none" the loss (and lse) come back shaped like `target`.
    """

    def __init__(self, config: LinearCrossEntropyConfig | None = None, **overrides) -> None:
        super().__init__()
        if config is None:
            config = LinearCrossEntropyConfig(**overrides)
        elif overrides:
            raise TypeError("pass either a LinearCrossEntropyConfig or keyword settings, not both")
        self.config = config

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                bias: torch.Tensor | None = None):
        if not isinstance(hidden, torch.Tensor) or hidden.dim() < 1:
            raise ValueError("hidden must be a tensor of shape [..., D]")
        if not isinstance(target, torch.Tensor) or target.shape != hidden.shape[:-1]:
            got = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__
            raise ValueError(f"target must have the leading shape of hidden {tuple(hidden.shape[:-1])}, got {got}")
        cfg = self.config
        lead = target.shape
        out = linear_cross_entropy(
            hidden.reshape(-1, hidden.shape[-1]), weight, target.reshape(-1), bias=bias,
            ignore_index=cfg.ignore_index, reduction=cfg.reduction, label_smoothing=cfg.label_smoothing,
            return_lse=cfg.return_lse, impl=cfg.impl, z_loss=cfg.z_loss,
        )
        if cfg.return_lse:
            loss, lse = out
            if cfg.reduction == "none":
                loss = loss.reshape(lead)
            return loss, lse.reshape(lead)
        return out.reshape(lead) if cfg.reduction == "none" else out

    def extra_repr(self) -> str:
        c = self.config
        return (f"ignore_index={c.ignore_index}, reduction={c.reduction!r}, "
                f"label_smoothing={c.label_smoothing}, impl={c.impl!r}, z_loss={c.z_loss}")
