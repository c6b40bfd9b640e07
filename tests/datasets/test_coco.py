"""CocoDetection: the sample format, the category mapping and every bad-input case."""
import json
import logging

import numpy as np
import pytest

from datasets.coco import IGNORE_LABEL, CocoDetection, coco2017_paths

from .conftest import make_coco, write_png


def test_coco2017_paths(tmp_path):
    ann, img = coco2017_paths(tmp_path, "val")
    assert ann == str(tmp_path / "annotations" / "instances_val2017.json")
    assert img == str(tmp_path / "val2017")
    assert coco2017_paths(tmp_path, "train")[1].endswith("train2017")
    with pytest.raises(ValueError, match="split"):
        coco2017_paths(tmp_path, "test")


def test_sample_format_and_category_mapping(tmp_path):
    cats = [{"id": 90, "name": "z"}, {"id": 3, "name": "c"}, {"id": 7, "name": "g"}]
    anns = [{"id": 1, "image_id": 1, "category_id": 90, "bbox": [1, 2, 3, 4]},
            {"id": 2, "image_id": 1, "category_id": 3, "bbox": [5.5, 6, 7, 8]},
            {"id": 3, "image_id": 2, "category_id": 7, "bbox": [0, 0, 30, 20], "iscrowd": 1}]
    ds = CocoDetection(*make_coco(tmp_path, annotations=anns, categories=cats))
    assert ds.class_names == ["c", "g", "z"]  # sorted by category id
    assert ds.cat_id_to_label == {3: 0, 7: 1, 90: 2}
    assert all(ds.cat_id_to_label[ds.label_to_cat_id[k]] == k for k in range(3))
    assert len(ds) == 2 and ds.image_ids == [1, 2]
    s = ds[0]
    assert s["image"].dtype == np.uint8 and s["image"].shape == (20, 30, 3)
    assert s["image_id"] == 1 and s["orig_size"] == (20, 30)
    assert s["boxes"].dtype == np.float32 and s["labels"].dtype == np.int64
    np.testing.assert_array_equal(s["boxes"], np.array([[1, 2, 4, 6], [5.5, 6, 12.5, 14]], np.float32))
    np.testing.assert_array_equal(s["labels"], [2, 0])
    s2 = ds[1]  # crowd kept as ignore
    np.testing.assert_array_equal(s2["labels"], [IGNORE_LABEL])
    np.testing.assert_array_equal(s2["boxes"], [[0, 0, 30, 20]])
    assert not ds.stats


def test_negative_images_kept(tmp_path):
    ds = CocoDetection(*make_coco(tmp_path))
    s = ds[1]
    assert s["boxes"].shape == (0, 4) and s["labels"].shape == (0,)
    assert ds.stats["image_without_boxes"] == 1


@pytest.mark.parametrize("field", ["images", "annotations", "categories"])
def test_not_coco_missing_top_field(tmp_path, field):
    ann, img = make_coco(tmp_path, drop=(field,))
    with pytest.raises(ValueError, match=rf"ann\.json.*missing field '{field}'"):
        CocoDetection(ann, img)


@pytest.mark.parametrize("kind,field", [("images", "file_name"), ("images", "id"), ("images", "height"),
                                        ("annotations", "bbox"), ("annotations", "category_id"),
                                        ("annotations", "image_id"), ("categories", "name")])
def test_not_coco_missing_entry_field(tmp_path, kind, field):
    ann, img = make_coco(tmp_path)
    data = json.loads(open(ann).read())
    del data[kind][0][field]
    open(ann, "w").write(json.dumps(data))
    with pytest.raises(ValueError, match=rf"ann\.json.*missing required field '{field}'"):
        CocoDetection(ann, img)


