"""kernels.bifpn_fusion: Triton (interpreter / CUDA) vs the PyTorch reference vs effdet's modules."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.bifpn_fusion import (bifpn_fusion, bifpn_fusion_custom_op, bifpn_fusion_reference,
                                  normalized_edge_weights)

try:
    from effdet.efficientdet import FpnCombine, SeparableConv2d
except Exception as e:  # pragma: no cover
    FpnCombine = None
    _effdet_error = repr(e)

from .aot import aot_compile

_RTOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-7}
_ATOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-9}


def assert_close(name, got, ref, dtype, length=1):
    """Tolerance by dtype (design.md section 5), atol scaled by sqrt(reduction length) and magnitude.
    On mismatch the first few mismatching elements are printed."""
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} vs {tuple(ref.shape)}"
    assert got.dtype == ref.dtype, f"{name}: dtype {got.dtype} vs {ref.dtype}"
    g, r = got.detach().double().cpu(), ref.detach().double().cpu()
    rtol = _RTOL[dtype]
    atol = _ATOL[dtype] * math.sqrt(max(length, 1)) * max(1.0, r.abs().max().item() if r.numel() else 1.0)
    bad = ~((g - r).abs() <= atol + rtol * r.abs())
    if bad.any():
        idx = bad.nonzero()[:5]
        rows = [f"  {tuple(i.tolist())}: got {g[tuple(i)].item():.8g} ref {r[tuple(i)].item():.8g}" for i in idx]
        raise AssertionError(f"{name}: {int(bad.sum())}/{bad.numel()} mismatches (rtol {rtol}, atol {atol:.3g})\n"
                             + "\n".join(rows))


def in_size(mode, out, pool_padding, pick=0):
    """An input size that `mode` maps to `out` (pick selects between the valid ones)."""
    if mode == "same":
        return out
    if mode == "up":
        return max(1, [(out + 1) // 2, out // 3, out - 1][pick % 3])
    return [2 * out, 2 * out - 1][pick % 2] if out > 1 else [1, 2][pick % 2]


def make_case(C, H, W, modes, method, pool_padding, channels_last, dtype, B=2, seed=0, pick=0,
              device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    xs = []
    for k, m in enumerate(modes):
        x = torch.randn(B, C, in_size(m, H, pool_padding, pick + k), in_size(m, W, pool_padding, pick + 2 * k),
                        generator=gen)
        x = x.to(device=device, dtype=dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        xs.append(x.requires_grad_())
    ew = None
    if method != "sum":
        ew = (torch.rand(len(modes), generator=gen) * 1.5 - 0.25).to(device).requires_grad_()  # some negative
    dw = torch.randn(C, 1, 3, 3, generator=gen).to(device).requires_grad_()
    return xs, ew, dw


def compare(C, H, W, modes, method, pool_padding, channels_last, dtype, B=2, seed=0, pick=0, device="cpu"):
    xs, ew, dw = make_case(C, H, W, modes, method, pool_padding, channels_last, dtype, B, seed, pick, device)
    params = [*xs, dw] + ([ew] if ew is not None else [])
    ref = bifpn_fusion(xs, modes, ew, dw, (H, W), method, pool_padding, backend="torch")
    out = bifpn_fusion(xs, modes, ew, dw, (H, W), method, pool_padding, backend="triton")
    assert out.dtype == dtype and out.shape == (B, C, H, W)
    first_cl = xs[0].is_contiguous(memory_format=torch.channels_last) and not xs[0].is_contiguous()
    assert out.is_contiguous(memory_format=torch.channels_last if first_cl else torch.contiguous_format)
    assert_close("forward", out, ref, dtype, 9 * len(modes))
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed + 1)).to(device=device, dtype=dtype)
    gref = torch.autograd.grad(ref, params, g)
    gout = torch.autograd.grad(out, params, g)
    for k, x in enumerate(xs):
        fan = 9 * math.ceil(H / x.shape[2]) * math.ceil(W / x.shape[3])
        assert_close(f"grad input {k} ({modes[k]})", gout[k], gref[k], dtype, fan)
        assert gout[k].stride() == x.stride()
    assert_close("grad dw_weight", gout[len(xs)], gref[len(xs)], torch.float32 if dtype != torch.bfloat16 else dtype,
                 B * H * W)
    if ew is not None:
        assert_close("grad edge_weights", gout[-1], gref[-1], torch.float32 if dtype != torch.bfloat16 else dtype,
                     B * C * H * W)
    return out, ref


# ---------------------------------------------------------------------------------------------
# Triton (interpreter) vs reference
# ---------------------------------------------------------------------------------------------

CASES = [  # C, H, W, modes, method, pool_padding, channels_last, dtype
    (8, 8, 8, ("same", "up"), "fast", "symmetric", True, torch.float32),  # P3 top-down node
    (8, 5, 5, ("same", "same", "down"), "fast", "symmetric", True, torch.float32),  # bottom-up, odd
    (3, 5, 3, ("same", "same", "down"), "softmax", "same", False, torch.float32),
    (17, 3, 5, ("up", "down"), "sum", "same", True, torch.float32),
    (1, 1, 1, ("same", "up", "down"), "fast", "same", False, torch.float32),
    (17, 2, 3, ("down", "same"), "softmax", "symmetric", False, torch.float32),
    (8, 5, 8, ("same", "up"), "fast", "symmetric", True, torch.float16),
    (3, 3, 2, ("down", "up", "same"), "sum", "same", False, torch.float16),
]


@pytest.mark.parametrize("C,H,W,modes,method,pool_padding,channels_last,dtype", CASES)
def test_triton_matches_reference(C, H, W, modes, method, pool_padding, channels_last, dtype):
    compare(C, H, W, modes, method, pool_padding, channels_last, dtype)


@settings(max_examples=10)
@given(C=st.sampled_from([1, 3, 8, 17]), H=st.sampled_from([1, 2, 3, 5, 8]), W=st.sampled_from([1, 2, 3, 5, 8]),
       modes=st.lists(st.sampled_from(["same", "up", "down"]), min_size=2, max_size=3),
       method=st.sampled_from(["fast", "softmax", "sum"]), pool_padding=st.sampled_from(["symmetric", "same"]),
       channels_last=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float16]),
       pick=st.integers(0, 5), seed=st.integers(0, 1000))
def test_triton_matches_reference_property(C, H, W, modes, method, pool_padding, channels_last, dtype, pick, seed):
    compare(C, H, W, tuple(modes), method, pool_padding, channels_last, dtype, B=1, seed=seed, pick=pick)


def test_maxpool_ties_first_max_wins():
    """Equal values in a pooling window: the gradient goes to the first maximum (row-major), as PyTorch."""
    C, H, W = 2, 3, 3
    down = torch.zeros(1, C, 6, 6)
    down[:, :, 1:3, 1:3] = 1.0  # a 2x2 plateau shared by several windows
    down = down.requires_grad_()
    same = torch.zeros(1, C, H, W, requires_grad=True)
    dw = torch.randn(C, 1, 3, 3)
    for pp in ("symmetric", "same"):
        gs = []
        for be in ("torch", "triton"):
            out = bifpn_fusion([same, down], ["same", "down"], None, dw, (H, W), "sum", pp, backend=be)
            gs.append(torch.autograd.grad(out.sum(), down)[0])
        routed = (gs[1] != 0) == (gs[0] != 0)
        assert routed.all(), f"{pp}: triton\n{gs[1][0, 0]}\nreference\n{gs[0][0, 0]}"
        assert_close(f"{pp} tie gradient", gs[1], gs[0], torch.float32, 36)


def test_upsample_matches_interpolate_on_odd_ratio():
    """Nearest index math in float32 as PyTorch (differs from integer dst*in//out, e.g. 2 -> 82)."""
    x = torch.randn(1, 2, 2, 3)
    dw = torch.zeros(2, 1, 3, 3)
    dw[:, :, 1, 1] = 1.0  # identity conv, so out = silu(upsampled x)
    for be in ("torch", "triton"):
        out = bifpn_fusion([x], ["up"], None, dw, (82, 7), "sum", backend=be)
        want = F.silu(F.interpolate(x, size=(82, 7), mode="nearest"))
        assert_close(f"{be} up 2->82", out, want, torch.float32, 1)


def test_no_grad_forward_and_weights_without_grad():
    xs, ew, dw = make_case(8, 5, 5, ("same", "down"), "fast", "symmetric", True, torch.float32)
    with torch.no_grad():
        a = bifpn_fusion(xs, ["same", "down"], ew, dw, (5, 5), backend="triton")
        b = bifpn_fusion(xs, ["same", "down"], ew, dw, (5, 5), backend="torch")
    assert_close("no-grad forward", a, b, torch.float32, 18)


def test_bad_sizes_raise():
    x = torch.randn(1, 2, 4, 4)
    dw = torch.randn(2, 1, 3, 3)
    with pytest.raises(ValueError):
        bifpn_fusion([x, torch.randn(1, 2, 9, 9)], ["same", "down"], None, dw, (4, 4), "sum")
    with pytest.raises(ValueError):
        bifpn_fusion([x, x], ["same", "left"], None, dw, (4, 4), "sum")
    with pytest.raises(ValueError):
        bifpn_fusion([x, x], ["same", "same"], None, dw, (4, 4), "fast")


def test_normalized_weights():
    w = torch.tensor([1.0, -2.0, 3.0])
    assert torch.allclose(normalized_edge_weights(w, 3, "fast", 1e-4, "cpu"), torch.tensor([1, 0, 3]) / 4.0001)
    assert torch.allclose(normalized_edge_weights(w, 3, "softmax", 1e-4, "cpu"), torch.softmax(w, 0))
    assert torch.equal(normalized_edge_weights(None, 3, "sum", 1e-4, "cpu"), torch.ones(3))


@pytest.mark.parametrize("pool_padding", ["symmetric", "same"])
def test_reference_gradcheck_float64(pool_padding):
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(1, 1, 3, 3, dtype=torch.float64, generator=gen).requires_grad_(),
          torch.randn(1, 1, 2, 2, dtype=torch.float64, generator=gen).requires_grad_(),
          torch.randn(1, 1, 5, 6, dtype=torch.float64, generator=gen).requires_grad_()]
    ew = torch.tensor([0.7, 1.3, 0.4], dtype=torch.float64, requires_grad=True)
    dw = torch.randn(1, 1, 3, 3, dtype=torch.float64, generator=gen, requires_grad=True)

    def fn(x0, x1, x2, ew, dw):
        return bifpn_fusion_reference([x0, x1, x2], ["same", "up", "down"], ew, dw, (3, 3), "fast", pool_padding)

    assert torch.autograd.gradcheck(fn, (*xs, ew, dw))
    assert torch.autograd.gradcheck(
        lambda a, b, w: bifpn_fusion_reference([a, b], ["same", "same"], w, dw, (3, 3), "softmax"),
        (xs[0], xs[0].detach().flip(-1).requires_grad_(), ew[:2].detach().requires_grad_()))


