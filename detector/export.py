"""Deployable copies of a detector: ONNX (with its post-processing in the graph) and TorchScript.

:class:`Detector` wraps an :class:`EfficientDet` into ``images (B, 3, H, W) -> detections (B, max_det, 6)``,
rows ``[x1, y1, x2, y2, score, class]`` in input pixels, unused rows zeros with class -1: the same function
as :func:`detector.pipeline.predict` with ``clip_size`` = the whole input (top-k over anchors x classes,
decode, clip, per-class hard NMS, best ``max_det`` by score). Why the post-processing is in the graph, and how
an exported file is used: ``docs/export.md``.

The NMS is the custom op ``effdet_export::class_nms``: in PyTorch it runs ``kernels.batched_nms`` (reference),
in ONNX it becomes one ``NonMaxSuppression`` node (per image, per class). The batch size is dynamic; the
image size is fixed at export time (anchors are constants).

    python -m detector.export --model tf_efficientdet_d0 --pretrained --format onnx --output d0.onnx
    python -m detector.export --checkpoint out/best.pth --use-ema --format torchscript --output d0.pt

A checkpoint of ours records its model, class count and input size, and is exported with them (flags
override them); effdet's and NVIDIA's need ``--model``.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import warnings

import torch
from torch import nn

import kernels

from .anchors import anchors_for
from .checkpoint import CheckpointError, error_line
from .configs import ConfigError
from .fuse import fuse_for_inference
from .model import EfficientDet, create_model

from kernels.decode import BBOX_XFORM_CLIP  # noqa: E402


# ------------------------------------------------------------------------------------------ NMS custom op
@torch.library.custom_op("effdet_export::class_nms", mutates_args=())
def class_nms(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, num_classes: int,
              iou_threshold: float) -> torch.Tensor:
    """``boxes (B, K, 4)``, ``scores (B, K)`` (negative = not a candidate), ``classes (B, K)`` int64 ->
    ``keep (B, K)`` bool: hard NMS within each (image, class)."""
    B, K = scores.shape
    image = torch.arange(B, device=scores.device).repeat_interleave(K)
    # non-candidates score lower than every candidate, so they never suppress one: mask them out afterwards
    keep = kernels.batched_nms_mask(boxes.reshape(-1, 4), scores.reshape(-1), classes.reshape(-1), iou_threshold,
                                    batch_index=image, backend="torch")
    return keep.reshape(B, K) & (scores >= 0)


@class_nms.register_fake
def _(boxes, scores, classes, num_classes, iou_threshold):
    return torch.empty_like(scores, dtype=torch.bool)


def _class_nms_onnx(boxes, scores, classes, num_classes: int, iou_threshold: float):
    """ONNX translation: one NonMaxSuppression over a (B, C, K) score matrix (-1 off the box's class)."""
    from onnxscript import FLOAT, INT64, opset18 as op  # noqa: F401  (optional dependency)

    k = op.Shape(scores, start=1, end=2)
    class_ids = op.Reshape(op.Range(op.Constant(value_int=0), op.Constant(value_int=num_classes),
                                    op.Constant(value_int=1)), op.Constant(value_ints=[1, num_classes, 1]))
    own = op.Equal(op.Unsqueeze(classes, op.Constant(value_ints=[1])), class_ids)  # (B, C, K)
    minus_one = op.CastLike(op.Constant(value_float=-1.0), scores)
    valid = op.GreaterOrEqual(scores, op.CastLike(op.Constant(value_float=0.0), scores))
    class_scores = op.Where(op.And(own, op.Unsqueeze(valid, op.Constant(value_ints=[1]))),
                            op.Unsqueeze(scores, op.Constant(value_ints=[1])), minus_one)
    selected = op.NonMaxSuppression(  # (S, 3): image, class, box; entries at -1 are under the score threshold
        op.Cast(boxes, to=1), op.Cast(class_scores, to=1), k,
        op.Constant(value_floats=[float(iou_threshold)]), op.Constant(value_floats=[-0.5]), center_point_box=0)
    where = op.Gather(selected, op.Constant(value_ints=[0, 2]), axis=1)  # (S, 2): image, box
    ones = op.Expand(op.Constant(value_float=1.0), op.Shape(selected, start=0, end=1))
    mask = op.ScatterND(op.ConstantOfShape(op.Shape(scores)), where, ones)
    return op.Cast(mask, to=9)  # BOOL


# ------------------------------------------------------------------------------------------ the wrapper
class Detector(nn.Module):
    """``images (B, 3, H, W)`` normalized, at the export size -> ``(B, max_det, 6)`` detections (input pixels).

    ``fuse=True`` folds BatchNorm into the convs first (:func:`detector.fuse.fuse_for_inference`), as
    evaluation does. Written without Python arithmetic on the batch size, so a traced or exported copy keeps
    the batch dimension free.
    """

    def __init__(self, model: EfficientDet, fuse: bool = True, score_threshold: float | None = None):
        super().__init__()
        cfg = model.config
        net = fuse_for_inference(model) if fuse else copy.deepcopy(model).eval()
        self.model = net.set_backend("torch")
        self.register_buffer("anchors", anchors_for(cfg).clone(), persistent=False)
        self.size = tuple(cfg.image_size)
        self.num_classes = cfg.num_classes
        self.num_anchors = cfg.num_anchors
        self.max_det = cfg.max_det_per_image
        self.iou = float(cfg.nms_iou)
        self.score_threshold = float(cfg.score_threshold if score_threshold is None else score_threshold)
        self.k = min(cfg.max_detection_points, self.anchors.shape[0] * self.num_classes)

    def _flat(self, maps: list[torch.Tensor], depth: int) -> torch.Tensor:
        return torch.cat([m.permute(0, 2, 3, 1).reshape(-1, m.shape[2] * m.shape[3] * self.num_anchors, depth)
                          for m in maps], dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        cls_maps, box_maps = self.model(images)
        cls = self._flat(cls_maps, self.num_classes).float()  # (B, N, C) anchors level/row/col/shape
        box = self._flat(box_maps, 4).float()
        C = self.num_classes
        logits, flat = torch.topk(cls.reshape(-1, cls.shape[1] * C), self.k, dim=1)
        anchor = torch.div(flat, C, rounding_mode="floor")
        classes = flat - anchor * C
        d = torch.gather(box, 1, anchor.unsqueeze(-1).expand(-1, -1, 4))
        a = self.anchors[anchor]  # (B, k, 4) xyxy
        wa, ha = a[..., 2] - a[..., 0], a[..., 3] - a[..., 1]
        cy = d[..., 0] * ha + (a[..., 1] + 0.5 * ha)
        cx = d[..., 1] * wa + (a[..., 0] + 0.5 * wa)
        h = torch.exp(d[..., 2].clamp(max=BBOX_XFORM_CLIP)) * ha
        w = torch.exp(d[..., 3].clamp(max=BBOX_XFORM_CLIP)) * wa
        H, W = float(self.size[0]), float(self.size[1])
        boxes = torch.stack([(cx - 0.5 * w).clamp(0.0, W), (cy - 0.5 * h).clamp(0.0, H),
                             (cx + 0.5 * w).clamp(0.0, W), (cy + 0.5 * h).clamp(0.0, H)], dim=-1)
        scores = torch.sigmoid(logits)
        if self.score_threshold > 0:
            scores = torch.where(scores >= self.score_threshold, scores, torch.full_like(scores, -1.0))
        keep = class_nms(boxes, scores, classes, C, self.iou)
        ranked = torch.where(keep, scores, torch.full_like(scores, -1.0))
        best, idx = torch.topk(ranked, min(self.max_det, self.k), dim=1)  # kept boxes first, by score
        rows = torch.cat([torch.gather(boxes, 1, idx.unsqueeze(-1).expand(-1, -1, 4)), best.unsqueeze(-1),
                          torch.gather(classes, 1, idx).unsqueeze(-1).float()], dim=2)
        empty = torch.zeros_like(rows)
        empty[..., 5] = -1.0
        out = torch.where((best >= 0).unsqueeze(-1), rows, empty)
        if out.shape[1] < self.max_det:  # fewer candidates than max_det: pad (shape fixed at export)
            pad = empty[:, :1].expand(-1, self.max_det - out.shape[1], -1)
            out = torch.cat([out, pad], dim=1)
        return out


def _example(model: EfficientDet, batch: int) -> torch.Tensor:
    h, w = model.config.image_size
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------------ exporters
class ExportPackagesMissing(RuntimeError):
    """ONNX export without the packages of requirements-export.txt."""


def export_onnx(model: EfficientDet, path: str, fuse: bool = True, opset: int = 18) -> str:
    """Write ``path`` (ONNX, input ``images (batch, 3, H, W)``, output ``detections (batch, max_det, 6)``)."""
    try:
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ExportPackagesMissing(f"ONNX export needs the optional packages of requirements-export.txt ({e})") \
            from None
    det = Detector(model, fuse=fuse).eval()
    batch = torch.export.Dim("batch", min=1, max=1024)
    with torch.no_grad():
        program = torch.onnx.export(
            det, (_example(model, 2),), dynamo=True, opset_version=opset, input_names=["images"],
            output_names=["detections"], dynamic_shapes={"images": {0: batch}},
            custom_translation_table={torch.ops.effdet_export.class_nms.default: _class_nms_onnx},
            verbose=False)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    program.save(path)
    return path


def export_torchscript(model: EfficientDet, path: str | None = None, fuse: bool = True) -> torch.jit.ScriptModule:
    """A traced :class:`Detector` (any batch size); saved to ``path`` when given. Loading it needs
    ``import detector.export`` first (it registers the NMS op the graph calls)."""
    det = Detector(model, fuse=fuse).eval()
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about the shape checks of the layers: they test the image size, fixed at export,
        # or the batch size, whose checks hold for any batch (tests/test_export.py runs other batch sizes).
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(det, (_example(model, 2),), check_trace=False)
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        torch.jit.save(traced, path)
    return traced


class TracedNetwork(nn.Module):
    """The network of ``model`` (BatchNorm folded) as a TorchScript trace, usable wherever
    :func:`detector.pipeline.predict` takes a model (it has ``config`` and ``flatten``): the
    ``evaluate.py --torchscript`` path, whose detections then come from the usual post-processing."""

    def __init__(self, model: EfficientDet, fuse: bool = True):
        super().__init__()
        self.config = model.config
        net = fuse_for_inference(model) if fuse else copy.deepcopy(model).eval()
        device = next(net.parameters()).device
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks, see export_torchscript
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace's deprecation notice
            self.traced = torch.jit.trace(net, (_example(model, 2).to(device),), check_trace=False)

    flatten = staticmethod(EfficientDet.flatten)

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        cls, box = self.traced(images)
        return list(cls), list(box)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m detector.export", description="Export a detector to ONNX or "
                                "TorchScript (post-processing included; see docs/export.md). Run it from the "
                                "repository root.")
    p.add_argument("--model", default=None, help="default: what --checkpoint records (effdet's and NVIDIA's "
                   "record none: pass it); tf_efficientdet_d0 with --pretrained or no weights")
    p.add_argument("--num-classes", type=int, default=None,
                   help="default: what --checkpoint records (or its class head), else 90")
    p.add_argument("--image-size", type=int, default=None,
                   help="default: what --checkpoint records, else the model's own")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", default=None, help="weights to export")
    src.add_argument("--pretrained", action="store_true", help="the published COCO weights of --model")
    p.add_argument("--use-ema", action="store_true", help="the EMA weights of --checkpoint")
    p.add_argument("--format", choices=("onnx", "torchscript"), default="onnx")
    p.add_argument("--output", required=True)
    p.add_argument("--no-fuse", action="store_true", help="keep BatchNorm layers (default: folded)")
    args = p.parse_args(argv)
    for flag, value in (("--num-classes", args.num_classes), ("--image-size", args.image_size)):
        if value is not None and value < 1:  # 0 read as "unset" or failed deep in the model's construction
            print(f"error: {flag} must be 1 or more, got {value} (-, {flag}): pass {flag} N, or leave it out for "
                  "the checkpoint's", file=sys.stderr)
            return 2
    if os.path.isdir(args.output):
        print(f"error: --output is a folder ({args.output}, --output): pass a file name, e.g. d0.onnx", file=sys.stderr)
        return 2
    try:  # bad input: a checkpoint or a model / size no EfficientDet has (anything else is a bug: its traceback)
        if args.checkpoint:
            from .checkpoint import load_for_inference

            loaded = load_for_inference(args.checkpoint, model_name=args.model, num_classes=args.num_classes,
                                        image_size=args.image_size, use_ema=args.use_ema, backend="torch")
            model = loaded.model
            print(f"loaded {loaded.description}", file=sys.stderr)
        else:
            model = create_model(args.model or "tf_efficientdet_d0", num_classes=args.num_classes or 90,
                                 image_size=args.image_size, backend="torch")
            if args.pretrained:
                from .pretrained import load_pretrained
                print(load_pretrained(model), file=sys.stderr)
            else:
                print("warning: no --checkpoint or --pretrained: exporting random weights", file=sys.stderr)
    except (CheckpointError, ConfigError) as e:
        # the flag that gave the value, where the error names no field inside the file
        e.field = {None: "--checkpoint" if isinstance(e, CheckpointError) else None, "model": "--model",
                   "image_size": "--image-size"}.get(e.field, e.field)
        print(error_line(e), file=sys.stderr)
        return 2
    cfg = model.config
    print(f"exporting {cfg.name}, {cfg.num_classes} classes, input {cfg.image_size[0]}x{cfg.image_size[1]}",
          file=sys.stderr)
    try:
        if args.format == "onnx":
            export_onnx(model, args.output, fuse=not args.no_fuse)
        else:
            export_torchscript(model, args.output, fuse=not args.no_fuse)
    except ExportPackagesMissing as e:
        print(f"error: {e} (-, --format): pip install -r requirements-export.txt", file=sys.stderr)
        return 2
    except OSError as e:  # the output cannot be written
        print(f"error: cannot write the export ({args.output}, --output): {e.strerror or e}", file=sys.stderr)
        return 2
    print(args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
