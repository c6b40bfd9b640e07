"""TF "same" padding without a padded copy: strided convs at inference (a shifted kernel) and the max-pool
(``ceil_mode``) give what padding the input first gives."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from detector import fuse
from detector.layers import Conv2d, max_pool_3x3_s2


def tf_pads(n: int, k: int, s: int) -> tuple[int, int]:
    """TensorFlow's "same" padding of one dimension, written out here as TF documents it."""
    total = max((math.ceil(n / s) - 1) * s + k - n, 0)
    return total // 2, total - total // 2


def padded_conv(x, conv):
    (bh, ah), (bw, aw) = tf_pads(x.shape[-2], conv.kernel_size[0], 2), tf_pads(x.shape[-1], conv.kernel_size[1], 2)
    return F.conv2d(F.pad(x, (bw, aw, bh, ah)), conv.weight, conv.bias, 2, 0, 1, conv.groups)


@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 13), w=st.integers(1, 13), k=st.sampled_from([1, 3, 5]), depthwise=st.booleans(),
       bias=st.booleans(), channels_last=st.booleans())
def test_strided_same_conv_reads_the_unpadded_input(h, w, k, depthwise, bias, channels_last):
    torch.manual_seed(h * 100 + w * 10 + k)
    c = 6
    conv = Conv2d(c, c, k, 2, groups=c if depthwise else 1, bias=bias, tf_padding=True)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, c, h, w).contiguous(memory_format=fmt)
    with torch.no_grad():
        want = padded_conv(x, conv)
        x_used, weight, padding = conv.same_operands(x)
        assert x_used is x, "inference reads the input itself, not a padded copy"
        uneven = [b != a for b, a in (tf_pads(h, k, 2), tf_pads(w, k, 2))]
        assert tuple(weight.shape[-2:]) == tuple(k + u for u in uneven)
        got = conv(x)
        fused = fuse.ConvSiLU(conv)(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused, F.silu(want), rtol=1e-5, atol=1e-5)


def test_training_keeps_the_padded_copy():
    """With a gradient to record, the conv runs on the padded input (the larger kernel's gradients cost more),
    and the gradients are those of the padded conv."""
    torch.manual_seed(0)
    conv = Conv2d(4, 4, 3, 2, groups=4, bias=True, tf_padding=True)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    x_used, weight, _ = conv.same_operands(x)
    assert x_used is not x and weight is conv.weight
    conv(x).square().sum().backward()
    got = x.grad, conv.weight.grad
    x.grad, conv.weight.grad = None, None
    padded_conv(x, conv).square().sum().backward()
    for g, w in zip(got, (x.grad, conv.weight.grad)):
        torch.testing.assert_close(g, w)


def test_traces_and_autocast_keep_the_padded_conv():
    """Traces (export) and CPU autocast keep the portable padded conv: the shifted kernel is an eager CPU
    fp32 path. A 9x9 map is padded evenly (1, 1): the shifted path would pad nothing, the copy pads the input."""
    conv = Conv2d(4, 4, 3, 2, groups=4, tf_padding=True).eval()
    x = torch.randn(1, 4, 9, 9)
    with torch.no_grad():
        assert conv.same_operands(x)[0] is x
        traced = torch.jit.trace(conv, x)
        kinds = [n.kind() for n in traced.graph.nodes()]
        assert "aten::pad" in kinds, kinds
        torch.testing.assert_close(traced(x), padded_conv(x, conv))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert conv.same_operands(x)[0] is not x


@pytest.mark.parametrize("h", range(1, 12))
@pytest.mark.parametrize("w", [1, 2, 7, 8])
def test_tf_max_pool_without_a_padded_copy(h, w):
    torch.manual_seed(h * 10 + w)
    x = torch.randn(2, 3, h, w, requires_grad=True)
    (bh, ah), (bw, aw) = tf_pads(h, 3, 2), tf_pads(w, 3, 2)
    want = F.max_pool2d(F.pad(x, (bw, aw, bh, ah), value=float("-inf")), 3, 2)
    got = max_pool_3x3_s2(x, tf_padding=True)
    assert got.shape == want.shape == (2, 3, math.ceil(h / 2), math.ceil(w / 2))
    assert torch.equal(got, want)
    g = torch.randn_like(got)
    assert torch.equal(torch.autograd.grad(got, x, g)[0], torch.autograd.grad(want, x, g)[0])


def test_an_inf_pixel_reaches_the_next_windows():
    """The documented difference: an inf pixel also makes NaN the outputs whose window, extended by the zero
    row and column in front, covers it (zero tap * inf); all other outputs are the padded conv's."""
    torch.manual_seed(1)
    conv = Conv2d(1, 1, 3, 2, tf_padding=True).eval()
    x = torch.randn(1, 1, 8, 8)
    x[0, 0, 3, 5] = float("inf")
    with torch.no_grad():
        got, want = conv(x)[0, 0], padded_conv(x, conv)[0, 0]
    # padded: only output (1, 2) reads pixel (3, 5) (rows 2..4, columns 4..6); row 3 lies just before the
    # windows of output row 2, column 5 just before those of output column 3
    assert want.isinf().nonzero().tolist() == [[1, 2]] and not want.isnan().any()
    assert got.isnan().nonzero().tolist() == [[1, 3], [2, 2], [2, 3]]
    finite = ~got.isnan()
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=1e-5)
