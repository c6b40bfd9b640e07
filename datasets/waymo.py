"""Waymo Open Dataset perception TFRecords -> COCO detection format, the layout ``--waymo`` training reads.

The output follows NVIDIA's ``waymo_tool/waymo_data_converter.py`` (read for the layout, not copied):

* every camera image of every frame becomes one image, ``images/{seg}_{frame}_{camera}.jpg`` with id
  ``seg * 10_000_000 + frame * 100 + camera`` (``frame`` counts the segment's frames from 1, ``camera`` the
  frame's camera images from 1);
* categories ``1 vehicle``, ``2 pedestrian``, ``3 cyclist``: Waymo label types 1, 2 and 4 (type 3, sign,
  has no camera labels); other types (0, unknown) are skipped and counted (NVIDIA keeps them as category 0);
* a camera label's box (``center_x``, ``center_y``, ``length`` along x, ``width`` along y, in pixels) becomes
  ``bbox = [center_x - length / 2, center_y - width / 2, length, width]``, ``area = length * width``;
* one annotation file ``annotations/annotations.json``.

Differences on purpose: the JPEG bytes are written as they are in the record (NVIDIA decodes and re-encodes
them with matplotlib, which loses quality), and one segment is one input TFRecord.

:func:`frame_to_coco` is plain Python over objects with the Waymo proto field names (``frame.images[i].name``
/ ``.image``, ``frame.camera_labels[j].name`` / ``.labels[k].type`` / ``.box.center_x`` ...), so it runs and is
tested without TensorFlow. Reading TFRecords needs ``pip install -r requirements-waymo.txt``::

    python -m datasets.waymo --out-dir /data/waymo/validation SEGMENT.tfrecord [SEGMENT.tfrecord ...]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
from collections import Counter

CATEGORIES = [{"supercategory": "object", "id": 1, "name": "vehicle"},
              {"supercategory": "object", "id": 2, "name": "pedestrian"},
              {"supercategory": "object", "id": 3, "name": "cyclist"}]
WAYMO_TYPE_TO_CATEGORY = {1: 1, 2: 2, 4: 3}  # TYPE_VEHICLE, TYPE_PEDESTRIAN, TYPE_CYCLIST
TYPE_NAMES = {0: "unknown", 1: "vehicle", 2: "pedestrian", 3: "sign", 4: "cyclist"}


def image_id(seg: int, frame: int, camera: int) -> int:
    """NVIDIA's image id; unique while frame < 100000 and camera < 100."""
    if not (0 < frame < 100_000 and 0 < camera < 100 and seg >= 0):
        raise ValueError(f"image id out of range: segment {seg}, frame {frame}, camera {camera}")
    return seg * 10_000_000 + frame * 100 + camera


def jpeg_size(data: bytes) -> tuple[int, int]:
    """(height, width) read from the JPEG header."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
    return h, w


def frame_to_coco(frame, seg: int, frame_index: int, first_annotation_id: int = 0):
    """One Waymo frame -> ``(images, annotations, jpegs, skipped)``.

    ``images`` / ``annotations`` are COCO records, ``jpegs`` maps file name -> JPEG bytes, ``skipped`` counts
    labels of types that are not detected (by type name). Labels are matched to the camera image of the
    same ``name``.
    """
    images, annotations, jpegs, skipped = [], [], {}, Counter()
    ann_id = first_annotation_id
    for cam_index, cam in enumerate(frame.images, start=1):
        iid = image_id(seg, frame_index, cam_index)
        file_name = f"{seg}_{frame_index}_{cam_index}.jpg"
        data = bytes(cam.image)
        h, w = jpeg_size(data)
        images.append({"id": iid, "file_name": file_name, "height": h, "width": w, "license": 1})
        jpegs[file_name] = data
        for labels in frame.camera_labels:
            if labels.name != cam.name:
                continue
            for label in labels.labels:
                cat = WAYMO_TYPE_TO_CATEGORY.get(int(label.type))
                if cat is None:
                    skipped[TYPE_NAMES.get(int(label.type), str(label.type))] += 1
                    continue
                b = label.box
                length, width = float(b.length), float(b.width)
                annotations.append({
                    "id": ann_id, "image_id": iid, "category_id": cat, "iscrowd": 0, "area": length * width,
                    "bbox": [float(b.center_x) - length / 2.0, float(b.center_y) - width / 2.0, length, width]})
                ann_id += 1
    return images, annotations, jpegs, skipped


def coco_document(images: list, annotations: list) -> dict:
    return {"info": {"description": "Waymo Open Dataset camera labels in COCO format (datasets/waymo.py)"},
            "licenses": [{"id": 1, "name": "Waymo Dataset License Agreement for Non-Commercial Use",
                          "url": "https://waymo.com/open/terms"}],
            "images": images, "annotations": annotations, "categories": CATEGORIES}


def read_frames(path: str):
    """Yield ``waymo_open_dataset.dataset_pb2.Frame`` protos from one TFRecord (needs TensorFlow + Waymo)."""
    try:
        import tensorflow as tf
        from waymo_open_dataset import dataset_pb2
    except ImportError as e:
        raise SystemExit(f"reading Waymo TFRecords needs TensorFlow and the Waymo package "
                         f"(pip install -r requirements-waymo.txt): {e}") from None
    for record in tf.data.TFRecordDataset(path, compression_type=""):
        frame = dataset_pb2.Frame()
        frame.ParseFromString(bytes(record.numpy()))
        yield frame


def convert(tfrecords: list[str], out_dir: str, first_segment: int = 0, frames=read_frames) -> dict:
    """Convert TFRecords (segment ``first_segment + i`` each) into ``out_dir``; returns a summary."""
    image_dir, ann_dir = os.path.join(out_dir, "images"), os.path.join(out_dir, "annotations")
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(ann_dir, exist_ok=True)
    images, annotations, skipped, per_class = [], [], Counter(), Counter()
    for i, path in enumerate(tfrecords):
        if not os.path.isfile(path):
            raise SystemExit(f"TFRecord {path!r} does not exist")
        for f_index, frame in enumerate(frames(path), start=1):
            ims, anns, jpegs, skip = frame_to_coco(frame, first_segment + i, f_index, len(annotations))
            for name, data in jpegs.items():
                with open(os.path.join(image_dir, name), "wb") as f:
                    f.write(data)
            images += ims
            annotations += anns
            skipped += skip
            per_class.update(a["category_id"] for a in anns)
    ann_file = os.path.join(ann_dir, "annotations.json")
    with open(ann_file, "w") as f:
        json.dump(coco_document(images, annotations), f)
    names = {c["id"]: c["name"] for c in CATEGORIES}
    return {"annotations_file": ann_file, "images": len(images), "annotations": len(annotations),
            "per_class": {names[k]: v for k, v in sorted(per_class.items())}, "skipped": dict(skipped)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Waymo Open Dataset TFRecords -> COCO format (images/, annotations/)")
    p.add_argument("tfrecords", nargs="+", help="segment TFRecord files (one segment each)")
    p.add_argument("--out-dir", required=True, help="writes OUT/images/*.jpg and OUT/annotations/annotations.json")
    p.add_argument("--seg-min", type=int, default=0, help="segment number of the first TFRecord (image ids)")
    args = p.parse_args(argv)
    summary = convert(args.tfrecords, args.out_dir, args.seg_min)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
