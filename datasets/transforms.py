"""Train and eval transforms on the sample dicts of ``datasets.coco``.

Both output an image of exactly the target size ``(H, W)`` (uint8 HWC), boxes xyxy in those
pixels, and ``"scale"`` = input pixels per original pixel, so ``original = detection / scale``
(padding is at the bottom/right only, crops only happen in training). ``"orig_size"`` is kept.

Randomness (train): every draw comes from ``numpy.random.default_rng([seed, epoch, index])``,
in a fixed order (flip, scale, crop y, crop x), so an augmented sample depends only on those
three numbers -- not on worker count, worker id or any global RNG state.
"""
from __future__ import annotations

import numpy as np

__all__ = ["TrainTransform", "EvalTransform", "build_transform", "IMAGENET_MEAN_PIXEL", "INTERPOLATIONS",
           "resize_filter", "resize_image", "clip_and_filter_boxes"]

# ImageNet mean in 0..255; the default pad colour, so padding is ~0 after normalization.
IMAGENET_MEAN_PIXEL = (124, 116, 104)


def _size_pair(size):
    if isinstance(size, int):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


# resize filters by name: the values of NVIDIA's --interpolation / --train-interpolation that its
# data/transforms.py::_pil_interp resizes with. There "" and "random" (its --train-interpolation default) fall
# through to bilinear (no per-image draw), as does "nearest"; here "nearest" is the nearest filter, as named.
INTERPOLATIONS = ("", "random", "bilinear", "bicubic", "nearest", "lanczos", "hamming")


def resize_filter(name: str):
    """The Pillow filter ``name`` resizes with (``PIL.Image.Resampling``)."""
    from PIL import Image

    _check_interpolation(name)
    return {"bicubic": Image.Resampling.BICUBIC, "nearest": Image.Resampling.NEAREST,
            "lanczos": Image.Resampling.LANCZOS, "hamming": Image.Resampling.HAMMING}.get(
        name, Image.Resampling.BILINEAR)


def resize_image(image: np.ndarray, out_hw, box=None, interpolation: str = "bilinear") -> np.ndarray:
    """Pillow resize (bilinear by default) of a uint8 HWC image to ``out_hw``; ``box`` = the source region
    ``(x0, y0, x1, y1)`` (floats allowed) that is resized, default the whole image."""
    from PIL import Image

    oh, ow = int(out_hw[0]), int(out_hw[1])
    if box is None and (oh, ow) == image.shape[:2]:
        return image
    im = Image.fromarray(image)
    return np.asarray(im.resize((ow, oh), resize_filter(interpolation), box=box), dtype=np.uint8)


def _check_interpolation(name: str, allowed=INTERPOLATIONS) -> str:
    if name not in allowed:
        raise ValueError(f"interpolation {name!r}: choose one of {', '.join(map(repr, allowed))}")
    return name


def clip_and_filter_boxes(boxes: np.ndarray, labels: np.ndarray, h: float, w: float, min_size: float = 1.0):
    """Clip xyxy boxes to ``[0, w] x [0, h]`` and drop those narrower or lower than ``min_size``."""
    boxes = boxes.astype(np.float32, copy=True).reshape(-1, 4)
    np.clip(boxes[:, 0::2], 0.0, w, out=boxes[:, 0::2])
    np.clip(boxes[:, 1::2], 0.0, h, out=boxes[:, 1::2])
    keep = ((boxes[:, 2] - boxes[:, 0]) >= min_size) & ((boxes[:, 3] - boxes[:, 1]) >= min_size)
    return boxes[keep], labels.reshape(-1)[keep]


def _place(image: np.ndarray, out_hw, fill) -> np.ndarray:
    """Put ``image`` at the top-left of an ``out_hw`` canvas filled with ``fill``."""
    oh, ow = out_hw
    if image.shape[:2] == (oh, ow):
        return np.ascontiguousarray(image)
    canvas = np.empty((oh, ow, 3), dtype=np.uint8)
    canvas[...] = np.asarray(fill, dtype=np.uint8)
    h, w = image.shape[:2]
    canvas[:h, :w] = image
    return canvas


def _out(sample, image, boxes, labels, scale):
    out = dict(sample)
    out.update(image=image, boxes=boxes.astype(np.float32).reshape(-1, 4),
               labels=labels.astype(np.int64).reshape(-1), scale=float(scale))
    out.setdefault("orig_size", tuple(sample["image"].shape[:2]))
    return out


