"""kernels.ema_update: pointer-table Triton kernel (interpreter on CPU, compiled on CUDA) vs references."""
import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.ema import ema_update, ema_update_reference

from .aot import aot_compile
from .compare import assert_close, tolerance

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
        assert_close(e, x, *tolerance(tol_dtype or e.dtype), f"tensor {i} {tuple(e.shape)} {e.dtype}")


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
        assert_close(e, x, *tolerance(torch.float32), "reference")


def test_multi_tile_tensors_and_one_launch(monkeypatch):
    """Tensors spanning several tiles; all of one dtype go through exactly one kernel launch."""
    monkeypatch.setattr(ema_mod, "_BLOCK", 16)
    ema_mod._PLANS.clear()
    ema_mod._BY_ID.clear()
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
        assert_close(e, x, *tolerance(e.dtype), f"tensor {i}")


def test_bf16_interpreter():
    # The interpreter rounds fp32 -> bf16 stores toward zero (real GPUs round to nearest), so compare
    # within one bf16 ulp; decay 0.5 makes a skipped update far larger than that.
    ema, model = make([(33,), (2, 5)], torch.bfloat16, seed=6)
    check(ema, model, 0.5, tol_dtype=torch.bfloat16)


def test_repeated_updates_use_cached_plan_and_rebuild_on_new_storage():
    ema_mod._PLANS.clear()
    ema_mod._BY_ID.clear()
    ema, model = make([(5,), (40,)], torch.float32, seed=7)
    e_ref = [e.clone() for e in ema]
    for step in range(3):
        decay = torch.tensor(0.5 + 0.1 * step)
        ema_update(ema, model, decay, backend="triton")
        ema_update_reference(e_ref, model, decay)
    assert len(ema_mod._PLANS) == 1
    plan = next(iter(ema_mod._PLANS.values()))
    for e, r in zip(ema, e_ref):
        assert_close(e, r, *tolerance(torch.float32, 3), "3 steps")
    # the same tensors in new list objects: the same plan
    ema_update(list(ema), list(model), 0.5, backend="triton")
    ema_update_reference(e_ref, model, 0.5)
    assert next(iter(ema_mod._PLANS.values())) is plan and len(ema_mod._PLANS) == 1
    # a model tensor moved to new storage (as .to() / .data = ... do): new addresses, a new plan, right values
    model[1].data = model[1].data.clone() * 2
    ema_update(ema, model, 0.25, backend="triton")
    ema_update_reference(e_ref, model, 0.25)
    assert len(ema_mod._PLANS) == 2
    for e, r in zip(ema, e_ref):
        assert_close(e, r, *tolerance(torch.float32, 5), "after new storage")


def test_list_items_replaced_or_resized_at_the_same_address_rebuild_the_plan():
    """The cached plan is checked against the tensor objects and element counts as well as addresses: a list
    item swapped for a view at the same address, the same tensor object given fewer elements at the same
    address (``.data = base[:4]``), or another dtype at the same address must not reuse the old sizes (the
    kernel would write past the new tensor's end) or dtype."""
    ema_mod._PLANS.clear()
    ema_mod._BY_ID.clear()
    a, b = torch.zeros(10), torch.ones(10)
    ema, model = [a], [b]
    ema_update(ema, model, 0.5, backend="triton")
    ema[0], model[0] = a[:5], b[:5]                  # the same list objects, the same addresses, 5 elements
    ema_update(ema, model, 0.5, backend="triton")
    assert a[:5].tolist() == [0.75] * 5 and a[5:].tolist() == [0.5] * 5, a
    base, src = torch.zeros(10), torch.ones(10)
    ema, model = [base[:10]], [src[:10]]
    ema_update(ema, model, 0.5, backend="triton")
    ema[0].data, model[0].data = base[:4], src[:4]  # the same objects, the same addresses, 4 elements
    ema_update(ema, model, 0.5, backend="triton")
    assert base[:4].tolist() == [0.75] * 4 and base[4:].tolist() == [0.5] * 6, base  # nothing past the end
    c, d = torch.zeros(4, dtype=torch.float32), torch.ones(4, dtype=torch.float32)
    ema, model = [c], [d]
    ema_update(ema, model, 0.5, backend="triton")
    c16 = c.view(torch.float16)                      # another dtype at the same address
    ema[0], model[0] = c16, torch.ones(8, dtype=torch.float16)
    ema_update(ema, model, 0.5, backend="triton")
    ref = torch.tensor([0.5] * 4).view(torch.float16).float()
    assert_close(c16.float(), 0.5 * ref + 0.5, *tolerance(torch.float16, 1), "fp16 view")


