"""Optimizer and learning-rate schedule.

The schedule is a per-step factor on the base LR (a ``LambdaLR``): linear warm-up from ``warmup_lr``, then a
cosine to ``min_lr`` (or step decay).
"""
from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay only on conv / linear weights (ndim > 1), not on biases, BN or fusion weights."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    opt = cfg.opt.lower()
    if opt in ("momentum", "sgd", "nesterov"):
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=opt in ("nesterov", "sgd"))
    if opt == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, eps=cfg.opt_eps)
    if opt == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, eps=cfg.opt_eps)
    raise ValueError(f"--opt {cfg.opt!r}: choose momentum, sgd, nesterov, adam or adamw")


def lr_lambda(cfg, steps_per_epoch: int):
    """Per-step LR factor: linear warm-up from warmup_lr, then cosine to min_lr (or step decay)."""
    warm = int(cfg.warmup_epochs * steps_per_epoch)
    total = max(1, cfg.epochs * steps_per_epoch)
    base = cfg.lr

    def f(step: int) -> float:
        if step < warm:
            return (cfg.warmup_lr + (base - cfg.warmup_lr) * step / warm) / base
        if cfg.sched == "step":
            return cfg.decay_rate ** ((step // steps_per_epoch) // max(1, cfg.decay_epochs))
        t = min(1.0, (step - warm) / max(1, total - warm))
        return (cfg.min_lr + 0.5 * (base - cfg.min_lr) * (1 + math.cos(math.pi * t))) / base

    return f


def build_scheduler(cfg, optimizer, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, steps_per_epoch))


def seek_scheduler(scheduler, step: int) -> None:
    """Put a fresh per-step LambdaLR at ``step`` (a restart without its saved state)."""
    scheduler.last_epoch = step
    lrs = [base * f(step) for base, f in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs
