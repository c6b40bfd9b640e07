"""kernels.decode_boxes / decode_topk: Triton kernels (interpreter on CPU, compiled on CUDA) vs references."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.decode import (BBOX_XFORM_CLIP, decode_boxes, decode_boxes_reference, decode_topk,
                            decode_topk_reference)

from .aot import aot_compile
from .compare import assert_close, tolerance


def make_anchors(n, gen, degenerate=False):
    xy = torch.rand(n, 2, generator=gen) * 300 - 20
    wh = torch.rand(n, 2, generator=gen) * 120 + 1
    if degenerate and n:
        wh[:: 3] = 0.0                                    # zero-size anchors
    return torch.cat([xy, xy + wh], 1)


def make_deltas(shape, gen, dtype=torch.float32, extreme=False):
    d = torch.randn(shape, generator=gen)
    if extreme and d.numel():
        flat = d.view(-1, 4)
        flat[::2, 2:] = 50.0                              # beyond the exp clamp
        flat[1::3, 2:] = -60.0
        flat[::5, :2] = 1e3
    return d.to(dtype)


def box_tol(deltas, anchors):
    """Both paths compute in fp32 from inputs that fp32 holds exactly, so the fp32 rule applies. A coordinate
    is a short sum (anchor centre + delta x anchor size, +- half the decoded size), so its absolute error
    follows the largest of those terms *of its own box*, not its own value (cancellation) nor the largest
    box of the batch: a per-box ``(..., N, 1)`` absolute tolerance."""
    rtol, atol = tolerance(torch.float32, n_accum=4)
    d, a = deltas.double(), anchors.double()
    wa, ha = a[..., 2] - a[..., 0], a[..., 3] - a[..., 1]
    clamp = lambda v: v.clamp(max=BBOX_XFORM_CLIP)  # noqa: E731  the decode's own clamp before exp
    terms = torch.stack(torch.broadcast_tensors(
        a.abs().amax(-1), d[..., 0] * ha, d[..., 1] * wa, torch.exp(clamp(d[..., 2])) * ha,
        torch.exp(clamp(d[..., 3])) * wa), dim=-1).abs()
    scale = torch.where(torch.isfinite(terms), terms, 0.0).amax(-1, keepdim=True).clamp(min=1.0)
    return rtol, atol * scale


def assert_close_special(got, ref, rtol, atol, what):
    """assert_close with NaN and +-inf compared exactly (compare.assert_close counts inf vs inf as a
    mismatch, since inf - inf is NaN)."""
    assert torch.equal(got.isnan(), ref.isnan()), f"{what}: NaN positions differ"
    assert torch.equal(got.isinf(), ref.isinf()), f"{what}: inf positions differ"
    inf = ref.isinf()
    assert torch.equal(got[inf], ref[inf]), f"{what}: inf signs differ"
    assert_close(torch.where(inf, 0.0, got), torch.where(inf, 0.0, ref), rtol, atol, what)


CLIP_KINDS = ["none", "pair", "tensor", "tensor_broadcast"]


def clip_arg(kind, batch_shape, gen):
    if kind == "none":
        return None
    if kind == "pair":
        return (200, 150.5)
    if kind == "tensor":
        return torch.rand(*batch_shape, 2, generator=gen) * 300 + 10
    return torch.tensor([120.0, 250.0])


# --------------------------------------------------------------------------------------------------
# references


def test_reference_matches_effdet_and_clamp():
    anchors_mod = pytest.importorskip("effdet.anchors")
    g = torch.Generator().manual_seed(0)
    a = make_anchors(40, g)
    d = make_deltas((40, 4), g)
    expected = anchors_mod.decode_box_outputs(d, a[:, [1, 0, 3, 2]], output_xyxy=True)   # effdet: yxyx anchors
    assert_close(decode_boxes_reference(d, a), expected, 1e-5, 1e-4, "vs effdet")
    # clamp: dh, dw beyond log(1000/16) give the same box as exactly log(1000/16)
    d2 = d.clone()
    d2[:, 2:] = 80.0
    d3 = d.clone()
    d3[:, 2:] = BBOX_XFORM_CLIP
    out = decode_boxes_reference(d2, a)
    assert torch.isfinite(out).all()
    assert torch.equal(out, decode_boxes_reference(d3, a))


def test_reference_gradcheck():
    g = torch.Generator().manual_seed(1)
    a = make_anchors(5, g).double()
    d = (torch.randn(2, 5, 4, generator=g) * 0.5).double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: decode_boxes_reference(v, a, (400.0, 400.0)), (d,))


# --------------------------------------------------------------------------------------------------
# decode_boxes, Triton


@settings(max_examples=20)
@given(lead=st.sampled_from([(), (1,), (3,), (2, 2)]), n=st.integers(1, 37),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       clip=st.sampled_from(CLIP_KINDS), extreme=st.booleans(), degenerate=st.booleans(),
       seed=st.integers(0, 999))
def test_decode_boxes_matches_reference(lead, n, dtype, clip, extreme, degenerate, seed):
    # bf16 reads are exact in the interpreter and all outputs are fp32, so bf16 runs here too.
    g = torch.Generator().manual_seed(seed)
    a = make_anchors(n, g, degenerate)
    d = make_deltas((*lead, n, 4), g, dtype, extreme)
    c = clip_arg(clip, lead, g)
    got = decode_boxes(d, a, c, backend="triton")
    ref = decode_boxes_reference(d, a, c)
    assert got.dtype == torch.float32 and got.shape == d.shape
    assert torch.isfinite(got).all()
    assert_close(got, ref, *box_tol(d, a), f"boxes clip={clip}")
    if clip != "none":
        assert (got >= 0).all()


@settings(max_examples=15)
@given(n=st.integers(1, 20), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       clip=st.sampled_from(CLIP_KINDS), seed=st.integers(0, 999),
       where=st.sampled_from(["deltas", "anchors", "clip"]))
def test_decode_boxes_nan_inf_like_reference(n, dtype, clip, seed, where):
    """NaN / +-inf in deltas, anchors or per-image clip sizes: the same NaN / inf as the reference
    (NaN must not turn into a finite clipped box)."""
    g = torch.Generator().manual_seed(seed)
    a = make_anchors(n, g)
    d = make_deltas((2, n, 4), g).to(dtype)
    c = clip_arg(clip, (2,), g)
    special = torch.tensor([float("nan"), float("inf"), -float("inf")])
    pick = lambda t: special[torch.randint(0, 3, t.shape, generator=g)]  # noqa: E731
    hit = lambda t: torch.rand(t.shape, generator=g) < 0.3  # noqa: E731
    if where == "deltas":
        d = torch.where(hit(d), pick(d).to(dtype), d)
    elif where == "anchors":
        a = torch.where(hit(a), pick(a), a)
    elif isinstance(c, torch.Tensor):
        c = torch.where(hit(c), pick(c), c)
    elif c is not None:  # a (height, width) pair of numbers: one of them special
        k = int(torch.randint(0, 2, (), generator=g))
        c = tuple(float(special[int(torch.randint(0, 3, (), generator=g))]) if i == k else v for i, v in enumerate(c))
    else:  # no clip to make special: make both deltas and anchors so instead
        d = torch.where(hit(d), pick(d).to(dtype), d)
        a = torch.where(hit(a), pick(a), a)
    got = decode_boxes(d, a, c, backend="triton")
    ref = decode_boxes_reference(d, a, c)
    assert_close_special(got, ref, *box_tol(d, a), f"special {where} clip={clip}")


def test_decode_boxes_nan_delta_stays_nan():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 4)
    nan, inf = float("nan"), float("inf")
    d = torch.tensor([[nan, 0, 0, 0], [0, 0, nan, 0], [0, 0, 0, inf], [0, 0, -inf, 0]])
    for clip in (None, (5.0, 5.0), torch.tensor([5.0, 5.0])):
        got = decode_boxes(d, a, clip, backend="triton")
        assert got[0, 1].isnan() and got[0, 3].isnan() and got[1, 1].isnan() and got[1, 3].isnan()
        # only the NaN coordinates are non-finite: +-inf log-sizes are clamped (effdet's exp clamp), clip or not
        assert torch.isfinite(got[0, [0, 2]]).all() and torch.isfinite(got[2:]).all()
        assert_close_special(got, decode_boxes_reference(d, a, clip), *tolerance(torch.float32), f"clip {clip}")


def test_decode_boxes_clip_values():
    a = torch.tensor([[10.0, 10.0, 30.0, 50.0], [0.0, 0.0, 100.0, 100.0]])
    d = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]],
                      [[-5.0, 5.0, 0.0, 0.0], [0.0, 0.0, 100.0, 100.0]]])
    out = decode_boxes(d, a, torch.tensor([[60.0, 25.0], [40.0, 1000.0]]), backend="triton")
    assert_close(out[0, 0], torch.tensor([10.0, 10.0, 25.0, 50.0]), 0, 1e-5, "x clipped to W=25")
    assert_close(out[1, 0], torch.tensor([110.0, 0.0, 130.0, 0.0]), 0, 1e-5, "y clipped, x inside")
    assert_close(out[1, 1], torch.tensor([0.0, 0.0, 1000.0, 40.0]), 0, 1e-5, "clamped exp, clipped")
    unclipped = decode_boxes(d, a, backend="triton")[1, 1]
    big = 100.0 * 1000.0 / 16.0                          # exp(log(1000/16)) * 100
    assert_close(unclipped, torch.tensor([50 - big / 2, 50 - big / 2, 50 + big / 2, 50 + big / 2]), 1e-6, 1e-3,
                 "clamped exp")


def test_decode_boxes_empty():
    a = torch.zeros(0, 4)
    assert decode_boxes(torch.zeros(3, 0, 4), a, backend="triton").shape == (3, 0, 4)
    assert decode_boxes(torch.zeros(0, 5, 4), torch.zeros(5, 4), (10, 10), backend="triton").shape == (0, 5, 4)


def test_decode_boxes_validation():
    with pytest.raises(ValueError, match="anchors"):
        decode_boxes(torch.zeros(2, 5, 4), torch.zeros(4, 4))
    with pytest.raises(ValueError, match=r"\(\.\.\., N, 4\)"):
        decode_boxes(torch.zeros(2, 5, 3), torch.zeros(5, 4))
    with pytest.raises(ValueError, match="clip_to"):
        decode_boxes(torch.zeros(2, 5, 4), torch.zeros(5, 4), torch.zeros(3, 2))


@pytest.mark.parametrize("what", ["anchors", "clip_to"])
def test_inputs_that_need_a_gradient_are_refused_by_triton_and_get_one_from_the_reference(what):
    """Anchors or a clip_to tensor with requires_grad: the Triton op has no backward, so "triton" refuses them
    by name up front (it used to run, and fail only at backward with autograd's register_autograd message)
    and "auto" runs the reference, which gives the gradient."""
    import kernels.decode as dec

    g = torch.Generator().manual_seed(30)
    a = make_anchors(6, g)
    d = make_deltas((2, 6, 4), g)
    logits = torch.randn(2, 6, 3, generator=g)
    clip = torch.tensor([[400.0, 420.0], [60.0, 70.0]])             # image 0 hardly clipped, image 1 much
    a_in = a.clone().requires_grad_(what == "anchors")
    c_in = clip.clone().requires_grad_(what == "clip_to")
    name = "anchors that need" if what == "anchors" else "a clip_to tensor that needs"
    for call in (lambda be: decode_boxes(d, a_in, c_in, backend=be),
                 lambda be: decode_topk(logits, d, a_in, 5, c_in, backend=be)[0]):
        with pytest.raises(ValueError, match=f"the Triton path cannot take {name} a gradient") as e:
            call("triton")
        assert "\n" not in str(e.value)
        assert dec._triton_unsupported(d, a_in, c_in) is not None       # "auto" on CUDA: the reference
        out = call("auto")
        leaf = a_in if what == "anchors" else c_in
        (grad,) = torch.autograd.grad(out.sum(), leaf)
        assert grad.abs().sum() > 0
        with torch.no_grad():                                            # no gradient wanted: Triton is fine
            assert dec._triton_unsupported(d, a_in, c_in) is None
            assert_close(call("triton"), out.detach(), 1e-5, 1e-3, "no-grad triton")


@pytest.mark.parametrize("clip", CLIP_KINDS)
def test_decode_boxes_several_programs(clip):
    """450 boxes = 2 programs of 256 (the test above draws at most 148): box and image indices across the
    block boundary, each image's clip size read by lanes of both programs (N = 150 does not divide 256)."""
    g = torch.Generator().manual_seed(31)
    a = make_anchors(150, g, degenerate=True)
    d = make_deltas((3, 150, 4), g, extreme=True)
    c = clip_arg(clip, (3,), g)
    got = decode_boxes(d, a, c, backend="triton")
    assert_close(got, decode_boxes_reference(d, a, c), *box_tol(d, a), f"boxes clip={clip}")


# --------------------------------------------------------------------------------------------------
# decode_topk, Triton


def picked(deltas, anchor_index):
    """(B, N, 4) deltas at the (B, k) chosen anchors -> (B, k, 4)."""
    return torch.gather(deltas, 1, anchor_index.unsqueeze(-1).expand(-1, -1, 4))


def check_topk(logits, deltas, anchors, k, clip, device="cpu"):
    args = [t.to(device) for t in (logits, deltas, anchors)]
    clip = clip.to(device) if isinstance(clip, torch.Tensor) else clip
    got = decode_topk(*args, k, clip, backend="triton")
    ref = decode_topk_reference(*args, k, clip)
    kk = min(k, logits.shape[1] * logits.shape[2])
    B = logits.shape[0]
    for t, shape, dt in zip(got, [(B, kk, 4), (B, kk), (B, kk), (B, kk)],
                            [torch.float32, torch.float32, torch.int64, torch.int64]):
        assert t.shape == shape and t.dtype == dt, (t.shape, t.dtype)
    assert torch.equal(got[2].cpu(), ref[2].cpu()), "classes"
    assert torch.equal(got[3].cpu(), ref[3].cpu()), "anchor_index"
    assert_close(got[0], ref[0], *box_tol(picked(args[1], got[3]), args[2][got[3]]), "boxes")
    assert_close(got[1], ref[1], 1e-6, 1e-7, "scores")
    assert torch.isfinite(got[0]).all()
    # consistency with the inputs: class/anchor index reproduce the chosen logit, scores sorted
    flat = got[3] * logits.shape[2] + got[2]
    chosen = torch.gather(args[0].reshape(B, -1), 1, flat)
    assert_close(got[1], torch.sigmoid(chosen.float()), 1e-6, 1e-7, "score = sigmoid(chosen logit)")
    assert (got[1][:, 1:] <= got[1][:, :-1]).all()
    return got


@settings(max_examples=15)
@given(b=st.integers(1, 3), n=st.integers(1, 30), c=st.integers(1, 11), k=st.integers(1, 60),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       clip=st.sampled_from(["none", "pair", "tensor"]), extreme=st.booleans(), seed=st.integers(0, 999))
def test_decode_topk_matches_reference(b, n, c, k, dtype, clip, extreme, seed):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(b, n, c, generator=g) * 4).to(dtype)
    if extreme:
        logits.view(-1)[::7] = 1e4 if dtype != torch.float16 else 6e4
        logits.view(-1)[1::7] = -1e4 if dtype != torch.float16 else -6e4
    check_topk(logits, make_deltas((b, n, 4), g, dtype, extreme), make_anchors(n, g), k,
               clip_arg(clip, (b,), g))


