"""Waymo TFRecords -> COCO: the frame conversion on stand-ins with the protos' field names (no TensorFlow),
the whole converter on stand-in frames, and on a real TFRecord when TensorFlow and the Waymo package exist."""
import importlib.util
import io
import json
from collections import namedtuple

import numpy as np
import pytest
from PIL import Image

from datasets import CocoDetection, load_coco_json
from datasets.waymo import convert, frame_to_coco, image_id

# the field names of waymo_open_dataset.dataset_pb2 / label_pb2
Box = namedtuple("Box", "center_x center_y length width")
Label = namedtuple("Label", "type box")
CameraLabels = namedtuple("CameraLabels", "name labels")
CameraImage = namedtuple("CameraImage", "name image")
Frame = namedtuple("Frame", "images camera_labels")
FRONT, FRONT_LEFT, SIDE_LEFT = 1, 2, 4  # CameraName values


def jpeg(h: int, w: int, seed: int = 0) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG")
    return buf.getvalue()


def sample_frame() -> Frame:
    return Frame(
        images=[CameraImage(FRONT, jpeg(48, 64)), CameraImage(SIDE_LEFT, jpeg(40, 72, 1))],
        camera_labels=[
            CameraLabels(SIDE_LEFT, [Label(4, Box(30.0, 20.0, 10.0, 6.0))]),  # cyclist (type 4)
            CameraLabels(FRONT, [Label(1, Box(32.0, 24.0, 20.0, 10.0)),  # vehicle
                                 Label(2, Box(10.5, 12.0, 3.0, 8.0)),  # pedestrian
                                 Label(0, Box(5.0, 5.0, 2.0, 2.0))]),  # unknown: skipped
            CameraLabels(FRONT_LEFT, [Label(1, Box(1.0, 1.0, 1.0, 1.0))]),  # camera without an image here
        ])


def test_frame_to_coco_boxes_classes_ids():
    images, anns, jpegs, skipped = frame_to_coco(sample_frame(), seg=3, frame_index=7, first_annotation_id=100)
    assert [(i["id"], i["file_name"], i["height"], i["width"]) for i in images] == [
        (30_000_701, "3_7_1.jpg", 48, 64), (30_000_702, "3_7_2.jpg", 40, 72)]
    assert set(jpegs) == {"3_7_1.jpg", "3_7_2.jpg"} and jpegs["3_7_2.jpg"] == sample_frame().images[1].image
    got = [(a["id"], a["image_id"], a["category_id"], a["bbox"], a["area"]) for a in anns]
    assert got == [
        (100, 30_000_701, 1, [22.0, 19.0, 20.0, 10.0], 200.0),  # x = cx - length/2, y = cy - width/2
        (101, 30_000_701, 2, [9.0, 8.0, 3.0, 8.0], 24.0),
        (102, 30_000_702, 3, [25.0, 17.0, 10.0, 6.0], 60.0),
    ]
    assert skipped == {"unknown": 1}


def test_image_ids_stay_unique_or_fail():
    assert image_id(0, 1, 1) == 101 and image_id(31, 99_999, 5) == 319_999_905
    with pytest.raises(ValueError, match="frame 100000"):
        image_id(0, 100_000, 1)


def test_convert_writes_a_coco_set_our_loader_reads(tmp_path):
    record = tmp_path / "segment-0.tfrecord"
    record.write_bytes(b"")  # the frames come from the stand-in reader
    summary = convert([str(record)], str(tmp_path / "out"), first_segment=2,
                      frames=lambda path: iter([sample_frame(), sample_frame()]))
    assert summary["images"] == 4 and summary["annotations"] == 6
    assert summary["per_class"] == {"vehicle": 2, "pedestrian": 2, "cyclist": 2}
    assert summary["skipped"] == {"unknown": 2}
    data = load_coco_json(summary["annotations_file"])
    assert [c["name"] for c in data["categories"]] == ["vehicle", "pedestrian", "cyclist"]
    assert len({a["id"] for a in data["annotations"]}) == 6 and {i["id"] for i in data["images"]} == {
        20_000_101, 20_000_102, 20_000_201, 20_000_202}
    ds = CocoDetection(summary["annotations_file"], str(tmp_path / "out" / "images"))
    assert len(ds) == 4 and ds.num_classes == 3


def test_missing_record_is_a_one_line_error(tmp_path):
    with pytest.raises(SystemExit, match="nope.tfrecord.*does not exist"):
        convert([str(tmp_path / "nope.tfrecord")], str(tmp_path / "out"), frames=lambda p: iter([]))


_HAVE_WAYMO = all(importlib.util.find_spec(m) for m in ("tensorflow", "waymo_open_dataset"))


@pytest.mark.skipif(not _HAVE_WAYMO, reason="TensorFlow and waymo-open-dataset are not installed "
                    "(optional: pip install -r requirements-waymo.txt)")
def test_real_tfrecord(tmp_path):
    import tensorflow as tf
    from waymo_open_dataset import dataset_pb2, label_pb2

    frame = dataset_pb2.Frame()
    img = frame.images.add()
    img.name, img.image = dataset_pb2.CameraName.FRONT, jpeg(48, 64)
    cl = frame.camera_labels.add()
    cl.name = dataset_pb2.CameraName.FRONT
    lab = cl.labels.add()
    lab.type = label_pb2.Label.TYPE_CYCLIST
    lab.box.center_x, lab.box.center_y, lab.box.length, lab.box.width = 32.0, 24.0, 20.0, 10.0
    path = str(tmp_path / "segment.tfrecord")
    with tf.io.TFRecordWriter(path) as w:
        w.write(frame.SerializeToString())
    summary = convert([path], str(tmp_path / "out"))
    data = json.load(open(summary["annotations_file"]))
    assert data["annotations"][0]["bbox"] == [22.0, 19.0, 20.0, 10.0] and data["annotations"][0]["category_id"] == 3
    assert data["images"][0]["file_name"] == "0_1_1.jpg"
