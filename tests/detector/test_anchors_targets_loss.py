"""Anchors, box coding, target assignment and the loss, against docs/design.md and effdet."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from detector import anchors_for, get_config
from detector.boxes import encode
from detector.loss import detection_loss
from detector.targets import assign_targets
import kernels


def xyxy_to_yxyx(b):
    return b[..., [1, 0, 3, 2]]


def test_anchor_count_and_first_two():
    a = anchors_for(get_config("efficientdet_d0"))
    assert a.shape == (49104, 4) and a.dtype == torch.float32
    yxyx = xyxy_to_yxyx(a[:2])
    torch.testing.assert_close(yxyx, torch.tensor([[-12.0, -12.0, 20.0, 20.0], [-7.2, -18.4, 15.2, 26.4]]))
    assert anchors_for(get_config("efficientdet_d0")) is a  # cached per size


@pytest.mark.parametrize("name", ["tf_efficientdet_d0", "tf_efficientdet_d3", "tf_efficientdet_d7x"])
def test_anchors_equal_effdet(effdet, name):
    from effdet.anchors import Anchors
    from effdet.config import get_efficientdet_config

    ref = Anchors.from_config(get_efficientdet_config(name)).boxes
    ours = anchors_for(get_config(name))
    assert ours.shape == ref.shape
    torch.testing.assert_close(xyxy_to_yxyx(ours), ref.float(), rtol=0, atol=1e-4)


def _random_gt(B, M, size, seed, crowd=False):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(B, M, 2, generator=g) * size * 0.8
    wh = torch.rand(B, M, 2, generator=g) * size * 0.5 + 2
    boxes = torch.cat([xy, (xy + wh).clamp(max=size)], -1)
    labels = torch.randint(0, 5, (B, M), generator=g)
    n = torch.randint(0, M + 1, (B,), generator=g)
    n[0] = M
    labels[torch.arange(M)[None] >= n[:, None]] = -1  # padding
    return boxes, labels


def test_targets_equal_effdet_labeler(effdet):
    from effdet.anchors import AnchorLabeler, Anchors
    from effdet.config import get_efficientdet_config

    cfg = get_efficientdet_config("efficientdet_d0")
    cfg.image_size = (256, 256)
    ref_anchors = Anchors.from_config(cfg)
    labeler = AnchorLabeler(ref_anchors, 5, match_threshold=0.5)
    ours_cfg = get_config("efficientdet_d0", image_size=256)
    anchors = anchors_for(ours_cfg)
    boxes, labels = _random_gt(4, 12, 256, seed=1)
    t = assign_targets(boxes, labels, anchors)
    for i in range(4):
        rc, rb, rn = labeler.label_anchors(xyxy_to_yxyx(boxes[i]), labels[i] + 1 - 2 * (labels[i] < 0).long())
        rc = torch.cat([c.reshape(-1) for c in rc])
        rb = torch.cat([b.reshape(-1, 4) for b in rb])
        assert torch.equal(t.cls[i], rc), (t.cls[i] != rc).nonzero()[:5]
        torch.testing.assert_close(t.box[i], rb, rtol=1e-5, atol=1e-5)
        assert t.num_pos[i].item() == rn.item()


def test_targets_edge_cases():
    anchors = anchors_for(get_config("efficientdet_d0", image_size=128))
    empty = assign_targets(torch.zeros(2, 0, 4), torch.zeros(2, 0, dtype=torch.long), anchors)
    assert (empty.cls == -1).all() and empty.num_pos.tolist() == [0, 0]
    # one image all padding, one with a box and an overlapping crowd region
    boxes = torch.tensor([[[0, 0, 10, 10.0], [0, 0, 0, 0]], [[10, 10, 60, 60.0], [60, 60, 120, 120.0]]])
    labels = torch.tensor([[-1, -1], [3, -2]])
    t = assign_targets(boxes, labels, anchors)
    assert (t.cls[0] == -1).all() and t.num_pos[0] == 0
    assert (t.cls[1] == 3).sum() == t.num_pos[1] > 0
    assert (t.cls[1] == -2).any(), "anchors on a crowd box are ignored"
    assert not ((t.cls[1] >= 0) & (t.cls[1] != 3)).any()


@given(st.integers(0, 10_000))
def test_decode_inverts_encode(seed):
    g = torch.Generator().manual_seed(seed)
    anchors = torch.rand(64, 2, generator=g) * 200
    anchors = torch.cat([anchors, anchors + torch.rand(64, 2, generator=g) * 100 + 10], 1)  # ratios stay below the exp clamp
    boxes = torch.rand(64, 2, generator=g) * 200
    boxes = torch.cat([boxes, boxes + torch.rand(64, 2, generator=g) * 100 + 1], 1)
    back = kernels.decode_boxes(encode(boxes, anchors), anchors, backend="torch")
    torch.testing.assert_close(back, boxes, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_loss_equals_effdet(effdet, smoothing):
    from effdet.anchors import AnchorLabeler, Anchors
    from effdet.config import get_efficientdet_config
    from effdet.loss import DetectionLoss

    C = 5
    cfg = get_efficientdet_config("efficientdet_d0")
    cfg.image_size, cfg.num_classes, cfg.label_smoothing = (128, 128), C, smoothing
    labeler = AnchorLabeler(Anchors.from_config(cfg), C, match_threshold=0.5)
    ours_cfg = get_config("efficientdet_d0", image_size=128, num_classes=C)
    anchors = anchors_for(ours_cfg)
    boxes, labels = _random_gt(3, 6, 128, seed=2)
    g = torch.Generator().manual_seed(3)
    sizes = [16, 8, 4, 2, 1]
    cls_out = [torch.randn(3, 9 * C, s, s, generator=g) * 2 for s in sizes]
    box_out = [torch.randn(3, 36, s, s, generator=g) * 0.5 for s in sizes]
    rc, rb, rn = labeler.batch_label_anchors(
        [xyxy_to_yxyx(b) for b in boxes], [l + 1 - 2 * (l < 0).long() for l in labels])
    ref = DetectionLoss(cfg)(cls_out, box_out, rc, rb, rn)

    from detector.model import EfficientDet
    fc, fb = EfficientDet.flatten(cls_out, box_out)
    t = assign_targets(boxes, labels, anchors)
    ours = detection_loss(fc, fb, t, label_smoothing=smoothing, backend="torch")
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r.float(), rtol=1e-5, atol=0)


def test_loss_ignores_ignored_anchors_and_has_gradients():
    C = 3
    logits = torch.randn(2, 50, C, requires_grad=True)
    deltas = torch.randn(2, 50, 4, requires_grad=True)
    cls = torch.full((2, 50), -1)
    cls[0, :5] = 1
    from detector.targets import Targets
    t = Targets(cls, torch.randn(2, 50, 4), torch.tensor([5.0, 0.0]))
    total, c, b = detection_loss(logits, deltas, t, backend="torch")
    total.backward()
    assert deltas.grad[0, 5:].abs().sum() == 0 and deltas.grad[0, :5].abs().sum() > 0
    cls2 = cls.clone()
    cls2[1, :10] = -2
    _, c2, _ = detection_loss(logits, deltas, Targets(cls2, t.box, t.num_pos), backend="torch")
    assert c2 < c


def test_box_loss_is_the_huber_formula_on_positives():
    """The fused ``F.huber_loss`` equals ``huber(x - y, delta)`` masked to positives (values and gradient),
    at 0, at exactly +-delta and beyond; a NaN delta of a non-positive anchor still makes the loss NaN."""
    from detector.loss import huber
    from detector.targets import Targets
    g = torch.Generator().manual_seed(0)
    B, N, delta = 2, 30, 0.1
    deltas = torch.randn(B, N, 4, generator=g) * 0.2
    deltas[0, 0] = torch.tensor([0.0, 0.1, -0.1, 0.35])
    box = torch.randn(B, N, 4, generator=g) * 0.1
    cls = torch.randint(-2, 3, (B, N), generator=g)
    cls[0, 0] = 1
    box = torch.where((cls >= 0)[..., None], box, 0.0)
    box[0, 0] = 0.0
    t = Targets(cls, box, (cls >= 0).sum(1).float())
    norm = t.num_pos.sum() + 1.0
    x1, x2 = deltas.clone().requires_grad_(True), deltas.clone().requires_grad_(True)
    _, _, got = detection_loss(torch.zeros(B, N, 3), x1, t, delta=delta, normalizer=norm)
    want = (huber(x2 - box, delta) * (cls >= 0)[..., None]).sum() / (4.0 * norm)
    got.backward()
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-6, atol=1e-9)
    bad = deltas.clone()
    bad[(cls < 0).nonzero()[0].tolist()] = float("nan")
    assert detection_loss(torch.zeros(B, N, 3), bad, t, delta=delta, normalizer=norm)[2].isnan()


def _old_assign_targets(gt_boxes, gt_labels, anchors, match_threshold=0.5):
    """assign_targets as it was before its IoU matrix was laid out (B, N, M): the oracle it is pinned to."""
    from detector.boxes import box_iou
    B, M = gt_labels.shape
    N = anchors.shape[0]
    iou = box_iou(gt_boxes, anchors.expand(B, N, 4))
    valid, crowd = gt_labels >= 0, gt_labels == -2
    iou_valid = iou.masked_fill(~valid[..., None], -1.0)
    best_iou, best_gt = iou_valid.amax(dim=1), iou_valid.argmax(dim=1)
    matches = torch.where(best_iou >= match_threshold, best_gt, torch.full_like(best_gt, -1))
    best_anchor = iou_valid.argmax(dim=2)
    box_index = torch.arange(M).expand(B, M)
    claim = torch.where(valid, box_index, torch.full_like(box_index, M))
    forced = torch.full((B, N), M, dtype=torch.long)
    forced.scatter_reduce_(1, best_anchor, claim, reduce="amin")
    matches = torch.where(forced < M, forced, matches)
    positive = matches >= 0
    idx = matches.clamp(min=0)
    cls = torch.where(positive, gt_labels.gather(1, idx), torch.full_like(idx, -1))
    if crowd.any():
        crowd_iou = iou.masked_fill(~crowd[..., None], 0.0).amax(dim=1)
        cls = torch.where(~positive & (crowd_iou >= match_threshold), torch.full_like(cls, -2), cls)
    matched = gt_boxes.gather(1, idx[..., None].expand(B, N, 4))
    box = torch.where(positive[..., None], encode(matched, anchors), torch.zeros_like(matched))
    return cls, box, positive.sum(1).float()


@pytest.mark.parametrize("seed", range(4))
def test_targets_equal_old_formulation_exactly(seed):
    """Bitwise the same targets as the (B, M, N) formulation, with duplicate boxes (IoU ties), crowd boxes,
    padding and an all-padding image."""
    anchors = anchors_for(get_config("efficientdet_d0", image_size=128))
    boxes, labels = _random_gt(3, 7, 128, seed=seed)
    boxes[:, 1], labels[:, 1] = boxes[:, 0], torch.where(labels[:, 0] >= 0, 4, labels[:, 1])  # ties
    labels[1, 2] = -2                                                                       # crowd
    labels[2] = -1                                                                          # no boxes
    t = assign_targets(boxes, labels, anchors)
    cls, box, num_pos = _old_assign_targets(boxes, labels, anchors)
    assert torch.equal(t.cls, cls) and torch.equal(t.box, box) and torch.equal(t.num_pos, num_pos)
    assert (t.cls >= 0).any()
