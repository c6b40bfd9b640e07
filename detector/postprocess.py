"""Post-processing for a whole batch at once: top-k -> decode -> clip -> per-class NMS -> top detections.

Output ``(B, max_det, 6)`` rows ``[x1, y1, x2, y2, score, class]`` (class = contiguous index 0..C-1), in
original-image pixels when ``image_scale`` (input pixels per original pixel) is given, else input pixels.
Unused rows are zeros with class -1. No Python loop over images.
"""
from __future__ import annotations

import torch

import kernels

from .boxes import box_iou


def postprocess(cls_logits: torch.Tensor, box_deltas: torch.Tensor, anchors: torch.Tensor, *,
                image_scale: torch.Tensor | None = None, clip_size: torch.Tensor | None = None,
                max_detection_points: int = 5000, max_det: int = 100, iou_threshold: float = 0.5,
                score_threshold: float = 0.0, soft_nms: bool = False, soft_nms_sigma: float = 0.5,
                backend: str = "auto") -> torch.Tensor:
    """``cls_logits (B, N, C)``, ``box_deltas (B, N, 4)``, ``anchors (N, 4)``; ``clip_size (B, 2)`` = (h, w)
    of the valid image area in input pixels (boxes are clipped to it before NMS)."""
    B = cls_logits.shape[0]
    boxes, scores, classes, _ = kernels.decode_topk(cls_logits, box_deltas, anchors, max_detection_points,
                                                    clip_to=clip_size, backend=backend)
    if soft_nms:
        out = _soft_nms(boxes, scores, classes, max_det, soft_nms_sigma, max(score_threshold, 1e-3))
    else:
        out = _hard_nms(boxes, scores, classes, max_det, iou_threshold, score_threshold, backend)
    if image_scale is not None:
        out[..., :4] /= image_scale.to(out).view(B, 1, 1)
    return out


def _hard_nms(boxes, scores, classes, max_det, iou_threshold, score_threshold, backend):
    """Batched NMS over (image, class) groups, then the ``max_det`` best kept boxes of each image.

    No row is filtered out before NMS: a box under ``score_threshold`` scores lower than every box above it,
    so it can never suppress one (greedy NMS only suppresses lower scores); dropping it afterwards gives the
    same detections with shapes that never depend on the data (no host synchronisation). Ties keep the
    candidate order (stable sort), as the index order of ``kernels.batched_nms`` does.
    """
    B, K = scores.shape
    image = torch.arange(B, device=scores.device).repeat_interleave(K)
    keep = kernels.batched_nms_mask(boxes.reshape(-1, 4), scores.reshape(-1), classes.reshape(-1), iou_threshold,
                                    batch_index=image, backend=backend).view(B, K)
    keep &= scores >= score_threshold
    key = torch.where(keep, scores, torch.full_like(scores, -float("inf")))
    key, idx = torch.sort(key, dim=1, descending=True, stable=True)
    n = min(max_det, K)
    key, idx = key[:, :n], idx[:, :n]
    valid = key > -float("inf")
    rows = torch.cat([boxes.gather(1, idx[..., None].expand(-1, -1, 4)), key[..., None],
                      classes.gather(1, idx)[..., None].float()], dim=2)
    out = torch.where(valid[..., None], rows, torch.zeros_like(rows))
    out[..., 5] = torch.where(valid, out[..., 5], torch.full_like(key, -1))
    if n < max_det:
        pad = torch.zeros(B, max_det - n, 6, device=out.device)
        pad[..., 5] = -1
        out = torch.cat([out, pad], dim=1)
    return out


def _soft_nms(boxes, scores, classes, max_det, sigma, score_threshold):
    """Gaussian soft-NMS per class: each round takes the highest remaining score of every image, then decays
    the scores of that image's same-class boxes by ``exp(-iou^2 / sigma)``. Picks within a class come out with
    non-increasing scores, so taking the image-wide maximum each round gives the per-class result, in order."""
    B, K = scores.shape
    live = scores.clone()
    live[live < score_threshold] = 0
    rows = torch.arange(B, device=scores.device)
    picked_idx, picked_score = [], []
    for _ in range(min(max_det, K)):  # rounds of selection, all images at once
        s, i = live.max(dim=1)
        picked_idx.append(i)
        picked_score.append(s)
        iou = box_iou(boxes[rows, i][:, None], boxes)[:, 0]  # (B, K)
        same_class = classes == classes[rows, i][:, None]
        live = live * torch.where(same_class, torch.exp(-(iou * iou) / sigma), torch.ones_like(iou))
        live[rows, i] = 0
        live[live < score_threshold] = 0
    idx = torch.stack(picked_idx, 1)
    sc = torch.stack(picked_score, 1)
    out = torch.cat([boxes.gather(1, idx[..., None].expand(-1, -1, 4)), sc[..., None],
                     classes.gather(1, idx)[..., None].float()], dim=2)
    valid = sc > 0
    out = torch.where(valid[..., None], out, torch.zeros_like(out))
    out[..., 5] = torch.where(valid, out[..., 5], torch.full_like(sc, -1))
    if out.shape[1] < max_det:
        pad = torch.zeros(B, max_det - out.shape[1], 6, device=out.device)
        pad[..., 5] = -1
        out = torch.cat([out, pad], dim=1)
    return out
