"""The inference rewrite (BN folded into convs) computes what the model computes."""
import pytest
import torch

from detector import create_model
from detector.fuse import fuse_for_inference

from .conftest import randomize_bn


@pytest.mark.parametrize("name,channels_last", [("efficientdet_d0", False), ("efficientdet_d0", True),
                                                 ("tf_efficientdet_d0", True), ("efficientdet_d1", False)])
def test_fused_model_gives_the_same_outputs(name, channels_last):
    """NCHW takes the portable paths of the fused layers, channels-last the CPU ones (oneDNN conv + SiLU,
    the squeeze-excite gate folded into the 1x1 conv)."""
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    m = randomize_bn(create_model(name, num_classes=5, image_size=128, backend="torch")).eval().to(memory_format=fmt)
    f = fuse_for_inference(m)
    assert not any(isinstance(x, torch.nn.BatchNorm2d) for x in f.modules())
    assert any(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules()), "the original is left alone"
    x = torch.randn(2, 3, 128, 128).contiguous(memory_format=fmt)
    with torch.no_grad():
        a, b = m(x), f(x)
    for r, o in zip(a[0] + a[1], b[0] + b[1]):
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-4)
    from detector import predict
    with torch.no_grad():
        got, want = predict(f, x, backend="torch"), predict(m, x, backend="torch")
    # the same detections; rows whose scores tie to rounding may come in either order (seen on one CPU)
    assert got.shape == want.shape
    for g, w in zip(got, want):
        nearest = torch.cdist(w, g, p=float("inf")).min(dim=1).values
        assert nearest.max() <= 1e-3 + 1e-4 * w.abs().max(), nearest.max()


@pytest.mark.parametrize("k,stride,groups,tf", [(1, 1, 1, False), (3, 2, 8, True), (5, 1, 8, False), (3, 2, 1, True)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv_silu_one_call_equals_conv_then_silu(k, stride, groups, tf, channels_last):
    """ConvSiLU's one oneDNN call (CPU, fp32, eager) computes silu(conv(x)), TF "same" padding included."""
    from detector import fuse
    from detector.layers import Conv2d

    torch.manual_seed(k * 10 + stride)
    conv = Conv2d(8, 8, k, stride, groups=groups, bias=True, tf_padding=tf).eval()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 8, 11, 9).contiguous(memory_format=fmt)
    layer = fuse.ConvSiLU(conv)
    if not fuse._HAS_POINTWISE:
        pytest.skip("this PyTorch build has no torch.ops.mkldnn._convolution_pointwise (conv then SiLU is used)")
    with torch.no_grad():
        assert fuse._fused_op_ok(x)
        ref = torch.nn.functional.silu(conv(x))
        torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
        traced = torch.jit.trace(layer, x)  # a trace records the portable conv + silu, not the oneDNN op
        assert "mkldnn" not in str(traced.graph)
        torch.testing.assert_close(traced(x), ref, rtol=1e-5, atol=1e-5)
    xg = x.clone().requires_grad_(True)  # an input that needs a gradient takes the differentiable path
    assert not fuse._fused_op_ok(xg)
    layer(xg).sum().backward()
    xr = x.clone().requires_grad_(True)
    torch.nn.functional.silu(conv(xr)).sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch,size", [(1, 5), (3, 4), (2, 1)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gated_pointwise_equals_gate_then_conv(batch, size, channels_last, monkeypatch):
    """GatedPointwise = conv(se(x)); channels-last on the CPU takes the batched product with the gate folded
    into the weights (counted), NCHW the two modules; both differentiable."""
    from detector import fuse
    from detector.backbone import SqueezeExcite
    from detector.layers import Conv2d

    torch.manual_seed(batch * 7 + size)
    se, conv = SqueezeExcite(12, 3), Conv2d(12, 5, 1, bias=True)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, 12, size, size + 1).contiguous(memory_format=fmt)
    calls = []
    real = torch.baddbmm
    monkeypatch.setattr(torch, "baddbmm", lambda *a, **k: calls.append(1) or real(*a, **k))
    layer = fuse.GatedPointwise(se, conv)
    xg, xr = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    got, want = layer(xg), conv(se(xr))
    assert len(calls) == int(channels_last)
    assert got.shape == want.shape and got.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got.square().sum().backward()
    want.square().sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad, rtol=1e-5, atol=1e-5)
