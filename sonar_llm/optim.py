"""The one learning-rate schedule and weight-decay split of the project (the trainer's train/sonar_train/optim.py and
the tiny SONAR's sonar_llm/sonar/train_tiny.py both use them). Imports nothing from sonar_llm.

* `param_groups(named_parameters, weight_decay, decay_all=False)`: AdamW groups (decay, no-decay):
  1-D tensors (norm weights, biases) and any parameter whose name contains 'norm' or ends in 'bias' get no
  weight decay (unless `decay_all`); frozen parameters are left out; a parameter reached twice (tied
  weights) is taken once.
* `lr_factor(step, warmup_steps, total_steps, min_lr_ratio)`: linear warmup, then cosine to
  `min_lr_ratio`; `WarmupCosine` is the same as a picklable `LambdaLR` lambda.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

from torch import nn

__all__ = ["param_groups", "lr_factor", "WarmupCosine"]


def param_groups(named_parameters: Iterable[tuple[str, nn.Parameter]], weight_decay: float,
                 decay_all: bool = False) -> list[dict]:
    """Trainable parameters split into (decay, no-decay) AdamW groups (see the module docstring)."""
    decay, no_decay, seen = [], [], set()
    for name, p in named_parameters:
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if not decay_all and (p.ndim < 2 or "norm" in name.lower() or name.endswith("bias")):
            no_decay.append(p)
        else:
            decay.append(p)
    if not decay and not no_decay:
        raise ValueError("model has no trainable parameters (every parameter has requires_grad=False)")
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based): (step+1)/warmup during warmup, then
    cosine from 1 down to min_lr_ratio at total_steps, constant after."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosine:
    """Picklable lr lambda (LambdaLR stores callables that are plain objects in its state): `lr_factor`."""

    def __init__(self, warmup_steps: int, total_steps: int, min_lr_ratio: float):
        self.warmup_steps, self.total_steps, self.min_lr_ratio = warmup_steps, total_steps, min_lr_ratio

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.warmup_steps, self.total_steps, self.min_lr_ratio)
