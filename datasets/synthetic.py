"""The built-in data set: coloured shapes on textured backgrounds, written in COCO format.

``ensure_synthetic(...)`` generates it once, deterministically from its parameters, into a cache
folder and returns the paths; the regular ``CocoDetection`` reads it. Layout::

    <dir>/annotations/instances_train.json   <dir>/train/000000.png ...
    <dir>/annotations/instances_val.json     <dir>/val/000000.png ...
    <dir>/synthetic.json                     parameters; written last, marks a finished set

The folder is generated under a temporary name next to its final place and renamed when
complete, so a half-written folder is never taken for a finished one (and two processes that
race both end up using the one that was renamed first).

Every image is drawn from ``numpy.random.default_rng([seed, split, index])``, so the bytes do
not depend on the number of worker processes.

CLI: ``python -m datasets.synthetic --out DIR --num-train 1000 --num-val 200 --size 256
--classes 3 --min-object 20 --max-object 120``.

A second family, ``family="glyphs"`` (``--family glyphs``; drawn by ``datasets.glyphs``), is unlike
the shapes: more classes (rendered characters), smaller objects and many more per image, on
cluttered backgrounds. It is written in the same layout; its flags left out take its own defaults
(``datasets.glyphs.DEFAULTS``) and its cache folder name starts with ``glyphs-``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

__all__ = ["ensure_synthetic", "generate_synthetic", "synthetic_name", "FAMILIES", "SHAPES", "DEFAULT_NUM_TRAIN",
           "DEFAULT_NUM_VAL", "DEFAULT_IMAGE_SIZE", "DEFAULT_NUM_CLASSES", "DEFAULT_MIN_OBJECT",
           "DEFAULT_MAX_OBJECT", "DEFAULT_MAX_OBJECTS_PER_IMAGE", "DEFAULT_SEED", "GENERATOR_VERSION"]

# Defaults of the built-in set (what train.py uses without data flags): small enough that an
# EfficientDet-D0 trained from scratch for a few minutes on 2 CPU cores learns it (the small-data recipe
# fits 128 px input to these 256 px images).
DEFAULT_SEED = 0
DEFAULT_NUM_TRAIN = 600
DEFAULT_NUM_VAL = 100
DEFAULT_IMAGE_SIZE = 256
DEFAULT_NUM_CLASSES = 3
DEFAULT_MIN_OBJECT = 24
DEFAULT_MAX_OBJECT = 128
DEFAULT_MAX_OBJECTS_PER_IMAGE = 5
GENERATOR_VERSION = 1  # bump when the drawing changes: it is part of the cache folder name

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond")
_SPLITS = {"train": 0, "val": 1}
FAMILIES = ("shapes", "glyphs")
_MARKER = "synthetic.json"


def _default_root() -> Path:
    env = os.environ.get("EFFDET_DATA")
    return Path(env) if env else Path.home() / ".cache" / "efficientdet-triton" / "synthetic"


def synthetic_name(seed=DEFAULT_SEED, num_train=None, num_val=None, image_size=None, num_classes=None,
                   min_object=None, max_object=None, textured=True, max_objects_per_image=None,
                   family="shapes", min_objects_per_image=None) -> str:
    """Cache folder name derived from every parameter (and the family's generator version)."""
    k = _resolve(family, locals())
    if family == "glyphs":
        from . import glyphs

        return (f"glyphs-v{glyphs.GENERATOR_VERSION}-s{seed}-n{k['num_train']}x{k['num_val']}-px{k['image_size']}"
                f"-c{k['num_classes']}-o{k['min_object']}to{k['max_object']}"
                f"-k{k['min_objects_per_image']}to{k['max_objects_per_image']}-{'tex' if textured else 'flat'}")
    num_train, num_val, image_size, num_classes, min_object, max_object, max_objects_per_image = (
        k[n] for n in _SHAPES_KEYS)
    return (f"shapes-v{GENERATOR_VERSION}-s{seed}-n{num_train}x{num_val}-px{image_size}-c{num_classes}"
            f"-o{min_object}to{max_object}-k{max_objects_per_image}-{'tex' if textured else 'flat'}")


_SHAPES_KEYS = ("num_train", "num_val", "image_size", "num_classes", "min_object", "max_object",
                "max_objects_per_image")
_SHAPES_DEFAULTS = dict(zip(_SHAPES_KEYS, (DEFAULT_NUM_TRAIN, DEFAULT_NUM_VAL, DEFAULT_IMAGE_SIZE,
                                           DEFAULT_NUM_CLASSES, DEFAULT_MIN_OBJECT, DEFAULT_MAX_OBJECT,
                                           DEFAULT_MAX_OBJECTS_PER_IMAGE)))


def _resolve(family: str, given: dict) -> dict:
    """The family's size parameters: those ``given`` as None take the family's defaults."""
    if family == "shapes":
        if given.get("min_objects_per_image") is not None:
            raise ValueError("min_objects_per_image is a glyphs-family parameter (shapes draw 1..max per image)")
        defaults = _SHAPES_DEFAULTS
    elif family == "glyphs":
        from . import glyphs

        defaults = glyphs.DEFAULTS
    else:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
    return {k: int(defaults[k] if given.get(k) is None else given[k]) for k in defaults}


# ---------------------------------------------------------------------------------- drawing
def _background(rng, size: int, textured: bool) -> np.ndarray:
    if not textured:
        return np.broadcast_to(rng.integers(0, 256, 3).astype(np.uint8), (size, size, 3)).copy()
    kind = rng.integers(0, 4)
    if kind == 0:  # linear gradient between two colours
        c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        ang = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
        t = xx * math.cos(ang) + yy * math.sin(ang)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        img = c0 * (1 - t[..., None]) + c1 * t[..., None]
    elif kind == 1:  # low-frequency blotches
        from PIL import Image

        g = int(rng.integers(2, 7))
        small = rng.integers(0, 256, (g, g, 3)).astype(np.uint8)
        img = np.asarray(Image.fromarray(small).resize((size, size), Image.BILINEAR), dtype=np.float32)
    elif kind == 2:  # low-contrast checkerboard / stripes (edges that are not objects)
        c0 = rng.uniform(30, 225, 3)
        c1 = np.clip(c0 + rng.uniform(-40, 40, 3), 0, 255)
        period = int(rng.integers(8, 48))
        yy, xx = np.mgrid[0:size, 0:size]
        mask = ((xx // period + (yy // period) * int(rng.integers(0, 2))) % 2).astype(bool)
        img = np.where(mask[..., None], c1, c0)
    else:  # flat colour
        img = np.broadcast_to(rng.uniform(0, 255, 3), (size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _draw(draw, shape: str, x0: int, y0: int, s: int, colour) -> float:
    """Draw one shape in the s x s square at (x0, y0); returns its area in pixels."""
    x1, y1 = x0 + s - 1, y0 + s - 1
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=colour)
        return math.pi * s * s / 4
    if shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=colour)
        return float(s * s)
    if shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=colour)
        return s * s / 2
    if shape == "cross":
        t = max(2, s // 3)
        a = (s - t) // 2
        draw.rectangle([x0, y0 + a, x1, y0 + a + t - 1], fill=colour)
        draw.rectangle([x0 + a, y0, x0 + a + t - 1, y1], fill=colour)
        return float(2 * s * t - t * t)
    if shape == "ring":
        w = max(2, s // 5)
        draw.ellipse([x0, y0, x1, y1], outline=colour, width=w)
        return math.pi / 4 * (s * s - (s - 2 * w) ** 2)
    if shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=colour)
        return s * s / 2
    raise ValueError(shape)


def _iou_and_cover(box, boxes):
    if not boxes:
        return 0.0, 0.0
    b = np.asarray(boxes, dtype=np.float64)
    iw = np.clip(np.minimum(box[2], b[:, 2]) - np.maximum(box[0], b[:, 0]), 0, None)
    ih = np.clip(np.minimum(box[3], b[:, 3]) - np.maximum(box[1], b[:, 1]), 0, None)
    inter = iw * ih
    area_new = (box[2] - box[0]) * (box[3] - box[1])
    area_old = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    iou = inter / (area_new + area_old - inter)
    return float(iou.max()), float((inter / area_old).max())


def render_image(seed: int, split: int, index: int, size: int, num_classes: int, min_object: int,
                 max_object: int, textured: bool, max_objects: int):
    """One image (uint8 HWC) and its objects ``[(class index, [x0, y0, x1, y1], area), ...]``."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng([seed, split, index])
    bg = _background(rng, size, textured)
    im = Image.fromarray(bg)
    draw = ImageDraw.Draw(im)
    lo = max(2, min(min_object, size))
    hi = max(lo, min(max_object, size))
    want = int(rng.integers(1, max_objects + 1))
    objects, boxes = [], []
    for _ in range(want * 8):
        if len(objects) >= want:
            break
        s = int(round(math.exp(rng.uniform(math.log(lo), math.log(hi + 1e-9)))))
        s = min(max(s, lo), size)
        x0, y0 = int(rng.integers(0, size - s + 1)), int(rng.integers(0, size - s + 1))
        cls = int(rng.integers(0, num_classes))
        box = [x0, y0, x0 + s, y0 + s]
        iou, cover = _iou_and_cover(box, boxes)
        if iou > 0.3 or cover > 0.5:  # some overlap, but every object stays mostly visible
            continue
        region = bg[y0:y0 + s, x0:x0 + s].reshape(-1, 3).mean(axis=0)
        colour = rng.integers(0, 256, 3)
        if np.abs(colour - region).sum() < 150:  # keep contrast with the background
            colour = np.where(region > 127, rng.integers(0, 60, 3), rng.integers(196, 256, 3))
        area = _draw(draw, SHAPES[cls], x0, y0, s, tuple(int(c) for c in colour))
        objects.append((cls, box, area))
        boxes.append(box)
    img = np.asarray(im, dtype=np.uint8)
    if textured:
        sigma = float(rng.uniform(0, 12))
        if rng.random() < 0.5:  # sensor-like noise on half of the images (noise also makes PNGs slow)
            noise = rng.standard_normal((size, size, 3), dtype=np.float32) * sigma
            img = np.clip(img.astype(np.float32) + noise, 0, 255).astype(np.uint8)
    return img, objects


def _write_one(args):
    from PIL import Image

    out_dir, seed, split, index, size, num_classes, min_object, max_object, textured, max_objects = args
    img, objects = render_image(seed, split, index, size, num_classes, min_object, max_object, textured,
                                max_objects)
    Image.fromarray(img).save(os.path.join(out_dir, f"{index:06d}.png"), compress_level=1)
    return objects


def _write_glyphs_one(args):
    from PIL import Image

    from .glyphs import render_image as render_glyphs

    out_dir, index, rest = args[0], args[3], args[1:]
    img, objects = render_glyphs(*rest)
    Image.fromarray(img).save(os.path.join(out_dir, f"{index:06d}.png"), compress_level=1)
    return objects


def _write_split(root: Path, name: str, n: int, params: dict, workers: int, categories) -> None:
    img_dir = root / name
    img_dir.mkdir(parents=True)
    glyphs = params.get("family") == "glyphs"
    if glyphs:
        write = _write_glyphs_one
        jobs = [(str(img_dir), params["seed"], _SPLITS[name], i, params["image_size"], params["num_classes"],
                 params["min_object"], params["max_object"], params["textured"], params["min_objects_per_image"],
                 params["max_objects_per_image"]) for i in range(n)]
    else:
        write = _write_one
        jobs = [(str(img_dir), params["seed"], _SPLITS[name], i, params["image_size"], params["num_classes"],
                 params["min_object"], params["max_object"], params["textured"], params["max_objects_per_image"])
                for i in range(n)]
    if workers > 1 and n >= 64:
        import multiprocessing as mp

        with mp.get_context("fork" if sys.platform.startswith("linux") else "spawn").Pool(workers) as pool:
            results = pool.map(write, jobs, chunksize=16)
    else:
        results = [write(j) for j in jobs]
    images, anns = [], []
    for i, objects in enumerate(results):
        images.append({"id": i + 1, "file_name": f"{i:06d}.png", "height": params["image_size"],
                       "width": params["image_size"]})
        for cls, (x0, y0, x1, y1), area in objects:
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cls + 1,
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "area": round(float(area), 2), "iscrowd": 0})
    description = "efficientdet-triton synthetic " + ("glyphs" if glyphs else "shapes")
    data = {"info": {"description": description, "version": params["generator_version"], "split": name, **params},
            "licenses": [], "images": images, "annotations": anns, "categories": categories}
    (root / "annotations").mkdir(exist_ok=True)
    with open(root / "annotations" / f"instances_{name}.json", "w") as f:
        json.dump(data, f, separators=(",", ":"))


def _paths(d: Path, class_names) -> dict:
    return {"root": str(d), "class_names": list(class_names),
            **{s: {"ann_file": str(d / "annotations" / f"instances_{s}.json"), "image_dir": str(d / s)}
               for s in _SPLITS}}


def generate_synthetic(out_dir, seed=DEFAULT_SEED, num_train=None, num_val=None, image_size=None, num_classes=None,
                       min_object=None, max_object=None, textured=True, max_objects_per_image=None, workers=None,
                       family="shapes", min_objects_per_image=None) -> dict:
    """Generate into exactly ``out_dir`` (atomically). If ``out_dir`` already holds a finished set
    with the same parameters it is reused; anything else already there is an error.

    ``family``: ``"shapes"`` (the built-in set) or ``"glyphs"``; size parameters left None take the
    family's defaults. ``min_objects_per_image`` belongs to the glyphs family only."""
    k = _resolve(family, locals())
    if family == "glyphs":
        return _generate_glyphs(out_dir, seed, textured, workers, **k)
    num_train, num_val, image_size, num_classes, min_object, max_object, max_objects_per_image = (
        k[n] for n in _SHAPES_KEYS)
    if not 1 <= num_classes <= len(SHAPES):
        raise ValueError(f"num_classes must be 1..{len(SHAPES)}, got {num_classes}")
    if num_train < 1 or num_val < 1:
        raise ValueError(f"num_train and num_val must be >= 1, got {num_train}, {num_val}")
    if not 2 <= min_object <= max_object:
        raise ValueError(f"need 2 <= min_object <= max_object, got {min_object}, {max_object}")
    if image_size < min_object:
        raise ValueError(f"image_size {image_size} is smaller than min_object {min_object}")
    if max_objects_per_image < 1:
        raise ValueError(f"max_objects_per_image must be >= 1, got {max_objects_per_image}")
    params = {"seed": int(seed), "num_train": int(num_train), "num_val": int(num_val),
              "image_size": int(image_size), "num_classes": int(num_classes), "min_object": int(min_object),
              "max_object": int(max_object), "textured": bool(textured),
              "max_objects_per_image": int(max_objects_per_image), "generator_version": GENERATOR_VERSION}
    return _generate(out_dir, params, SHAPES[:num_classes], "shape", workers)


def _generate_glyphs(out_dir, seed, textured, workers, num_train, num_val, image_size, num_classes, min_object,
                     max_object, min_objects_per_image, max_objects_per_image) -> dict:
    from . import glyphs

    if num_train < 1 or num_val < 1:
        raise ValueError(f"num_train and num_val must be >= 1, got {num_train}, {num_val}")
    glyphs.check_params(num_classes, min_object, max_object, image_size, min_objects_per_image,
                        max_objects_per_image)
    params = {"family": "glyphs", "seed": int(seed), "num_train": num_train, "num_val": num_val,
              "image_size": image_size, "num_classes": num_classes, "min_object": min_object,
              "max_object": max_object, "textured": bool(textured), "min_objects_per_image": min_objects_per_image,
              "max_objects_per_image": max_objects_per_image, "generator_version": glyphs.GENERATOR_VERSION}
    return _generate(out_dir, params, list(glyphs.GLYPHS[:num_classes]), "glyph", workers)


def _generate(out_dir, params: dict, names, supercategory: str, workers) -> dict:
    """Write the set of ``params`` into ``out_dir`` atomically, or reuse the finished one already there."""
    num_train, num_val = params["num_train"], params["num_val"]
    out = Path(out_dir)

    def finished():
        m = out / _MARKER
        if not m.is_file():
            return False
        with open(m) as f:
            have = json.load(f)
        if have != params:
            raise ValueError(f"{out}: holds a synthetic set with other parameters ({have}); "
                             f"wanted {params}. Use another folder or remove it.")
        return True

    if finished():
        return _paths(out, names)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out}: exists, is not empty and is not a finished synthetic set "
                         f"(no {_MARKER}); refusing to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        categories = [{"id": i + 1, "name": n, "supercategory": supercategory} for i, n in enumerate(names)]
        if workers is None:
            workers = min(os.cpu_count() or 1, 8)
        for split, n in (("train", num_train), ("val", num_val)):
            _write_split(tmp, split, n, params, workers, categories)
        with open(tmp / _MARKER, "w") as f:
            json.dump(params, f, indent=1)
        if out.exists():
            out.rmdir()  # empty (checked above); a race may refill it, then rename fails below
        try:
            os.rename(tmp, out)
        except OSError:
            if not finished():  # someone else finished first -> use theirs
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return _paths(out, names)


def ensure_synthetic(root=None, seed=DEFAULT_SEED, num_train=None, num_val=None, image_size=None, num_classes=None,
                     min_object=None, max_object=None, textured=True, max_objects_per_image=None, workers=None,
                     family="shapes", min_objects_per_image=None) -> dict:
    """Paths of the synthetic set with these parameters, generating it on first use.

    ``root`` defaults to ``$EFFDET_DATA`` or ``~/.cache/efficientdet-triton/synthetic``; the set
    lives in ``root/<synthetic_name(...)>``. Returns ``{"root": dir, "class_names": [...],
    "train": {"ann_file", "image_dir"}, "val": {"ann_file", "image_dir"}}``. ``family="glyphs"``
    gives the second family (parameters left None take its defaults).
    """
    root = Path(root) if root is not None else _default_root()
    kw = dict(seed=seed, num_train=num_train, num_val=num_val, image_size=image_size, num_classes=num_classes,
              min_object=min_object, max_object=max_object, textured=textured,
              max_objects_per_image=max_objects_per_image, family=family,
              min_objects_per_image=min_objects_per_image)
    return generate_synthetic(root / synthetic_name(**kw), workers=workers, **kw)


def main(argv=None) -> int:
    from . import glyphs

    p = argparse.ArgumentParser(prog="python -m datasets.synthetic", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder to write (must not exist or be empty)")
    p.add_argument("--family", choices=FAMILIES, default="shapes",
                   help="shapes: the built-in set; glyphs: many small characters on cluttered backgrounds")

    def dflt(key):
        return f"default {_SHAPES_DEFAULTS[key]} (shapes), {glyphs.DEFAULTS[key]} (glyphs)"

    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--num-train", type=int, default=None, help=dflt("num_train"))
    p.add_argument("--num-val", type=int, default=None, help=dflt("num_val"))
    p.add_argument("--size", type=int, default=None, help=dflt("image_size"))
    p.add_argument("--classes", type=int, default=None,
                   help=f"shapes 1..{len(SHAPES)}: {', '.join(SHAPES)}; glyphs 1..{len(glyphs.GLYPHS)}: "
                        f"{glyphs.GLYPHS}; {dflt('num_classes')}")
    p.add_argument("--min-object", type=int, default=None, help=dflt("min_object"))
    p.add_argument("--max-object", type=int, default=None, help=dflt("max_object"))
    p.add_argument("--min-objects-per-image", type=int, default=None,
                   help=f"glyphs only, default {glyphs.DEFAULTS['min_objects_per_image']}")
    p.add_argument("--max-objects-per-image", type=int, default=None, help=dflt("max_objects_per_image"))
    p.add_argument("--flat", action="store_true", help="plain backgrounds instead of textured ones")
    p.add_argument("--workers", type=int, default=None)
    a = p.parse_args(argv)
    if a.family == "shapes" and a.min_objects_per_image is not None:
        p.error("--min-objects-per-image applies to --family glyphs only")
    if os.path.exists(a.out) and not os.path.isdir(a.out):
        p.error(f"--out {a.out} is a file: pass a folder to write the data set into")
    t0 = time.perf_counter()
    try:
        paths = generate_synthetic(a.out, seed=a.seed, num_train=a.num_train, num_val=a.num_val, image_size=a.size,
                                   num_classes=a.classes, min_object=a.min_object, max_object=a.max_object,
                                   textured=not a.flat, max_objects_per_image=a.max_objects_per_image,
                                   workers=a.workers, family=a.family, min_objects_per_image=a.min_objects_per_image)
    except ValueError as e:
        p.error(str(e))
    except OSError as e:  # --out cannot be written (a file on its path, no permission, a full disk)
        p.error(f"cannot write {e.filename or a.out}: {e.strerror or e}")
    print(json.dumps({**paths, "seconds": round(time.perf_counter() - t0, 2)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
