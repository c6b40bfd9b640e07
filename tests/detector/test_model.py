"""The network: configs, parameter counts, state-dict layout and outputs against effdet."""
import pytest
import torch

from detector import create_model, get_config, model_names

from .conftest import randomize_bn

# docs/design.md section 2, 90 classes
PARAMS = {"d0": 3.880, "d1": 6.626, "d2": 8.097, "d3": 12.032, "d4": 20.724, "d5": 33.653,
          "d6": 51.872, "d7": 51.872, "d7x": 77.147}


@pytest.mark.parametrize("variant", list(PARAMS))
def test_parameter_counts_match_design(variant):
    with torch.device("meta"):
        model = create_model(f"tf_efficientdet_{variant}")
    n = sum(p.numel() for p in model.parameters())
    assert round(n / 1e6, 3) == PARAMS[variant], n


def test_config_table_and_errors():
    assert len(model_names()) == 18
    cfg = get_config("efficientdet_d7x")
    assert cfg.max_level == 8 and cfg.fusion == "sum" and not cfg.tf_padding
    assert get_config("tf_efficientdet_d7").anchor_scale == 5.0 and get_config("tf_efficientdet_d0").redundant_bias
    with pytest.raises(ValueError, match="multiple of 2\\*\\*max_level"):
        get_config("efficientdet_d0", image_size=(500, 512))
    with pytest.raises(ValueError, match="unknown model"):
        get_config("efficientdet_d9")
    with pytest.raises(ValueError, match="unknown config field"):
        get_config("efficientdet_d0", bifpn_width=3)


def test_model_config_records_build_arguments():
    m = create_model("efficientdet_d0", num_classes=3, image_size=(128, 256))
    assert m.config.num_classes == 3 and m.config.image_size == (128, 256)
    cls, box = m.eval()(torch.randn(1, 3, 128, 256))
    assert [tuple(c.shape) for c in cls] == [(1, 27, 16, 32), (1, 27, 8, 16), (1, 27, 4, 8), (1, 27, 2, 4), (1, 27, 1, 2)]
    assert [b.shape[1] for b in box] == [36] * 5


@pytest.mark.parametrize("name,size", [("tf_efficientdet_d0", 256), ("efficientdet_d0", 256),
                                       ("tf_efficientdet_d1", 128), ("efficientdet_d3", 128)])
def test_outputs_equal_effdet(effdet, name, size):
    torch.manual_seed(0)
    ref = randomize_bn(effdet.create_model(name, pretrained=False, pretrained_backbone=False,
                                           image_size=(size, size))).eval()
    ours = create_model(name, image_size=size, backend="torch").eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        rc, rb = ref(x)
        oc, ob = ours(x)
    for r, o in zip(rc + rb, oc + ob):
        assert r.shape == o.shape
        torch.testing.assert_close(o, r, rtol=0, atol=1e-4)


def test_training_forward_equals_effdet_with_drop_path(effdet):
    """Training mode: batch-statistics BN and stochastic depth. With one seed both models drop the same
    residual branches (same random draws in the same block order) and scale the kept ones alike."""
    torch.manual_seed(0)
    ref = effdet.create_model("efficientdet_d0", pretrained=False, pretrained_backbone=False,
                              image_size=(128, 128)).train()
    ours = create_model("efficientdet_d0", image_size=128, backend="torch").train()
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert ours.config.drop_path_rate > 0
    x = torch.randn(4, 3, 128, 128)
    torch.manual_seed(1)
    rc, rb = ref(x)
    torch.manual_seed(1)
    oc, ob = ours(x)
    for r, o in zip(rc + rb, oc + ob):
        torch.testing.assert_close(o, r, rtol=0, atol=1e-4)
    torch.manual_seed(2)  # another draw drops other branches: the outputs change
    assert not torch.allclose(ours(x)[0][0], oc[0], atol=1e-4)


def test_channels_last_gives_same_outputs():
    torch.manual_seed(0)
    m = randomize_bn(create_model("efficientdet_d0", image_size=128, backend="torch")).eval()
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        a = m(x)
        b = m.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    for r, o in zip(a[0] + a[1], b[0] + b[1]):
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-4)


def test_flatten_orders_anchors_level_row_col_shape():
    m = create_model("efficientdet_d0", num_classes=2, image_size=128)
    cls = [torch.arange(18 * h * w, dtype=torch.float32).reshape(1, 18, h, w) for h, w in [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]]
    box = [torch.zeros(1, 36, c.shape[2], c.shape[3]) for c in cls]
    fc, fb = m.flatten(cls, box)
    assert fc.shape == (1, 9 * (256 + 64 + 16 + 4 + 1), 2)
    # anchor 1 at row 0, col 0 of level 3 is shape 1: channels 2, 3 of the map at (0, 0)
    assert fc[0, 1].tolist() == [cls[0][0, 2, 0, 0].item(), cls[0][0, 3, 0, 0].item()]
    # anchor 9 is shape 0 at row 0, col 1
    assert fc[0, 9, 0].item() == cls[0][0, 0, 0, 1].item()
