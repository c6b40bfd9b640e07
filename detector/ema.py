"""Exponential moving average of a model's weights and BN buffers, updated with ``kernels.ema_update``."""
from __future__ import annotations

import copy

import torch
from torch import nn

import kernels


class ModelEma:
    """``ema = decay * ema + (1 - decay) * model`` over every floating parameter and buffer (BN running
    statistics included), all tensors of one dtype in one kernel launch; integer buffers are copied.

    ``warmup=True`` uses ``min(decay, (1 + updates) / (10 + updates))`` so early averages are not dominated by
    the random initialization.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9998, warmup: bool = False, backend: str = "auto"):
        self.module = copy.deepcopy(_unwrap(model)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.warmup, self.backend = decay, warmup, backend
        self.updates = 0

    def _pairs(self, model: nn.Module):
        """(ema tensor, model tensor) per parameter and buffer, each ema tensor once: a tensor tied to two
        modules (one Parameter under two names, which the deep copy keeps tied) is averaged once per update,
        not twice."""
        src = dict(_unwrap(model).state_dict(keep_vars=True))
        seen = set()
        for name, t in self.module.state_dict(keep_vars=True).items():
            if id(t) in seen:
                continue
            seen.add(id(t))
            yield t, src[name]

    def _split(self, model: nn.Module):
        """(float ema, float model, other ema, other model) lists of the parameter and buffer objects, built
        once per model (``.to()`` and ``load_state_dict`` keep those objects, so the lists stay valid)."""
        key = id(_unwrap(model))
        if getattr(self, "_split_key", None) != key:
            floats, sources, ints, int_sources = [], [], [], []
            for e, m in self._pairs(model):
                if e.is_floating_point():
                    floats.append(e)
                    sources.append(m)
                else:
                    ints.append(e)
                    int_sources.append(m)
            self._split_cache, self._split_key = (floats, sources, ints, int_sources), key
        return self._split_cache

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.decay
        if self.warmup:
            decay = min(decay, (1 + self.updates) / (10 + self.updates))
        self.updates += 1
        floats, sources, ints, int_sources = self._split(model)
        if ints:
            torch._foreach_copy_(ints, int_sources)
        kernels.ema_update(floats, sources, decay, backend=self.backend)

    @torch.no_grad()
    def restart(self, model: nn.Module) -> None:
        """Average anew from ``model``'s current weights and buffers (warm-up included): what came before is
        dropped, e.g. weights trained under another normalization of BN (``--freeze-bn-after``)."""
        for e, m in self._pairs(model):
            e.copy_(m)
        self.updates = 0

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "decay": self.decay, "updates": self.updates,
                "warmup": self.warmup}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])  # in place: cached tensor lists stay valid
        self.decay, self.updates = state.get("decay", self.decay), state.get("updates", 0)
        self.warmup = state.get("warmup", self.warmup)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model
