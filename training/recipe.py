"""The small-data recipe, fitted to the training set's own statistics.

``SMALL_RECIPE`` (``training/config.py``) holds the settings that do not depend on the data (AdamW, EMA with
warm-up, fast BN statistics, gentle scale jitter). ``fit_small_recipe`` fills in the ones that do, from
``DataStats`` measured on the training annotations:

* **input size**: the smallest of 128 / 256 / 384 / 512 px at which the median object spans at least
  ``MIN_OBJECT_PX`` input pixels (never above the images' own size, rounded up to a multiple of 128).
  D0's smallest anchors are 32 px; an object much smaller than that overlaps no anchor well, and every
  doubling of the input costs four times the compute, so the smallest size that keeps objects visible wins.
* **batch size** and **learning rate**: 16 images at 128 px, 8 at 256, 4 above (about the same compute per
  step); the AdamW learning rate scales with the square root of the batch (2e-3 at 16).
* **epochs** (the length of the cosine schedule): about ``IMAGE_VIEWS`` images seen in all, 10 to 300 epochs,
  so a small set is revisited often and a larger one not for hours.

The class count sets the class head's width and nothing else here, and objects per image change nothing
either; a 10-class set with up to 30 small objects per image trains under these rules (its curve is in
``bench/RESULTS.md``, "Glyphs"), though 10 minutes of a 2-core CPU are far from enough for it.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

INPUT_SIZES = (128, 256, 384, 512)
MIN_OBJECT_PX = 20  # the median object spans at least this many input pixels (sqrt of its area)
IMAGE_VIEWS = 18_000  # images seen in one schedule: 30 epochs of the built-in set's 600 images
EPOCH_RANGE = (10, 300)


@dataclass(frozen=True)
class DataStats:
    """What the recipe reads from a training set: counts, and object sizes relative to their image."""

    images: int
    classes: int
    objects: int
    objects_per_image: float
    image_side: float  # median of max(width, height) over the images, in pixels
    object_rel_size: float  # median over boxes of sqrt(w * h) / max(image width, image height)

    @classmethod
    def of(cls, coco: dict) -> "DataStats":
        """From a COCO-format annotation dict (``images``, ``annotations``, ``categories``)."""
        images = {im["id"]: im for im in coco["images"]}
        sides = np.array([max(im.get("width", 0), im.get("height", 0)) for im in images.values()], dtype=float)
        rel = [math.sqrt(max(a["bbox"][2], 0) * max(a["bbox"][3], 0)) / s
               for a in coco["annotations"] if not a.get("iscrowd", 0)
               for s in [max(images[a["image_id"]].get("width", 0), images[a["image_id"]].get("height", 0))]
               if s > 0]
        return cls(images=len(images), classes=len(coco.get("categories", [])), objects=len(rel),
                   objects_per_image=len(rel) / max(1, len(images)),
                   image_side=float(np.median(sides)) if len(sides) else 0.0,
                   object_rel_size=float(np.median(rel)) if rel else 0.0)

    def to_dict(self) -> dict:
        return asdict(self)


def input_size_for(stats: DataStats) -> int:
    """The smallest input size at which the median object spans ``MIN_OBJECT_PX`` pixels (see the module doc)."""
    cap = max(INPUT_SIZES[0], math.ceil(stats.image_side / 128) * 128) if stats.image_side else INPUT_SIZES[-1]
    sizes = [s for s in INPUT_SIZES if s <= cap] or [INPUT_SIZES[0]]
    for s in sizes:
        if stats.object_rel_size * s >= MIN_OBJECT_PX:
            return s
    return sizes[-1]


def fit_small_recipe(stats: DataStats) -> dict:
    """The data-dependent part of the small-data recipe: input size, batch size, learning rate, epochs."""
    size = input_size_for(stats)
    batch = 16 if size <= 128 else 8 if size <= 256 else 4
    epochs = int(min(max(round(IMAGE_VIEWS / max(1, stats.images)), EPOCH_RANGE[0]), EPOCH_RANGE[1]))
    return dict(input_size=(size, size), batch_size=batch, lr=lr_for_batch(batch), epochs=epochs)


def lr_for_batch(batch: int) -> float:
    """The small-data recipe's AdamW learning rate: 2e-3 at batch 16, scaled by the square root of the batch."""
    return round(2e-3 * math.sqrt(batch / 16), 6)


def describe(stats: DataStats, fitted: dict) -> str:
    """One line for the start of a run: what was measured and what it chose."""
    return (f"data: {stats.images} images, {stats.classes} classes, {stats.objects_per_image:.1f} objects per "
            f"image, median object {stats.object_rel_size * 100:.0f}% of the image side -> input "
            f"{fitted['input_size'][0]} px, batch {fitted['batch_size']}, lr {fitted['lr']:g}, "
            f"{fitted['epochs']} epochs")
