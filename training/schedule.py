"""Optimizer and learning-rate schedule.

The schedule is a per-step factor on the base LR (a ``LambdaLR``): linear warm-up from ``warmup_lr``, then
cosine cycles to ``min_lr`` (``--lr-cycle-limit`` of them, each ``--lr-cycle-mul`` times longer than the one
before and its peak ``--decay-rate`` times lower), then ``--cooldown-epochs`` at ``min_lr``; or step decay.
``--lr-noise`` multiplies the LR of each epoch in its range by ``1 + n``, ``n ~ N(0, std)`` redrawn until
``|n| < --lr-noise-pct``, seeded by ``seed + epoch``: NVIDIA's rules, applied per step.

``--time-budget`` (``training/budget.py``) only decides when training stops; the LR keeps following the
schedule above.
"""
from __future__ import annotations

import math

import torch
from torch import nn

# --opt -> (torch.optim class, nesterov, what it stands for). NVIDIA's fused* optimizers (apex) compute the
# same update as these; LAMB and NovoGrad have no PyTorch counterpart, AdamW is the closest.
OPTIMIZERS = {
    "momentum": ("SGD", False, None),
    "sgd": ("SGD", True, None),
    "nesterov": ("SGD", True, None),
    "adam": ("Adam", None, None),
    "adamw": ("AdamW", None, None),
    "fusedmomentum": ("SGD", False, "apex FusedSGD without Nesterov: the same update"),
    "fusedsgd": ("SGD", True, "apex FusedSGD with Nesterov: the same update"),
    "fusedadam": ("Adam", None, "apex FusedAdam: the same update"),
    "fusedadamw": ("AdamW", None, "apex FusedAdam in AdamW mode: the same update"),
    "lamb": ("AdamW", None, "LAMB's layer-wise trust ratio is not applied (PyTorch has no LAMB)"),
    "fusedlamb": ("AdamW", None, "LAMB's layer-wise trust ratio is not applied (PyTorch has no LAMB)"),
    "novograd": ("AdamW", None, "NovoGrad's per-layer moments are not applied (PyTorch has no NovoGrad)"),
    "fusednovograd": ("AdamW", None, "NovoGrad's per-layer moments are not applied (PyTorch has no NovoGrad)"),
}


def _lookup(opt: str):
    name = opt.lower()
    if name not in OPTIMIZERS:
        from .errors import UserError

        raise UserError(f"unknown optimizer --opt {opt!r}", None, "--opt", f"choose one of {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name]


def optimizer_note(opt: str) -> str | None:
    """The line said at start when ``--opt`` names one of NVIDIA's apex optimizers."""
    cls, nesterov, why = _lookup(opt)
    if why is None:
        return None
    kind = f"torch.optim.{cls}" + ("" if nesterov is None else f"(nesterov={nesterov})")
    return f"--opt {opt}: runs as {kind}; {why}"


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay only on conv / linear weights (ndim > 1), not on biases, BN or fusion weights."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def fused_kw(params) -> dict:
    """``fused=True`` when every parameter is a floating tensor on the CPU or a CUDA device: PyTorch's fused
    SGD / Adam / AdamW update every tensor in one pass. The default on the CPU is a Python loop of ~8 ops per
    tensor; for D0's 424 tensors one AdamW step took 33.6 ms that way and 7.7 ms fused (2 cores)."""
    ok = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return {"fused": True} if ok else {}


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    cls, nesterov, _ = _lookup(cfg.opt)
    fused = fused_kw([p for g in groups for p in g["params"]])
    if cls == "SGD":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=nesterov, **fused)
    betas = (0.95, 0.98) if "novograd" in cfg.opt.lower() else (0.9, 0.999)  # NVIDIA's NovoGrad betas
    return getattr(torch.optim, cls)(groups, lr=cfg.lr, eps=cfg.opt_eps, betas=betas, **fused)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """``optimizer.load_state_dict(state)``, keeping this run's implementation (``fused`` / ``foreach``): a
    checkpoint's param groups carry the flags of the run that wrote it, and would otherwise replace them."""
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        for key in ("fused", "foreach"):
            if key in optimizer.defaults:
                group[key] = optimizer.defaults[key]