def test_decode_topk_several_programs():
    """3 images x k = 120 = 360 selections: 2 programs of 256, the second starting inside image 3."""
    g = torch.Generator().manual_seed(32)
    logits = torch.randn(3, 90, 5, generator=g) * 3
    check_topk(logits, make_deltas((3, 90, 4), g, extreme=True), make_anchors(90, g), 120,
               clip_arg("tensor", (3,), g))


def test_decode_topk_nan_inf_logits_and_deltas():
    """NaN logits are chosen first (torch.topk's order) and score NaN; +-inf logits score 1 / 0; NaN
    deltas decode to NaN boxes; same as the reference."""
    g = torch.Generator().manual_seed(12)
    logits = torch.randn(2, 9, 3, generator=g)
    logits[0, 2, 1] = float("nan")
    logits[0, 4, 0] = float("inf")
    logits[1, 0, 2] = -float("inf")
    logits[1, 7, 0] = float("nan")
    deltas = make_deltas((2, 9, 4), g)
    deltas[0, 2, 0] = float("nan")
    deltas[1, 7, 3] = float("nan")
    deltas[1, 3, 2] = float("inf")
    anchors = make_anchors(9, g)
    for clip in (None, (50.0, 60.0), torch.tensor([[50.0, 60.0], [float("nan"), 40.0]])):
        got = decode_topk(logits, deltas, anchors, 27, clip, backend="triton")
        ref = decode_topk_reference(logits, deltas, anchors, 27, clip)
        assert torch.equal(got[2], ref[2]) and torch.equal(got[3], ref[3])
        assert_close_special(got[0], ref[0], *box_tol(picked(deltas, ref[3]), anchors[ref[3]]), f"boxes clip {clip}")
        assert_close(got[1], ref[1], *tolerance(torch.float32), "scores")
        assert got[1][0, 0].isnan() and got[1][0, 1] == 1.0 and got[1][1, -1] == 0.0
        assert got[0][0, 0].isnan().any()


