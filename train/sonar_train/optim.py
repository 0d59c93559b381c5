"""Optimizer and learning-rate schedule: AdamW (fused / apex when available) with decay-free groups
for norms and biases, linear warmup then cosine decay to `min_lr_ratio * lr`."""
from __future__ import annotations

import torch
from torch import nn

from sonar_llm.optim import WarmupCosine, lr_factor  # noqa: F401  (lr_factor: the one schedule, re-exported)
from sonar_llm.optim import param_groups as _library_param_groups
from sonar_train.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float, decay_all: bool = False) -> list[dict]:
    """AdamW groups of `model` (sonar_llm.optim.param_groups: norms and biases undecayed unless `decay_all`)."""
    return _library_param_groups(model.named_parameters(), weight_decay, decay_all)


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


_Schedule = WarmupCosine  # the picklable lr lambda (kept name)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, train_steps: int, start_step: int = 0
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule of `cfg`, positioned at optimizer step `start_step` (a resumed run rebuilds it from its
    current config: the lr of step s is a function of the config and s only, so nothing about the schedule
    is checkpointed). With start_step > 0 every param group needs its `initial_lr` (the base lr)."""
    total = cfg.total_steps or train_steps
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _Schedule(cfg.warmup_steps, total, cfg.min_lr_ratio),
                                             last_epoch=start_step - 1)