@pytest.mark.skipif(FpnCombine is None, reason="effdet not importable")
@pytest.mark.parametrize("pad_type", ["", "same"])
def test_reference_matches_effdet_modules(pad_type):
    """effdet's FpnCombine (fastattn) + SiLU + SeparableConv2d.conv_dw on a 3-input node."""
    torch.manual_seed(0)
    C = 4
    info = [dict(num_chs=C, size=(5, 5)), dict(num_chs=C, size=(3, 3)), dict(num_chs=C, size=(10, 9))]
    combine = FpnCombine(info, C, (0, 1, 2), output_size=(5, 5), pad_type=pad_type, weight_method="fastattn")
    with torch.no_grad():
        combine.edge_weights.copy_(torch.tensor([0.5, 1.5, -0.2]))
    sep = SeparableConv2d(C, C, 3, padding=pad_type, bias=False, act_layer=None)
    xs = [torch.randn(2, C, *i["size"]) for i in info]
    want = sep.conv_dw(F.silu(combine(xs)))
    pp = "same" if pad_type == "same" else "symmetric"
    got = bifpn_fusion_reference(xs, ["same", "up", "down"], combine.edge_weights, sep.conv_dw.weight, (5, 5),
                                 "fast", pp)
    assert_close("reference vs effdet", got, want, torch.float32, 27)
    tri = bifpn_fusion(xs, ["same", "up", "down"], combine.edge_weights, sep.conv_dw.weight, (5, 5), "fast", pp,
                       backend="triton")
    assert_close("triton vs effdet", tri, want, torch.float32, 27)


