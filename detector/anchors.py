"""Anchor boxes: one fixed ``(N, 4)`` float32 tensor of xyxy pixels per image size.

Order of the flat list: level (min..max), then row, then column, then the ``num_scales x len(aspect_ratios)``
shapes at that position, scale-major. Shape ``(scale s, aspect (ax, ay))`` at level ``l`` has base size
``anchor_scale * stride * 2**(s / num_scales)`` and half-extents ``base * ax / 2`` (x), ``base * ay / 2`` (y);
centres at ``stride / 2 + k * stride`` where ``stride = image / feature size`` per axis.
Computed in float64 and rounded once to float32, like effdet's numpy version.
"""
from __future__ import annotations

import functools

import torch

from .configs import ModelConfig, feature_sizes


@functools.lru_cache(maxsize=32)
def _anchors(image_size, min_level, max_level, num_scales, aspect_ratios, anchor_scale) -> torch.Tensor:
    sizes = feature_sizes(image_size, max_level)
    out = []
    for level in range(min_level, max_level + 1):
        fh, fw = sizes[level]
        sy, sx = image_size[0] / fh, image_size[1] / fw
        cy = torch.arange(fh, dtype=torch.float64) * sy + sy / 2
        cx = torch.arange(fw, dtype=torch.float64) * sx + sx / 2
        cy, cx = torch.meshgrid(cy, cx, indexing="ij")  # (fh, fw)
        half = torch.tensor([
            (anchor_scale * sx * 2 ** (s / num_scales) * ax / 2, anchor_scale * sy * 2 ** (s / num_scales) * ay / 2)
            for s in range(num_scales) for ax, ay in aspect_ratios], dtype=torch.float64)  # (A, 2) = (hx, hy)
        cx, cy = cx.reshape(-1, 1), cy.reshape(-1, 1)
        boxes = torch.stack([cx - half[:, 0], cy - half[:, 1], cx + half[:, 0], cy + half[:, 1]], dim=-1)
        out.append(boxes.reshape(-1, 4))
    return torch.cat(out).to(torch.float32)


def anchors_for(cfg: ModelConfig, image_size=None, device=None) -> torch.Tensor:
    """``(N, 4)`` xyxy anchors for ``cfg`` at ``image_size`` (default ``cfg.image_size``); cached per size
    and device."""
    size = tuple(int(v) for v in (image_size or cfg.image_size))
    key = (size, cfg.min_level, cfg.max_level, cfg.num_scales, tuple(cfg.aspect_ratios), cfg.anchor_scale)
    a = _anchors(*key)
    if device is None or torch.device(device).type == "cpu":
        return a
    return _on_device(key, str(torch.device(device)))


@functools.lru_cache(maxsize=32)
def _on_device(key, device: str) -> torch.Tensor:
    return _anchors(*key).to(device)

