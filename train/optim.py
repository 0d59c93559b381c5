"""Optimizer and learning-rate schedule: AdamW (fused / apex when available) with decay-free groups
for norms and biases, linear warmup then cosine decay to `min_lr_ratio * lr`."""
from __future__ import annotations

import math

import torch
from torch import nn

from train.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float, decay_all: bool = False) -> list[dict]:
    """Trainable parameters split into (decay, no-decay): 1-D tensors (norm weights, biases) and any
    parameter whose name contains 'norm' or ends in 'bias' get no weight decay, unless `decay_all` (one
    group, every parameter decayed, as AdamW(model.parameters()) does). Frozen ones are left out."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
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


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; apex FusedAdam if `cfg.apex`, importable and the parameters are not FSDP-sharded, else torch
    AdamW(fused=True) on CUDA if `cfg.fused`."""
    groups = param_groups(model, cfg.weight_decay, cfg.decay_all_params)
    betas = (float(cfg.betas[0]), float(cfg.betas[1]))
    sharded = any(type(p).__name__ == "DTensor" for g in groups for p in g["params"])
    if cfg.apex and device.type == "cuda" and not sharded:  # apex kernels take plain tensors, not DTensors
        try:
            from apex.optimizers import FusedAdam  # type: ignore[import-not-found]

            return FusedAdam(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, adam_w_mode=True)
        except ImportError:
            pass  # fall back to torch's fused AdamW
    kwargs = {}
    if cfg.fused and device.type == "cuda":
        kwargs["fused"] = True
    elif device.type == "cpu":
        kwargs["foreach"] = False  # bitwise-stable single-tensor path on the CPU
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, **kwargs)


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based): (step+1)/warmup during warmup, then
    cosine from 1 down to min_lr_ratio at total_steps, constant after."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class _Schedule:
    """Picklable lr lambda (LambdaLR stores callables that are plain objects in its state)."""

    def __init__(self, warmup_steps: int, total_steps: int, min_lr_ratio: float):
        self.warmup_steps, self.total_steps, self.min_lr_ratio = warmup_steps, total_steps, min_lr_ratio

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.warmup_steps, self.total_steps, self.min_lr_ratio)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, train_steps: int
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    total = cfg.total_steps or train_steps
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _Schedule(cfg.warmup_steps, total, cfg.min_lr_ratio))