@pytest.mark.parametrize("pool_padding", ["symmetric", "same"])
def test_custom_op_cpu_kernels_match_reference(pool_padding):
    """The CPU kernels of effdet::bifpn_fusion_fwd/bwd (reference forward, backward in torch ops)."""
    modes = ("same", "up", "down")
    xs, ew, dw = make_case(5, 5, 3, modes, "softmax", pool_padding, True, torch.float32, pick=1)
    ref = bifpn_fusion_reference(xs, modes, ew, dw, (5, 3), "softmax", pool_padding)
    out = bifpn_fusion_custom_op(xs, modes, ew, dw, (5, 3), "softmax", pool_padding)
    assert_close("custom-op forward", out, ref, torch.float32, 27)
    g = torch.randn_like(ref)
    for k, (a, b) in enumerate(zip(torch.autograd.grad(out, [*xs, ew, dw], g),
                                   torch.autograd.grad(ref, [*xs, ew, dw], g))):
        assert_close(f"custom-op grad {k}", a, b, torch.float32, 64)
        assert a.stride() == b.stride()


def test_compile_fullgraph():
    xs, ew, dw = make_case(3, 4, 4, ("same", "up"), "fast", "symmetric", True, torch.float32, B=1)
    ref = bifpn_fusion_reference(xs, ["same", "up"], ew, dw, (4, 4))
    # the public function with the reference backend
    fn = torch.compile(lambda a, b, w, d: bifpn_fusion([a, b], ["same", "up"], w, d, (4, 4), backend="torch"),
                       fullgraph=True, backend="eager")
    assert_close("compiled torch backend", fn(*xs, ew, dw), ref, torch.float32, 18)
    # the custom ops (CPU kernels = reference), forward and backward through register_autograd
    fn2 = torch.compile(lambda a, b, w, d: bifpn_fusion_custom_op([a, b], ["same", "up"], w, d, (4, 4)),
                        fullgraph=True, backend="aot_eager")
    out = fn2(*xs, ew, dw)
    assert_close("compiled custom op", out, ref, torch.float32, 18)
    g_op = torch.autograd.grad(out.sum(), [*xs, ew, dw])
    g_ref = torch.autograd.grad(ref.sum(), [*xs, ew, dw])
    for k, (a, b) in enumerate(zip(g_op, g_ref)):
        assert_close(f"custom-op grad {k}", a, b, torch.float32, 64)