def test_unaligned_tensors_use_the_unhinted_variant():
    """Views that start 4 bytes into their storage are not 16-byte aligned: their group launches the
    kernel without alignment hints (on a GPU the hinted variant would fault on them)."""
    ema_mod._PLANS.clear()
    ema_mod._BY_ID.clear()
    g = torch.Generator().manual_seed(12)
    base_e, base_m = torch.randn(5000, generator=g), torch.randn(5000, generator=g)
    ema = [base_e[1:4097], torch.randn(3000, generator=g)]           # 4097 elements: 2 full tiles + 1
    model = [base_m[1:4097], torch.randn(3000, generator=g)]
    assert ema[0].data_ptr() % 16 != 0 and ema[1].data_ptr() % 16 == 0
    check(ema, model, 0.3)
    launches, fb_e, _ = next(iter(ema_mod._PLANS.values())).groups()
    assert sorted(l[5] for l in launches) == [False, True] and not fb_e


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



def _aliased_cases():
    """(name, make) -> (ema list, model list, the storage both live in). 4097 elements: 3 tiles of 2048."""
    def overlap_forward():    # ema = buf[5:], model = buf[:-5]: each tile's ema is the next tile's model
        base = torch.randn(4200, generator=torch.Generator().manual_seed(20))
        return [base[5:4102]], [base[0:4097]], base

    def overlap_backward():   # model = buf[5:], ema = buf[:-5]
        base = torch.randn(4200, generator=torch.Generator().manual_seed(21))
        return [base[0:4097]], [base[5:4102]], base

    def same_ema_twice():     # a tied parameter listed twice
        g = torch.Generator().manual_seed(22)
        base, m = torch.randn(4097, generator=g), torch.randn(4097, generator=g)
        return [base, base], [m, m], base

    def ema_is_other_model():  # ema 0 is model 1
        base = torch.randn(3 * 4097, generator=torch.Generator().manual_seed(23))
        a, b, c = base.split(4097)
        return [a, b], [b, c], base

    def ema_is_own_model():   # the very same tensor on both sides
        base = torch.randn(4097, generator=torch.Generator().manual_seed(24))
        return [base], [base], base
    return [overlap_forward, overlap_backward, same_ema_twice, ema_is_other_model, ema_is_own_model]


@pytest.mark.parametrize("make_case", _aliased_cases(), ids=lambda f: f.__name__)
def test_aliased_tensors_run_the_reference_or_are_refused(make_case):
    """Ema tensors sharing memory with each other or with model tensors: the kernel's tiles would read values
    other tiles already wrote (order-dependent results; measured here before the fix: up to 1.3 off). The
    plan flags them, "triton" refuses them in one line, the custom op (torch.compile's path) and "auto"
    compute the reference."""
    ema_mod._PLANS.clear()
    ema_mod._BY_ID.clear()
    ema, model, base = make_case()
    e_ref, m_ref, want = make_case()                                 # the same values, own storage
    ema_update_reference(e_ref, m_ref, 0.5)
    assert ema_mod._plan(ema, model).aliasing is not None          # "auto" takes the reference
    with pytest.raises(ValueError, match="share memory") as err:
        ema_update(ema, model, 0.5, backend="triton")
    assert "\n" not in str(err.value) and "backend='torch'" in str(err.value)
    assert torch.equal(base, make_case()[2]), "refused, but written"
    torch.ops.effdet.ema_update_(list(ema), list(model), None, 0.5)
    assert_close(base, want, *tolerance(torch.float32), "custom op on aliased tensors")


