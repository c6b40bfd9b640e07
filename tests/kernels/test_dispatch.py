"""kernels._dispatch: the one decision between a Triton kernel and its reference, including inputs that only
the reference computes as specified (float64, gradients a kernel has no backward for)."""
import pytest
import torch

from kernels import bifpn_fusion, decode_boxes, focal_loss
from kernels._dispatch import ENV_VAR, resolve


def test_auto_takes_triton_on_cuda_tensors_unless_the_call_is_unsupported(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert resolve("op", "auto", "cuda") == "triton"           # a device name: no GPU needed to decide
    assert resolve("op", "auto", "cuda", unsupported="float64 x") == "torch"
    assert resolve("op", "auto", "cpu") == "torch"
    with pytest.raises(ValueError, match=r"^kernels.op: the Triton path cannot take float64 x \(backend 'triton' "
                                         r"set by argument\); use backend='torch'$"):
        resolve("op", "triton", "cuda", unsupported="float64 x")
    monkeypatch.setenv(ENV_VAR, "triton")
    with pytest.raises(ValueError, match=f"set by {ENV_VAR}"):
        resolve("op", "auto", "cuda", unsupported="float64 x")


def test_ops_name_what_their_triton_path_refuses():
    """What each op's reference computes and its kernel does not: refused with one line when Triton is asked
    for by name (``"auto"`` runs the reference for these, see the test above)."""
    logits, targets = torch.randn(2, 5, 3, dtype=torch.float64), torch.zeros(2, 5, dtype=torch.int64)
    with pytest.raises(ValueError, match="float64 logits"):
        focal_loss(logits, targets, 1.0, backend="triton")
    deltas, anchors = torch.zeros(3, 4, requires_grad=True), torch.tensor([[0.0, 0.0, 8.0, 8.0]] * 3)
    with pytest.raises(ValueError, match="deltas that need a gradient"):
        decode_boxes(deltas, anchors, backend="triton")
    with torch.no_grad():
        decode_boxes(deltas, anchors, backend="triton")        # no gradient wanted: the kernel runs
    with pytest.raises(ValueError, match="float64 deltas"):
        decode_boxes(deltas.detach().double(), anchors.double(), backend="triton")
    from kernels import decode_topk

    scores = torch.randn(1, 3, 2, requires_grad=True)
    with pytest.raises(ValueError, match="class logits that need a gradient"):
        decode_topk(scores, torch.zeros(1, 3, 4), anchors, 2, backend="triton")
    x, dw = torch.randn(1, 2, 4, 4), torch.randn(2, 1, 3, 3)
    with pytest.raises(ValueError, match="4 inputs"):
        bifpn_fusion([x] * 4, ["same"] * 4, None, dw, (4, 4), "sum", backend="triton")
    # the reference takes them all
    assert focal_loss(logits, targets, 1.0, backend="torch").dtype == torch.float64
    decode_boxes(deltas, anchors, backend="torch").sum().backward()
    assert deltas.grad is not None