def test_decode_topk_ties_and_large_k():
    g = torch.Generator().manual_seed(3)
    logits = torch.zeros(2, 6, 3)                       # all tied
    logits[1, 4, 2] = 1.0
    got = check_topk(logits, make_deltas((2, 6, 4), g), make_anchors(6, g), 100, None)  # k > N*C
    assert got[1].shape == (2, 18)
    assert got[2][1, 0].item() == 2 and got[3][1, 0].item() == 4
    assert got[1][0, 0].item() == 0.5


def test_decode_topk_empty_and_zero_k():
    g = torch.Generator().manual_seed(4)
    out = decode_topk(torch.zeros(2, 0, 3), torch.zeros(2, 0, 4), torch.zeros(0, 4), 10, backend="triton")
    assert [tuple(t.shape) for t in out] == [(2, 0, 4), (2, 0), (2, 0), (2, 0)]
    out = decode_topk(torch.randn(2, 5, 3, generator=g), make_deltas((2, 5, 4), g), make_anchors(5, g), 0,
                      backend="triton")
    assert out[0].shape == (2, 0, 4)


# --------------------------------------------------------------------------------------------------
# the two-stage top-k of the reference vs the flat torch.topk (the oracle, kept here)


def _flat_topk_oracle(logits, k):
    B, N, C = logits.shape
    return torch.topk(logits.reshape(B, N * C), max(0, min(k, N * C)), dim=1, sorted=True)