def test_views_of_one_storage_that_do_not_overlap_stay_on_the_kernel():
    """Adjacent, disjoint views of one buffer (a flat parameter buffer) share a storage but no element: no
    aliasing, the kernel runs."""
    ema_mod._PLANS.clear()
    ema_mod._BY_ID.clear()
    g = torch.Generator().manual_seed(25)
    eb, mb = torch.randn(3 * 4097, generator=g), torch.randn(3 * 4097, generator=g)
    ema, model = list(eb.split(4097)), list(mb.split(4097))
    assert ema_mod._plan(ema, model).aliasing is None
    check(ema, model, 0.5)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_update_bumps_autograd_versions(backend):
    """The kernel writes through raw addresses; autograd must still see an in-place change of a tensor it
    saved for backward (and refuse the stale gradient), as it does for the reference's foreach ops."""
    ema, model = make([(4,), (3, 2)], torch.float32)
    w = torch.ones(4, requires_grad=True)
    y = (w * ema[0]).sum()                                             # saves ema[0] for backward
    versions = [e._version for e in ema]
    ema_update(ema, model, 0.9, backend=backend)
    assert all(e._version > v for e, v in zip(ema, versions))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


@pytest.mark.parametrize("decay", [0.9998, 0.999])
def test_float_decay_weight_is_rounded_as_the_reference_rounds_it(decay):
    """1 - decay in double, then fp32 (what the reference multiplies by), not 1 - fp32(decay): for decay
    0.9998 those differ by 1.3e-4 relatively, which a large model - ema difference shows."""
    ema, model = [torch.zeros(5)], [torch.full((5,), 1e4)]
    ema_ref = [torch.zeros(5)]
    ema_update(ema, model, decay, backend="triton")
    ema_update_reference(ema_ref, model, decay)
    rel = ((ema[0] - ema_ref[0]).abs() / ema_ref[0].abs()).max().item()
    assert rel < 1e-6, f"triton {ema[0][0].item()!r} vs reference {ema_ref[0][0].item()!r}: rel {rel:.2e}"

def test_torch_compile_fullgraph_cpu():
    ema, model = make([(3, 4), (5,)], torch.float32, seed=9)
    expected = lerp_expected(ema, model, 0.8)
    decay = torch.tensor(0.8)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(e, m):
        torch.ops.effdet.ema_update_(e, m, decay, 0.0)          # the custom op (on CPU: the kernel, interpreted)

    step(ema, model)
    for e, x in zip(ema, expected):
        assert_close(e, x, *tolerance(torch.float32), "compiled custom op")

    ema2, model2 = make([(3, 4), (5,)], torch.float32, seed=9)
    torch.compile(lambda e, m: ema_update(e, m, decay, backend="torch"), fullgraph=True, backend="eager")(
        ema2, model2)
    for e, x in zip(ema2, expected):
        assert_close(e, x, *tolerance(torch.float32), "compiled public fn")


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
        assert_close(e, x, *tolerance(torch.float32), "inductor")


# --------------------------------------------------------------------------------------------------
# GPU code generation without a GPU: compile the kernels for sm_90 with the real Triton compiler


def test_kernel_compiles_for_cuda_without_gpu():
    sig = {"table_ptr": "*i64", "n_tensors": "i32", "decay_ptr": "*fp32", "weight_value": "fp32"}
    aot_compile("kernels.ema", [
        ("_ema_kernel", sig, {"EMA_DTYPE": "tl.float32", "MODEL_DTYPE": "tl.float32", "DECAY_FROM_PTR": True,
                              "ALIGNED": True, "BLOCK": 2048}),
        ("_ema_kernel", sig, {"EMA_DTYPE": "tl.bfloat16", "MODEL_DTYPE": "tl.float32", "DECAY_FROM_PTR": False,
                              "ALIGNED": False, "BLOCK": 2048})])


