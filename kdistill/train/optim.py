"""Optimizer and learning-rate schedule from a TrainConfig.

The schedule is a pure function of the step number (no scheduler object with hidden state),
so resuming at any step gives exactly the learning rate an uninterrupted run would have had.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn


def build_optimizer(params: Iterable[nn.Parameter], cfg) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer '{cfg.optimizer}' (sgd, adam, adamw)")


def learning_rate(cfg, step: int, steps_per_epoch: int) -> float:
    """The learning rate for optimisation step `step` (0-based)."""
    total = cfg.epochs * steps_per_epoch
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if cfg.schedule == "step":
        return cfg.lr * cfg.step_gamma ** (step // (cfg.step_epochs * steps_per_epoch))
    if cfg.schedule == "multistep":
        passed = sum(step >= milestone * steps_per_epoch for milestone in cfg.milestones)
        return cfg.lr * cfg.step_gamma ** passed
    return cfg.lr
