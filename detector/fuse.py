"""Inference-only rewrite: BatchNorm folded into the convolution before it, SiLU fused into that conv.

``fuse_for_inference(model)`` returns a copy whose ``forward`` gives the same outputs (to float rounding) with
fewer passes over memory, which on the CPU cost about as much as the convs (``bench/model.py`` predicts with it).
The heads' BN is per level behind a conv shared by all levels, so each level gets its own folded copy of the
pointwise conv. In the backbone, each block's squeeze-excite gate is folded into the 1x1 conv after it, per image
(:class:`GatedPointwise`). The copy is for inference: it has no BN to train and other state-dict keys.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import DepthwiseSeparable, EfficientNetFeatures, InvertedResidual, SqueezeExcite
from .bifpn import ConvBn, FNode
from .heads import HeadNet
from .layers import eager_cpu
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


class ConvSiLU(nn.Module):
    """``silu(conv(x))`` for a (BN-folded) ``detector.layers.Conv2d``. On the CPU in fp32 (eager, no autocast)
    it is one oneDNN call with SiLU as a post-op (``torch.ops.mkldnn._convolution_pointwise``, the op inductor
    emits for this pattern): no second pass over the output. Traced, scripted, compiled, under autocast, with
    an input that needs a gradient, or elsewhere it is the conv, then SiLU in place."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        if _fused_op_ok(x):
            c = self.conv
            x, weight, padding = c.same_operands(x)
            return torch.ops.mkldnn._convolution_pointwise(x, weight, c.bias, padding, c.stride, c.dilation,
                                                           c.groups, "swish", [], "")
        return F.silu(self.conv(x), inplace=True)


def _fused_op_ok(x: torch.Tensor) -> bool:
    return (eager_cpu(x) and x.dtype == torch.float32 and _HAS_POINTWISE
            and not (torch.is_grad_enabled() and x.requires_grad))  # the oneDNN op has no backward


_HAS_POINTWISE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


class GatedPointwise(nn.Module):
    """``conv(se(x))`` for a squeeze-excite ``se`` followed by a 1x1 ``conv`` (stride 1, with bias), the gate
    folded into the conv's weights, per image: ``W (x * s_b) = (W * s_b) x``. On the CPU in eager mode with a
    channels-last ``x`` that is one batched matrix product over the pixels (``torch.baddbmm``, the gated weights
    are ``(B, C_in, C_out)``), in place of the gate's multiply over the block's widest tensor and then the conv;
    elsewhere (NCHW, CUDA, traced, scripted, compiled, autocast) it is ``conv(se(x))``."""

    def __init__(self, se: SqueezeExcite, conv: nn.Conv2d):
        super().__init__()
        assert conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.groups == 1 and conv.bias is not None
        self.se, self.conv = se, conv

    def forward(self, x):
        if not (eager_cpu(x) and x.is_contiguous(memory_format=torch.channels_last)):
            return self.conv(self.se(x))
        B, C, H, W = x.shape
        gated = self.se.gate(x)[:, :, None] * self.conv.weight.flatten(1).t()        # (B, C_in, C_out)
        pixels = x.permute(0, 2, 3, 1).reshape(B, H * W, C)                          # a view: x is channels-last
        out = torch.baddbmm(self.conv.bias, pixels, gated)                            # (B, H * W, C_out)
        return out.view(B, H, W, -1).permute(0, 3, 1, 2)                              # channels-last (B, C_out, H, W)


def _fold_act(conv: nn.Conv2d, bn) -> tuple[nn.Module, nn.Module]:
    """(conv, bn) of a conv followed by a BatchNormAct -> (folded conv with its activation, identity)."""
    folded = _fold(conv, bn)
    return (ConvSiLU(folded) if bn.act else folded), nn.Identity()


def _fold_gated(se: SqueezeExcite, conv: nn.Conv2d, bn) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(se, 1x1 conv, BN without activation) of a block's end -> (identity, gated folded conv, identity)."""
    assert not bn.act
    return nn.Identity(), GatedPointwise(se, _fold(conv, bn)), nn.Identity()


def _fuse_backbone(b: EfficientNetFeatures) -> None:
    b.conv_stem, b.bn1 = _fold_act(b.conv_stem, b.bn1)
    for stage in b.blocks:
        for blk in stage:
            if isinstance(blk, InvertedResidual):
                blk.conv_pw, blk.bn1 = _fold_act(blk.conv_pw, blk.bn1)
                blk.conv_dw, blk.bn2 = _fold_act(blk.conv_dw, blk.bn2)
                blk.se, blk.conv_pwl, blk.bn3 = _fold_gated(blk.se, blk.conv_pwl, blk.bn3)
            elif isinstance(blk, DepthwiseSeparable):
                blk.conv_dw, blk.bn1 = _fold_act(blk.conv_dw, blk.bn1)
                blk.se, blk.conv_pw, blk.bn2 = _fold_gated(blk.se, blk.conv_pw, blk.bn2)


class _FusedHead(nn.Module):
    """HeadNet with each level's BN folded into its own copy of every repeat's pointwise conv."""

    def __init__(self, head: HeadNet):
        super().__init__()
        self.conv_dw = nn.ModuleList([r.conv_dw for r in head.conv_rep])
        self.conv_pw = nn.ModuleList([
            nn.ModuleList([ConvSiLU(_fold(r.conv_pw, bns[level].bn)) for level in range(len(bns))])
            for r, bns in zip(head.conv_rep, head.bn_rep)])
        self.predict = head.predict

    def forward(self, features):
        out = []
        for level, x in enumerate(features):
            for dw, pws in zip(self.conv_dw, self.conv_pw):
                x = pws[level](dw(x))
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
