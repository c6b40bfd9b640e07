"""``detector.layers.DepthwiseSmallMap``: the CPU weight gradient of small depthwise maps equals PyTorch's."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from detector import layers
from detector.layers import Conv2d, DepthwiseSmallMap


def _grads(conv, x, g, shifted_sums: bool):
    old, layers.kernel_exceeds_map = layers.kernel_exceeds_map, lambda x, conv: shifted_sums
    try:
        x = x.detach().requires_grad_(True)
        conv.zero_grad(set_to_none=True)
        y = conv(x)
        y.backward(g)
        return y.detach(), x.grad, conv.weight.grad, None if conv.bias is None else conv.bias.grad
    finally:
        layers.kernel_exceeds_map = old


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(1, 24), h=st.integers(1, 9), w=st.integers(1, 9),
       k=st.sampled_from([1, 3, 5]), stride=st.sampled_from([1, 2]), tf=st.booleans(), bias=st.booleans(),
       channels_last=st.booleans())
def test_small_map_gradients_equal_torch(n, c, h, w, k, stride, tf, bias, channels_last):
    torch.manual_seed(n * 1000 + c * 10 + h)
    conv = Conv2d(c, c, k, stride, groups=c, bias=bias, tf_padding=tf)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(n, c, h, w).contiguous(memory_format=fmt)
    with torch.no_grad():
        y0 = conv(x)
    g = torch.randn_like(y0)
    ref = _grads(conv, x, g, shifted_sums=False)  # PyTorch's convolution backward
    ours = _grads(conv, x, g, shifted_sums=True)  # every map counts as small
    for name, a, b in zip(("output", "input grad", "weight grad", "bias grad"), ours, ref):
        if b is None:
            assert a is None
            continue
        scale = b.abs().max().clamp_min(1e-6)
        err = ((a - b).abs().max() / scale).item()
        assert err < 1e-5, f"{name}: relative error {err:.2e} (n={n} c={c} {h}x{w} k={k} s={stride} tf={tf})"


def test_used_only_where_it_pays(monkeypatch):
    """Eager CPU training of a depthwise conv on a map smaller than its kernel (judged before TF "same"
    padding); everything else (maps as large as the kernel, inference, other convs, autocast, traces) is
    nn.Conv2d's path."""
    seen = []
    orig = DepthwiseSmallMap.apply

    def spy(*a):
        seen.append(tuple(a[0].shape))
        return orig(*a)

    monkeypatch.setattr(DepthwiseSmallMap, "apply", spy)
    dw = Conv2d(8, 8, 3, groups=8)
    dw(torch.randn(2, 8, 2, 2))  # 2x2 map, 3x3 kernel, grad enabled: shifted sums
    dw(torch.randn(2, 8, 2, 3))  # as wide as the kernel: oneDNN
    dw(torch.randn(2, 8, 4, 4))  # larger than the kernel: oneDNN
    Conv2d(8, 8, 5, 2, groups=8, tf_padding=True)(torch.randn(2, 8, 4, 4))  # judged at 4x4, then padded
    with torch.no_grad():
        dw(torch.randn(2, 8, 2, 2))  # inference
    Conv2d(8, 16, 3)(torch.randn(2, 8, 2, 2))  # not depthwise
    Conv2d(8, 8, 3, groups=4)(torch.randn(2, 8, 2, 2))  # grouped, not depthwise
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dw(torch.randn(2, 8, 2, 2))  # mixed precision: PyTorch's autocast rules
    torch.jit.trace(dw, torch.randn(2, 8, 2, 2), check_trace=False)  # a trace records the plain conv
    assert seen == [(2, 8, 2, 2), (2, 8, 7, 7)]  # the TF conv runs on its padded input


def test_d0_small_maps_at_128_px():
    """At 128 px D0's 4x4 level takes the shifted sums for 5x5 kernels only; its 2x2 and 1x1 levels for 3x3."""
    def exceeds(side, k):
        return layers.kernel_exceeds_map(torch.empty(1, 1, side, side), Conv2d(1, 1, k, groups=1))
    assert exceeds(4, 5) and exceeds(2, 3) and exceeds(1, 3)
    assert not exceeds(4, 3) and not exceeds(3, 3) and not exceeds(8, 5)
