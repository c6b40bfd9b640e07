"""Fixtures for the datasets tests: a tiny synthetic set and helpers to write broken COCO files."""
import json
from pathlib import Path

import numpy as np
import pytest

from datasets.synthetic import generate_synthetic

TINY = dict(seed=3, num_train=8, num_val=4, image_size=64, num_classes=3, min_object=8, max_object=32,
            workers=1)


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory):
    return generate_synthetic(tmp_path_factory.mktemp("syn") / "tiny", **TINY)


def write_png(path, h=20, w=30, colour=(10, 20, 30)):
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((h, w, 3), np.uint8)
    arr[...] = colour
    Image.fromarray(arr).save(path)
    return path


def make_coco(tmp_path, images=None, annotations=None, categories=None, write_images=True, drop=(), **extra):
    """Write ``ann.json`` + images under ``tmp_path``; returns (ann_file, image_dir).

    Defaults: two 20x30 images (ids 1, 2), categories 5 'a' and 9 'b', one box on image 1."""
    image_dir = tmp_path / "img"
    image_dir.mkdir(exist_ok=True)
    if images is None:
        images = [{"id": 1, "file_name": "a.png", "height": 20, "width": 30},
                  {"id": 2, "file_name": "b.png", "height": 20, "width": 30}]
    if categories is None:
        categories = [{"id": 9, "name": "b"}, {"id": 5, "name": "a"}]
    if annotations is None:
        annotations = [{"id": 100, "image_id": 1, "category_id": 9, "bbox": [2, 3, 10, 5], "iscrowd": 0}]
    if write_images:
        for im in images:
            if isinstance(im, dict) and isinstance(im.get("file_name"), str) and ".." not in im["file_name"] \
                    and not im["file_name"].startswith("/"):
                write_png(image_dir / im["file_name"], im.get("height", 20), im.get("width", 30))
    data = {"images": images, "annotations": annotations, "categories": categories, **extra}
    for k in drop:
        data.pop(k)
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(data))
    return str(ann), str(image_dir)
