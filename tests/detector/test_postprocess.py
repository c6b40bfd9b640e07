"""Batched post-processing against effdet's DetBenchPredict, and soft-NMS behaviour."""
import torch

from detector import anchors_for, create_model
from detector.postprocess import postprocess

from .conftest import randomize_bn


def test_detections_equal_effdet_bench(effdet):
    from effdet.bench import DetBenchPredict

    torch.manual_seed(0)
    name, size, C = "efficientdet_d0", 128, 6
    ref = randomize_bn(effdet.create_model(name, pretrained=False, pretrained_backbone=False,
                                           image_size=(size, size), num_classes=C)).eval()
    with torch.no_grad():  # spread the logits so NMS has real work to do
        ref.class_net.predict.conv_pw.bias.normal_(0, 2)
        ref.box_net.predict.conv_pw.weight.mul_(5)
    bench = DetBenchPredict(ref).eval()
    ours = create_model(name, num_classes=C, image_size=size, backend="torch").eval()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 3, size, size)
    scale = torch.tensor([0.5, 1.0, 2.0])  # input px per original px
    orig_hw = torch.tensor([[256, 200], [128, 100], [64, 64]])
    with torch.no_grad():
        r = bench(x, img_info={"img_scale": 1 / scale, "img_size": orig_hw.flip(1).float()})
        cls, box = ours.flatten(*ours(x))
        o = postprocess(cls, box, anchors_for(ours.config), image_scale=scale,
                        clip_size=(orig_hw * scale[:, None]).float(), max_detection_points=1000, backend="torch")
    assert o.shape == (3, 100, 6)
    for i in range(3):
        valid = r[i, :, 4] > 0
        n = int(valid.sum())
        assert n > 10
        assert torch.equal(o[i, :n, 5].long(), r[i, :n, 5].long() - 1)  # effdet classes are 1-based
        torch.testing.assert_close(o[i, :n, 4], r[i, :n, 4], rtol=0, atol=1e-5)
        torch.testing.assert_close(o[i, :n, :4], r[i, :n, :4], rtol=0, atol=1e-3)
        assert (o[i, n:, 5] == -1).all()


def _toy(B=2, N=40, C=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    anchors = torch.rand(N, 2, generator=g) * 100
    anchors = torch.cat([anchors, anchors + 20], 1)
    return torch.randn(B, N, C, generator=g) * 3, torch.randn(B, N, 4, generator=g) * 0.1, anchors


def test_soft_nms_takes_highest_remaining_and_decays_same_class_only():
    cls, box, anchors = _toy()
    out = postprocess(cls, box, anchors, soft_nms=True, max_detection_points=120, backend="torch")
    valid = out[..., 5] >= 0
    for i in range(2):
        s = out[i, valid[i], 4]
        assert (s[:-1] >= s[1:]).all(), "scores come out highest first"
    hard = postprocess(cls, box, anchors, soft_nms=False, iou_threshold=0.5, max_detection_points=120, backend="torch")
    # the top detection of each image is the same: nothing decays it
    torch.testing.assert_close(out[:, 0], hard[:, 0])
    # two identical boxes of different classes: soft-NMS keeps both scores
    anchors2 = torch.tensor([[0, 0, 10, 10.0], [0, 0, 10, 10.0]])
    logits = torch.tensor([[[4.0, -9], [-9, 3.0]]])
    o2 = postprocess(logits, torch.zeros(1, 2, 4), anchors2, soft_nms=True, max_detection_points=4, backend="torch")
    assert o2[0, :2, 5].tolist() == [0, 1]
    torch.testing.assert_close(o2[0, :2, 4], torch.sigmoid(torch.tensor([4.0, 3.0])))


def test_postprocess_scales_back_and_pads():
    cls, box, anchors = _toy(B=1, N=5, C=1)
    a = postprocess(cls, box, anchors, max_detection_points=5, backend="torch")
    b = postprocess(cls, box, anchors, image_scale=torch.tensor([2.0]), max_detection_points=5, backend="torch")
    n = int((a[0, :, 5] >= 0).sum())
    assert 1 <= n <= 5 and (a[0, n:, 5] == -1).all()
    torch.testing.assert_close(b[0, :n, :4] * 2, a[0, :n, :4])
