"""EMA helper and checkpoint loading: our format, effdet's, NVIDIA's; unsafe and broken files."""
import os

import pytest
import torch

from detector import create_model
from detector.checkpoint import CheckpointError, load, read, save
from detector.ema import ModelEma


def _tiny(**kw):
    return create_model("efficientdet_d0", num_classes=kw.pop("num_classes", 4), image_size=128, backend="torch", **kw)


def test_ema_decay_zero_copies_one_keeps_and_buffers_follow():
    torch.manual_seed(0)
    m = _tiny()
    ema = ModelEma(m, decay=1.0)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    m.train()(torch.randn(2, 3, 128, 128))  # moves BN running stats
    ema.update(m)
    for k, v in ema.module.state_dict().items():
        if v.is_floating_point():
            assert torch.equal(v, before[k]), k
    ema.decay = 0.0
    m = m.to(memory_format=torch.channels_last)  # new storage behind the same parameter objects
    with torch.no_grad():
        for p in m.parameters():
            p.add_(3.0)
    ema.update(m)
    for k, v in ema.module.state_dict().items():  # decay 0 copies (to fp32 rounding of ema + (m - ema))
        torch.testing.assert_close(v, m.state_dict()[k], rtol=1e-6, atol=1e-6, msg=k)
    ema.decay = 0.5
    target = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for p in m.parameters():
            p.add_(2.0)
    ema.update(m)
    p = "class_net.predict.conv_pw.bias"
    torch.testing.assert_close(ema.module.state_dict()[p], target[p] + 1.0)
    state = ema.state_dict()
    ema2 = ModelEma(_tiny(), decay=0.1)
    ema2.load_state_dict(state)
    assert ema2.updates == 3 and ema2.decay == 0.5
    assert torch.equal(ema2.module.state_dict()[p], ema.module.state_dict()[p])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_tied_parameter_is_averaged_once(backend):
    """One Parameter shared by two modules (listed twice by state_dict) is averaged once per update: before,
    it was in the EMA's lists twice, so each update moved it twice (and the Triton path raced on it)."""
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(4, 4)
            self.b = torch.nn.Linear(4, 4)
            self.b.weight = self.a.weight

    torch.manual_seed(0)
    m = Tied()
    ema = ModelEma(m, decay=0.5, backend=backend)
    assert ema.module.b.weight is ema.module.a.weight                 # the copy keeps the tie
    floats = ema._split(m)[0]
    assert len(floats) == len({id(t) for t in floats}) == 3           # a.weight, a.bias, b.bias
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    ema.update(m)
    for k, v in ema.module.state_dict().items():
        torch.testing.assert_close(v, 0.5 * before[k] + 0.5 * m.state_dict()[k], msg=k)
    ema.restart(m)
    for k, v in ema.module.state_dict().items():
        assert torch.equal(v, m.state_dict()[k]), k


def test_roundtrip_our_checkpoint(tmp_path):
    m = _tiny()
    path = str(tmp_path / "ckpt.pth")
    save({"model": m.state_dict(), "config": m.config.to_dict(), "epoch": 3}, path)
    m2 = _tiny()
    assert "ours" in load(m2, path)
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k])
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": Evil()}, path, pickle_protocol=2)
    with pytest.raises(CheckpointError, match="refused"):
        read(str(path))


def test_truncated_and_missing_files_give_clear_errors(tmp_path):
    m = _tiny()
    path = tmp_path / "full.pth"
    torch.save(m.state_dict(), path)
    data = path.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pth.*truncated"):
        read(str(tmp_path / "cut.pth"))
    with pytest.raises(CheckpointError, match="does not exist"):
        read(str(tmp_path / "nope.pth"))


def test_checkpoint_of_another_model_lists_keys(tmp_path):
    other = create_model("efficientdet_d1", num_classes=4, image_size=128, backend="torch")
    path = tmp_path / "d1.pth"
    torch.save(other.state_dict(), path)
    with pytest.raises(CheckpointError) as e:
        load(_tiny(), str(path))
    msg = str(e.value)
    assert "wrong shape" in msg and "checkpoint (88,) vs model (64,)" in msg
    assert "unexpected (" in msg and "missing (" in msg and "remove-weights" not in msg


