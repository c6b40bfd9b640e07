"""COCO box evaluation: the 12 standard numbers, per-class AP, optional per-class IoU thresholds.

Uses ``faster_coco_eval`` when it is importable (same API), else pycocotools' ``COCOeval``.
Detections are COCO results: dicts ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``
in original-image pixels, or a ``(K, 7)`` array ``[image_id, x, y, w, h, score, category_id]``
(pycocotools' numpy layout). ``to_coco_results`` turns batched network outputs into that list.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import os

import numpy as np

from .coco import AnnotationError, MissingFileError

log = logging.getLogger(__name__)

__all__ = ["evaluate_detections", "load_detections", "to_coco_results", "STAT_NAMES", "eval_backend"]

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
_FIELDS = ("image_id", "category_id", "bbox", "score")


def _pycocotools():
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    return "pycocotools", COCO, COCOeval


def _run_eval(COCO, COCOeval, gt, dets, image_ids, iou_thrs, sink, cg=None, cd=None):
    with contextlib.redirect_stdout(sink):
        if cg is None:
            cg = COCO()
            cg.dataset = _with_coco_defaults(gt)
            cg.createIndex()
            cd = cg.loadRes(copy.deepcopy(dets))  # loadRes adds fields to the dicts it gets
        ev = COCOeval(cg, cd, "bbox")
        if image_ids is not None:
            ev.params.imgIds = sorted(int(i) for i in image_ids)
        if iou_thrs is not None:
            ev.params.iouThrs = np.asarray(iou_thrs, dtype=np.float64)
        ev.evaluate()
        ev.accumulate()
        if iou_thrs is None:
            ev.summarize()
    return cg, cd, ev


def eval_backend():
    """``(name, COCO class, COCOeval class)``: faster_coco_eval when importable, else pycocotools."""
    try:
        from faster_coco_eval import COCO, COCOeval_faster

        return "faster_coco_eval", COCO, COCOeval_faster
    except Exception:
        return _pycocotools()


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def _bad(where, what: str, field=None) -> AnnotationError:
    """``where``: the detections file, or None for a list given in memory (a caller that knows the file
    names it, see ``training.errors.naming``)."""
    return AnnotationError(where, what, field, todo="fix the detections file (COCO results format: a list of "
                                              "{image_id, category_id, bbox [x, y, w, h], score})")


def _validate(dets, where: str) -> list:
    if not isinstance(dets, list):
        raise _bad(where, f"detections must be a list of objects, got {type(dets).__name__}")
    out = []
    for i, d in enumerate(dets):
        if not isinstance(d, dict):
            raise _bad(where, f"entry #{i} is not an object", f"[{i}]")
        for f in _FIELDS:
            if f not in d:
                raise _bad(where, f"entry #{i} is missing field {f!r}", f"[{i}].{f}")
        for f in ("image_id", "category_id"):
            if not _is_int(d[f]):
                raise _bad(where, f"entry #{i}: field {f!r} must be an integer, got {d[f]!r}", f"[{i}].{f}")
        bb = d["bbox"]
        if not (isinstance(bb, (list, tuple)) and len(bb) == 4 and all(_is_num(v) and math.isfinite(v) for v in bb)):
            raise _bad(where, f"entry #{i}: field 'bbox' must be 4 finite numbers [x, y, w, h], got {bb!r}",
                       f"[{i}].bbox")
        if bb[2] < 0 or bb[3] < 0:
            raise _bad(where, f"entry #{i}: field 'bbox' has negative width/height {bb!r}", f"[{i}].bbox")
        if not (_is_num(d["score"]) and math.isfinite(d["score"])):
            raise _bad(where, f"entry #{i}: field 'score' must be a finite number, got {d['score']!r}",
                       f"[{i}].score")
        out.append({"image_id": int(d["image_id"]), "category_id": int(d["category_id"]),
                    "bbox": [float(v) for v in bb], "score": float(d["score"])})
    return out


def load_detections(path) -> list:
    """Read and validate a COCO results file; returns the list of detection dicts.

    ``AnnotationError`` (a ``ValueError``) naming the file, the entry index and the field for anything
    malformed."""
    path = str(path)
    if not os.path.isfile(path):
        raise MissingFileError(path, "detections file is a folder" if os.path.isdir(path) else
                               "detections file not found", "--detections", todo="check the path given to --detections")
    try:
        with open(path, encoding="utf-8") as f:
            dets = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _bad(path, f"not a JSON file ({e})") from e
    return _validate(dets, path)


def _round_like_python(v: np.ndarray, ndigits: int) -> list:
    """``[round(x, ndigits) for x in v.tolist()]`` (Python's correctly rounded ``round``), vectorized.

    ``round(x, n)`` is the double nearest to ``m / 10**n``, ``m`` the integer nearest to the exact ``x * 10**n``
    (ties to even); ``np.rint(x * 10**n) / 10**n`` is the same double whenever the rounded product
    ``x * 10**n`` gives the same ``m`` (the division of two exact doubles is correctly rounded), which holds
    unless that product is within its rounding error of a half-integer. Those values (and non-finite or huge
    ones) are taken from ``round`` itself."""
    v = np.asarray(v, dtype=np.float64)
    scale = 10.0 ** ndigits
    y = v * scale
    out = (np.rint(y) / scale).tolist()
    with np.errstate(invalid="ignore"):
        doubt = ~(np.abs(y) < 2.0 ** 40) | (np.abs(np.abs(y - np.trunc(y)) - 0.5) < 1e-6)
    for i in np.flatnonzero(doubt).tolist():
        out[i] = round(float(v[i]), ndigits)
    return out


def to_coco_results(boxes, scores, labels, image_ids, scales, label_to_cat_id, orig_sizes=None) -> list:
    """Batched detections -> COCO results list.

    ``boxes`` (B, K, 4) xyxy in network-input pixels, ``scores`` (B, K), ``labels`` (B, K) class
    index (entries with label < 0 are padding and skipped), ``image_ids`` (B,), ``scales`` (B,)
    input pixels per original pixel, ``label_to_cat_id`` dict or sequence. With ``orig_sizes``
    (B, 2) as (h, w), boxes are clipped to the original image. Accepts numpy arrays or tensors.
    """
    def np_(x):
        return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)

    boxes, scores, labels = np_(boxes).astype(np.float64), np_(scores).astype(np.float64), np_(labels)
    image_ids, scales = np_(image_ids).reshape(-1), np_(scales).astype(np.float64).reshape(-1)
    b = boxes.shape[0]
    boxes = boxes.reshape(b, -1, 4) / scales[:, None, None]
    if orig_sizes is not None:
        hw = np_(orig_sizes).astype(np.float64).reshape(b, 2)
        boxes = np.clip(boxes, 0, np.stack([hw[:, 1], hw[:, 0], hw[:, 1], hw[:, 0]], 1)[:, None, :])
    lut = label_to_cat_id if isinstance(label_to_cat_id, dict) else dict(enumerate(label_to_cat_id))
    labels = labels.reshape(b, -1)
    bi, ki = np.nonzero(labels >= 0)
    lab = labels[bi, ki]
    classes, inv = np.unique(lab, return_inverse=True)  # one look-up per class, not per detection
    cats = [lut.get(int(c)) for c in classes.tolist()]
    ok = np.array([c is not None for c in cats], dtype=bool)[inv.reshape(-1)]
    unmapped = int(ok.size - ok.sum())  # classes the ground truth has no category for: they match nothing
    cat_of = [int(c) if c is not None else 0 for c in cats]
    bi, ki, inv = bi[ok], ki[ok], inv.reshape(-1)[ok]
    sel = boxes[bi, ki]  # (K, 4) float64, xyxy original pixels
    x1, y1 = sel[:, 0], sel[:, 1]
    w, h = sel[:, 2] - x1, sel[:, 3] - y1
    r3 = [_round_like_python(v, 3) for v in (x1, y1, w, h)]
    out = [{"image_id": i, "category_id": cat_of[c], "bbox": [a, bb, ww, hh], "score": sc}
           for i, c, a, bb, ww, hh, sc in zip(image_ids[bi].astype(np.int64).tolist(), inv.tolist(), *r3,
                                               _round_like_python(scores[bi, ki], 5))]
    if unmapped:
        log.warning("to_coco_results: %d detections of classes without a category id were left out "
                    "(classes known: %d)", unmapped, len(lut))
    return out


def _gt_dataset(coco_gt) -> dict:
    """The ground-truth dict from a COCO object, an annotation file path, a CocoDetection, or a dict."""
    if isinstance(coco_gt, (str, os.PathLike)):
        with open(coco_gt, encoding="utf-8") as f:
            return json.load(f)
    if isinstance(coco_gt, dict):
        return coco_gt
    if hasattr(coco_gt, "coco") and hasattr(coco_gt.coco, "dataset"):
        return coco_gt.coco.dataset
    if hasattr(coco_gt, "dataset") and isinstance(coco_gt.dataset, dict):
        return coco_gt.dataset
    raise TypeError(f"coco_gt must be a COCO object, a CocoDetection, a dict or an annotation file path, "
                    f"got {type(coco_gt).__name__}")


def _gt_file(coco_gt) -> str | None:
    """The annotation file behind ``coco_gt``, when it has one (for error messages)."""
    if isinstance(coco_gt, (str, os.PathLike)):
        return str(coco_gt)
    return getattr(coco_gt, "ann_file", None)


def _with_coco_defaults(gt: dict) -> dict:
    """A copy of ``gt`` whose annotations all have ``iscrowd`` (0) and ``area`` (box width x height), which
    COCOeval reads and the COCO format leaves optional to writers: pycocotools raises ``KeyError`` without them."""
    gt = copy.deepcopy(gt)
    for a in gt["annotations"]:
        a.setdefault("iscrowd", 0)
        if "area" not in a:
            a["area"] = float(a["bbox"][2]) * float(a["bbox"][3])
    return gt


def _ap_from_precision(precision: np.ndarray, t_idx=None) -> np.ndarray:
    """Per-class AP from COCOeval's precision [T, R, K, A, M] at area 'all', maxDets last.
    ``t_idx`` selects IoU thresholds (default all). -1 where a class has no ground truth."""
    p = precision[:, :, :, 0, -1]
    if t_idx is not None:
        p = p[np.atleast_1d(t_idx)]
    valid = p > -1
    n = valid.sum(axis=(0, 1))
    s = np.where(valid, p, 0).sum(axis=(0, 1))
    return np.where(n > 0, s / np.maximum(n, 1), -1.0)


def evaluate_detections(coco_gt, detections, iou_by_class=None, image_ids=None, verbose: bool = False) -> dict:
    """COCO bbox evaluation.

    Returns ``{"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm",
    "ARl"}`` (floats, as COCOeval's ``stats``: -1 where an area range has no ground truth),
    ``"per_class"``: class name -> AP@[.5:.95] (-1 for a class without ground truth), and with
    ``iou_by_class`` (class name -> IoU, e.g. ``{"vehicle": 0.7}``; classes not named use 0.5)
    ``"per_class_iou"``: class name -> AP at that single IoU, and ``"mAP_iou_by_class"``, their
    mean over classes with ground truth. ``image_ids`` restricts the evaluation to those images
    (default: every ground-truth image). Empty detections give zeros; a ground truth without
    annotations is an error.
    """
    backend, COCO, COCOeval = eval_backend()
    gt = _gt_dataset(coco_gt)
    for key in ("annotations", "images"):
        if not gt.get(key):
            raise AnnotationError(_gt_file(coco_gt), f"the ground truth has no {key}: AP is undefined", field=key,
                                  todo="score against an annotation file with boxes")
    cats = sorted(gt["categories"], key=lambda c: c["id"])
    names = [str(c["name"]) for c in cats]
    cat_ids = [c["id"] for c in cats]
    if iou_by_class is not None:
        unknown = sorted(set(iou_by_class) - set(names))
        if unknown:
            raise ValueError(f"evaluate_detections: iou_by_class names unknown classes {unknown}; known: {names}")

    if isinstance(detections, np.ndarray) or hasattr(detections, "detach"):
        arr = detections.detach().cpu().numpy() if hasattr(detections, "detach") else detections
        arr = np.asarray(arr, dtype=np.float64).reshape(-1, 7)
        detections = [{"image_id": int(r[0]), "category_id": int(r[6]), "bbox": r[1:5].tolist(),
                       "score": float(r[5])} for r in arr]
    dets = _validate(list(detections), None)
    gt_img_ids, gt_cat_ids = {im["id"] for im in gt["images"]}, set(cat_ids)
    for i, d in enumerate(dets):
        if d["image_id"] not in gt_img_ids:
            raise _bad(None, f"entry #{i}: image_id {d['image_id']} is not in the ground truth", f"[{i}].image_id")
        if d["category_id"] not in gt_cat_ids:
            raise _bad(None, f"entry #{i}: category_id {d['category_id']} is not a ground-truth category "
                             f"({cat_ids})", f"[{i}].category_id")

    result = {k: 0.0 for k in STAT_NAMES}
    result["per_class"] = {n: 0.0 for n in names}
    ious = {n: float((iou_by_class or {}).get(n, 0.5)) for n in names}
    if iou_by_class is not None:
        result["per_class_iou"] = {n: 0.0 for n in names}
        result["mAP_iou_by_class"] = 0.0
    if not dets:
        return result

    sink = io.StringIO()
    try:
        cg, cd, ev = _run_eval(COCO, COCOeval, gt, dets, image_ids, None, sink)
    except Exception as e:  # faster_coco_eval API drift: fall back to the reference implementation
        if backend == "pycocotools":
            raise
        log.warning("faster_coco_eval failed (%s: %s); using pycocotools", type(e).__name__, e)
        _, COCO, COCOeval = _pycocotools()
        cg, cd, ev = _run_eval(COCO, COCOeval, gt, dets, image_ids, None, sink)
    if verbose:
        print(sink.getvalue())
    stats = np.asarray(ev.stats, dtype=np.float64)
    result.update({k: float(v) for k, v in zip(STAT_NAMES, stats)})
    precision = np.asarray(ev.eval["precision"])
    k_of = {cid: k for k, cid in enumerate(ev.params.catIds)}
    ap = _ap_from_precision(precision)
    result["per_class"] = {n: float(ap[k_of[c]]) for n, c in zip(names, cat_ids)}

    if iou_by_class is not None:
        thrs = np.asarray(ev.params.iouThrs, dtype=np.float64)
        need = sorted(set(ious.values()))
        if all(np.isclose(thrs, t).any() for t in need):
            prec2, thrs2 = precision, thrs
        else:  # thresholds off the standard grid: one more evaluation at exactly those
            _, _, ev2 = _run_eval(COCO, COCOeval, gt, dets, image_ids, need, sink, cg, cd)
            prec2, thrs2 = np.asarray(ev2.eval["precision"]), np.asarray(ev2.params.iouThrs)
        per = {}
        for n, c in zip(names, cat_ids):
            t = int(np.argmin(np.abs(thrs2 - ious[n])))
            per[n] = float(_ap_from_precision(prec2, t)[k_of[c]])
        result["per_class_iou"] = per
        valid = [v for v in per.values() if v >= 0]
        result["mAP_iou_by_class"] = float(np.mean(valid)) if valid else -1.0
    return result
