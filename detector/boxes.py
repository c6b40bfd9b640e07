"""Box coding and overlap, all boxes xyxy in pixels.

Regression targets are ``(dy, dx, dh, dw)`` = ``((cy - cya) / ha, (cx - cxa) / wa, log(h / ha), log(w / wa))``,
the order of effdet's box head. ``decode`` lives in ``kernels.decode_boxes`` (it is a hot path).
"""
from __future__ import annotations

import torch

EPS = 1e-7  # added to every height and width before dividing (effdet's FasterRcnnBoxCoder)


def encode(boxes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """``(..., 4)`` xyxy boxes against broadcastable ``(..., 4)`` xyxy anchors -> ``(..., 4)`` (dy, dx, dh, dw)."""
    ha = anchors[..., 3] - anchors[..., 1] + EPS
    wa = anchors[..., 2] - anchors[..., 0] + EPS
    cya = (anchors[..., 1] + anchors[..., 3]) / 2
    cxa = (anchors[..., 0] + anchors[..., 2]) / 2
    h = boxes[..., 3] - boxes[..., 1] + EPS
    w = boxes[..., 2] - boxes[..., 0] + EPS
    cy = (boxes[..., 1] + boxes[..., 3]) / 2
    cx = (boxes[..., 0] + boxes[..., 2]) / 2
    return torch.stack([(cy - cya) / ha, (cx - cxa) / wa, torch.log(h / ha), torch.log(w / wa)], dim=-1)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of ``(..., M, 4)`` and ``(..., N, 4)`` -> ``(..., M, N)``; 0 where boxes do not intersect."""
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    lt = torch.maximum(a[..., :, None, :2], b[..., None, :, :2])
    rb = torch.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[..., :, None] + area_b[..., None, :] - inter
    return torch.where(inter > 0, inter / union, torch.zeros_like(inter))
