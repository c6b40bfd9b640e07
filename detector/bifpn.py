"""BiFPN: the general node graph for levels L_min..L_max and the fused node op.

Graph (``docs/design.md`` section 2): inputs are numbered 0.. from P_min; each new node takes the next number.
Top-down from L_max-1 to L_min, each node fuses the newest node of its level with the newest node of the
level above; then bottom-up from L_min+1 to L_max, each node fuses every node of its level so far with the
newest node of the level below. A cell outputs the newest node of each level.

One node = resample every input to the node's level (1x1 conv + BN first when channels differ), weighted
fusion, SiLU, depthwise 3x3 (``kernels.bifpn_fusion`` does these four in one op), then pointwise 1x1 + BN.
"""
from __future__ import annotations

import torch
from torch import nn

import kernels

from .configs import ModelConfig, feature_sizes
from .layers import Conv2d, glorot_uniform_, max_pool_3x3_s2


def bifpn_graph(min_level: int, max_level: int) -> list[tuple[int, list[int]]]:
    """Nodes of one BiFPN cell as ``(level, input offsets)``; for P3-P7 the design card's eight nodes."""
    newest = {lvl: [i] for i, lvl in enumerate(range(min_level, max_level + 1))}
    nodes, next_id = [], max_level - min_level + 1
    for lvl in range(max_level - 1, min_level - 1, -1):
        nodes.append((lvl, [newest[lvl][-1], newest[lvl + 1][-1]]))
        newest[lvl].append(next_id)
        next_id += 1
    for lvl in range(min_level + 1, max_level + 1):
        nodes.append((lvl, newest[lvl] + [newest[lvl - 1][-1]]))
        newest[lvl].append(next_id)
        next_id += 1
    return nodes


class ConvBn(nn.Module):
    """1x1 conv + BN (no activation): the channel projection of effdet's resample."""

    def __init__(self, cin, cout, cfg: ModelConfig):
        super().__init__()
        self.conv = Conv2d(cin, cout, 1, bias=cfg.redundant_bias)
        self.bn = nn.BatchNorm2d(cout, eps=cfg.bn_eps, momentum=cfg.bn_momentum)

    def forward(self, x):
        return self.bn(self.conv(x))


class Resample(nn.Module):
    """Channel projection for one input of a node (resizing happens inside ``kernels.bifpn_fusion``)."""

    def __init__(self, cin, cout, cfg: ModelConfig):
        super().__init__()
        if cin != cout:
            self.conv = ConvBn(cin, cout, cfg)

    def forward(self, x):
        return self.conv(x) if hasattr(self, "conv") else x


class Combine(nn.Module):
    def __init__(self, offsets, in_channels, cfg: ModelConfig):
        super().__init__()
        self.offsets = list(offsets)
        self.resample = nn.ModuleDict({str(o): Resample(in_channels[o], cfg.fpn_channels, cfg) for o in offsets})
        if cfg.fusion != "sum":
            self.edge_weights = nn.Parameter(torch.ones(len(offsets)))
        else:
            self.edge_weights = None


class SeparableConvBn(nn.Module):
    """Depthwise 3x3 + pointwise 1x1 (+ BN). In the BiFPN the depthwise part runs inside the fused op."""

    def __init__(self, cin, cout, cfg: ModelConfig, bias: bool, bn: bool = True):
        super().__init__()
        self.conv_dw = Conv2d(cin, cin, 3, groups=cin, tf_padding=cfg.tf_padding)
        self.conv_pw = Conv2d(cin, cout, 1, bias=bias)
        if bn:
            self.bn = nn.BatchNorm2d(cout, eps=cfg.bn_eps, momentum=cfg.bn_momentum)

    def forward(self, x):
        x = self.conv_pw(self.conv_dw(x))
        return self.bn(x) if hasattr(self, "bn") else x


class AfterCombine(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.conv = SeparableConvBn(cfg.fpn_channels, cfg.fpn_channels, cfg, bias=cfg.redundant_bias)


class FNode(nn.Module):
    """One BiFPN node: ``forward(nodes: list of (B, C_i, H_i, W_i)) -> (B, C, H, W)`` at ``out_size``."""

    def __init__(self, level, offsets, in_channels, in_levels, sizes, cfg: ModelConfig):
        super().__init__()
        self.level, self.out_size = level, sizes[level]
        self.method, self.tf_padding = cfg.fusion, cfg.tf_padding
        self.modes = ["same" if in_levels[o] == level else "up" if in_levels[o] > level else "down"
                      for o in offsets]
        self.combine = Combine(offsets, in_channels, cfg)
        self.after_combine = AfterCombine(cfg)
        self.backend = "auto"

    def forward(self, nodes: list[torch.Tensor]) -> torch.Tensor:
        inputs = [self.combine.resample[str(o)](nodes[o]) for o in self.combine.offsets]
        conv = self.after_combine.conv
        x = kernels.bifpn_fusion(
            inputs, self.modes, self.combine.edge_weights, conv.conv_dw.weight, self.out_size,
            method=self.method, pool_padding="same" if self.tf_padding else "symmetric", backend=self.backend)
        return conv.bn(conv.conv_pw(x))


class BiFpnCell(nn.Module):
    def __init__(self, in_channels, sizes, cfg: ModelConfig):
        super().__init__()
        self.num_levels = cfg.num_levels
        levels = list(range(cfg.min_level, cfg.max_level + 1))
        in_channels, in_levels = list(in_channels), list(levels)
        self.fnode = nn.ModuleList()
        for level, offsets in bifpn_graph(cfg.min_level, cfg.max_level):
            self.fnode.append(FNode(level, offsets, in_channels, in_levels, sizes, cfg))
            in_channels.append(cfg.fpn_channels)
            in_levels.append(level)

    def forward(self, x: list[torch.Tensor]) -> list[torch.Tensor]:
        nodes = list(x)
        for node in self.fnode:
            nodes.append(node(nodes))
        return nodes[-self.num_levels:]


class ExtraLevel(nn.Module):
    """P6 from C5 (1x1 conv + BN when channels differ, then 3x3 s2 max-pool); P7 from P6 (pool only)."""

    def __init__(self, cin, cfg: ModelConfig):
        super().__init__()
        self.tf_padding = cfg.tf_padding
        if cin != cfg.fpn_channels:
            self.conv = ConvBn(cin, cfg.fpn_channels, cfg)

    def forward(self, x):
        if hasattr(self, "conv"):
            x = self.conv(x)
        return max_pool_3x3_s2(x, self.tf_padding)


class BiFpn(nn.Module):
    """``forward([C3, C4, C5]) -> [P3, ..., P_max]``, each (B, fpn_channels, H/2^l, W/2^l)."""

    def __init__(self, cfg: ModelConfig, backbone_channels: list[int]):
        super().__init__()
        sizes = feature_sizes(cfg.image_size, cfg.max_level)
        channels = list(backbone_channels)
        self.resample = nn.ModuleDict()
        for i in range(len(channels), cfg.num_levels):
            self.resample[str(i)] = ExtraLevel(channels[-1], cfg)
            channels.append(cfg.fpn_channels)
        self.cell = nn.Sequential(*[
            BiFpnCell(channels if r == 0 else [cfg.fpn_channels] * cfg.num_levels, sizes, cfg)
            for r in range(cfg.fpn_cell_repeats)])
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                glorot_uniform_(m.weight, groups=m.groups)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        x = list(features)
        for extra in self.resample.values():
            x.append(extra(x[-1]))
        for cell in self.cell:
            x = cell(x)
        return x
