"""kernels.ema_update: pointer-table Triton kernel (interpreter on CPU, compiled on CUDA) vs references."""
import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.ema import ema_update, ema_update_reference

from .aot import aot_compile
from .compare import TOL, assert_close

ema_mod = importlib.import_module("kernels.ema")


def lerp_expected(ema, model, decay):
    """torch._foreach_lerp_ on fp32 copies, rounded to the ema dtype: the contract."""
    d = float(decay)
    e32 = [e.float().clone() for e in ema]
    torch._foreach_lerp_(e32, [m.float() for m in model], 1.0 - d)
    return [x.to(e.dtype) for x, e in zip(e32, ema)]


def make(shapes, dtype, model_dtype=None, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    ema = [torch.randn(s, generator=g).to(device=device, dtype=dtype) for s in shapes]
    model = [(torch.randn(s, generator=g) * 3).to(device=device, dtype=model_dtype or dtype) for s in shapes]
    return ema, model


def check(ema, model, decay, backend="triton", tol_dtype=None):
    expected = lerp_expected(ema, model, decay)
    before = [e.clone() for e in ema]
    ema_update(ema, model, decay, backend=backend)
    for i, (e, x, b) in enumerate(zip(ema, expected, before)):
        assert e.dtype == b.dtype and e.shape == b.shape
        rtol, atol = TOL[tol_dtype or e.dtype]
        assert_close(e, x, rtol, atol, f"tensor {i} {tuple(e.shape)} {e.dtype}")


shapes_st = st.lists(st.lists(st.integers(0, 9), min_size=0, max_size=3).map(tuple), min_size=1, max_size=6)


@settings(max_examples=15)
@given(shapes=shapes_st, dtype=st.sampled_from([torch.float32, torch.float16]),
       decay=st.sampled_from([0.0, 0.5, 0.9, 0.9998, 1.0]), as_tensor=st.booleans(), seed=st.integers(0, 999))
def test_matches_foreach_lerp(shapes, dtype, decay, as_tensor, seed):
    ema, model = make(shapes, dtype, seed=seed)
    check(ema, model, torch.tensor(decay) if as_tensor else decay)


def test_reference_matches_foreach_lerp():
    ema, model = make([(3, 5), (7,), ()], torch.float32, seed=1)
    expected = lerp_expected(ema, model, 0.7)
    ema_update_reference(ema, model, torch.tensor(0.7))
    for e, x in zip(ema, expected):
        assert_close(e, x, 1e-6, 1e-7, "reference")


def test_multi_tile_tensors_and_one_launch(monkeypatch):
    """Tensors spanning several tiles; all of one dtype go through exactly one kernel launch."""
    monkeypatch.setattr(ema_mod, "_BLOCK", 16)
    ema_mod._TABLE_CACHE.clear()
    launches = []
    real = ema_mod._ema_kernel

    class Spy:
        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]
    monkeypatch.setattr(ema_mod, "_ema_kernel", Spy())
    ema, model = make([(5, 7), (16,), (17,), (1,), (3, 3, 3, 3)], torch.float32, seed=2)
    check(ema, model, 0.5)
    assert len(launches) == 1, launches
    assert launches[0] == (3 + 1 + 2 + 1 + 6,)          # tiles of 16 per tensor


def test_mixed_dtypes_one_launch_per_group():
    ema32, model32 = make([(10,), (4, 4)], torch.float32, seed=3)
    ema16, model16 = make([(9,)], torch.float16, seed=4)
    ema_h, model_f = make([(6,)], torch.float16, model_dtype=torch.float32, seed=5)   # half ema of fp32 model
    expected = lerp_expected(ema32 + ema16 + ema_h, model32 + model16 + model_f, 0.75)
    ema_update(ema32 + ema16 + ema_h, model32 + model16 + model_f, 0.75, backend="triton")
    for i, (e, x) in enumerate(zip(ema32 + ema16 + ema_h, expected)):
        rtol, atol = TOL[e.dtype]
        assert_close(e, x, rtol, atol, f"tensor {i}")


def test_bf16_interpreter():
    # The interpreter rounds fp32 -> bf16 stores toward zero (real GPUs round to nearest), so compare
    # within one bf16 ulp; decay 0.5 makes a skipped update far larger than that.
    ema, model = make([(33,), (2, 5)], torch.bfloat16, seed=6)
    check(ema, model, 0.5, tol_dtype=torch.bfloat16)


