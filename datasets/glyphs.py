"""A second synthetic family, unlike the shapes set: many small rendered characters on cluttered backgrounds.

Where the shapes set has 3 classes, 24-128 px objects and at most 5 per image, the glyphs set has 10
classes (the digits; up to 20 with ten letters), 12-40 px objects and 10-30 per image, drawn in random
colours with small rotations on gradients, blotches, stripes and noise, crossed by random strokes and
dots that are not objects. Glyphs may partly overlap; a later glyph can hide part of an earlier one.

The ground-truth box of a glyph is the bounding box of its own ink: the character is rendered alone
into a mask (Pillow's built-in scalable font), rotated, and the mask's pixels at or above
``INK_THRESHOLD`` give the box; pixels below it are cleared, so no ink of the glyph lies outside
its box. The size drawn for a glyph is the longer side of that box.

``datasets.synthetic`` writes, caches and names the set (``--family glyphs``); this module only draws.
Every image is drawn from ``numpy.random.default_rng([seed, split, index, 1])``.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from .synthetic import _iou_and_cover  # (largest IoU with boxes, largest share of one of them covered)

__all__ = ["GLYPHS", "GENERATOR_VERSION", "DEFAULTS", "INK_THRESHOLD", "render_glyph", "render_image",
           "check_params"]

GLYPHS = "0123456789AEFHKLMPRT"  # digits, then letters that are not a digit's look-alike
GENERATOR_VERSION = 1  # bump when the drawing changes: it is part of the cache folder name
INK_THRESHOLD = 64  # mask value (0..255) from which a pixel counts as the glyph's ink
_FAMILY_SEED = 1  # appended to the rng seed so a glyphs image never shares a stream with a shapes image

# What ``--family glyphs`` uses for every flag left out: trains to a non-trivial AP on 2 CPU cores in minutes.
DEFAULTS = {"num_train": 800, "num_val": 150, "image_size": 320, "num_classes": 10, "min_object": 12,
            "max_object": 40, "min_objects_per_image": 10, "max_objects_per_image": 30}


def check_params(num_classes: int, min_object: int, max_object: int, image_size: int, min_objects: int,
                 max_objects: int) -> None:
    if not 1 <= num_classes <= len(GLYPHS):
        raise ValueError(f"glyphs: num_classes must be 1..{len(GLYPHS)}, got {num_classes}")
    if not 6 <= min_object <= max_object:
        raise ValueError(f"glyphs: need 6 <= min_object <= max_object, got {min_object}, {max_object}")
    if image_size < max_object + 2:
        raise ValueError(f"glyphs: image_size {image_size} must exceed max_object {max_object} by 2 or more")
    if not 1 <= min_objects <= max_objects:
        raise ValueError(f"glyphs: need 1 <= min_objects_per_image <= max_objects_per_image, "
                         f"got {min_objects}, {max_objects}")


@lru_cache(maxsize=16)
def _font(px: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=px)
    except TypeError:  # Pillow < 10.1 has only a fixed bitmap font: scaled in _raw_mask
        return None


@lru_cache(maxsize=4096)
def _raw_mask(char: str, px: int) -> np.ndarray:
    """The character at font size ``px`` as a uint8 mask cropped to its ink (may be empty)."""
    from PIL import Image, ImageDraw, ImageFont

    font = _font(px)
    if font is None:
        small = Image.new("L", (16, 16), 0)
        ImageDraw.Draw(small).text((2, 1), char, fill=255, font=ImageFont.load_default())
        im = small.resize((16 * px // 11 + 1,) * 2, Image.BILINEAR)
    else:
        im = Image.new("L", (2 * px + 8, 2 * px + 8), 0)
        ImageDraw.Draw(im).text((4, 4), char, fill=255, font=font)
    return _crop(np.asarray(im, dtype=np.uint8))


def _crop(mask: np.ndarray) -> np.ndarray:
    """``mask`` with pixels below INK_THRESHOLD cleared, cropped to the remaining ink."""
    mask = np.where(mask >= INK_THRESHOLD, mask, 0).astype(np.uint8)
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return mask[:0, :0]
    return mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


def render_glyph(char: str, size: int, angle: float = 0.0) -> np.ndarray:
    """The uint8 mask of ``char``, rotated by ``angle`` degrees and cropped to its ink box (every border
    row and column holds ink). Unrotated, the box's longer side is ``size`` pixels; a rotation grows it
    (``render_image`` rejects a glyph whose rotated box falls outside its size range)."""
    from PIL import Image

    px = max(4, size)
    for _ in range(3):  # font size -> ink size is close to linear: a couple of corrections suffice
        m = _raw_mask(char, px)
        side = max(m.shape) if m.size else 0
        if side == size or side == 0:
            break
        px = max(4, int(round(px * size / side)))
    m = _raw_mask(char, px)
    if angle:
        m = np.asarray(Image.fromarray(m).rotate(angle, resample=Image.BILINEAR, expand=True), dtype=np.uint8)
    return _crop(m)


def _strokes(draw, rng, size: int, count: int) -> None:
    """Distractors: lines, arcs and dots in random colours (clutter, not objects)."""
    for _ in range(count):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = rng.integers(0, 3)
        x, y = rng.uniform(0, size, 2)
        if kind == 0:
            length, ang = rng.uniform(10, size / 2), rng.uniform(0, 2 * math.pi)
            draw.line([x, y, x + length * math.cos(ang), y + length * math.sin(ang)], fill=colour,
                      width=int(rng.integers(1, 4)))
        elif kind == 1:
            r = rng.uniform(8, size / 4)
            a0 = rng.uniform(0, 360)
            draw.arc([x - r, y - r, x + r, y + r], a0, a0 + rng.uniform(40, 200), fill=colour,
                     width=int(rng.integers(1, 3)))
        else:
            r = rng.uniform(1, 3)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)


def render_image(seed: int, split: int, index: int, size: int, num_classes: int, min_object: int,
                 max_object: int, textured: bool, min_objects: int, max_objects: int):
    """One image (uint8 HWC) and its objects ``[(class index, [x0, y0, x1, y1], ink pixels), ...]``;
    the box covers pixel columns x0..x1-1 and rows y0..y1-1."""
    from PIL import Image, ImageDraw

    from .synthetic import _background

    rng = np.random.default_rng([seed, split, index, _FAMILY_SEED])
    bg = _background(rng, size, textured)
    if textured:
        im = Image.fromarray(bg)
        _strokes(ImageDraw.Draw(im), rng, size, int(rng.integers(4, 16)))
        bg = np.asarray(im, dtype=np.uint8)
    canvas = bg.astype(np.float32)
    want = int(rng.integers(min_objects, max_objects + 1))
    objects, boxes = [], []
    for _ in range(want * 10):
        if len(objects) >= want:
            break
        cls = int(rng.integers(0, num_classes))
        s = int(round(math.exp(rng.uniform(math.log(min_object), math.log(max_object)))))
        angle = float(rng.uniform(-15, 15)) if rng.random() < 0.5 else 0.0
        mask = render_glyph(GLYPHS[cls], s, angle)
        h, w = mask.shape
        if not (h and w) or not min_object <= max(h, w) <= max_object or h > size or w > size:
            continue
        x0, y0 = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
        box = [x0, y0, x0 + w, y0 + h]
        iou, cover = _iou_and_cover(box, boxes)
        if iou > 0.25 or cover > 0.4:  # partial overlap only: every glyph stays mostly visible
            continue
        region = canvas[y0:y0 + h, x0:x0 + w].reshape(-1, 3).mean(axis=0)
        colour = rng.integers(0, 256, 3).astype(np.float32)
        if np.abs(colour - region).sum() < 200:  # keep contrast with what lies underneath
            colour = np.where(region > 127, rng.integers(0, 50, 3), rng.integers(206, 256, 3)).astype(np.float32)
        alpha = mask.astype(np.float32)[..., None] / 255.0
        patch = canvas[y0:y0 + h, x0:x0 + w]
        canvas[y0:y0 + h, x0:x0 + w] = patch * (1 - alpha) + colour * alpha
        objects.append((cls, box, int((mask > 0).sum())))
        boxes.append(box)
    if textured and rng.random() < 0.5:  # sensor-like noise on half of the images
        canvas += rng.standard_normal((size, size, 3), dtype=np.float32) * float(rng.uniform(0, 10))
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8), objects
