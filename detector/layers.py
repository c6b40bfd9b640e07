"""Small building blocks shared by the backbone, BiFPN and heads.

``tf_padding=True`` reproduces TensorFlow "same" padding: output = ceil(input / stride), the total padding
split with the extra pixel at the bottom/right. For stride-1 convs that is ordinary symmetric padding, so only
strided convs and max-pools need the dynamic padding below. The max-pool never copies its input: PyTorch's
``ceil_mode`` adds the last window that overhangs the bottom/right edge. A strided conv copies it into a padded
tensor except in eager CPU inference, where it shifts its kernel instead (``Conv2d.same_operands``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def same_pad_amount(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """(before, after) padding of TF "same" for one spatial dimension."""
    out = -(-size // stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def pad_same(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    ph = same_pad_amount(x.shape[-2], kernel, stride)
    pw = same_pad_amount(x.shape[-1], kernel, stride)
    if any(ph) or any(pw):
        x = F.pad(x, (pw[0], pw[1], ph[0], ph[1]))
    return x


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` with symmetric padding ``(k-1)//2`` or, for strided TF convs, dynamic "same" padding.

    A depthwise conv trained on the CPU on a map smaller than its kernel (``kernel_exceeds_map``) takes its
    weight gradient from :class:`DepthwiseSmallMap` (same function, another summation order)."""

    def __init__(self, in_ch, out_ch, kernel_size, stride=1, groups=1, bias=False, tf_padding=False):
        self.dynamic_same = tf_padding and stride > 1
        padding = 0 if self.dynamic_same else (kernel_size - 1) // 2
        super().__init__(in_ch, out_ch, kernel_size, stride=stride, padding=padding, groups=groups, bias=bias)
        self.depthwise = groups > 1 and groups == in_ch == out_ch

    def pad_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with the dynamic TF "same" padding this conv needs (unchanged for symmetric padding)."""
        return pad_same(x, self.kernel_size[0], self.stride[0]) if self.dynamic_same else x

    def same_operands(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """``(input, weight, padding)`` that give this conv's output for ``x`` with symmetric ``padding``.

        For a strided TF conv in eager CPU inference (nothing records a gradient) that is ``x`` itself, not a
        padded copy: where a dimension's padding is uneven (``b`` before, ``b + 1`` after), a zero tap in front
        of the kernel and ``b + 1`` on both sides give the same sums (output ``i`` sums ``w[t] x[s*i - b + t]``
        either way; the zero tap reads the pixel just before the window). So the result is the padded conv's for
        finite inputs; an inf or NaN pixel also turns into NaN (``0 * inf``) the outputs whose window, extended by
        the zero row and column in front, covers it, where the padded conv's may be finite. Copying the widest
        maps cost more than the conv (D0 at 512 px, batch 8, 2-core AMD EPYC VM, 96 x 256x256, 3x3 stride-2
        depthwise: 34 ms for the copy and the conv, 16 ms for the shifted conv alone). In training the larger
        kernel's gradients cost more than the copy saves, so the copy stays there, as it does elsewhere (CUDA,
        CPU autocast, traces, compile). Dilation is 1 (this class takes none), which the shift assumes."""
        if not (self.dynamic_same and eager_cpu(x) and not _records_gradient(x, self.weight)):
            return self.pad_input(x), self.weight, self.padding
        (bh, ah), (bw, aw) = (same_pad_amount(n, k, s) for n, k, s in zip(x.shape[-2:], self.kernel_size, self.stride))
        weight = F.pad(self.weight, (aw - bw, 0, ah - bh, 0)) if (ah, aw) != (bh, bw) else self.weight
        return x, weight, (ah, aw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.depthwise and _small_map_ok(x, self):  # judged on the map before "same" padding
            return DepthwiseSmallMap.apply(self.pad_input(x), self.weight, self.bias, self.stride, self.padding)
        x, weight, padding = self.same_operands(x)
        return F.conv2d(x, weight, self.bias, self.stride, padding, self.dilation, self.groups)


def eager_cpu(x: torch.Tensor) -> bool:
    """``x`` is on the CPU and runs in plain eager mode: no CPU autocast, TorchScript trace or script, or
    ``torch.compile`` (the condition for the CPU-only eager paths here and in ``detector.fuse``)."""
    return (x.device.type == "cpu" and not torch.is_autocast_enabled("cpu") and not torch.jit.is_scripting()
            and not torch.jit.is_tracing() and not torch.compiler.is_compiling())


def _records_gradient(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Autograd will record an op on ``x`` and ``weight`` (a training forward, not inference)."""
    return torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)