def test_repeated_updates_use_cached_table():
    ema_mod._TABLE_CACHE.clear()
    ema, model = make([(5,), (40,)], torch.float32, seed=7)
    e_ref = [e.clone() for e in ema]
    for step in range(3):
        decay = torch.tensor(0.5 + 0.1 * step)
        ema_update(ema, model, decay, backend="triton")
        ema_update_reference(e_ref, model, decay)
    assert len(ema_mod._TABLE_CACHE) == 1
    for e, r in zip(ema, e_ref):
        assert_close(e, r, 1e-5, 1e-6, "3 steps")


def test_layouts_channels_last_and_non_dense():
    g = torch.Generator().manual_seed(8)
    cl_e = torch.randn(2, 3, 4, 5, generator=g).to(memory_format=torch.channels_last)
    cl_m = torch.randn(2, 3, 4, 5, generator=g).to(memory_format=torch.channels_last)
    tr_e = torch.randn(6, 4, generator=g).t()                        # transposed, dense
    tr_m = torch.randn(4, 6, generator=g)                             # contiguous: strides differ
    sl_e = torch.randn(8, 8, generator=g)[:, ::2]                     # not dense
    sl_m = torch.randn(8, 4, generator=g)
    base = torch.randn(10, generator=g)
    ema = [cl_e, tr_e, sl_e, base]
    model = [cl_m, tr_m, sl_m, torch.randn(10, generator=g)]
    check(ema, model, 0.25)
    assert cl_e.is_contiguous(memory_format=torch.channels_last)


def test_errors():
    e, m = make([(3,)], torch.float32)
    with pytest.raises(ValueError, match="1 ema tensors but 2"):
        ema_update(e, m + m, 0.9)
    with pytest.raises(TypeError, match="integer buffers"):
        ema_update([torch.zeros(3, dtype=torch.int64)], [torch.zeros(3, dtype=torch.int64)], 0.9)
    with pytest.raises(ValueError, match="shape"):
        ema_update(e, [torch.zeros(4)], 0.9)
    with pytest.raises(ValueError, match="scalar"):
        ema_update(e, m, torch.tensor([0.9, 0.9]))
    ema_update([], [], 0.9)                                            # empty: no-op


def test_torch_compile_fullgraph_cpu():
    ema, model = make([(3, 4), (5,)], torch.float32, seed=9)
    expected = lerp_expected(ema, model, 0.8)
    decay = torch.tensor(0.8)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(e, m):
        torch.ops.effdet.ema_update_(e, m, decay, 0.0)          # the custom op (CPU impl = reference)

    step(ema, model)
    for e, x in zip(ema, expected):
        assert_close(e, x, 1e-5, 1e-6, "compiled custom op")

    ema2, model2 = make([(3, 4), (5,)], torch.float32, seed=9)
    torch.compile(lambda e, m: ema_update(e, m, decay, backend="torch"), fullgraph=True, backend="eager")(
        ema2, model2)
    for e, x in zip(ema2, expected):
        assert_close(e, x, 1e-5, 1e-6, "compiled public fn")


# --------------------------------------------------------------------------------------------------
# CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_matches_foreach_lerp(cuda_device, dtype):
    shapes = [(64, 3, 3, 3), (1,), (5001,), (0,), (320, 1280), (7, 13)]
    ema, model = make(shapes, dtype, seed=10, device=cuda_device)
    check(ema, model, torch.tensor(0.9, device=cuda_device))
    check(ema, model, 0.5)


@pytest.mark.cuda
def test_cuda_compile_inductor(cuda_device):
    ema, model = make([(40, 3), (2000,)], torch.float32, seed=11, device=cuda_device)
    expected = lerp_expected(ema, model, 0.9)
    decay = torch.tensor(0.9, device=cuda_device)
    torch.compile(lambda e, m: ema_update(e, m, decay, backend="triton"), fullgraph=True)(ema, model)
    for e, x in zip(ema, expected):
        assert_close(e, x, 1e-5, 1e-6, "inductor")


# --------------------------------------------------------------------------------------------------
# GPU code generation without a GPU: compile the kernels for sm_90 with the real Triton compiler


def test_kernel_compiles_for_cuda_without_gpu():
    sig = {"table_ptr": "*i64", "n_tensors": "i32", "decay_ptr": "*fp32", "decay_value": "fp32"}
    aot_compile("kernels.ema", [
        ("_ema_kernel", sig, {"EMA_DTYPE": "tl.float32", "MODEL_DTYPE": "tl.float32", "DECAY_FROM_PTR": True,
                              "BLOCK": 2048}),
        ("_ema_kernel", sig, {"EMA_DTYPE": "tl.bfloat16", "MODEL_DTYPE": "tl.float32", "DECAY_FROM_PTR": False,
                              "BLOCK": 2048})])
