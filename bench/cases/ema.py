"""Benchmark cases for kernels.ema_update over a D0-sized (and D4-sized) parameter list."""
from __future__ import annotations

import torch

from bench.harness import Case


def _sizes(total: int, count: int, seed: int) -> list[int]:
    """``count`` tensor sizes, log-uniform between 16 and ~2% of the total, summing to ~``total``."""
    g = torch.Generator().manual_seed(seed)
    logs = torch.rand(count, generator=g) * (torch.log(torch.tensor(total * 0.02)) - 2.77) + 2.77
    raw = logs.exp()
    return [max(1, int(s)) for s in (raw / raw.sum() * total).tolist()]


def _make(label, total, count, dtype, device, quick):
    from kernels.ema import ema_update, ema_update_reference

    sizes = _sizes(total, count, seed=count)
    ema = [torch.randn(s, device=device).to(dtype) for s in sizes]
    model = [torch.randn(s, device=device).to(dtype) for s in sizes]
    decay_t = torch.tensor(0.9998, device=device)
    decay = 0.9998
    providers = {
        "triton": lambda: ema_update(ema, model, decay_t, backend="triton"),
        "reference": lambda: ema_update_reference(ema, model, decay_t),
    }
    if not quick:
        compiled = torch.compile(ema_update_reference)
        providers["compiled"] = lambda: compiled(ema, model, decay_t)
    providers["peer:foreach_lerp"] = lambda: torch._foreach_lerp_(ema, model, 1.0 - decay)
    n = sum(sizes)
    es = torch.empty((), dtype=dtype).element_size()
    return Case(op="ema_update", shape=label, providers=providers, bytes_moved=3 * n * es,
                setup=f"{count} tensors, {n / 1e6:.2f}M params, {str(dtype).replace('torch.', '')}, "
                      "decay as a device tensor (peer: float)")


def cases(quick: bool, device) -> list[Case]:
    device = torch.device(device)
    if quick:
        return [_make("tiny 12 tensors", 9000, 12, torch.float32, device, quick)]
    return [_make("D0 params fp32 (~3.9M in 400)", 3_880_000, 400, torch.float32, device, quick),
            _make("D4 params fp32 (~20.7M in 700)", 20_724_000, 700, torch.float32, device, quick)]