def kernel_exceeds_map(x: torch.Tensor, conv: nn.Conv2d) -> bool:
    """True when the kernel is larger than the input map in both dimensions (most taps read padding). There
    oneDNN's depthwise weight gradient is slow and DepthwiseSmallMap's shifted sums are faster; elsewhere
    oneDNN is. Forward + backward, batch 16, channels-last, 2 cores, 2026-12-01 (oneDNN / shifted sums):
    1152 x 4x4 with 5x5: 16.6 / 4.5 ms; 1152 x 2x2 with 3x3: 8.5 / 1.5 ms; 64 x 2x2 with 3x3: 1.23 / 0.97 ms;
    but 64 x 3x3 with 3x3: 0.40 / 0.62 ms, 64 x 4x4 with 3x3: 0.55 / 1.00 ms, 1152 x 8x8 with 5x5: 12.7 / 17.7 ms."""
    kh, kw = conv.kernel_size
    return x.shape[-2] < kh and x.shape[-1] < kw


def _small_map_ok(x: torch.Tensor, conv: nn.Conv2d) -> bool:
    """Eager CPU training in one dtype (no autocast, trace or compile) of a map smaller than the kernel."""
    return (eager_cpu(x) and torch.is_grad_enabled() and conv.weight.requires_grad
            and x.dtype == conv.weight.dtype and kernel_exceeds_map(x, conv))


class DepthwiseSmallMap(torch.autograd.Function):
    """Depthwise ``F.conv2d`` (one filter per channel, no dilation) whose weight gradient is summed one kernel
    tap at a time: ``dW[c, 0, i, j] = sum over n, y, x of dY[n, c, y, x] * Xpad[n, c, i + s*y, j + s*x]``,
    ``k*k`` small products instead of oneDNN's kernel, which is slow on maps smaller than the kernel
    (``kernel_exceeds_map``). Forward and input gradient are PyTorch's."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding):
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding, ctx.has_bias = tuple(stride), tuple(padding), bias is not None
        return F.conv2d(x, weight, bias, stride, padding, 1, weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        (sh, sw), (ph, pw) = ctx.stride, ctx.padding
        c, _, kh, kw = weight.shape
        gx = None
        if ctx.needs_input_grad[0]:
            gx = torch.ops.aten.convolution_backward(grad, x, weight, None, [sh, sw], [ph, pw], [1, 1], False,
                                                     [0, 0], c, [True, False, False])[0]
        gw = None
        if ctx.needs_input_grad[1]:
            xp = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
            ho, wo = grad.shape[-2:]
            gw = grad.new_empty(c, kh * kw)
            for i in range(kh):
                for j in range(kw):
                    tap = xp[:, :, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw]
                    gw[:, i * kw + j] = (grad * tap).sum((0, 2, 3))
            gw = gw.view(c, 1, kh, kw)
        gb = grad.sum((0, 2, 3)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb, None, None


def max_pool_3x3_s2(x: torch.Tensor, tf_padding: bool) -> torch.Tensor:
    """3x3 stride-2 max-pool: symmetric padding 1, or TF "same" padding with -inf.

    TF "same" pads ``b`` before and ``b`` or ``b + 1`` after (``same_pad_amount``); PyTorch pads ``b`` on both
    sides with -inf and ``ceil_mode`` adds the last window, which overhangs the input: the same windows, with no
    padded copy. (Where a window over the edge holds only -inf, its gradient now goes to one of its pixels, not
    to the padding.)"""
    if tf_padding:
        before = tuple(same_pad_amount(n, 3, 2)[0] for n in x.shape[-2:])
        return F.max_pool2d(x, 3, 2, padding=before, ceil_mode=True)
    return F.max_pool2d(x, 3, 2, padding=1)


class BatchNormAct(nn.BatchNorm2d):
    """BatchNorm2d followed by an optional SiLU (keeps effdet/timm state-dict keys ``bnX.weight`` etc.)."""

    def __init__(self, channels, eps, momentum, act=True):
        super().__init__(channels, eps=eps, momentum=momentum)
        self.act = act

    def forward(self, x):
        x = super().forward(x)
        return F.silu(x) if self.act else x


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch per sample with probability ``p``."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


def glorot_uniform_(w: torch.Tensor, groups: int = 1) -> None:
    """TF's glorot-uniform (fan-average) init used for the BiFPN convs."""
    fan_in, fan_out = _fans(w, groups)
    limit = math.sqrt(3.0 / max(1.0, (fan_in + fan_out) / 2.0))
    with torch.no_grad():
        w.uniform_(-limit, limit)