def test_class_count_change_needs_remove_weights(tmp_path):
    m = _tiny(num_classes=4)
    path = tmp_path / "c4.pth"
    torch.save(m.state_dict(), path)
    m7 = _tiny(num_classes=7)
    with pytest.raises(CheckpointError, match="remove-weights"):
        load(m7, str(path))
    head = m7.class_net.predict.conv_pw.weight.clone()
    load(m7, str(path), reset_class_head=True)
    assert torch.equal(m7.class_net.predict.conv_pw.weight, head)
    assert torch.equal(m7.box_net.predict.conv_pw.weight, m.box_net.predict.conv_pw.weight)


def test_named_remove_weights_reset_only_those_layers(tmp_path):
    """--remove-weights box_net (NVIDIA's meaning): the box head fresh, the class head loaded; names plus a class
    count change need class_net among the names."""
    m = _tiny(num_classes=4)
    path = tmp_path / "c4.pth"
    torch.save(m.state_dict(), path)
    m4 = _tiny(num_classes=4)
    box = m4.box_net.predict.conv_pw.weight.clone()
    msg = load(m4, str(path), remove=["box_net"])
    assert "(box_net re-initialized)" in msg
    assert torch.equal(m4.box_net.predict.conv_pw.weight, box)                         # fresh
    assert torch.equal(m4.class_net.predict.conv_pw.weight, m.class_net.predict.conv_pw.weight)  # loaded
    m7 = _tiny(num_classes=7)
    with pytest.raises(CheckpointError, match="add class_net to its names"):
        load(m7, str(path), remove=["box_net"])
    assert "class_net, box_net re-initialized" in load(m7, str(path), remove=["class_net", "box_net"])


def _to_nvidia(sd: dict, model, pad_to: int = 8) -> dict:
    """Write our state dict in NVIDIA's training-checkpoint layout (inverse of the loader's conversion)."""
    inv_ir = {"conv_pw": "expand_conv.0", "bn1": "expand_conv.1", "conv_dw": "depthwise_conv.0",
              "bn2": "depthwise_conv.1", "se.conv_reduce": "squeeze_and_excitation.squeeze",
              "se.conv_expand": "squeeze_and_excitation.expand", "conv_pwl": "project_conv.0", "bn3": "project_conv.1"}
    inv_ds = {"conv_dw": "depthwise_conv.0", "bn1": "depthwise_conv.1", "se.conv_reduce": "squeeze_and_excitation.squeeze",
              "se.conv_expand": "squeeze_and_excitation.expand", "conv_pw": "project_conv.0", "bn2": "project_conv.1"}
    flat, i = {}, 0
    for s, stage in enumerate(model.backbone.blocks):
        for b, blk in enumerate(stage):
            flat[(s, b)] = (i, not hasattr(blk, "conv_pwl"))
            i += 1
    out = {}
    for k, v in sd.items():
        if k.startswith("backbone.conv_stem"):
            k = "backbone.input_conv.0." + k.split(".")[-1]
        elif k.startswith("backbone.bn1"):
            k = "backbone.input_conv.1." + k.split(".")[-1]
        elif k.startswith("backbone.blocks."):
            parts = k.split(".")
            idx, ds = flat[(int(parts[2]), int(parts[3]))]
            inner, leaf = ".".join(parts[4:-1]), parts[-1]
            if inner.startswith("se.") and leaf == "weight":
                v = v[:, :, 0, 0]
            k = f"backbone.mbconv_blocks.{idx}.{(inv_ds if ds else inv_ir)[inner]}.{leaf}"
        elif k.startswith("class_net.predict.conv_pw"):
            c = model.config.num_classes
            padded = (c + pad_to - 1) // pad_to * pad_to
            v = v.reshape(9, c, *v.shape[1:])
            v = torch.cat([v, torch.zeros(9, padded - c, *v.shape[2:])], 1).reshape(9 * padded, *v.shape[2:])
        out["module." + k] = v
    return out


def test_nvidia_checkpoint_converts(tmp_path):
    torch.manual_seed(0)
    m = _tiny(num_classes=5).eval()
    nv = _to_nvidia(m.state_dict(), m)
    assert nv["module.class_net.predict.conv_pw.bias"].shape[0] == 9 * 8
    path = tmp_path / "nvidia.pth"
    torch.save({"epoch": 10, "state_dict": nv, "state_dict_ema": nv}, path)
    m2 = _tiny(num_classes=5).eval()
    msg = load(m2, str(path), use_ema=True)
    assert "NVIDIA" in msg and "state_dict_ema" in msg
    assert m2.config.backbone_bn_eps == 1e-3
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
