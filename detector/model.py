"""EfficientDet: EfficientNet backbone -> BiFPN -> class and box heads (effdet's module and key layout)."""
from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from .backbone import EfficientNetFeatures
from .bifpn import BiFpn, FNode
from .configs import ModelConfig, get_config
from .heads import HeadNet


class EfficientDet(nn.Module):
    """``forward(images (B, 3, H, W) normalized float) -> (class_outputs, box_outputs)``.

    Each output is a list over levels min..max of ``(B, A * C, H_l, W_l)`` class logits and
    ``(B, A * 4, H_l, W_l)`` box regressions ``(dy, dx, dh, dw)``, exactly as effdet's ``EfficientDet``.
    ``flatten`` turns them into ``(B, N, C)`` and ``(B, N, 4)`` in anchor order.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.backbone = EfficientNetFeatures(
            config.backbone, config.backbone_bn_eps, config.bn_momentum, config.drop_path_rate, config.tf_padding)
        self.fpn = BiFpn(config, self.backbone.out_channels)
        self.class_net = HeadNet(config, config.num_classes, is_class=True)
        self.box_net = HeadNet(config, 4, is_class=False)

    def set_backend(self, backend: str) -> "EfficientDet":
        """Kernel backend for the fused BiFPN nodes: ``"auto"``, ``"triton"`` or ``"torch"``."""
        for m in self.modules():
            if isinstance(m, FNode):
                m.backend = backend
        return self

    def reset_class_head(self, num_classes: int) -> None:
        """Replace the class head (new class count), freshly initialized."""
        self.config.num_classes = num_classes
        ref = next(self.parameters())
        self.class_net = HeadNet(self.config, num_classes, is_class=True).to(ref.device)

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        features = self.fpn(self.backbone(images))
        return self.class_net(features), self.box_net(features)

    @staticmethod
    def flatten(class_outputs, box_outputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-level maps -> ``(B, N, C)`` logits and ``(B, N, 4)`` deltas, anchors ordered level/row/col/shape."""
        a = box_outputs[0].shape[1] // 4
        cls = torch.cat([rearrange(x, "b (a c) h w -> b (h w a) c", a=a) for x in class_outputs], dim=1)
        box = torch.cat([rearrange(x, "b (a k) h w -> b (h w a) k", a=a) for x in box_outputs], dim=1)
        return cls, box


def create_model(name: str, num_classes: int = 90, image_size=None, backend: str = "auto", **overrides) -> EfficientDet:
    """Build ``name`` (e.g. ``"tf_efficientdet_d0"``); ``model.config`` records everything it was built from."""
    if image_size is not None:
        overrides["image_size"] = image_size
    cfg = get_config(name, num_classes=num_classes, **overrides)
    return EfficientDet(cfg).set_backend(backend)
