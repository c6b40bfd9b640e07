"""Batched anchor target assignment on the device (effdet's AnchorLabeler, without a loop over images).

Matching per image: IoU of every ground-truth box with every anchor; an anchor takes its best box when that
IoU >= ``match_threshold`` (ties: the lower box index) and is background otherwise; then every box also claims
its own best anchor (ties: the lower anchor index; an anchor claimed by several boxes goes to the lowest box
index), whatever that IoU is. Crowd boxes (label -2) never match: background anchors overlapping a crowd
box with IoU >= ``match_threshold`` are ignored (-2) instead.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .boxes import box_iou, encode

BACKGROUND, IGNORE = -1, -2


@dataclass
class Targets:
    cls: torch.Tensor  # (B, N) int64: -1 background, -2 ignore, k >= 0 class
    box: torch.Tensor  # (B, N, 4) float32 (dy, dx, dh, dw); zero where not positive
    num_pos: torch.Tensor  # (B,) float32 positives per image


def assign_targets(gt_boxes: torch.Tensor, gt_labels: torch.Tensor, anchors: torch.Tensor,
                   match_threshold: float = 0.5) -> Targets:
    """``gt_boxes (B, M, 4)`` xyxy, ``gt_labels (B, M)`` (-1 padding, -2 crowd), ``anchors (N, 4)`` -> Targets."""
    B, M = gt_labels.shape
    N = anchors.shape[0]
    gt_boxes = gt_boxes.float()
    anchors = anchors.to(gt_boxes.device)
    if M == 0:
        return Targets(torch.full((B, N), BACKGROUND, dtype=torch.long, device=anchors.device),
                       anchors.new_zeros(B, N, 4), anchors.new_zeros(B))
    # (B, N, M): the box axis last, so the per-anchor reductions over boxes run along contiguous memory
    # (a reduction over a short strided axis is ~10x slower); IoU is symmetric, so the values are the same
    iou = box_iou(anchors.expand(B, N, 4), gt_boxes)
    valid = gt_labels >= 0  # real, non-crowd boxes
    crowd = gt_labels == IGNORE
    iou_valid = iou.masked_fill(~valid[:, None, :], -1.0)

    best_iou, best_gt = iou_valid.max(dim=2)  # (B, N); first max on ties
    matches = torch.where(best_iou >= match_threshold, best_gt, -1)

    # every valid box claims its best anchor; lowest box index wins a shared anchor
    best_anchor = iou_valid.argmax(dim=1)  # (B, M)
    claim = torch.where(valid, torch.arange(M, device=gt_labels.device), M)
    forced = torch.full((B, N), M, dtype=torch.long, device=gt_labels.device)
    forced.scatter_reduce_(1, best_anchor, claim, reduce="amin")
    matches = torch.where(forced < M, forced, matches)

    positive = matches >= 0
    idx = matches.clamp(min=0)
    cls = torch.where(positive, gt_labels.gather(1, idx), BACKGROUND)
    if crowd.any():
        crowd_iou = iou.masked_fill(~crowd[:, None, :], 0.0).amax(dim=2)
        cls = torch.where(~positive & (crowd_iou >= match_threshold), IGNORE, cls)
    matched_boxes = gt_boxes.gather(1, idx[..., None].expand(B, N, 4))
    box = torch.where(positive[..., None], encode(matched_boxes, anchors), 0.0)
    return Targets(cls, box, positive.sum(1).float())
