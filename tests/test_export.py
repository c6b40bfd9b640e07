"""Export: the ONNX graph (post-processing included, run by onnxruntime on the CPU) and the TorchScript trace
give the PyTorch detections, at batch sizes other than the one exported with."""
import pytest
import torch

from detector.export import Detector, TracedNetwork, export_onnx, export_torchscript, main
from detector.model import create_model
from detector.pipeline import predict
from tests.detector.conftest import randomize_bn

SIZE = 128
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.* is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # D0 with one BiFPN cell and one head repeat: the same op types, exported in half the time
    m = create_model("tf_efficientdet_d0", num_classes=4, image_size=SIZE, backend="torch",
                     max_detection_points=400, fpn_cell_repeats=1, box_class_repeats=1).eval()
    return randomize_bn(m)  # varied outputs: a fresh model scores every anchor alike


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def want(model, images):
    """The eager detections of the wrapper (BatchNorm folded, as exported)."""
    with torch.no_grad():
        return Detector(model)(images)


def assert_same_detections(got: torch.Tensor, want: torch.Tensor, atol: float = 1e-3):
    """Equal up to float rounding; rows whose scores tie within 1e-5 may come in either order."""
    assert got.shape == want.shape
    for g, w in zip(got, want):
        gv, wv = g[g[:, 5] >= 0], w[w[:, 5] >= 0]
        assert len(gv) == len(wv) > 0
        torch.testing.assert_close(gv[:, 4], wv[:, 4], atol=1e-5, rtol=0)
        last = wv[:, 4].min()
        for row in wv[wv[:, 4] > last + 1e-5]:  # the lowest scores may differ at the cut
            near = (gv[:, 5] == row[5]) & ((gv[:, :4] - row[:4]).abs().amax(1) < atol) & \
                   ((gv[:, 4] - row[4]).abs() < 1e-5)
            assert near.any(), f"no exported detection matches {row.tolist()}"


def test_wrapper_is_predict(model, images, want):
    with torch.no_grad():
        ref = predict(model, images, clip_size=torch.full((3, 2), float(SIZE)), backend="torch")
        unfused = Detector(model, fuse=False)(images)
    assert_same_detections(unfused, ref, atol=1e-4)
    assert_same_detections(want, ref)  # fused BatchNorm: the same detections up to rounding


def test_onnx_matches_pytorch(model, images, want, tmp_path):
    pytest.importorskip("onnxscript", reason="ONNX export needs requirements-export.txt (onnxscript)")
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime (requirements-export.txt) not installed")
    onnx = pytest.importorskip("onnx", reason="onnx (requirements-export.txt) not installed")
    path = export_onnx(model, str(tmp_path / "d0.onnx"))
    graph = onnx.load(path).graph
    assert any(n.op_type == "NonMaxSuppression" for n in graph.node)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for b in (1, 3):  # exported with batch 2
        (got,) = session.run(None, {"images": images[:b].numpy()})
        assert_same_detections(torch.from_numpy(got), want[:b])


def test_torchscript_matches_pytorch(model, images, want, tmp_path):
    path = tmp_path / "d0.pt"
    export_torchscript(model, str(path))
    loaded = torch.jit.load(str(path))
    with torch.no_grad():
        for b in (1, 3):  # traced with batch 2
            assert_same_detections(loaded(images[:b]), want[:b])


def test_traced_network_in_predict(model, images):
    """evaluate.py --torchscript: the traced network through the usual post-processing, any batch size."""
    traced = TracedNetwork(model, fuse=False)
    clip = torch.full((3, 2), float(SIZE))
    with torch.no_grad():
        want = predict(model, images, clip_size=clip, backend="torch")
        for b in (1, 3):  # traced with batch 2
            got = predict(traced, images[:b], clip_size=clip[:b], backend="torch")
            assert_same_detections(got, want[:b], atol=1e-4)


def test_cli_error_is_one_line(tmp_path, capsys):
    bad = tmp_path / "missing.pth"
    assert main(["--model", "tf_efficientdet_d0", "--checkpoint", str(bad), "--output", str(tmp_path / "x.pt"),
                 "--image-size", str(SIZE)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(bad) in err


def test_cli_exports_our_checkpoint_as_recorded(model, images, want, tmp_path, capsys):
    """Ours record model, classes and input size: the export is built with them, not with D0's 512 px or 90
    classes, and gives the model's detections."""
    ckpt = tmp_path / "ours.pth"
    torch.save({"model": model.state_dict(), "config": model.config.to_dict()}, ckpt)
    out = tmp_path / "ours.pt"
    assert main(["--checkpoint", str(ckpt), "--format", "torchscript", "--output", str(out)]) == 0
    assert f"exporting tf_efficientdet_d0, 4 classes, input {SIZE}x{SIZE}" in capsys.readouterr().err
    assert_same_detections(torch.jit.load(str(out))(images), want, atol=1e-4)


def test_cli_errors_are_one_line_in_the_scripts_form(tmp_path, capsys):
    import re

    line = re.compile(r"^error: \S.* \((?P<file>[^,]+), (?P<field>.+)\): \S.*$")
    (tmp_path / "text.pth").write_text("hello\n")
    for argv, field in ((["--checkpoint", str(tmp_path / "text.pth"), "--output", str(tmp_path / "x.pt")], "--checkpoint"),
                        (["--output", str(tmp_path)], "--output"),
                        (["--model", "efficientdet_d9", "--output", str(tmp_path / "x.pt")], "--model"),
                        (["--num-classes", "0", "--output", str(tmp_path / "x.pt")], "--num-classes"),
                        (["--image-size", "0", "--output", str(tmp_path / "x.pt")], "--image-size")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and (m := line.match(err[0])) and m["field"] == field, err
