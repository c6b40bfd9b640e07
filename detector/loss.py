"""Detection loss: focal loss over all anchors x classes + Huber box loss on positive anchors.

``total = cls + box_loss_weight * box``; ``cls`` is divided by ``normalizer = positives + 1`` and ``box`` by
``4 * normalizer`` (a mean over the four coordinates), as in effdet and the TF reference. Under DDP pass the
positive count summed over all workers as ``normalizer`` so every worker divides by the same number.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import kernels

from .targets import Targets


def huber(x: torch.Tensor, delta: float) -> torch.Tensor:
    a = x.abs()
    q = a.clamp(max=delta)
    return 0.5 * q * q + delta * (a - q)


def detection_loss(cls_logits: torch.Tensor, box_deltas: torch.Tensor, targets: Targets, *, alpha: float = 0.25,
                   gamma: float = 1.5, delta: float = 0.1, box_loss_weight: float = 50.0, label_smoothing: float = 0.0,
                   normalizer: torch.Tensor | None = None, backend: str = "auto"):
    """``cls_logits (B, N, C)``, ``box_deltas (B, N, 4)`` -> ``(total, cls, box)`` float32 scalars."""
    if normalizer is None:
        normalizer = targets.num_pos.sum() + 1.0
    cls = kernels.focal_loss(cls_logits, targets.cls, normalizer, alpha=alpha, gamma=gamma,
                             label_smoothing=label_smoothing, backend=backend)
    positive = (targets.cls >= 0)[..., None]
    # F.huber_loss is ``huber(x - y, delta)`` in one fused pass (and one for its gradient)
    err = F.huber_loss(box_deltas.float(), targets.box, reduction="none", delta=delta) * positive
    box = err.sum() / (4.0 * normalizer)
    return cls + box_loss_weight * box, cls, box
