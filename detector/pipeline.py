"""The two things a caller does with a model: predict detections, and compute the training loss.

Both take a batch as produced by ``datasets`` (images already normalized on the device) and do all of the
per-batch work on the device: no loop over images.
"""
from __future__ import annotations

import torch

from .anchors import anchors_for
from .loss import detection_loss
from .model import EfficientDet
from .postprocess import postprocess
from .targets import assign_targets


def predict(model: EfficientDet, images: torch.Tensor, image_scale: torch.Tensor | None = None,
            clip_size: torch.Tensor | None = None, soft_nms: bool | None = None,
            score_threshold: float | None = None, backend: str = "auto") -> torch.Tensor:
    """``images (B, 3, H, W)`` -> ``(B, max_det, 6)`` ``[x1, y1, x2, y2, score, class]``.

    ``image_scale (B,)``: input pixels per original pixel (detections are mapped back to original pixels);
    ``clip_size (B, 2)``: (h, w) of the real image inside the padded input, in input pixels.
    """
    cfg = model.config
    cls, box = model.flatten(*model(images))
    anchors = anchors_for(cfg, images.shape[-2:], device=images.device)
    return postprocess(
        cls, box, anchors, image_scale=image_scale, clip_size=clip_size,
        max_detection_points=cfg.max_detection_points, max_det=cfg.max_det_per_image, iou_threshold=cfg.nms_iou,
        score_threshold=cfg.score_threshold if score_threshold is None else score_threshold,
        soft_nms=cfg.soft_nms if soft_nms is None else soft_nms, soft_nms_sigma=cfg.soft_nms_sigma,
        backend=backend)


def compute_loss(model: EfficientDet, images: torch.Tensor, gt_boxes: torch.Tensor, gt_labels: torch.Tensor,
                 normalizer_fn=None, backend: str = "auto") -> dict:
    """Forward + targets + loss. ``normalizer_fn(num_pos_sum) -> tensor`` lets DDP sum positives over workers.

    ``model`` may be wrapped in DistributedDataParallel (its forward is what synchronizes gradients).
    Returns ``{"loss", "cls_loss", "box_loss", "num_pos"}`` (tensors, no host sync).
    """
    cfg = getattr(model, "module", model).config
    cls, box = EfficientDet.flatten(*model(images))
    anchors = anchors_for(cfg, images.shape[-2:], device=images.device)
    targets = assign_targets(gt_boxes, gt_labels, anchors)
    num_pos = targets.num_pos.sum()
    normalizer = (normalizer_fn(num_pos) if normalizer_fn is not None else num_pos) + 1.0
    total, cls_loss, box_loss = detection_loss(
        cls, box, targets, alpha=cfg.alpha, gamma=cfg.gamma, delta=cfg.delta, box_loss_weight=cfg.box_loss_weight,
        label_smoothing=cfg.label_smoothing, normalizer=normalizer, backend=backend)
    return {"loss": total, "cls_loss": cls_loss, "box_loss": box_loss, "num_pos": num_pos}