def variance_scaling_(w: torch.Tensor, groups: int = 1) -> None:
    """TF's variance-scaling (fan-in, normal) init used for the heads."""
    fan_in, _ = _fans(w, groups)
    with torch.no_grad():
        w.normal_(0.0, math.sqrt(1.0 / max(1.0, fan_in)))


def _fans(w: torch.Tensor, groups: int) -> tuple[int, int]:
    receptive = w[0][0].numel() if w.dim() > 2 else 1
    return w.size(1) * receptive, w.size(0) * receptive // groups


class _SyncBatchNormMixin:
    """Batch statistics summed over all workers (gloo on the CPU or NCCL on GPUs) in training mode.

    ``torch.nn.SyncBatchNorm`` needs CUDA and drops the activation of ``BatchNormAct``; this works on any
    device and keeps it. The mean, then the sum of squared deviations, are all-reduced with a differentiable
    all-reduce (two passes, so the variance does not lose precision to cancellation).
    """

    def forward(self, x):
        if not self.training:
            y = nn.BatchNorm2d.forward(self, x)
        else:
            import warnings

            xf = x.float()
            c = x.shape[1]
            count = torch.full((1,), x.numel() / c, device=x.device, dtype=torch.float32)
            with warnings.catch_warnings():  # the differentiable all-reduce is marked deprecated, not replaced
                warnings.simplefilter("ignore", FutureWarning)
                from torch.distributed.nn.functional import all_reduce

                stats = all_reduce(torch.cat([xf.sum((0, 2, 3)), count]))
                n = stats[-1]
                mean = stats[:c] / n
                # second pass on centred values: no cancellation for activations with a large mean
                var = all_reduce(((xf - mean[None, :, None, None]) ** 2).sum((0, 2, 3))) / n
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum
                self.running_mean.mul_(1 - m).add_(mean.detach() * m)
                self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1).clamp(min=1)) * m)
            y = (xf - mean[None, :, None, None]) * torch.rsqrt(var + self.eps)[None, :, None, None]
            y = (y * self.weight[None, :, None, None] + self.bias[None, :, None, None]).to(x.dtype)
        return F.silu(y) if getattr(self, "act", False) else y


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Make every BatchNorm2d (and BatchNormAct) of ``module`` synchronize its statistics across workers."""
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d) and not isinstance(m, _SyncBatchNormMixin):
            m.__class__ = type(f"Sync{type(m).__name__}", (_SyncBatchNormMixin, type(m)), {})
    return module
