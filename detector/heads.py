"""Class and box heads, shared across levels with a BN per level (effdet layout)."""
from __future__ import annotations

import math

import torch
from torch import nn

from .bifpn import SeparableConvBn
from .configs import ModelConfig
from .layers import variance_scaling_

CLASS_PRIOR = 0.01  # initial foreground probability: class bias = -log((1 - p) / p)


class LevelBn(nn.Module):
    def __init__(self, channels, cfg: ModelConfig):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, eps=cfg.bn_eps, momentum=cfg.bn_momentum)

    def forward(self, x):
        return self.bn(x)


class HeadNet(nn.Module):
    """``forward([P_l (B, C, H_l, W_l)]) -> [(B, num_anchors * num_outputs, H_l, W_l)]``.

    Per level: ``repeats`` x (separable conv -> BN of that level -> SiLU), then a separable conv with bias.
    Output channels are anchor-major: channel ``a * num_outputs + k``. For the box head ``k`` runs over
    ``(dy, dx, dh, dw)`` - effdet's order, kept so existing checkpoints keep their meaning.
    """

    def __init__(self, cfg: ModelConfig, num_outputs: int, is_class: bool):
        super().__init__()
        ch = cfg.fpn_channels
        self.conv_rep = nn.ModuleList([
            SeparableConvBn(ch, ch, cfg, bias=cfg.redundant_bias, bn=False) for _ in range(cfg.box_class_repeats)])
        self.bn_rep = nn.ModuleList([
            nn.ModuleList([LevelBn(ch, cfg) for _ in range(cfg.num_levels)]) for _ in range(cfg.box_class_repeats)])
        self.predict = SeparableConvBn(ch, num_outputs * cfg.num_anchors, cfg, bias=True, bn=False)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                variance_scaling_(m.weight, groups=m.groups)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if is_class:
            nn.init.constant_(self.predict.conv_pw.bias, -math.log((1 - CLASS_PRIOR) / CLASS_PRIOR))

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        outputs = []
        for level, x in enumerate(features):
            for conv, bns in zip(self.conv_rep, self.bn_rep):
                x = nn.functional.silu(bns[level](conv(x)))
            outputs.append(self.predict(x))
        return outputs
