"""The inference rewrite (BN folded into convs) computes what the model computes."""
import pytest
import torch

from detector import create_model
from detector.fuse import fuse_for_inference

from .conftest import randomize_bn


@pytest.mark.parametrize("name", ["efficientdet_d0", "tf_efficientdet_d0", "efficientdet_d1"])
def test_fused_model_gives_the_same_outputs(name):
    torch.manual_seed(0)
    m = randomize_bn(create_model(name, num_classes=5, image_size=128, backend="torch")).eval()
    f = fuse_for_inference(m)
    assert not any(isinstance(x, torch.nn.BatchNorm2d) for x in f.modules())
    assert any(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules()), "the original is left alone"
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        a, b = m(x), f(x)
    for r, o in zip(a[0] + a[1], b[0] + b[1]):
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-4)
    from detector import predict
    with torch.no_grad():
        torch.testing.assert_close(predict(f, x, backend="torch"), predict(m, x, backend="torch"), rtol=1e-4, atol=1e-3)