# ---------------------------------------------------------------------------------------------
# CUDA: real compilation. bf16 only here: the interpreter rounds bf16 stores wrongly (measured: ~48% of
# a bf16 output off by one bf16 ulp versus the reference), so bf16 Triton cases are CUDA-only.
# ---------------------------------------------------------------------------------------------

CUDA_CASES = CASES + [
    (64, 16, 16, ("same", "up"), "fast", "symmetric", True, torch.bfloat16),
    (64, 15, 9, ("same", "same", "down"), "fast", "same", True, torch.bfloat16),
    (224, 32, 32, ("same", "same", "down"), "fast", "symmetric", True, torch.float16),
    (88, 20, 20, ("same", "up"), "softmax", "same", False, torch.float32),
]


@pytest.mark.cuda
@pytest.mark.parametrize("C,H,W,modes,method,pool_padding,channels_last,dtype", CUDA_CASES)
def test_cuda_matches_reference(C, H, W, modes, method, pool_padding, channels_last, dtype):
    compare(C, H, W, modes, method, pool_padding, channels_last, dtype, device="cuda")


@pytest.mark.cuda
def test_cuda_compile_through_custom_op():
    xs, ew, dw = make_case(16, 8, 8, ("same", "down"), "fast", "same", True, torch.float16, device="cuda")
    ref = bifpn_fusion_reference(xs, ["same", "down"], ew, dw, (8, 8), pool_padding="same")
    fn = torch.compile(lambda a, b, w, d: bifpn_fusion([a, b], ["same", "down"], w, d, (8, 8),
                                                       pool_padding="same", backend="triton"), fullgraph=True)
    out = fn(*xs, ew, dw)
    assert_close("compiled triton", out, ref, torch.float16, 18)
    g1 = torch.autograd.grad(out.float().sum(), [*xs, ew, dw])
    g2 = torch.autograd.grad(ref.float().sum(), [*xs, ew, dw])
    for k, (a, b) in enumerate(zip(g1, g2)):
        assert_close(f"compiled grad {k}", a, b, torch.float16, 2048)


# ---------------------------------------------------------------------------------------------
# GPU code generation without a GPU: compile the kernels for sm_90 with the real Triton compiler.
# Argument types as the launchers pass them: out/grad/inputs/gx in the input dtype (fp32/fp16/bf16),
# unused input slots point at the float32 normalized weights, f/gf/partials/weights float32, the
# "up" row/column tables int32 (else the float32 weights again), sizes/strides/pads int32, scales
# float. (BLOCK_P, BLOCK_C) are the CUDA values of _blocks(): (32, 64) for C >= 64, (64, 32), (256, 8),
# (2048, 1). A "down" (mode 2) slot is by far the slowest to compile (81 unrolled window loads), so
# each forward spec holds at most one.
# ---------------------------------------------------------------------------------------------