def _check_topk_select(logits, k):
    """decode_topk_reference's selection vs the flat top-k: the same values in the same order (NaN first),
    distinct (anchor, class) pairs that hold those values, every logit above the k-th value chosen, and the
    same set when nothing else ties with the k-th value."""
    B, N, C = logits.shape
    g = torch.Generator().manual_seed(0)
    deltas, anchors = make_deltas((B, N, 4), g), make_anchors(N, g)
    _, scores, classes, anchor_index = decode_topk_reference(logits, deltas, anchors, k)
    want = _flat_topk_oracle(logits, k)
    kk = want.values.shape[1]
    assert classes.shape == (B, kk) and anchor_index.shape == (B, kk)
    assert ((classes >= 0) & (classes < C) & (anchor_index >= 0) & (anchor_index < N)).all()
    flat = anchor_index * C + classes
    got_vals = torch.gather(logits.reshape(B, N * C), 1, flat)
    assert torch.equal(got_vals.isnan(), want.values.isnan()), "NaN positions"
    assert torch.equal(torch.nan_to_num(got_vals, nan=0.0), torch.nan_to_num(want.values, nan=0.0)), "values"
    torch.testing.assert_close(scores, torch.sigmoid(want.values.float()), equal_nan=True)
    x = logits.reshape(B, N * C)
    for b in range(B):
        assert flat[b].unique().numel() == kk, "an (anchor, class) chosen twice"
        if kk == 0:
            continue
        v = want.values[b, -1]
        above = torch.zeros_like(x[b], dtype=torch.bool) if v.isnan() else (x[b].isnan() | (x[b] > v))
        tied = x[b].isnan() if v.isnan() else (x[b] == v)
        chosen = torch.zeros_like(above)
        chosen[flat[b]] = True
        assert (chosen[above]).all(), "a logit above the k-th value was left out"
        assert (above | tied)[chosen].all(), "a logit below the k-th value was chosen"
        if int(tied.sum()) == int((want.values[b] == v).sum() if not v.isnan() else want.values[b].isnan().sum()):
            assert torch.equal(chosen, torch.zeros_like(chosen).index_fill_(0, want.indices[b], True)), "set"


