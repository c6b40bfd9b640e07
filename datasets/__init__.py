"""Data: COCO-format detection sets, transforms, batching, the built-in synthetic set, COCO eval.

Imports neither ``detector`` nor ``kernels``: it hands over plain tensors (uint8 NHWC images,
xyxy pixel boxes, integer labels; see ``loader.collate``).
"""
from .coco import IGNORE_LABEL, CocoDetection, coco2017_paths, load_coco_json
from .evaluation import STAT_NAMES, eval_backend, evaluate_detections, load_detections, to_coco_results
from .loader import (IMAGENET_MEAN, IMAGENET_STD, DevicePrefetcher, EpochDataLoader, EpochSampler, build_loader,
                     collate)
from .transforms import EvalTransform, TrainTransform, build_transform

_SYNTHETIC = ("DEFAULT_IMAGE_SIZE", "DEFAULT_MAX_OBJECT", "DEFAULT_MIN_OBJECT", "DEFAULT_NUM_CLASSES",
              "DEFAULT_NUM_TRAIN", "DEFAULT_NUM_VAL", "SHAPES", "ensure_synthetic", "generate_synthetic")


def __getattr__(name):
    """The synthetic set's names load on first use, so ``python -m datasets.synthetic`` runs the module once."""
    if name in _SYNTHETIC:
        from . import synthetic

        return getattr(synthetic, name)
    raise AttributeError(f"module 'datasets' has no attribute {name!r}")

__all__ = [
    "CocoDetection", "coco2017_paths", "load_coco_json", "IGNORE_LABEL",
    "TrainTransform", "EvalTransform", "build_transform",
    "collate", "build_loader", "EpochDataLoader", "EpochSampler", "DevicePrefetcher", "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ensure_synthetic", "generate_synthetic", "SHAPES", "DEFAULT_NUM_TRAIN", "DEFAULT_NUM_VAL",
    "DEFAULT_IMAGE_SIZE", "DEFAULT_NUM_CLASSES", "DEFAULT_MIN_OBJECT", "DEFAULT_MAX_OBJECT",
    "evaluate_detections", "load_detections", "to_coco_results", "STAT_NAMES", "eval_backend",
]