def _aot_slots(dtypes):
    sig = {}
    for k, dt in enumerate(dtypes):
        sig.update({f"x{k}": dt, f"s{k}b": "i32", f"s{k}c": "i32", f"s{k}h": "i32", f"s{k}w": "i32", f"h{k}": "i32",
                    f"w{k}": "i32", f"pt{k}": "i32", f"pl{k}": "i32", f"sh{k}": "fp32", f"sw{k}": "fp32"})
    return sig


def _aot_specs():
    def fwd(dt, n):
        return {"out_ptr": dt, "so_b": "i32", "so_c": "i32", "so_h": "i32", "so_w": "i32", "f_ptr": "*fp32",
                "nw_ptr": "*fp32", "dw_ptr": "*fp32", "C": "i32", "H": "i32", "W": "i32", "tiles_per_img": "i32",
                **_aot_slots([dt] * n + ["*fp32"] * (3 - n))}

    def bwd(dt, n):
        return {"g_ptr": dt, "sg_b": "i32", "sg_c": "i32", "sg_h": "i32", "sg_w": "i32", "f_ptr": "*fp32",
                "gf_ptr": "*fp32", "pnw_ptr": "*fp32", "pdw_ptr": "*fp32", "nw_ptr": "*fp32", "dw_ptr": "*fp32",
                "C": "i32", "H": "i32", "W": "i32", "tiles_per_img": "i32", **_aot_slots([dt] * n + ["*fp32"] * (3 - n))}

    def inp(dt, table):
        return {"gx_ptr": dt, "x_ptr": dt, "sb": "i32", "sc": "i32", "sh": "i32", "sw": "i32", "hin": "i32",
                "win": "i32", "pad_t": "i32", "pad_l": "i32", "gf_ptr": "*fp32", "nw_ptr": "*fp32", "k": "i32",
                "rows_ptr": table, "cols_ptr": table, "C": "i32", "H": "i32", "W": "i32", "tiles_per_img": "i32"}

    def c(n, m, bp, bc, **kw):
        return dict(N=n, M0=m[0], M1=m[1], M2=m[2], **kw, BLOCK_P=bp, BLOCK_C=bc)

    # "down" inputs (mode 2) unroll a 3x3 window at each of the 9 taps: those variants take 40-60 s each to
    # compile on 2 CPU cores, so they form the slow set; the fast set covers every other mode and dtype.
    fast = [
        ("_bifpn_fwd_kernel", fwd("*fp32", 2), c(2, (0, 1, 0), 32, 64, SAVE_F=True)),
        ("_bifpn_fwd_kernel", fwd("*fp16", 3), c(3, (0, 0, 1), 32, 64, SAVE_F=False)),
        ("_bifpn_bwd_fused_kernel", bwd("*bf16", 2), c(2, (1, 2, 0), 32, 64)),
        ("_bifpn_bwd_fused_kernel", bwd("*fp32", 3), c(3, (2, 0, 1), 256, 8)),
        ("_bifpn_bwd_fused_kernel", bwd("*fp16", 3), c(3, (0, 1, 2), 2048, 1)),
        # backward, kernel 2, once per input: RH/RW = ceil(out/in) + 1 for "up" (3 at 2x), else 1
        ("_bifpn_bwd_input_kernel", inp("*fp32", "*fp32"), dict(MODE=0, RH=1, RW=1, BLOCK_P=32, BLOCK_C=64)),
        ("_bifpn_bwd_input_kernel", inp("*bf16", "*i32"), dict(MODE=1, RH=3, RW=3, BLOCK_P=32, BLOCK_C=64)),
        ("_bifpn_bwd_input_kernel", inp("*fp16", "*i32"), dict(MODE=1, RH=4, RW=2, BLOCK_P=256, BLOCK_C=8))]
    slow = [
        ("_bifpn_fwd_kernel", fwd("*fp16", 2), c(2, (2, 0, 0), 256, 8, SAVE_F=False)),
        ("_bifpn_fwd_kernel", fwd("*bf16", 3), c(3, (1, 2, 0), 2048, 1, SAVE_F=True)),
        ("_bifpn_fwd_kernel", fwd("*fp32", 3), c(3, (0, 1, 2), 64, 32, SAVE_F=False)),
        ("_bifpn_bwd_input_kernel", inp("*fp16", "*fp32"), dict(MODE=2, RH=1, RW=1, BLOCK_P=32, BLOCK_C=64))]
    return fast, slow


def test_kernels_compile_for_cuda_without_gpu():
    aot_compile("kernels.bifpn_fusion", _aot_specs()[0])


@pytest.mark.slow
def test_downsampling_kernels_compile_for_cuda_without_gpu():
    aot_compile("kernels.bifpn_fusion", _aot_specs()[1])