def cycle_epochs(cfg) -> float:
    """Epochs of all LR cycles: ``epochs`` for the first, times ``lr_cycle_mul`` for each next one."""
    n, mul = max(1, cfg.lr_cycle_limit), cfg.lr_cycle_mul
    if cfg.sched != "cosine" or n == 1:
        return cfg.epochs
    return cfg.epochs * n if mul == 1 else math.floor(cfg.epochs * (mul ** n - 1) / (mul - 1))


def scheduled_epochs(cfg) -> int:
    """Epochs the run trains: the LR cycles, then the cool-down (NVIDIA's rule)."""
    return int(cycle_epochs(cfg)) + cfg.cooldown_epochs


def _cycle(t: float, length: float, mul: float) -> tuple[int, float, float]:
    """(cycle index, position in it, its length) of time ``t`` for cycles of ``length * mul**i``."""
    if mul == 1:
        i = int(t // length)
        return i, t - i * length, length
    i = math.floor(math.log(1 - t / length * (1 - mul), mul))
    return i, t - (1 - mul ** i) / (1 - mul) * length, length * mul ** i


def lr_noise(cfg, epoch: int) -> float:
    """NVIDIA's LR noise for ``epoch``: 0 outside the ``--lr-noise`` range."""
    if not cfg.lr_noise:
        return 0.0
    lo = cfg.lr_noise[0] * cfg.epochs
    hi = cfg.lr_noise[1] * cfg.epochs if len(cfg.lr_noise) > 1 else math.inf
    if not lo <= epoch < hi:
        return 0.0
    g = torch.Generator().manual_seed(cfg.seed + epoch)
    while True:
        n = torch.randn(1, generator=g).item() * cfg.lr_noise_std
        if abs(n) < cfg.lr_noise_pct:
            return n


def lr_lambda(cfg, steps_per_epoch: int):
    """Per-step LR factor (see the module docstring)."""
    warm = int(cfg.warmup_epochs * steps_per_epoch)
    first = max(1, cfg.epochs * steps_per_epoch)
    base = cfg.lr
    noise: dict[int, float] = {}

    def cosine(step: int) -> float:
        i, t, length = _cycle(step, first, cfg.lr_cycle_mul)
        if i == 0:  # the first cycle starts after the warm-up
            t, length = step - warm, max(1, first - warm)
        if 0 < cfg.lr_cycle_limit <= i:
            return cfg.min_lr
        gamma = cfg.decay_rate ** i
        t = min(1.0, t / length)
        return cfg.min_lr * gamma + 0.5 * (base - cfg.min_lr) * gamma * (1 + math.cos(math.pi * t))

    def f(step: int) -> float:
        if step < warm:
            lr = cfg.warmup_lr + (base - cfg.warmup_lr) * step / warm
        elif cfg.sched == "step":
            lr = base * cfg.decay_rate ** int((step // steps_per_epoch) // max(1e-9, cfg.decay_epochs))
        else:
            lr = cosine(step)
        epoch = step // steps_per_epoch
        if epoch not in noise:
            noise[epoch] = lr_noise(cfg, epoch)
        return lr * (1 + noise[epoch]) / base

    return f


def build_scheduler(cfg, optimizer, steps_per_epoch: int):
    """A per-step ``LambdaLR`` (``lr_lambda``)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, steps_per_epoch))


def seek_scheduler(scheduler, step: int) -> None:
    """Put a fresh per-step LambdaLR at ``step`` (a restart without its saved state)."""
    scheduler.last_epoch = step
    lrs = [base * f(step) for base, f in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs
