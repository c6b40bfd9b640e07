"""EfficientDet D0-D7x as data: one table, one dataclass.

``get_config(name, **overrides)`` returns a :class:`ModelConfig` for ``efficientdet_d0`` ... ``efficientdet_d7x``
(symmetric padding, no conv bias before BN) and ``tf_efficientdet_d0`` ... ``tf_efficientdet_d7x`` (TensorFlow
"same" padding, conv bias kept before BN as in the ported TF weights). Numbers follow ``docs/design.md`` section 2.
"""
from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A model name or size no EfficientDet has. ``what``, ``file`` (None: the caller names it), ``field`` and
    ``todo`` make the scripts' one-line report, as for ``detector.checkpoint.CheckpointError``."""

    def __init__(self, what: str, field: str, todo: str):
        super().__init__(what)
        self.what, self.file, self.field, self.todo = what, None, field, todo

#                 width  depth  (EfficientNet compound scaling)
BACKBONES = {
    "efficientnet_b0": (1.0, 1.0),
    "efficientnet_b1": (1.0, 1.1),
    "efficientnet_b2": (1.1, 1.2),
    "efficientnet_b3": (1.2, 1.4),
    "efficientnet_b4": (1.4, 1.8),
    "efficientnet_b5": (1.6, 2.2),
    "efficientnet_b6": (1.8, 2.6),
    "efficientnet_b7": (2.0, 3.1),
}

#      variant: backbone, image, BiFPN ch, BiFPN cells, head repeats, anchor scale, fusion, max level
_TABLE = {
    "d0": ("efficientnet_b0", 512, 64, 3, 3, 4.0, "fast", 7),
    "d1": ("efficientnet_b1", 640, 88, 4, 3, 4.0, "fast", 7),
    "d2": ("efficientnet_b2", 768, 112, 5, 3, 4.0, "fast", 7),
    "d3": ("efficientnet_b3", 896, 160, 6, 4, 4.0, "fast", 7),
    "d4": ("efficientnet_b4", 1024, 224, 7, 4, 4.0, "fast", 7),
    "d5": ("efficientnet_b5", 1280, 288, 7, 4, 4.0, "fast", 7),
    "d6": ("efficientnet_b6", 1280, 384, 8, 5, 4.0, "sum", 7),
    "d7": ("efficientnet_b6", 1536, 384, 8, 5, 5.0, "sum", 7),
    "d7x": ("efficientnet_b7", 1536, 384, 8, 5, 4.0, "sum", 8),
}


@dataclass
class ModelConfig:
    """Everything a network is built from. ``image_size`` is (H, W), a multiple of 2**max_level."""

    name: str
    backbone: str
    image_size: tuple[int, int]
    fpn_channels: int
    fpn_cell_repeats: int
    box_class_repeats: int
    anchor_scale: float
    fusion: str  # "fast" (fast-normalized), "sum" or "softmax"
    min_level: int = 3
    max_level: int = 7
    num_classes: int = 90
    num_scales: int = 3
    aspect_ratios: tuple[tuple[float, float], ...] = ((1.0, 1.0), (1.4, 0.7), (0.7, 1.4))
    tf_padding: bool = False  # TensorFlow "same" padding for convs and max-pools
    redundant_bias: bool = False  # conv bias kept before BN (the TF-ported weights have it)
    backbone_bn_eps: float = 1e-5
    bn_eps: float = 1e-3
    bn_momentum: float = 0.01
    drop_path_rate: float = 0.2
    # loss
    alpha: float = 0.25
    gamma: float = 1.5
    delta: float = 0.1
    box_loss_weight: float = 50.0
    label_smoothing: float = 0.0
    # post-processing
    max_detection_points: int = 5000
    max_det_per_image: int = 100
    nms_iou: float = 0.5
    soft_nms: bool = False
    soft_nms_sigma: float = 0.5
    score_threshold: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def num_levels(self) -> int:
        return self.max_level - self.min_level + 1

    @property
    def num_anchors(self) -> int:
        """Anchors per feature-map position."""
        return self.num_scales * len(self.aspect_ratios)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def model_names() -> list[str]:
    return [f"{p}efficientdet_{v}" for p in ("", "tf_") for v in _TABLE]


def get_config(name: str, **overrides) -> ModelConfig:
    """Config of a named variant, with keyword overrides (e.g. ``num_classes=3, image_size=(256, 256)``)."""
    tf = name.startswith("tf_")
    variant = name.removeprefix("tf_").removeprefix("efficientdet_")
    if not name.removeprefix("tf_").startswith("efficientdet_") or variant not in _TABLE:
        raise ConfigError(f"unknown model {name!r}", "model", f"choose one of {', '.join(model_names())}")
    backbone, image, ch, cells, heads, anchor_scale, fusion, max_level = _TABLE[variant]
    cfg = ModelConfig(
        name=name, backbone=backbone, image_size=(image, image), fpn_channels=ch, fpn_cell_repeats=cells,
        box_class_repeats=heads, anchor_scale=anchor_scale, fusion=fusion, max_level=max_level,
        tf_padding=tf, redundant_bias=tf, backbone_bn_eps=1e-3 if tf else 1e-5,
        drop_path_rate=0.1 if name == "efficientdet_d0" else 0.2,
    )
    unknown = set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)}
    if unknown:
        raise ValueError(f"unknown config field(s) {sorted(unknown)} for {name}")
    cfg = dataclasses.replace(cfg, **overrides)
    cfg.image_size = _as_size(cfg.image_size)
    cfg.aspect_ratios = tuple(tuple(a) for a in cfg.aspect_ratios)
    step = 2 ** cfg.max_level
    if cfg.image_size[0] % step or cfg.image_size[1] % step or min(cfg.image_size) <= 0:
        raise ConfigError(f"{name}: image_size {cfg.image_size} is not a positive multiple of 2**max_level = {step}",
                          "image_size", f"pass an image size that is a multiple of {step} (e.g. {step}, {4 * step})")
    if cfg.fusion not in ("fast", "sum", "softmax"):
        raise ValueError(f"fusion must be 'fast', 'sum' or 'softmax', got {cfg.fusion!r}")
    return cfg


def config_problem(name: str, **overrides) -> str | None:
    """Why ``get_config(name, **overrides)`` fails (``"<what>; <todo>"``, for a command-line tool's one-line
    error before long work), or None."""
    try:
        get_config(name, **overrides)
    except ConfigError as e:
        return f"{e.what}; {e.todo}"
    return None


def _as_size(size) -> tuple[int, int]:
    try:
        if not isinstance(size, (tuple, list)):
            return (operator.index(size),) * 2
        if len(size) == 2:
            return (operator.index(size[0]), operator.index(size[1]))
    except TypeError:  # not an integer
        pass
    raise ConfigError(f"image_size must be an int or a pair of ints, got {size!r}", "image_size",
                      "pass an image size as H or (H, W)")


def feature_sizes(image_size: tuple[int, int], max_level: int) -> list[tuple[int, int]]:
    """Feature-map (H, W) for levels 0..max_level: ``f = (f_prev - 1) // 2 + 1``."""
    sizes = [tuple(image_size)]
    for _ in range(max_level):
        h, w = sizes[-1]
        sizes.append(((h - 1) // 2 + 1, (w - 1) // 2 + 1))
    return sizes
