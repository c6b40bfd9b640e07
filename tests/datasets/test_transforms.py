"""Train/eval transforms: boxes follow the pixels, scale maps back, randomness is (seed, epoch, index)."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from datasets.transforms import EvalTransform, TrainTransform, build_transform


def box_image(h, w, boxes, labels=None):
    """Black image; box k (integer pixels) filled with 255 in channel k % 3 (white when one box)."""
    img = np.zeros((h, w, 3), np.uint8)
    for k, (x1, y1, x2, y2) in enumerate(boxes):
        img[int(y1):int(y2), int(x1):int(x2), slice(None) if len(boxes) == 1 else k % 3] = 255
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    labels = np.arange(len(boxes), dtype=np.int64) if labels is None else np.asarray(labels, np.int64)
    return {"image": img, "boxes": boxes, "labels": labels, "image_id": 7, "orig_size": (h, w), "scale": 1.0}


def bright_extent(img, box, channel=0, thr=128):
    """xyxy extent of bright pixels of ``channel`` inside a (slightly grown) window around ``box``."""
    h, w = img.shape[:2]
    x1, y1, x2, y2 = box
    xa, ya = max(0, int(np.floor(x1)) - 2), max(0, int(np.floor(y1)) - 2)
    xb, yb = min(w, int(np.ceil(x2)) + 2), min(h, int(np.ceil(y2)) + 2)
    m = img[ya:yb, xa:xb, channel] > thr
    ys, xs = np.nonzero(m)
    if len(xs) == 0:
        return None
    return np.array([xs.min() + xa, ys.min() + ya, xs.max() + 1 + xa, ys.max() + 1 + ya], np.float32)


def check(sample, th, tw):
    assert sample["image"].shape == (th, tw, 3) and sample["image"].dtype == np.uint8
    b = sample["boxes"]
    assert b.dtype == np.float32 and sample["labels"].dtype == np.int64 and len(b) == len(sample["labels"])
    assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= tw).all() and (b[:, 3] <= th).all()
    assert ((b[:, 2] - b[:, 0]) >= 1).all() and ((b[:, 3] - b[:, 1]) >= 1).all()
    assert isinstance(sample["scale"], float) and sample["scale"] > 0


def test_eval_resize_pad_and_scale_maps_back():
    s = box_image(48, 64, [[8, 4, 40, 30], [60, 40, 64, 48]])
    out = EvalTransform((128, 128))(s)
    check(out, 128, 128)
    assert out["scale"] == 2.0 and out["orig_size"] == (48, 64)
    np.testing.assert_allclose(out["boxes"] / out["scale"], s["boxes"], atol=1e-5)
    np.testing.assert_array_equal(out["labels"], [0, 1])
    assert (out["image"][96:] == (124, 116, 104)).all()  # padded bottom with the mean colour
    for k in range(2):
        np.testing.assert_allclose(bright_extent(out["image"], out["boxes"][k], k), out["boxes"][k], atol=1)


@settings(max_examples=15)
@given(h=st.integers(1, 90), w=st.integers(1, 90), th=st.integers(8, 70), tw=st.integers(8, 70))
def test_eval_any_size(h, w, th, tw):
    s = box_image(h, w, [[0, 0, w, h]])
    out = EvalTransform((th, tw))(s)
    check(out, th, tw)
    sc = out["scale"]
    assert abs(min(th / h, tw / w) - sc) < 1e-9
    if len(out["boxes"]):  # the whole-image box maps back to the image within the rounding of one pixel
        np.testing.assert_allclose(out["boxes"][0] / sc, [0, 0, w, h], atol=1.0 / sc + 1e-4)


def test_flip_is_exact_and_twice_is_identity():
    rng = np.random.default_rng(0)
    s = box_image(32, 48, [[3, 5, 20, 30], [40, 0, 48, 7]])
    s["image"] = rng.integers(0, 256, s["image"].shape, dtype=np.uint8)
    t = TrainTransform((32, 48), flip_prob=1.0, scale_range=(1.0, 1.0))
    once = t(s, index=0)
    np.testing.assert_array_equal(once["image"], s["image"][:, ::-1])
    np.testing.assert_array_equal(once["boxes"], [[28, 5, 45, 30], [0, 0, 8, 7]])
    twice = t(once, index=1)
    np.testing.assert_array_equal(twice["image"], s["image"])
    np.testing.assert_array_equal(twice["boxes"], s["boxes"])
    assert once["scale"] == 1.0


@settings(max_examples=20)
@given(seed=st.integers(0, 2**31), index=st.integers(0, 10**6), epoch=st.integers(0, 500))
def test_train_boxes_follow_pixels(seed, index, epoch):
    s = box_image(60, 80, [[10, 12, 40, 42], [50, 5, 75, 20], [5, 48, 60, 58]])
    t = TrainTransform((64, 64), seed=seed)
    out = t(s, index=index, epoch=epoch)
    check(out, 64, 64)
    for box, label in zip(out["boxes"], out["labels"]):
        w, h = box[2] - box[0], box[3] - box[1]
        ext = bright_extent(out["image"], box, channel=int(label))
        if min(w, h) < 4:  # sub-4-px boxes blur away under bilinear downscaling
            continue
        assert ext is not None
        np.testing.assert_allclose(ext, box, atol=1.5, err_msg=f"box {box} vs bright pixels {ext}")


def test_train_randomness_is_seed_epoch_index_only():
    rng = np.random.default_rng(1)
    s = box_image(50, 70, [[10, 10, 40, 30]])
    s["image"] = rng.integers(0, 256, s["image"].shape, dtype=np.uint8)
    t = TrainTransform((64, 64), seed=5)
    a = t(s, index=3, epoch=2)
    np.random.seed(123)
    torch.manual_seed(123)
    np.random.random(10)
    b = TrainTransform((64, 64), seed=5)(s, index=3, epoch=2)
    for k in ("image", "boxes", "labels"):
        np.testing.assert_array_equal(a[k], b[k])
    assert a["scale"] == b["scale"]
    t.set_epoch(2)
    np.testing.assert_array_equal(t(s, index=3)["image"], a["image"])
    others = [t(s, index=3, epoch=3), t(s, index=4, epoch=2), TrainTransform((64, 64), seed=6)(s, 3, 2)]
    for o in others:
        assert o["scale"] != a["scale"]


def test_train_scale_range_and_crop():
    s = box_image(100, 100, [[0, 0, 100, 100]])
    t = TrainTransform((50, 50), seed=0)
    scales = [t(s, index=i)["scale"] / 0.5 for i in range(200)]
    assert 0.1 <= min(scales) < 0.2 and 1.9 < max(scales) <= 2.0
    # big zoom: the whole-image box is clipped to the crop window
    t2 = TrainTransform((50, 50), seed=0, scale_range=(2.0, 2.0), flip_prob=0.0)
    out = t2(s, index=0)
    np.testing.assert_array_equal(out["boxes"], [[0, 0, 50, 50]])
    assert (out["image"] == 255).all()


def test_boxes_leaving_the_crop_are_dropped():
    s = box_image(100, 100, [[0, 0, 10, 10], [90, 90, 100, 100]], labels=[4, 6])
    t = TrainTransform((50, 50), seed=0, scale_range=(2.0, 2.0), flip_prob=0.0)
    for i in range(20):
        out = t(s, index=i)
        check(out, 50, 50)
        assert len(out["boxes"]) <= 1  # a 100x100 crop window out of 200x200 holds at most one corner
        assert set(out["labels"].tolist()) <= {4, 6}


def test_empty_boxes_and_build_transform():
    s = box_image(30, 40, [])
    for tf in (build_transform(True, 32, seed=1), build_transform(False, (32, 16))):
        out = tf(s, index=0)
        assert out["boxes"].shape == (0, 4) and out["labels"].shape == (0,)
    assert isinstance(build_transform(True, 32), TrainTransform)
    assert isinstance(build_transform(False, 32), EvalTransform)
    with pytest.raises(ValueError):
        TrainTransform(32, scale_range=(0.0, 1.0))


@pytest.mark.parametrize("h,w,target", [(427, 640, 256), (511, 257, 256), (97, 143, 256), (480, 640, 512),
                                        (333, 500, 128), (640, 427, 512), (10, 900, 128)])
def test_eval_transform_is_effdets_resize_pad(h, w, target):
    """The evaluation input equals effdet's ``ResizePad`` (which NVIDIA's pipeline uses too), pixel for pixel,
    for sizes where rounding and truncating the resized side differ (427 x 640 at 256 px: 170.8 -> 170)."""
    effdet_transforms = pytest.importorskip("effdet.data.transforms")
    from PIL import Image

    from datasets.transforms import IMAGENET_MEAN_PIXEL

    rng = np.random.default_rng(h * w)
    img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    ours = EvalTransform(target)({"image": img, "boxes": np.zeros((0, 4), np.float32),
                                  "labels": np.zeros((0,), np.int64)})
    theirs, anno = effdet_transforms.ResizePad(target, "bilinear", IMAGENET_MEAN_PIXEL)(Image.fromarray(img), {})
    assert np.array_equal(ours["image"], np.asarray(theirs)), (h, w, target)
    assert ours["scale"] == pytest.approx(1.0 / anno["img_scale"], rel=1e-12)
