"""COCO-format detection data read with pycocotools and pillow.

Every sample is a plain dict (no torch types):

* ``"image"``     uint8 ``(H, W, 3)`` RGB numpy array,
* ``"boxes"``     float32 ``(M, 4)`` xyxy in pixels of that image (COCO stores xywh),
* ``"labels"``    int64 ``(M,)`` contiguous class index ``0..C-1``; crowd annotations
                  (``iscrowd=1``) are kept with label ``-2`` ("ignore"),
* ``"image_id"``  int, the COCO image id,
* ``"orig_size"`` ``(h, w)`` of the decoded image,
* ``"scale"``     1.0 here; a transform replaces it with input pixels per original pixel.

Bad input is either an error that names the file and the field, or a counted, logged fix:

==========================================  ============================================
annotation file is not COCO                 ``AnnotationError`` (a ``ValueError``: file + field)
no images                                   ``AnnotationError``
image path escapes the image folder         ``AnnotationError`` (file + image id)
unknown category id / unknown image id      ``AnnotationError`` (file + annotation id)
missing image file                          ``MissingFileError`` (a ``FileNotFoundError``) at
                                            construction, or with ``skip_bad_images=True``
                                            the image is DROPPED FROM THE INDEX
                                            (``stats["image_missing"]``)
corrupt image file (found when decoded)     ``ImageError`` (an ``OSError``) naming the file, or
                                            with ``skip_bad_images=True`` the sample is REPLACED
                                            BY THE NEXT GOOD ONE (``stats["image_corrupt"]``;
                                            the sample's ``bad_images`` has their indices)
box partly outside the image                clipped, ``stats["box_clipped"]``
box < 1 px wide/high after clipping         dropped, ``stats["box_too_small"]``
box with NaN/inf                            dropped, ``stats["box_nonfinite"]``
image without annotations                   kept (a negative), ``stats["image_without_boxes"]``
one file under several image ids            each entry kept, ``stats["image_file_repeated"]``
==========================================  ============================================

A set whose decoded images fit in ``cache_bytes`` (``CACHE_BYTES``, 256 MiB, by the image entries' sizes:
the built-in set's 600 train images take 118 MB) keeps every image after its first decode, so later epochs
skip pillow's decoding (loading and augmenting a 256 px PNG of the built-in set took 3.1-3.6 ms without the
cache and 1.1-1.2 ms with it: ``bench/RESULTS.md``, "The default run"). Each loader process holds its own cache; ``cache_bytes=0`` turns it off.

Box fixes happen once, at construction, against the ``height``/``width`` of the image entry, so
``stats`` is complete right after ``__init__``. Corrupt images are only found when decoded, which
happens in DataLoader worker processes: their counts stay in the worker's copy of ``stats`` (each
worker logs the first one of each kind).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from collections import Counter
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
import torch.utils.data

log = logging.getLogger(__name__)

__all__ = ["CocoDetection", "coco2017_paths", "load_coco_json", "IGNORE_LABEL", "DataError", "AnnotationError",
           "ImageError", "MissingFileError"]

IGNORE_LABEL = -2
_REQUIRED_TOP = ("images", "annotations", "categories")
_REQUIRED_IMAGE = ("id", "file_name", "height", "width")
_REQUIRED_ANN = ("id", "image_id", "category_id", "bbox")
_REQUIRED_CAT = ("id", "name")
CACHE_BYTES = 256 * 2**20  # decoded images of a set up to this size are kept in memory (see the module doc)


class DataError(Exception):
    """Bad input data. ``str(e)`` is ``"<file>: <what>"``; ``file``, ``what``, ``field`` (the entry or field at
    fault, when known) and ``todo`` (what the user can do) are also kept apart, for a one-line report."""

    todo = "fix the file"

    def __init__(self, file, what=None, field=None, todo=None):
        if what is None:  # re-created from its text alone (an error re-raised from a DataLoader worker)
            file, what = None, file
        self.file, self.what, self.field = file, what, field
        if todo:
            self.todo = todo
        super().__init__(f"{file}: {what}" if file else what)


class AnnotationError(DataError, ValueError):
    todo = "fix the annotation file (COCO detection format: images, annotations, categories)"


class ImageError(DataError, OSError):
    todo = "replace or remove the image file, or pass --skip-bad-images to skip it"


class MissingFileError(DataError, FileNotFoundError):
    todo = "check the path"


_IMAGE_TODO = "fix the path or add the file, or pass --skip-bad-images to leave the image out"


def rgb_array(im) -> np.ndarray:
    """A PIL image as uint8 (H, W, 3) RGB, the way every loader of this project reads one: PIL's conversion
    (an alpha channel is dropped, as PIL's ``convert("RGB")`` and the peers' COCO loaders drop it), except
    16-bit and float grayscale (modes ``I;16*``, ``I``, ``F``), which PIL clips to white: their 0..65535 range is
    scaled to 0..255."""
    if im.mode.startswith("I") or im.mode == "F":
        gray = np.asarray(im, dtype=np.float32) / 257.0
        gray = np.clip(np.rint(gray), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def coco2017_paths(root, split: str) -> tuple[str, str]:
    """``(ann_file, image_dir)`` of a COCO-2017 root laid out as
    ``annotations/instances_{train,val}2017.json`` and ``{train,val}2017/``."""
    if split not in ("train", "val"):
        raise ValueError(f"COCO-2017 split must be 'train' or 'val', got {split!r}")
    root = Path(root)
    return str(root / "annotations" / f"instances_{split}2017.json"), str(root / f"{split}2017")


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _entry_name(kind: str, entry, i: int) -> str:
    if isinstance(entry, dict) and "id" in entry:
        return f"{kind} id {entry['id']!r}"
    return f"{kind} #{i}"


def load_coco_json(ann_file) -> dict:
    """Read and validate a COCO detection annotation file; returns the parsed dict.

    Raises ``FileNotFoundError`` when absent and ``ValueError`` naming the file, the entry and the
    field for anything that is not COCO detection format.
    """
    ann_file = str(ann_file)
    if not os.path.isfile(ann_file):
        raise MissingFileError(ann_file, "annotation file is a folder" if os.path.isdir(ann_file) else
                               "annotation file not found",
                               todo="check the path given to --train-ann/--val-ann or the data root")
    try:
        with open(ann_file, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AnnotationError(ann_file, f"not a JSON file ({e})") from e
    if not isinstance(data, dict):
        raise AnnotationError(ann_file, f"not a COCO annotation file (top level is "
                         f"{type(data).__name__}, expected an object with {list(_REQUIRED_TOP)})")
    for key in _REQUIRED_TOP:
        if key not in data:
            raise AnnotationError(ann_file, f"not a COCO annotation file: missing field {key!r}", field=key)
        if not isinstance(data[key], list):
            raise AnnotationError(ann_file, f"field {key!r} must be a list, got {type(data[key]).__name__}", field=key)
    if not data["images"]:
        raise AnnotationError(ann_file, f"the annotation file contains no images ('images' is empty)", field="images")
    if not data["categories"]:
        raise AnnotationError(ann_file, f"the annotation file defines no categories ('categories' is empty)",
                              field="categories")
    for kind, key, fields in (("image", "images", _REQUIRED_IMAGE), ("annotation", "annotations", _REQUIRED_ANN),
                              ("category", "categories", _REQUIRED_CAT)):
        for i, entry in enumerate(data[key]):
            if not isinstance(entry, dict):
                raise AnnotationError(ann_file, f"{kind} #{i} in {key!r} is not an object", field=f"{key}[{i}]")
            for field in fields:
                if field not in entry:
                    raise AnnotationError(ann_file, f"{_entry_name(kind, entry, i)} (#{i} in {key!r}) "
                                     f"is missing required field {field!r}", field=f"{key}[{i}].{field}")
            for field in ("id",) + (("image_id", "category_id") if kind == "annotation" else ()) \
                    + (("height", "width") if kind == "image" else ()):
                if not _is_int(entry[field]):
                    raise AnnotationError(ann_file, f"{_entry_name(kind, entry, i)}: field {field!r} must be "
                                     f"an integer, got {entry[field]!r}", field=f"{key}[{i}].{field}")
                if not -2**63 <= entry[field] < 2**63:  # ids and sizes are int64 in tensors and COCO's tools
                    raise AnnotationError(ann_file, f"{_entry_name(kind, entry, i)}: field {field!r} does not fit "
                                     f"in 64 bits ({entry[field]})", field=f"{key}[{i}].{field}")
            if kind == "image" and not isinstance(entry["file_name"], str):
                raise AnnotationError(ann_file, f"image id {entry['id']!r}: field 'file_name' must be a string",
                                      field=f"images[{i}].file_name")
            if kind == "annotation":
                bb = entry["bbox"]
                if not (isinstance(bb, (list, tuple)) and len(bb) == 4
                        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bb)):
                    raise AnnotationError(ann_file, f"annotation id {entry['id']!r}: field 'bbox' must be "
                                     f"4 numbers [x, y, w, h], got {bb!r}", field=f"annotations[{i}].bbox")
                if "iscrowd" in entry and entry["iscrowd"] not in (0, 1):  # "0" would read as crowd: ignored
                    raise AnnotationError(ann_file, f"annotation id {entry['id']!r}: field 'iscrowd' must be "
                                     f"0 or 1, got {entry['iscrowd']!r}", field=f"annotations[{i}].iscrowd")
                if "area" in entry and not (isinstance(entry["area"], (int, float))
                                            and not isinstance(entry["area"], bool)):
                    raise AnnotationError(ann_file, f"annotation id {entry['id']!r}: field 'area' must be a "
                                     f"number, got {entry['area']!r}", field=f"annotations[{i}].area")
    for kind, key in (("image", "images"), ("category", "categories"), ("annotation", "annotations")):
        ids = Counter(e["id"] for e in data[key])
        dup = [k for k, n in ids.items() if n > 1]
        if dup:
            second = [i for i, e in enumerate(data[key]) if e["id"] == dup[0]][1]
            raise AnnotationError(ann_file, f"duplicate {kind} id {dup[0]!r} in {key!r}", field=f"{key}[{second}].id")
    return data


def _check_relative(ann_file: str, image: dict) -> str:
    name = image["file_name"]
    posix, win = PurePosixPath(name), PureWindowsPath(name)
    if (not name or posix.is_absolute() or win.is_absolute() or win.drive or ".." in posix.parts
            or ".." in win.parts):
        raise AnnotationError(ann_file, f"image id {image['id']!r}: file_name {name!r} escapes the image "
                         f"folder (absolute paths and '..' are not allowed)",
                          field=f"image id {image['id']}: file_name")
    return name


class CocoDetection(torch.utils.data.Dataset):
    """COCO-format detection data set (see the module docstring for the sample and the checks).

    ``transform`` is called as ``transform(sample, index=index, epoch=epoch)``; ``set_epoch``
    sets the epoch used when ``__getitem__`` gets a plain index. ``__getitem__`` also takes an
    ``(index, epoch)`` pair, which is what the sampler of ``datasets.loader.build_loader`` yields,
    so persistent worker processes see the right epoch without being told.
    """

    def __init__(self, ann_file, image_dir, transform=None, skip_bad_images: bool = False,
                 cache_bytes: int = CACHE_BYTES):
        self.ann_file = str(ann_file)
        self.image_dir = str(image_dir)
        self.transform = transform
        self.skip_bad_images = bool(skip_bad_images)
        self.epoch = 0
        self.stats: Counter = Counter()
        self._logged: set = set()
        self._bad: set = set()

        data = load_coco_json(self.ann_file)
        from pycocotools.coco import COCO

        coco = COCO()
        coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
        self.coco = coco

        cats = sorted(data["categories"], key=lambda c: c["id"])
        self.cat_ids = [c["id"] for c in cats]
        self.class_names = [str(c["name"]) for c in cats]
        self.cat_id_to_label = {cid: i for i, cid in enumerate(self.cat_ids)}
        self.label_to_cat_id = {i: cid for i, cid in enumerate(self.cat_ids)}
        self.num_classes = len(self.cat_ids)

        images = {im["id"]: im for im in data["images"]}
        for im in images.values():
            _check_relative(self.ann_file, im)
        anns = data["annotations"]
        for a in anns:
            if a["image_id"] not in images:
                raise AnnotationError(self.ann_file, f"annotation id {a['id']!r} refers to unknown image id "
                                 f"{a['image_id']!r}", field=f"annotation id {a['id']}: image_id")
            if a["category_id"] not in self.cat_id_to_label:
                raise AnnotationError(self.ann_file, f"annotation id {a['id']!r} has category_id "
                                 f"{a['category_id']!r}, which is not in 'categories'",
                                      field=f"annotation id {a['id']}: category_id")

        # --- boxes: vectorized clip / drop, once, against the image entry's height and width
        img_ids_sorted = sorted(images)
        row_of = {iid: r for r, iid in enumerate(img_ids_sorted)}
        n = len(anns)
        xywh = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(n, 4)
        ann_img = np.array([row_of[a["image_id"]] for a in anns], dtype=np.int64)
        labels = np.array([IGNORE_LABEL if a.get("iscrowd", 0) else self.cat_id_to_label[a["category_id"]]
                           for a in anns], dtype=np.int64)
        ann_ids = [a["id"] for a in anns]
        hw = np.array([[images[i]["height"], images[i]["width"]] for i in img_ids_sorted], dtype=np.float64)
        xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        finite = np.isfinite(xyxy).all(axis=1)
        lim = np.stack([hw[ann_img, 1], hw[ann_img, 0]], axis=1)  # (n, 2) as (w, h)
        lim = np.concatenate([lim, lim], axis=1)
        clipped = np.clip(np.where(finite[:, None], xyxy, 0.0), 0.0, lim)
        big = ((clipped[:, 2] - clipped[:, 0]) >= 1.0) & ((clipped[:, 3] - clipped[:, 1]) >= 1.0) & finite
        was_clipped = finite & big & (np.abs(clipped - xyxy) > 0).any(axis=1)
        self._count("box_nonfinite", int((~finite).sum()),
                    lambda: f"annotation id {ann_ids[int(np.flatnonzero(~finite)[0])]!r}",
                    "boxes with NaN/inf coordinates were dropped")
        small = finite & ~big
        self._count("box_too_small", int(small.sum()),
                    lambda: f"annotation id {ann_ids[int(np.flatnonzero(small)[0])]!r}",
                    "boxes with a width or height under 1 px (negative included) after clipping were dropped")
        self._count("box_clipped", int(was_clipped.sum()),
                    lambda: f"annotation id {ann_ids[int(np.flatnonzero(was_clipped)[0])]!r}",
                    "boxes partly outside their image were clipped")

        keep = big
        order = np.argsort(ann_img[keep], kind="stable")
        kb = clipped[keep][order].astype(np.float32)
        kl = labels[keep][order]
        counts = np.bincount(ann_img[keep], minlength=len(img_ids_sorted))
        splits = np.cumsum(counts)[:-1]
        boxes_per_img = np.split(kb, splits)
        labels_per_img = np.split(kl, splits)
        self._count("image_without_boxes", int((counts == 0).sum()), lambda: "", None)

        # --- the index: sorted image ids; missing files are an error or dropped (skip_bad_images)
        self._entries = []
        for r, iid in enumerate(img_ids_sorted):
            im = images[iid]
            path = os.path.join(self.image_dir, im["file_name"])
            if not os.path.isfile(path):
                if not self.skip_bad_images:
                    raise MissingFileError(path, f"image file listed in {os.path.basename(self.ann_file)} not found",
                                           field=f"image id {iid}", todo=_IMAGE_TODO)
                self._count("image_missing", 1, lambda: path, "missing image files were dropped from the index")
                continue
            self._entries.append((iid, path, (int(im["height"]), int(im["width"])),
                                  boxes_per_img[r].reshape(-1, 4), labels_per_img[r].reshape(-1)))
        paths = Counter(e[1] for e in self._entries)
        twice = sorted(p for p, n in paths.items() if n > 1)
        self._count("image_file_repeated", sum(paths[p] - 1 for p in twice), lambda: twice[0],
                    "image files listed under more than one image id (each entry is used)")
        if not self._entries:
            raise MissingFileError(self.image_dir, f"no usable images: all {len(images)} image files listed in "
                                   f"{os.path.basename(self.ann_file)} are missing from this folder",
                                   field="image folder", todo="pass the folder that holds the images (--train-images / "
                                   "--val-images, or the data root)")
        self.image_ids = [e[0] for e in self._entries]
        decoded_bytes = sum(3 * h * w for _, _, (h, w), _, _ in self._entries)
        self._cache: dict[int, np.ndarray] | None = {} if decoded_bytes <= cache_bytes else None

    # ------------------------------------------------------------------ bookkeeping
    def _count(self, kind: str, n: int, example, what):
        if n <= 0:
            return
        self.stats[kind] += n
        if what is not None and kind not in self._logged:
            self._logged.add(kind)
            ex = example()
            log.warning("%s: %s (%s: %d so far%s)", self.ann_file, what, kind, self.stats[kind],
                        f"; first: {ex}" if ex else "")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.transform, "set_epoch"):
            self.transform.set_epoch(epoch)

    def image_path(self, index: int) -> str:
        """The image file of sample ``index``."""
        return self._entries[index][1]

    def __len__(self) -> int:
        return len(self._entries)

    # ------------------------------------------------------------------ samples
    def _decode(self, path: str, expect_hw) -> np.ndarray:
        from PIL import Image

        try:
            with Image.open(path) as im:
                arr = rgb_array(im)
        except FileNotFoundError as e:
            raise MissingFileError(path, "image file not found", todo=_IMAGE_TODO) from e
        except Exception as e:  # PIL raises UnidentifiedImageError / OSError / SyntaxError / ValueError
            raise ImageError(path, f"cannot decode image file ({type(e).__name__}: {e})") from e
        if tuple(arr.shape[:2]) != tuple(expect_hw):
            raise ImageError(path, f"decoded size {arr.shape[0]}x{arr.shape[1]} (h x w) differs from the "
                          f"annotation's height/width {expect_hw[0]}x{expect_hw[1]} in {self.ann_file}")
        return np.ascontiguousarray(arr)

    def load(self, index: int) -> dict:
        """The untransformed sample at ``index`` (raises on a bad image, whatever skip_bad_images)."""
        iid, path, hw, boxes, labels = self._entries[index]
        image = self._cache.get(index) if self._cache is not None else None
        if image is None:
            image = self._decode(path, hw)
            if self._cache is not None:
                image.flags.writeable = False  # shared by every later epoch: no transform may write into it
                self._cache[index] = image
        return {"image": image, "boxes": boxes.copy(), "labels": labels.copy(), "image_id": int(iid),
                "orig_size": (int(image.shape[0]), int(image.shape[1])), "scale": 1.0}

    def __getitem__(self, key):
        if isinstance(key, (tuple, list)):
            index, epoch = int(key[0]), int(key[1])
        else:
            index, epoch = int(key), self.epoch
        n = len(self._entries)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for a data set of {n} images")
        sample, replaced = None, []
        for step in range(n):
            j = (index + step) % n
            if j in self._bad:
                continue
            try:
                sample = self.load(j)
                break
            except OSError as e:
                if not self.skip_bad_images:
                    raise
                self._bad.add(j)
                replaced.append(j)
                self._count("image_corrupt", 1, lambda e=e: str(e),
                            "corrupt image files are replaced by the next good sample")
        if sample is None:
            raise RuntimeError(f"{self.ann_file}: every image in {self.image_dir} failed to decode")
        if self.transform is not None:
            sample = self.transform(sample, index=index, epoch=epoch)
        if replaced:  # found by this copy of the data set (a loader worker's): the main process counts them
            sample["bad_images"] = tuple(replaced)  # indices: ``image_path(j)`` names the file
        return sample

    def __repr__(self) -> str:
        return (f"CocoDetection({self.ann_file!r}, {self.image_dir!r}, images={len(self)}, "
                f"classes={self.num_classes}, stats={dict(self.stats)})")