class EvalTransform:
    """Resize to fit (longest side -> target) and pad bottom/right to the target size."""

    def __init__(self, target_size, fill=IMAGENET_MEAN_PIXEL, interpolation: str = "bilinear"):
        self.target_size = _size_pair(target_size)
        self.fill = tuple(int(v) for v in fill)
        self.interpolation = _check_interpolation(interpolation)

    def set_epoch(self, epoch: int) -> None:  # uniform interface; nothing random here
        pass

    def __call__(self, sample: dict, index: int = 0, epoch=None) -> dict:
        image = sample["image"]
        h, w = image.shape[:2]
        th, tw = self.target_size
        s = min(th / h, tw / w)
        # truncated, as effdet's and NVIDIA's ResizePad size it (int(h * s)): rounding gave another input
        # size, and other detections, for e.g. 427 x 640 at 256 px
        rh, rw = min(th, max(1, int(h * s))), min(tw, max(1, int(w * s)))
        resized = resize_image(image, (rh, rw), interpolation=self.interpolation)
        boxes = sample["boxes"].reshape(-1, 4) * np.array([rw / w, rh / h, rw / w, rh / h], dtype=np.float32)
        boxes, labels = clip_and_filter_boxes(boxes, sample["labels"], rh, rw)
        return _out(sample, _place(resized, (th, tw), self.fill), boxes, labels, s)

    def __repr__(self):
        return f"EvalTransform(target_size={self.target_size})"


class TrainTransform:
    """Random horizontal flip, then scale jitter of the resize-to-fit scale, random crop, pad.

    The resize-to-fit scale ``s0 = min(H/h, W/w)`` is multiplied by ``j ~ U(scale_range)``; the
    image is resized by ``s = s0 * j``; where it is larger than the target a random crop window is
    taken, where smaller it is padded bottom/right. Boxes follow, are clipped to the crop and
    dropped when under ``min_box_size`` px. Only the crop window is resized (pillow ``box=``), so
    large jitter costs no more than the output size.
    """

    def __init__(self, target_size, seed: int = 0, scale_range=(0.1, 2.0), flip_prob: float = 0.5,
                 fill=IMAGENET_MEAN_PIXEL, min_box_size: float = 1.0, interpolation: str = "bilinear"):
        self.target_size = _size_pair(target_size)
        self.seed = int(seed)
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        if not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise ValueError(f"scale_range must be 0 < low <= high, got {scale_range}")
        self.flip_prob = float(flip_prob)
        self.fill = tuple(int(v) for v in fill)
        self.min_box_size = float(min_box_size)
        self.interpolation = _check_interpolation(interpolation)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def rng(self, index: int, epoch=None) -> np.random.Generator:
        epoch = self.epoch if epoch is None else int(epoch)
        return np.random.default_rng([self.seed, epoch, int(index)])

    def __call__(self, sample: dict, index: int = 0, epoch=None) -> dict:
        rng = self.rng(index, epoch)
        flip = rng.random() < self.flip_prob
        jitter = rng.uniform(*self.scale_range)
        uy, ux = rng.random(), rng.random()
        interpolation = self.interpolation

        image = sample["image"]
        h, w = image.shape[:2]
        boxes = sample["boxes"].reshape(-1, 4).astype(np.float32)
        if flip:
            image = image[:, ::-1]
            boxes = np.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], axis=1)
        th, tw = self.target_size
        s = min(th / h, tw / w) * jitter
        rh, rw = max(1, round(h * s)), max(1, round(w * s))
        fy, fx = rh / h, rw / w  # exact per-axis factors of the resized image
        oy = int(np.floor(uy * (rh - th + 1))) if rh > th else 0
        ox = int(np.floor(ux * (rw - tw + 1))) if rw > tw else 0
        ch, cw = min(th, rh), min(tw, rw)
        region = (ox / fx, oy / fy, (ox + cw) / fx, (oy + ch) / fy)
        crop = resize_image(np.ascontiguousarray(image), (ch, cw), box=region, interpolation=interpolation)
        boxes = boxes * np.array([fx, fy, fx, fy], dtype=np.float32) - np.array([ox, oy, ox, oy], dtype=np.float32)
        boxes, labels = clip_and_filter_boxes(boxes, sample["labels"], ch, cw, self.min_box_size)
        return _out(sample, _place(crop, (th, tw), self.fill), boxes, labels, s)

    def __repr__(self):
        return (f"TrainTransform(target_size={self.target_size}, seed={self.seed}, "
                f"scale_range={self.scale_range}, flip_prob={self.flip_prob})")


def build_transform(train: bool, target_size, seed: int = 0, **kwargs):
    """``TrainTransform`` when ``train`` else ``EvalTransform``."""
    if train:
        return TrainTransform(target_size, seed=seed, **kwargs)
    return EvalTransform(target_size, **{k: v for k, v in kwargs.items() if k in ("fill", "interpolation")})
