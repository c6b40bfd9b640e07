"""evaluate_detections against pycocotools, empty inputs, per-class AP and per-class IoU."""
import contextlib
import io
import json

import numpy as np
import pytest
import torch

from datasets.evaluation import STAT_NAMES, evaluate_detections, load_detections, to_coco_results


def gt_dict():
    """3 images, 2 classes with ids 4 ('car') and 8 ('dog'), boxes of several sizes."""
    images = [{"id": i, "file_name": f"{i}.png", "height": 200, "width": 300} for i in (1, 2, 3)]
    boxes = [(1, 4, [10, 10, 50, 40]), (1, 8, [100, 50, 120, 100]), (2, 4, [5, 5, 20, 20]),
             (2, 4, [150, 20, 60, 90]), (3, 8, [30, 60, 200, 130]), (3, 8, [0, 0, 10, 12])]
    anns = [{"id": k + 1, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
            for k, (i, c, b) in enumerate(boxes)]
    return {"images": images, "annotations": anns,
            "categories": [{"id": 8, "name": "dog"}, {"id": 4, "name": "car"}]}


def perfect(gt):
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]), "score": 0.9}
            for a in gt["annotations"]]


def noisy(gt, seed=0):
    rng = np.random.default_rng(seed)
    dets = []
    for a in gt["annotations"]:
        for _ in range(3):
            x, y, w, h = a["bbox"]
            j = rng.normal(0, 0.15, 4) * [w, h, w, h]
            dets.append({"image_id": a["image_id"], "category_id": int(rng.choice([4, 8], p=[0.8, 0.2]))
                         if rng.random() < 0.3 else a["category_id"],
                         "bbox": [float(x + j[0]), float(y + j[1]), float(max(1, w + j[2])), float(max(1, h + j[3]))],
                         "score": float(rng.random())})
    return dets


def test_perfect_detections_give_ap_one():
    gt = gt_dict()
    r = evaluate_detections(gt, perfect(gt))
    for k in ("AP", "AP50", "AP75", "AR100"):
        assert r[k] == pytest.approx(1.0), k
    assert r["per_class"] == {"dog": pytest.approx(1.0), "car": pytest.approx(1.0)}


