"""torch.compile(fullgraph=True) traces the loss and the post-processing through the kernels' custom ops."""
import torch

from detector.loss import detection_loss
from detector.postprocess import postprocess
from detector.targets import Targets


def test_loss_and_postprocess_compile_fullgraph():
    torch._dynamo.reset()
    torch.manual_seed(0)
    logits = torch.randn(2, 50, 3, requires_grad=True)
    deltas = torch.randn(2, 50, 4, requires_grad=True)
    cls = torch.full((2, 50), -1)
    cls[0, :5] = 1
    t = Targets(cls, torch.randn(2, 50, 4), torch.tensor([5.0, 0.0]))

    def loss_fn(a, b, c, d, e):
        return detection_loss(a, b, Targets(c, d, e), backend="torch")

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    out = compiled(logits, deltas, t.cls, t.box, t.num_pos)
    ref = detection_loss(logits, deltas, t, backend="torch")
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r)
    (g_compiled,) = torch.autograd.grad(out[0], logits)
    (g_eager,) = torch.autograd.grad(ref[0], logits)
    torch.testing.assert_close(g_compiled, g_eager)

    anchors = torch.rand(50, 2) * 100
    anchors = torch.cat([anchors, anchors + 20], 1)

    def post(a, b):
        return postprocess(a, b, anchors, max_detection_points=100, backend="torch")

    with torch.no_grad():
        o = torch.compile(post, fullgraph=True, backend="aot_eager")(logits.detach(), deltas.detach() * 0.1)
        r = post(logits.detach(), deltas.detach() * 0.1)
    assert torch.equal(o, r) and (o[..., 5] >= 0).sum() > 0
