"""Benchmark cases for kernels.batched_nms (post-processing: many images x top-k candidates x classes)."""
from __future__ import annotations

import torch

from bench.harness import Case


def _inputs(images, per_image, classes, device, seed=0):
    """Detector-like candidates: half jittered around a few objects per image (heavy overlap), half
    spread over the image; scores in (0, 1), classes uniform."""
    g = torch.Generator().manual_seed(seed)
    n = images * per_image
    objects = torch.rand(images, 20, 4, generator=g) * torch.tensor([400., 400., 100., 100.])
    objects = torch.cat([objects[..., :2], objects[..., :2] + 16 + objects[..., 2:]], -1)
    pick = torch.randint(0, 20, (images, per_image), generator=g)
    clustered = torch.gather(objects, 1, pick[..., None].expand(-1, -1, 4)) + torch.randn(images, per_image, 4,
                                                                                         generator=g) * 4
    xy = torch.rand(images, per_image, 2, generator=g) * 480
    spread = torch.cat([xy, xy + 8 + torch.rand(images, per_image, 2, generator=g) * 120], -1)
    half = torch.rand(images, per_image, 1, generator=g) < 0.5
    boxes = torch.where(half, clustered, spread)
    scores = torch.rand(images, per_image, generator=g)
    cls = torch.randint(0, classes, (images, per_image), generator=g)
    bi = torch.arange(images)[:, None].expand(images, per_image)
    return [t.to(device) for t in (boxes, scores, cls, bi)], n


def _min_bytes(boxes, scores, cls, bi, n):
    """Inputs read once, the kept indices written (at most n), and the suppression bitmask the Triton
    path needs at the least: one 64-bit word per (box, later 64-box block of its segment), written
    once and read once. Segment sizes are counted here, outside the timed region."""
    group = (bi.reshape(n).long() * (int(cls.max()) + 1) + cls.reshape(n).long()).cpu()
    sizes = torch.bincount(group).double()
    mask_words = float((sizes * torch.ceil(sizes / 64)).sum())
    inputs = n * (4 * boxes.element_size() + scores.element_size() + cls.element_size() + bi.element_size())
    return int(inputs + n * 8 + 2 * 8 * mask_words)


def _make(label, images, per_image, classes, device, quick, iou=0.5):
    from kernels.nms import batched_nms, batched_nms_reference

    (boxes, scores, cls, bi), n = _inputs(images, per_image, classes, device)
    fb, fs, fc, fi = boxes.reshape(n, 4), scores.reshape(n), cls.reshape(n), bi.reshape(n)
    one_image = images == 1
    providers = {
        "triton": lambda: batched_nms(fb, fs, fc, iou, None if one_image else fi, backend="triton"),
        "reference": lambda: batched_nms_reference(fb, fs, fc, iou, None if one_image else fi),
    }
    try:
        import torchvision

        idxs = fi * classes + fc
        providers["peer:torchvision-batched"] = lambda: torchvision.ops.batched_nms(fb, fs, idxs, iou)
        if not one_image:
            def tv_loop():
                return [torchvision.ops.batched_nms(boxes[k], scores[k], cls[k], iou) for k in range(images)]

            providers["peer:torchvision-loop"] = tv_loop
    except ImportError:
        pass
    return Case(op="batched_nms", shape=label, providers=providers,
                bytes_moved=_min_bytes(boxes, scores, cls, bi, n),
                setup=f"{images} images x {per_image} candidates, {classes} classes, IoU {iou}, fp32 boxes, "
                      "half clustered on 20 objects per image, half spread")


def cases(quick: bool, device) -> list[Case]:
    device = torch.device(device)
    if quick:
        return [_make("tiny 2x100x5", 2, 100, 5, device, quick),
                _make("tiny 1x200 one class", 1, 200, 1, device, quick)]
    return [_make("16 images x 5000 x 90 classes", 16, 5000, 90, device, quick),
            _make("8 images x 5000 x 90 classes", 8, 5000, 90, device, quick),
            _make("32 images x 5000 x 90 classes", 32, 5000, 90, device, quick),
            _make("1 image x 20000 boxes, one class", 1, 20000, 1, device, quick)]