VECTOR_SCRIPT = r"""
import importlib, re, sys
import triton, triton.language as tl
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
mod = importlib.import_module("kernels.ema")
sig = {"table_ptr": "*i64", "n_tensors": "i32", "decay_ptr": "*fp32", "weight_value": "fp32"}
for dt in ("float32", "bfloat16"):
    for aligned in (True, False):
        const = {"EMA_DTYPE": getattr(tl, dt), "MODEL_DTYPE": getattr(tl, dt), "DECAY_FROM_PTR": True,
                 "ALIGNED": aligned, "BLOCK": 2048}
        k = triton.compile(ASTSource(fn=mod._ema_kernel, signature=dict(sig, **{c: "constexpr" for c in const}),
                                     constexprs=const), target=GPUTarget("cuda", 90, 32))
        ptx = k.asm["ptx"]
        print(dt, aligned, len(re.findall(r"ld\.global\.v4", ptx)), len(re.findall(r"st\.global\.v4", ptx)))
"""


def test_aligned_full_tiles_compile_to_vector_accesses():
    """sm_90: the aligned variant reads and writes full tiles with 16-byte vectors (ld.global.v4 ->
    LDG.E.128), for fp32 and bf16 (8 elements per access); the unaligned variant has none."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    if torch.cuda.is_available():
        pytest.skip("real CUDA present: the cuda-marked tests run the kernel")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", VECTOR_SCRIPT], env=env, cwd=root, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = {(dt, al == "True"): (int(ld), int(st))
              for dt, al, ld, st in (line.split() for line in proc.stdout.split("\n") if line.strip())}
    for dt in ("float32", "bfloat16"):
        assert min(counts[(dt, True)]) > 0, counts
        assert counts[(dt, False)] == (0, 0), counts


# --------------------------------------------------------------------------------------------------
# host overhead per step


def test_host_time_per_call_for_d0_lists(monkeypatch):
    """ema_update on D0's float parameters + buffers (the lists ModelEma passes every step) costs at most
    0.3 ms of host time per call with the kernel launch stubbed out: no per-call validation, grouping or
    table building once the plan is cached; what is left is the plan's key, passes reading every tensor's
    address and element count (to notice storage moved by ``.to()`` or resized), the identity check, plus a
    constant. Median of 50 calls, the smallest of 3 such medians, as this thread's CPU time. On the shared
    2-core CPU the key's passes alone vary 2x with the load, so a call is also accepted within 2x of that
    bare key timed alongside (the old per-call validation and grouping was >10x)."""
    import statistics
    import time

    from detector import create_model
    from detector.ema import ModelEma

    torch.manual_seed(0)
    model = create_model("efficientdet_d0", num_classes=90, image_size=128, backend="torch")
    ema = ModelEma(model, decay=0.999, backend="triton")
    floats, sources, _, _ = ema._split(model)
    assert len(floats) > 600                                     # D0: ~640 floating tensors
    launches = []

    class StubKernel:                                            # records the launch, runs nothing
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(grid)
    monkeypatch.setattr(ema_mod, "_ema_kernel", StubKernel())
    ema_mod._PLANS.clear()
    ema_mod._BY_ID.clear()
    decay = torch.tensor(0.999)
    for _ in range(3):                                           # warm-up: the plan is built once here
        ema_update(floats, sources, decay, backend="triton")
    calls, scans = [], []
    for _ in range(3):
        times, base = [], []
        for _ in range(50):
            t0 = time.thread_time()
            ema_update(floats, sources, decay, backend="triton")
            t1 = time.thread_time()
            ema_mod._key(floats), ema_mod._key(sources)
            base.append(time.thread_time() - t1)
            times.append(t1 - t0)
        calls.append(statistics.median(times) * 1e3)
        scans.append(statistics.median(base) * 1e3)
    assert len(launches) == 153 and len(ema_mod._PLANS) == 1      # one launch per call: one dtype group
    call_ms, scan_ms = min(calls), min(scans)
    print(f"ema_update host time per call {call_ms:.3f} ms; bare key {scan_ms:.3f} ms")
    assert call_ms <= 0.3 or call_ms <= 2.0 * scan_ms, \
        f"host time per ema_update call {call_ms:.3f} ms > 0.3 ms and > 2x the plan's key ({scan_ms:.3f} ms)"