def test_matches_direct_pycocotools_run(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = gt_dict()
    dets = noisy(gt)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    with contextlib.redirect_stdout(io.StringIO()):
        cg = COCO(str(tmp_path / "gt.json"))
        ev = COCOeval(cg, cg.loadRes(str(tmp_path / "dets.json")), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    r = evaluate_detections(str(tmp_path / "gt.json"), load_detections(tmp_path / "dets.json"))
    got = np.array([r[k] for k in STAT_NAMES])
    np.testing.assert_allclose(got, ev.stats, rtol=0, atol=1e-12)
    assert 0.05 < r["AP"] < 0.95  # a non-trivial case
    # per-class AP from the precision array: AP of each class alone; their mean is the overall AP
    for cat_id, name in ((4, "car"), (8, "dog")):
        p = ev.eval["precision"][:, :, ev.params.catIds.index(cat_id), 0, -1]
        assert r["per_class"][name] == pytest.approx(p[p > -1].mean())
    assert np.mean(list(r["per_class"].values())) == pytest.approx(r["AP"])
    arr = np.array([[d["image_id"], *d["bbox"], d["score"], d["category_id"]] for d in dets])
    r2 = evaluate_detections(cg, arr)  # (K, 7) array and a COCO object
    assert r2 == r


def test_empty_detections_give_zeros():
    r = evaluate_detections(gt_dict(), [], iou_by_class={"car": 0.7})
    assert all(r[k] == 0.0 for k in STAT_NAMES)
    assert r["per_class"] == {"car": 0.0, "dog": 0.0} and r["per_class_iou"] == {"car": 0.0, "dog": 0.0}
    assert evaluate_detections(gt_dict(), np.zeros((0, 7)))["AP"] == 0.0


def test_empty_ground_truth_is_an_error():
    gt = gt_dict()
    gt["annotations"] = []
    with pytest.raises(ValueError, match="ground truth has no annotations") as e:
        evaluate_detections(gt, [])
    assert e.value.field == "annotations"  # a DataError: a one-line report in the scripts


@pytest.mark.parametrize("backend", ["pycocotools", "default"])
def test_optional_area_and_iscrowd(monkeypatch, backend):
    """The COCO format leaves ``area`` and ``iscrowd`` to the writer; pycocotools' COCOeval raised KeyError
    without them. Missing, they are the box's area and 0: the same numbers as when written out."""
    import datasets.evaluation as E

    if backend == "pycocotools":
        monkeypatch.setattr(E, "eval_backend", E._pycocotools)
    gt = gt_dict()
    full = evaluate_detections(gt, noisy(gt))
    for a in gt["annotations"]:
        del a["area"], a["iscrowd"]
    bare = evaluate_detections(gt, noisy(gt))
    assert {k: bare[k] for k in STAT_NAMES} == {k: full[k] for k in STAT_NAMES}
    assert "area" not in gt["annotations"][0]  # the caller's dict is left as it was


def test_iou_by_class():
    gt = gt_dict()
    dets = perfect(gt)
    for d in dets:  # shift every box by 20 % of its width: IoU = 0.8/1.2 = 0.667
        d["bbox"][0] += 0.2 * d["bbox"][2]
    r = evaluate_detections(gt, dets, iou_by_class={"car": 0.7})
    assert r["per_class_iou"] == {"car": pytest.approx(0.0), "dog": pytest.approx(1.0)}
    assert r["mAP_iou_by_class"] == pytest.approx(0.5)
    r = evaluate_detections(gt, dets, iou_by_class={"car": 0.66, "dog": 0.67})  # off the 0.05 grid
    assert r["per_class_iou"] == {"car": pytest.approx(1.0), "dog": pytest.approx(0.0)}
    with pytest.raises(ValueError, match="unknown classes"):
        evaluate_detections(gt, dets, iou_by_class={"cat": 0.5})


def test_detections_on_unknown_image_or_category():
    gt = gt_dict()
    d = perfect(gt)
    d[2]["image_id"] = 99
    with pytest.raises(ValueError, match=r"entry #2: image_id 99"):
        evaluate_detections(gt, d)
    d = perfect(gt)
    d[1]["category_id"] = 5
    with pytest.raises(ValueError, match=r"entry #1: category_id 5"):
        evaluate_detections(gt, d)


@pytest.mark.parametrize("bad,match", [
    ({"image_id": 1, "category_id": 4, "bbox": [0, 0, 1, 1]}, "entry #1 is missing field 'score'"),
    ({"image_id": 1, "category_id": 4, "score": 0.5}, "entry #1 is missing field 'bbox'"),
    ({"category_id": 4, "bbox": [0, 0, 1, 1], "score": 0.5}, "entry #1 is missing field 'image_id'"),
    ({"image_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}, "entry #1 is missing field 'category_id'"),
    ({"image_id": 1, "category_id": 4, "bbox": [0, 0, 1], "score": 0.5}, "entry #1: field 'bbox'"),
    ({"image_id": 1, "category_id": 4, "bbox": [0, 0, -1, 1], "score": 0.5}, "entry #1: field 'bbox'"),
    ({"image_id": "1", "category_id": 4, "bbox": [0, 0, 1, 1], "score": 0.5}, "entry #1: field 'image_id'"),
    ({"image_id": 1, "category_id": 4, "bbox": [0, 0, 1, 1], "score": None}, "entry #1: field 'score'"),
    (7, "entry #1 is not an object"),
])
def test_load_detections_validation(tmp_path, bad, match):
    good = {"image_id": 1, "category_id": 4, "bbox": [0, 0, 1, 1], "score": 0.5}
    p = tmp_path / "res.json"
    p.write_text(json.dumps([good, bad]))
    with pytest.raises(ValueError, match=rf"res\.json: {match}"):
        load_detections(p)


def test_load_detections_not_a_list(tmp_path):
    p = tmp_path / "res.json"
    p.write_text('{"a": 1}')
    with pytest.raises(ValueError, match="must be a list"):
        load_detections(p)
    p.write_text("[{")
    with pytest.raises(ValueError, match="not a JSON"):
        load_detections(p)
    p.write_text("[]")
    assert load_detections(p) == []


def test_to_coco_results_maps_back_and_skips_padding():
    boxes = np.array([[[20, 40, 60, 100], [0, 0, 1, 1]], [[10, 10, 30, 30], [0, 0, 0, 0]]], np.float32)
    scores = np.array([[0.9, 0.5], [0.7, 0.0]])
    labels = np.array([[1, 0], [0, -1]])
    out = to_coco_results(boxes, scores, labels, [5, 6], [2.0, 0.5], {0: 4, 1: 8})
    assert out == [
        {"image_id": 5, "category_id": 8, "bbox": [10.0, 20.0, 20.0, 30.0], "score": 0.9},
        {"image_id": 5, "category_id": 4, "bbox": [0.0, 0.0, 0.5, 0.5], "score": 0.5},
        {"image_id": 6, "category_id": 4, "bbox": [20.0, 20.0, 40.0, 40.0], "score": 0.7}]
    clipped = to_coco_results(boxes, scores, labels, [5, 6], [2.0, 0.5], [4, 8], orig_sizes=[[100, 15], [50, 50]])
    assert clipped[0]["bbox"] == [10.0, 20.0, 5.0, 30.0]


def _to_coco_results_loop(boxes, scores, labels, image_ids, scales, lut, orig_sizes):
    """The former per-detection loop, kept as the oracle of the vectorized to_coco_results."""
    boxes = np.asarray(boxes, np.float64) / np.asarray(scales, np.float64)[:, None, None]
    hw = np.asarray(orig_sizes, np.float64)
    boxes = np.clip(boxes, 0, np.stack([hw[:, 1], hw[:, 0], hw[:, 1], hw[:, 0]], 1)[:, None, :])
    out = []
    for i, k in zip(*np.nonzero(labels >= 0)):
        cat = lut.get(int(labels[i, k]))
        if cat is None:
            continue
        x1, y1, x2, y2 = boxes[i, k].tolist()
        out.append({"image_id": int(image_ids[i]), "category_id": int(cat),
                    "bbox": [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)],
                    "score": round(float(scores[i, k]), 5)})
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_to_coco_results_same_as_a_loop(seed, caplog):
    """Random detections (padding, a class without a category, values on rounding edges, boxes beyond the
    image) give exactly the dicts of the per-detection loop, in the same order."""
    rng = np.random.default_rng(seed)
    b, k = 4, 30
    xy = rng.uniform(-20, 300, (b, k, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(0, 200, (b, k, 2))], 2).astype(np.float32)
    boxes[0, :5] = np.round(boxes[0, :5] * 2000) / 2000 + 0.0005  # halfway cases of round(., 3)
    scores = rng.random((b, k)).astype(np.float32)
    scores[1, :5] = np.round(scores[1, :5] * 1e5) / 1e5 + 5e-6
    labels = rng.integers(-1, 7, (b, k))  # -1 = padding; class 6 has no category
    lut = {c: 10 * c + 3 for c in range(6)}
    ids, scales = [7, 3, 9, 11], rng.uniform(0.5, 2.0, b)
    sizes = rng.integers(50, 400, (b, 2))
    got = to_coco_results(torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(labels),
                          torch.tensor(ids), torch.from_numpy(scales), lut, orig_sizes=torch.from_numpy(sizes))
    want = _to_coco_results_loop(boxes, scores, labels, ids, scales, lut, sizes)
    assert got == want and len(got) == int(((labels >= 0) & (labels < 6)).sum())
    assert "left out" in caplog.text
    empty = to_coco_results(boxes[:, :0], scores[:, :0], labels[:, :0], ids, scales, lut)
    assert empty == []


@pytest.mark.parametrize("ndigits", [3, 5])
def test_vectorized_round_is_pythons_round(ndigits):
    from datasets.evaluation import _round_like_python

    rng = np.random.default_rng(ndigits)
    k = np.arange(-3000, 3000)
    v = np.concatenate([rng.uniform(-1e4, 1e4, 20000), rng.random(20000), (k + 0.5) / 10 ** ndigits,  # halfway
                        (2 * k + 1) / 2 * 10.0 ** -ndigits + rng.choice([-1, 1], k.size) * 1e-17,
                        np.float32(rng.uniform(0, 600, 5000)).astype(np.float64),
                        [0.0625, -0.0, 1e300, -1e20, np.inf, -np.inf, np.nan, 5e-324]])
    got = _round_like_python(v, ndigits)
    want = [round(x, ndigits) for x in v.tolist()]
    assert [repr(x) for x in got] == [repr(x) for x in want]


def test_faster_coco_eval_gives_pycocotools_numbers(tiny_synthetic, monkeypatch):
    pytest.importorskip("faster_coco_eval", reason="faster-coco-eval (optional) not installed")
    import datasets.evaluation as E

    gt = json.load(open(tiny_synthetic["val"]["ann_file"]))
    rng = np.random.default_rng(0)
    dets = []
    for a in gt["annotations"]:
        x, y, w, h = a["bbox"]
        j = rng.uniform(-3, 3, 4)
        dets.append({"image_id": a["image_id"], "category_id": a["category_id"],
                     "bbox": [x + j[0], y + j[1], w + j[2], h + j[3]], "score": float(rng.random())})
        dets.append({"image_id": a["image_id"], "category_id": gt["categories"][-1]["id"],
                     "bbox": [1.0, 1.0, 9.0, 7.0], "score": 0.2})
    assert E.eval_backend()[0] == "faster_coco_eval"
    fast = E.evaluate_detections(gt, dets)
    monkeypatch.setattr(E, "eval_backend", E._pycocotools)
    slow = E.evaluate_detections(gt, dets)
    for k in E.STAT_NAMES:
        assert fast[k] == pytest.approx(slow[k], abs=1e-9), k
    assert fast["per_class"] == pytest.approx(slow["per_class"], abs=1e-9)
