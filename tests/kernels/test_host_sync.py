"""No host synchronisation in a launcher (the code in ``kernels/*.py`` between a public op and its kernel).

CPU: one D0 training step + inference pass on the Triton path (interpreter) as warm-up, then a second one
under ``bench.static.HostSyncRecorder``: no call made from ``kernels/`` may create a tensor from Python data
(``torch.tensor`` / ``as_tensor`` / ``scalar_tensor``, one-element ``torch.full`` of a Python number) or read
a tensor back (``.item`` / ``.cpu`` / ``.tolist`` / ``.numpy`` / ``nonzero``, or implicitly: a tensor as a
Python bool / int / float / index, ``.to("cpu")``, ``torch.equal``, a boolean mask, ``repeat_interleave``
sized by data). Tables built once in the
warm-up and cached are allowed. The run is shared with ``test_compiled.py`` (one subprocess per size).

CUDA: the same after one warm-up step, under ``torch.cuda.set_sync_debug_mode("error")``.
"""
import pytest
import torch

from bench import static as st

from .test_compiled import BATCH, SIZES


def test_recorder_sees_calls_from_its_roots_only(tmp_path):
    x = torch.ones(3)
    with st.HostSyncRecorder(roots=[st.REPO_ROOT / "tests"]) as rec:
        x.sum().item()                       # flagged: called from a file under tests/
        torch.tensor([1.0, 2.0])             # flagged: Python data
        torch.as_tensor(x)                   # not flagged: from a tensor
        torch.full((), 2.0)                  # flagged: a host scalar made a tensor
        torch.full((8,), 0.0)                # not flagged: a device fill
        torch.nonzero(x)                     # flagged
        x.tolist()                           # flagged
        torch.ones(2).sum()                  # not flagged
        if x.sum():                          # flagged: a tensor as a Python bool
            int(x.sum())                     # flagged
        x[x > 1]                             # flagged: a boolean mask (its result's size is data)
        x[1:]                                # not flagged
        repeats = torch.ones(3, dtype=torch.int64)
        torch.repeat_interleave(x, repeats)  # flagged: output size from the data
        torch.repeat_interleave(x, repeats, output_size=3)  # not flagged
        x.to("cpu")                          # flagged (on a GPU a copy to the host)
        x.to(torch.float64)                  # not flagged
        torch.equal(x, x)                    # flagged
        y = x.clone()
        y[x > 1] = 0.0                       # flagged: a write through a boolean mask (index_put_ + nonzero)
        torch.where(x > 1)                   # flagged: nonzero
        torch.where(x > 1, x, 0.0)           # not flagged
    kinds = [k for k, _ in rec.calls]
    assert kinds == ["Tensor.item", "torch.tensor", "torch.full", "torch.nonzero", "Tensor.tolist",
                     "Tensor.__bool__", "Tensor.__int__", "Tensor[bool mask]", "torch.repeat_interleave",
                     "Tensor.to(cpu)", "torch.equal", "Tensor[bool mask] =", "torch.where(cond)"], rec.calls
    assert all("test_host_sync.py:" in where for _, where in rec.calls)
    with st.HostSyncRecorder() as rec2:     # default root: kernels/ -> nothing from this file
        x.sum().item()
    assert rec2.calls == []
    assert torch.Tensor.item is not None and x.sum().item() == 3.0   # patches undone
    assert "__bool__" not in vars(torch.Tensor) and bool(x.sum())   # an inherited slot: the wrapper is gone


def test_d0_launchers_do_not_sync_after_warmup():
    cap = st.cached_d0_captures(SIZES, BATCH, (SIZES[0],))[SIZES[0]]
    assert cap.host_sync is not None
    calls = sorted({f"{what} at {where}" for what, where in cap.host_sync})
    assert not calls, (f"{len(cap.host_sync)} host-sync calls in launchers during the second D0 train step + "
                       f"inference at {SIZES[0]} px (batch {BATCH}):\n  " + "\n  ".join(calls))


@pytest.mark.cuda
def test_d0_step_and_inference_do_not_sync_on_cuda():
    train_step, infer = st.d0_workload(128, BATCH, "cuda", backend="triton")
    train_step()
    infer()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        train_step()
        infer()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