def test_not_json_and_not_object(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"bad\.json.*not a JSON"):
        CocoDetection(bad, tmp_path)
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"bad\.json.*not a COCO"):
        CocoDetection(bad, tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CocoDetection(tmp_path / "nope.json", tmp_path)


def test_bad_bbox_field_and_duplicate_ids(tmp_path):
    anns = [{"id": 7, "image_id": 1, "category_id": 5, "bbox": [1, 2, 3]}]
    with pytest.raises(ValueError, match=r"annotation id 7.*'bbox'"):
        CocoDetection(*make_coco(tmp_path, annotations=anns))
    anns = [{"id": 7, "image_id": 1, "category_id": 5, "bbox": [1, 2, 3, 4]},
            {"id": 7, "image_id": 2, "category_id": 5, "bbox": [1, 2, 3, 4]}]
    with pytest.raises(ValueError, match="duplicate annotation id 7"):
        CocoDetection(*make_coco(tmp_path, annotations=anns))


@pytest.mark.parametrize("field, value, match", [("iscrowd", "0", "'iscrowd' must be 0 or 1"),
                                                  ("iscrowd", 2, "'iscrowd' must be 0 or 1"),
                                                  ("area", "12", "'area' must be a number"),
                                                  ("id", 2**70, "'id' does not fit in 64 bits")])
def test_annotation_fields_of_the_wrong_type(tmp_path, field, value, match):
    """iscrowd "0" read as a crowd (the box silently ignored); an id past int64 failed in the loader."""
    anns = [{"id": 7, "image_id": 1, "category_id": 5, "bbox": [1, 2, 3, 4], field: value}]
    with pytest.raises(ValueError, match=rf"annotation id .*{match}") as e:
        CocoDetection(*make_coco(tmp_path, annotations=anns))
    assert e.value.field == f"annotations[0].{field}"


def test_empty_annotation_file(tmp_path):
    ann, img = make_coco(tmp_path, images=[], annotations=[])
    with pytest.raises(ValueError, match=r"ann\.json.*no images"):
        CocoDetection(ann, img)


@pytest.mark.parametrize("name", ["../escape.png", "sub/../../escape.png", "/etc/passwd", "C:\\x.png"])
def test_path_escaping_image_folder(tmp_path, name):
    images = [{"id": 1, "file_name": name, "height": 20, "width": 30}]
    with pytest.raises(ValueError, match=r"ann\.json: image id 1: file_name .* escapes the image folder"):
        CocoDetection(*make_coco(tmp_path, images=images, annotations=[]))


def test_subfolder_paths_are_fine(tmp_path):
    images = [{"id": 1, "file_name": "sub/dir/x.png", "height": 20, "width": 30}]
    ds = CocoDetection(*make_coco(tmp_path, images=images, annotations=[]))
    assert ds[0]["image"].shape == (20, 30, 3)


def test_unknown_category(tmp_path):
    anns = [{"id": 42, "image_id": 1, "category_id": 77, "bbox": [1, 1, 5, 5]}]
    with pytest.raises(ValueError, match=r"annotation id 42 has category_id 77"):
        CocoDetection(*make_coco(tmp_path, annotations=anns))


def test_unknown_image_id(tmp_path):
    anns = [{"id": 43, "image_id": 99, "category_id": 5, "bbox": [1, 1, 5, 5]}]
    with pytest.raises(ValueError, match=r"annotation id 43 refers to unknown image id 99"):
        CocoDetection(*make_coco(tmp_path, annotations=anns))


def test_missing_image_is_error(tmp_path):
    ann, img = make_coco(tmp_path)
    (tmp_path / "img" / "b.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"img/b\.png.*not found"):
        CocoDetection(ann, img)


def test_missing_image_skipped_and_counted(tmp_path, caplog):
    ann, img = make_coco(tmp_path)
    (tmp_path / "img" / "a.png").unlink()
    with caplog.at_level(logging.WARNING, logger="datasets.coco"):
        ds = CocoDetection(ann, img, skip_bad_images=True)
    assert len(ds) == 1 and ds.image_ids == [2]  # dropped from the index
    assert ds.stats["image_missing"] == 1
    assert any("a.png" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("content", [b"this is not an image", "truncated"])
def test_corrupt_image_is_error(tmp_path, content):
    ann, img = make_coco(tmp_path)
    p = tmp_path / "img" / "a.png"
    p.write_bytes(p.read_bytes()[:40] if content == "truncated" else content)
    ds = CocoDetection(ann, img)
    with pytest.raises(OSError, match=r"img/a\.png: cannot decode"):
        ds[0]
    assert ds[1]["image_id"] == 2


def test_corrupt_image_replaced_by_next_good(tmp_path, caplog):
    ann, img = make_coco(tmp_path)
    (tmp_path / "img" / "a.png").write_bytes(b"garbage")
    ds = CocoDetection(ann, img, skip_bad_images=True)
    with caplog.at_level(logging.WARNING, logger="datasets.coco"):
        s = ds[0]
        ds[0]
    assert s["image_id"] == 2  # the next good one
    assert s["bad_images"] == (0,) and ds.image_path(0).endswith("a.png")  # for the caller to count
    assert ds.stats["image_corrupt"] == 1  # counted once: the bad index is remembered
    assert sum("image_corrupt" in r.getMessage() for r in caplog.records) == 1


def test_image_size_mismatch(tmp_path):
    ann, img = make_coco(tmp_path)
    write_png(tmp_path / "img" / "a.png", 21, 30)
    with pytest.raises(OSError, match=r"a\.png: decoded size 21x30"):
        CocoDetection(ann, img)[0]


def test_boxes_clipped_and_counted(tmp_path, caplog):
    anns = [{"id": 1, "image_id": 1, "category_id": 5, "bbox": [-4, -2, 10, 8]},
            {"id": 2, "image_id": 1, "category_id": 5, "bbox": [25, 15, 10, 10]},
            {"id": 3, "image_id": 1, "category_id": 5, "bbox": [1, 1, 2, 2]}]
    with caplog.at_level(logging.WARNING, logger="datasets.coco"):
        ds = CocoDetection(*make_coco(tmp_path, annotations=anns))
    np.testing.assert_array_equal(ds[0]["boxes"], [[0, 0, 6, 6], [25, 15, 30, 20], [1, 1, 3, 3]])
    assert ds.stats["box_clipped"] == 2
    msgs = [r.getMessage() for r in caplog.records if "box_clipped" in r.getMessage()]
    assert len(msgs) == 1 and "annotation id 1" in msgs[0]  # logged once per kind


def test_degenerate_boxes_dropped_and_counted(tmp_path):
    anns = [{"id": 1, "image_id": 1, "category_id": 5, "bbox": [1, 1, 0.5, 5]},     # < 1 px wide
            {"id": 2, "image_id": 1, "category_id": 5, "bbox": [1, 1, 0, 0]},       # zero area
            {"id": 3, "image_id": 1, "category_id": 5, "bbox": [1, 1, -3, 4]},      # negative width
            {"id": 4, "image_id": 1, "category_id": 5, "bbox": [29.5, 1, 10, 5]},   # 0.5 px after clip
            {"id": 5, "image_id": 1, "category_id": 5, "bbox": [40, 40, 5, 5]},     # fully outside
            {"id": 6, "image_id": 1, "category_id": 5, "bbox": [float("nan"), 1, 4, 4]},
            {"id": 7, "image_id": 1, "category_id": 5, "bbox": [1, 1, float("inf"), 4]},
            {"id": 8, "image_id": 1, "category_id": 9, "bbox": [2, 2, 1, 1]}]       # exactly 1 px: kept
    ds = CocoDetection(*make_coco(tmp_path, annotations=anns))
    np.testing.assert_array_equal(ds[0]["boxes"], [[2, 2, 3, 3]])
    np.testing.assert_array_equal(ds[0]["labels"], [1])
    assert ds.stats["box_too_small"] == 5 and ds.stats["box_nonfinite"] == 2
    assert "box_clipped" not in ds.stats


def test_getitem_accepts_index_epoch_pairs(tmp_path):
    seen = []

    def tf(sample, index, epoch):
        seen.append((index, epoch))
        return sample

    ds = CocoDetection(*make_coco(tmp_path), transform=tf)
    ds[1]
    ds[(0, 5)]
    ds.set_epoch(3)
    ds[-1]
    assert seen == [(1, 0), (0, 5), (1, 3)]
    with pytest.raises(IndexError):
        ds[2]


def test_no_categories_is_a_clear_error(tmp_path):
    ann, img = make_coco(tmp_path, categories=[], annotations=[])
    with pytest.raises(ValueError, match="no categories"):
        CocoDetection(ann, img)


def test_small_set_keeps_decoded_images(tmp_path):
    """A set under ``cache_bytes`` decodes each image once: the file can go, the pixels stay, read-only."""
    ann, img_dir = make_coco(tmp_path)
    ds = CocoDetection(ann, img_dir)  # two 20 x 30 images: far under the default limit
    first = ds.load(0)["image"]
    (tmp_path / "img" / "a.png").unlink()
    again = ds.load(0)["image"]
    assert again is first and not again.flags.writeable
    np.testing.assert_array_equal(again, np.full((20, 30, 3), (10, 20, 30), np.uint8))


def test_set_over_the_cache_limit_decodes_every_time(tmp_path):
    ann, img_dir = make_coco(tmp_path)
    ds = CocoDetection(ann, img_dir, cache_bytes=2 * 20 * 30 * 3 - 1)  # one byte short of both images
    ds.load(0)
    (tmp_path / "img" / "a.png").unlink()
    with pytest.raises(FileNotFoundError, match="a.png"):
        ds.load(0)


def test_16_bit_grayscale_is_scaled_not_clipped_to_white(tmp_path):
    """PIL's convert("RGB") clips a 16-bit gray PNG (mode I;16) to 255: the loaders scale it instead, and
    evaluate.py --images reads it as training does."""
    from PIL import Image

    from training.images import read_image

    from pathlib import Path

    ann, img = make_coco(tmp_path)
    img = Path(img)
    gray = (np.arange(20 * 30, dtype=np.uint16).reshape(20, 30) * 100)   # 0 .. 59900
    Image.fromarray(gray).save(img / "a.png")
    assert Image.open(img / "a.png").mode.startswith("I")
    image = CocoDetection(ann, img).load(0)["image"]
    want = np.clip(np.rint(gray / 257.0), 0, 255).astype(np.uint8)
    assert image.shape == (20, 30, 3) and np.array_equal(image[..., 0], want) and np.array_equal(image[..., 2], want)
    assert np.array_equal(read_image(str(img / "a.png")), image)
    rgba = np.dstack([np.full((20, 30, 3), 40, np.uint8), np.zeros((20, 30), np.uint8)])  # fully transparent
    Image.fromarray(rgba, "RGBA").save(img / "b.png")
    assert np.array_equal(read_image(str(img / "b.png")), CocoDetection(ann, img).load(1)["image"])  # alpha dropped


def test_file_listed_under_two_image_ids_is_counted(tmp_path, caplog):
    images = [{"id": 1, "file_name": "a.png", "height": 20, "width": 30},
              {"id": 2, "file_name": "a.png", "height": 20, "width": 30}]
    ds = CocoDetection(*make_coco(tmp_path, images=images))
    assert len(ds) == 2 and ds.stats["image_file_repeated"] == 1
    assert "more than one image id" in caplog.text
