"""``detector.layers.DepthwiseSmallMap``: the CPU weight gradient of small depthwise maps equals PyTorch's."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from detector import layers
from detector.layers import Conv2d, DepthwiseSmallMap


def _grads(conv, x, g, small_map):
    old, layers.SMALL_MAP = layers.SMALL_MAP, small_map
    try:
        x = x.detach().requires_grad_(True)
        conv.zero_grad(set_to_none=True)
        y = conv(x)
        y.backward(g)
        return y.detach(), x.grad, conv.weight.grad, None if conv.bias is None else conv.bias.grad
    finally:
        layers.SMALL_MAP = old


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
    ref = _grads(conv, x, g, small_map=0)  # PyTorch's convolution backward
    ours = _grads(conv, x, g, small_map=10 ** 9)  # every map counts as small
    for name, a, b in zip(("output", "input grad", "weight grad", "bias grad"), ours, ref):
        if b is None:
            assert a is None
            continue
        scale = b.abs().max().clamp_min(1e-6)
        err = ((a - b).abs().max() / scale).item()
        assert err < 1e-5, f"{name}: relative error {err:.2e} (n={n} c={c} {h}x{w} k={k} s={stride} tf={tf})"


def test_used_only_where_it_pays(monkeypatch):
    """Eager CPU training of a depthwise conv with at most SMALL_MAP output pixels; everything else (larger maps,
    inference, other convs, autocast, traces) is nn.Conv2d's path."""
    seen = []
    orig = DepthwiseSmallMap.apply

    def spy(*a):
        seen.append(tuple(a[0].shape))
        return orig(*a)

    monkeypatch.setattr(DepthwiseSmallMap, "apply", spy)
    dw = Conv2d(8, 8, 3, groups=8)
    dw(torch.randn(2, 8, 4, 4))  # 16 output pixels, grad enabled
    dw(torch.randn(2, 8, 5, 5))  # 25 pixels: oneDNN
    with torch.no_grad():
        dw(torch.randn(2, 8, 2, 2))  # inference
    Conv2d(8, 16, 3)(torch.randn(2, 8, 2, 2))  # not depthwise
    Conv2d(8, 8, 3, groups=4)(torch.randn(2, 8, 2, 2))  # grouped, not depthwise
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = dw(torch.randn(2, 8, 2, 2))  # mixed precision: PyTorch's autocast rules
    y.float().sum().backward()
    assert dw.weight.grad.dtype == torch.float32
    torch.jit.trace(dw, torch.randn(2, 8, 2, 2), check_trace=False)  # a trace records the plain conv
    assert seen == [(2, 8, 4, 4)]
    assert layers.SMALL_MAP == 16
