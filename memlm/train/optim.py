"""AdamW with decoupled weight decay on matrices only, and the learning-rate schedules.

Schedules (multipliers of ``optimizer.lr``; linear warmup over ``warmup_steps`` first):
- ``cosine``: cosine from 1 down to ``min_lr_ratio`` at the last step;
- ``wsd`` (warmup-stable-decay, Hu et al. 2024 MiniCPM): 1, then a linear decay to ``min_lr_ratio``
  over the last ``decay_fraction`` of the steps;
- ``constant`` (constant with cooldown, Hägele et al. 2024): 1, then a ``1 − sqrt`` cooldown to
  ``min_lr_ratio`` over the last ``decay_fraction`` — a run can be extended before its cooldown.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from memlm.train.config import OptimizerSection, ScheduleSection


def build_optimizer(model: nn.Module, cfg: OptimizerSection) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and not getattr(p, "_no_weight_decay", False) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def lr_multiplier(step: int, total: int, cfg: ScheduleSection) -> float:
    """The schedule's factor at optimizer step ``step`` (0-based) of ``total``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    lo = cfg.min_lr_ratio
    if cfg.name == "cosine":
        span = max(total - cfg.warmup_steps, 1)
        progress = min((step - cfg.warmup_steps) / span, 1.0)
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_steps = max(int(round(cfg.decay_fraction * total)), 1)
    decay_start = total - decay_steps
    if step < decay_start:
        return 1.0
    progress = min((step - decay_start + 1) / decay_steps, 1.0)
    shape = progress if cfg.name == "wsd" else math.sqrt(progress)
    return 1.0 - (1.0 - lo) * shape


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleSection, total: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, total, cfg))
