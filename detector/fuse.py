"""Inference-only rewrite: BatchNorm folded into the convolution before it, SiLU in place.

``fuse_for_inference(model)`` returns a copy whose ``forward`` gives the same outputs (to float rounding) with
about a fifth less work on the CPU, where BN and activation passes over memory cost as much as the convs.
The heads' BN is per level behind a conv shared by all levels, so each level gets its own folded copy of the
pointwise conv. The copy is for inference: it has no BN to train and other state-dict keys.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import DepthwiseSeparable, EfficientNetFeatures, InvertedResidual
from .bifpn import ConvBn, FNode
from .heads import HeadNet
from .model import EfficientDet


@torch.no_grad()
def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A conv equal to ``bn(conv(x))`` in eval mode."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    fused = copy.deepcopy(conv)
    fused.weight.copy_(conv.weight * scale.reshape(-1, *([1] * (conv.weight.dim() - 1))))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    fused.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias)
    return fused


class _Act(nn.Module):
    """What is left of a folded BatchNormAct: its activation, in place."""

    def __init__(self, act: bool):
        super().__init__()
        self.act = act

    def forward(self, x):
        return F.silu(x, inplace=True) if self.act else x


def _fuse_backbone(b: EfficientNetFeatures) -> None:
    b.conv_stem, b.bn1 = _fold(b.conv_stem, b.bn1), _Act(b.bn1.act)
    for stage in b.blocks:
        for blk in stage:
            if isinstance(blk, InvertedResidual):
                blk.conv_pw, blk.bn1 = _fold(blk.conv_pw, blk.bn1), _Act(blk.bn1.act)
                blk.conv_dw, blk.bn2 = _fold(blk.conv_dw, blk.bn2), _Act(blk.bn2.act)
                blk.conv_pwl, blk.bn3 = _fold(blk.conv_pwl, blk.bn3), _Act(blk.bn3.act)
            elif isinstance(blk, DepthwiseSeparable):
                blk.conv_dw, blk.bn1 = _fold(blk.conv_dw, blk.bn1), _Act(blk.bn1.act)
                blk.conv_pw, blk.bn2 = _fold(blk.conv_pw, blk.bn2), _Act(blk.bn2.act)


class _FusedHead(nn.Module):
    """HeadNet with each level's BN folded into its own copy of every repeat's pointwise conv."""

    def __init__(self, head: HeadNet):
        super().__init__()
        self.conv_dw = nn.ModuleList([r.conv_dw for r in head.conv_rep])
        self.conv_pw = nn.ModuleList([
            nn.ModuleList([_fold(r.conv_pw, bns[level].bn) for level in range(len(bns))])
            for r, bns in zip(head.conv_rep, head.bn_rep)])
        self.predict = head.predict

    def forward(self, features):
        out = []
        for level, x in enumerate(features):
            for dw, pws in zip(self.conv_dw, self.conv_pw):
                x = F.silu(pws[level](dw(x)), inplace=True)
            out.append(self.predict(x))
        return out


def fuse_for_inference(model: EfficientDet) -> EfficientDet:
    """An eval-mode copy of ``model`` with BN folded into convs (see the module docstring)."""
    m = copy.deepcopy(model).eval()
    _fuse_backbone(m.backbone)
    for mod in list(m.fpn.modules()):
        if isinstance(mod, ConvBn):
            mod.conv, mod.bn = _fold(mod.conv, mod.bn), nn.Identity()
        elif isinstance(mod, FNode):
            sep = mod.after_combine.conv
            folded = _fold(sep.conv_pw, sep.bn)
            del sep.bn
            sep.conv_pw = folded
            sep.bn = nn.Identity()
    m.class_net, m.box_net = _FusedHead(m.class_net), _FusedHead(m.box_net)
    for p in m.parameters():
        p.requires_grad_(False)
    return m