_LOGIT_VALUES = [-2.0, -1.0, 0.0, 0.5, 1.0, 3.0, float("inf"), -float("inf"), float("nan")]


@settings(max_examples=60, deadline=None)
@given(b=st.integers(1, 3), n=st.integers(1, 24), c=st.integers(1, 7), k=st.integers(0, 60),
       ties=st.booleans(), special=st.booleans(), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       seed=st.integers(0, 10_000))
def test_two_stage_topk_matches_flat_topk(b, n, c, k, ties, special, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    if ties:  # few distinct values: ties everywhere, also at the k-th value
        pool = torch.tensor(_LOGIT_VALUES if special else _LOGIT_VALUES[:6])
        logits = pool[torch.randint(0, pool.numel(), (b, n, c), generator=g)]
    else:
        logits = torch.randn(b, n, c, generator=g) * 3
        if special:
            m = torch.rand(b, n, c, generator=g)
            logits[m < 0.05] = float("nan")
            logits[(m >= 0.05) & (m < 0.1)] = float("inf")
            logits[(m >= 0.1) & (m < 0.15)] = -float("inf")
    _check_topk_select(logits.to(dtype), k)


def test_two_stage_topk_cases():
    g = torch.Generator().manual_seed(21)
    # one anchor holds all of the best logits: stage 1 must keep it, stage 2 takes several classes from it
    logits = torch.randn(2, 50, 6, generator=g)
    logits[0, 17] = 10 + torch.arange(6.0)
    logits[1, 3, 2] = float("nan")
    logits[1, 3, 4] = float("nan")
    for k in (1, 3, 6, 7, 49, 50, 51, 300, 301):
        _check_topk_select(logits, k)
    _, _, classes, anchor_index = decode_topk_reference(logits, make_deltas((2, 50, 4), g), make_anchors(50, g), 6)
    assert anchor_index[0].tolist() == [17] * 6 and classes[0].tolist() == [5, 4, 3, 2, 1, 0]
    assert anchor_index[1, :2].tolist() == [3, 3] and sorted(classes[1, :2].tolist()) == [2, 4]
    # all logits tied: any k distinct pairs, all of them the tied value
    _check_topk_select(torch.zeros(1, 40, 5), 7)


# --------------------------------------------------------------------------------------------------
# torch.compile


def test_torch_compile_fullgraph_cpu():
    g = torch.Generator().manual_seed(5)
    a = make_anchors(12, g)
    d = make_deltas((2, 12, 4), g)
    logits = torch.randn(2, 12, 4, generator=g)
    hw = torch.tensor([[100.0, 90.0], [80.0, 70.0]])
    ref_boxes = decode_boxes_reference(d, a, hw)
    ref_topk = decode_topk_reference(logits, d, a, 7, hw)

    f = torch.compile(lambda x: decode_boxes(x, a, hw, backend="torch"), fullgraph=True, backend="eager")
    assert_close(f(d), ref_boxes, 1e-6, 1e-5, "compiled public decode_boxes")
    op = torch.compile(lambda x: torch.ops.effdet.decode_boxes(x, a, 2, hw, 0.0, 0.0), fullgraph=True,
                       backend="aot_eager")
    assert_close(op(d), ref_boxes, 1e-6, 1e-5, "compiled custom op decode_boxes")

    def topk_op(lg, x):
        vals, idx = torch.topk(lg.reshape(2, -1), 7, dim=1)
        return torch.ops.effdet.decode_topk_gather(vals, idx, x, a, 2, hw, 0.0, 0.0, 4)
    got = torch.compile(topk_op, fullgraph=True, backend="aot_eager")(logits, d)
    for x, y in zip(got, ref_topk):
        assert_close(x, y, 1e-6, 1e-5, "compiled custom op decode_topk_gather")
    got = torch.compile(lambda lg, x: decode_topk(lg, x, a, 7, hw, backend="torch"), fullgraph=True,
                        backend="eager")(logits, d)
    for x, y in zip(got, ref_topk):
        assert_close(x, y, 1e-6, 1e-5, "compiled public decode_topk")


# --------------------------------------------------------------------------------------------------
# CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("clip", CLIP_KINDS)
def test_cuda_decode_boxes(cuda_device, dtype, clip):
    g = torch.Generator().manual_seed(6)
    n = 49104
    a = make_anchors(n, g, degenerate=True).to(cuda_device)
    d = make_deltas((2, n, 4), g, dtype, extreme=True).to(cuda_device)
    c = clip_arg(clip, (2,), g)
    c = c.to(cuda_device) if isinstance(c, torch.Tensor) else c
    got = decode_boxes(d, a, c, backend="triton")
    ref = decode_boxes_reference(d, a, c)
    assert torch.isfinite(got).all()
    assert_close(got, ref, *box_tol(d, a), "cuda boxes")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_decode_topk(cuda_device, dtype):
    g = torch.Generator().manual_seed(7)
    n, c = 4000, 90
    logits = (torch.randn(3, n, c, generator=g) * 3).to(dtype)
    check_topk(logits, make_deltas((3, n, 4), g, dtype, True), make_anchors(n, g), 5000,
               torch.tensor([[512.0, 512.0], [300.0, 400.0], [512.0, 100.0]]), device=cuda_device)


@pytest.mark.cuda
@pytest.mark.parametrize("clip", CLIP_KINDS)
def test_cuda_decode_nan_inf(cuda_device, clip):
    g = torch.Generator().manual_seed(9)
    n = 3000
    a = make_anchors(n, g)
    d = make_deltas((2, n, 4), g)
    special = torch.tensor([float("nan"), float("inf"), -float("inf")])
    hit = torch.rand(d.shape, generator=g) < 0.1
    d = torch.where(hit, special[torch.randint(0, 3, d.shape, generator=g)], d)
    a[::17, 1] = float("nan")
    c = clip_arg(clip, (2,), g)
    c = c.to(cuda_device) if isinstance(c, torch.Tensor) else c
    got = decode_boxes(d.to(cuda_device), a.to(cuda_device), c, backend="triton")
    ref = decode_boxes_reference(d.to(cuda_device), a.to(cuda_device), c)
    assert_close_special(got, ref, *box_tol(d, a), f"cuda NaN/inf clip={clip}")


@pytest.mark.cuda
def test_cuda_compile_inductor(cuda_device):
    g = torch.Generator().manual_seed(8)
    a = make_anchors(500, g).to(cuda_device)
    d = make_deltas((2, 500, 4), g).to(cuda_device)
    logits = torch.randn(2, 500, 20, generator=g).to(cuda_device)
    f = torch.compile(lambda lg, x: decode_topk(lg, x, a, 100, (512, 512), backend="triton"), fullgraph=True)
    got = f(logits, d)
    ref = decode_topk_reference(logits, d, a, 100, (512, 512))
    for x, y in zip(got, ref):
        assert_close(x, y, 1e-5, 1e-3, "inductor")


# --------------------------------------------------------------------------------------------------
# GPU code generation without a GPU: compile the kernels for sm_90 with the real Triton compiler


def test_kernels_compile_for_cuda_without_gpu():
    clip = BBOX_XFORM_CLIP
    boxes = {"d_ptr": "*bf16", "a_ptr": "*fp32", "clip_ptr": "*fp32", "out_ptr": "*fp32", "n_boxes": "i32",
             "N": "i32", "clip_h": "fp32", "clip_w": "fp32"}
    topk = {"val_ptr": "*fp16", "idx_ptr": "*i64", "d_ptr": "*fp16", "a_ptr": "*fp32", "clip_ptr": "*fp32",
            "box_ptr": "*fp32", "score_ptr": "*fp32", "cls_ptr": "*i64", "aidx_ptr": "*i64", "n_sel": "i32",
            "k": "i32", "N": "i32", "C": "i32", "clip_h": "fp32", "clip_w": "fp32"}
    aot_compile("kernels.decode", [
        ("_decode_boxes_kernel", boxes, {"XFORM_CLIP": clip, "CLIP_MODE": 2, "BLOCK": 256}),
        ("_topk_gather_kernel", topk, {"XFORM_CLIP": clip, "CLIP_MODE": 1, "BLOCK": 256})])
