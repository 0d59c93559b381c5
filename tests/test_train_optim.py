"""Optimizer param groups and the warmup + cosine schedule against closed-form values."""
import math

import torch
from torch import nn

from sonar_train.config import OptimConfig
from sonar_train.optim import build_optimizer, build_scheduler, lr_factor, param_groups


def test_schedule_closed_form():
    w, total, r = 10, 110, 0.1
    assert lr_factor(0, w, total, r) == 1 / 10
    assert lr_factor(9, w, total, r) == 1.0
    for s in (10, 35, 60, 85, 110):
        expected = r + (1 - r) * 0.5 * (1 + math.cos(math.pi * (s - w) / (total - w)))
        assert abs(lr_factor(s, w, total, r) - expected) < 1e-12
    assert abs(lr_factor(60, w, total, r) - (r + (1 - r) / 2)) < 1e-12  # half-way = mean of ends
    assert lr_factor(500, w, total, r) == r  # stays at the floor
    assert lr_factor(0, 0, 5, 0.0) == 1.0  # no warmup


def test_scheduler_drives_optimizer_lr():
    m = nn.Linear(3, 3)
    cfg = OptimConfig(lr=2e-3, warmup_steps=4, total_steps=0, min_lr_ratio=0.2)
    opt = build_optimizer(m, cfg, torch.device("cpu"))
    sched = build_scheduler(opt, cfg, train_steps=20)
    seen = []
    for _ in range(25):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    for s, lr in enumerate(seen):
        assert abs(lr - 2e-3 * lr_factor(s, 4, 20, 0.2)) < 1e-15


class _M(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.rms_norm_weight = nn.Parameter(torch.ones(4, 4))  # 2-D but named like a norm
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def test_param_groups_exclude_norms_biases_and_frozen():
    m = _M()
    decay, no_decay = param_groups(m, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(m.lin.weight)}
    assert {id(p) for p in no_decay["params"]} == {id(m.lin.bias), id(m.norm.weight), id(m.norm.bias),
                                                   id(m.rms_norm_weight)}


def test_adamw_matches_closed_form_first_step():
    torch.manual_seed(0)
    m = nn.Linear(5, 1, bias=False)
    w0 = m.weight.detach().clone().double()
    cfg = OptimConfig(lr=0.01, betas=[0.9, 0.99], eps=1e-8, weight_decay=0.5)
    opt = build_optimizer(m, cfg, torch.device("cpu"))
    m.weight.grad = torch.randn_like(m.weight)
    g = m.weight.grad.double()
    opt.step()
    # bias-corrected first Adam step: update = g / (|g| + eps) ; decoupled decay: w *= 1 - lr * wd
    expected = w0 * (1 - 0.01 * 0.5) - 0.01 * g / (g.abs() + 1e-8)
    torch.testing.assert_close(m.weight.detach().double(), expected, rtol=1e-5, atol=1e-6)
