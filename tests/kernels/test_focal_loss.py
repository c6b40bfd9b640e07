"""kernels.focal_loss: Triton kernel (interpreter on CPU, compiled on CUDA) against the reference."""
import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.focal_loss import focal_loss, focal_loss_reference

from .aot import aot_compile
from .compare import assert_close, lowest_precision, tolerance


# ``kernels.focal_loss`` the attribute is the function (re-exported by kernels/__init__), so fetch the module
fl = importlib.import_module("kernels.focal_loss")
F32 = tolerance(torch.float32)


def make_targets(shape, num_classes, gen, p_pos=0.2, p_ignore=0.1):
    u = torch.rand(shape, generator=gen)
    t = torch.full(shape, -1, dtype=torch.int64)
    pos = u < p_pos
    t[pos] = torch.randint(0, max(num_classes, 1), (int(pos.sum()),), generator=gen)
    t[(u >= p_pos) & (u < p_pos + p_ignore)] = -2
    return t


def run_both(x, t, norm, device="cpu", **kw):
    """-> (loss, grad) of the Triton path and of the reference (autograd)."""
    xt = x.detach().clone().to(device).requires_grad_(True)
    xr = x.detach().clone().to(device).requires_grad_(True)
    t = t.to(device)
    norm = norm.to(device) if isinstance(norm, torch.Tensor) else norm
    lt = focal_loss(xt, t, norm, backend="triton", **kw)
    lt.backward()
    lr = focal_loss_reference(xr, t, norm, **kw)
    lr.backward()
    return lt, xt.grad, lr, xr.grad


def check(x, t, norm, device="cpu", **kw):
    """Tolerances from the shared rule in ``compare.py``. Loss: an fp32 sum of ``x.numel()`` terms; both
    sides read the same (exactly fp32-representable) logits and do fp32 math, so it is an fp32 quantity.
    Gradient: stored in ``x.dtype``, so an ``x.dtype`` quantity (one term per element)."""
    lt, gt, lr, gr = run_both(x, t, norm, device, **kw)
    assert lt.dtype == torch.float32 and lt.dim() == 0
    assert gt.dtype == x.dtype
    assert_close(lt, lr, *tolerance(torch.float32, x.numel()), "loss")
    assert_close(gt, gr.to(x.dtype), *tolerance(lowest_precision(x.dtype, torch.float32)), "grad")
    return lt, gt


# --------------------------------------------------------------------------------------------------
# reference


def test_reference_matches_effdet():
    effdet_loss = pytest.importorskip("effdet.loss")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 50, 9, generator=g) * 4
    t = make_targets((2, 50), 9, g)
    norm = torch.tensor(7.0)
    for s in (0.0, 0.1):
        onehot = effdet_loss.one_hot(t.clamp(min=-1), 9)        # effdet: -1 -> no hot
        per = effdet_loss.new_focal_loss(x, onehot, 0.25, 1.5, norm, label_smoothing=s)
        expected = (per * (t != -2).unsqueeze(-1)).sum()
        assert_close(focal_loss_reference(x, t, norm, label_smoothing=s), expected, *F32, f"s={s}")


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("gamma", [0.0, 1.5])
def test_reference_gradcheck(smoothing, gamma):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(3, 4, generator=g) * 3).double().requires_grad_(True)
    t = torch.tensor([1, -1, -2])
    norm = torch.tensor(2.0, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda v: focal_loss_reference(v, t, norm, 0.25, gamma, smoothing), (x,), eps=1e-6, atol=1e-6)
    # the written-out derivative (_ModulatedBCE) is differentiable again under create_graph
    assert torch.autograd.gradgradcheck(
        lambda v: focal_loss_reference(v, t, norm, 0.25, gamma, smoothing), (x,), eps=1e-6, atol=1e-6)


def _old_focal_loss_reference(logits, targets, normalizer, alpha=0.25, gamma=1.5, label_smoothing=0.0,
                              ignore_index=-2):
    """The reference as it was before it was rewritten to take fewer passes (float one-hot, BCE with
    logits, ``sigmoid ** gamma`` with a floor, full-size masks): the oracle the current one is pinned to."""
    x = logits if logits.dtype == torch.float64 else logits.float()
    t = (targets.unsqueeze(-1) == torch.arange(x.shape[-1], device=x.device)).to(x.dtype)
    valid = (targets != ignore_index).unsqueeze(-1)
    finite = x.isfinite()
    xs = torch.where(valid & finite, x, 0.0)
    mod = torch.sigmoid(xs * (1.0 - 2.0 * t)).clamp_min(torch.finfo(x.dtype).tiny).pow(gamma)
    alpha_t = (1.0 - alpha) + t * (2.0 * alpha - 1.0)
    bce_target = t * (1.0 - label_smoothing) + 0.5 * label_smoothing if label_smoothing > 0 else t
    ce = torch.nn.functional.binary_cross_entropy_with_logits(xs, bce_target, reduction="none")
    terms = alpha_t * mod * ce * valid.to(x.dtype)
    bad = valid & ~finite
    terms = terms + torch.where(bad, x, 0.0) * torch.where(bad, float("nan"), 0.0)
    loss = terms.sum()
    return loss / (normalizer.to(x.dtype) if isinstance(normalizer, torch.Tensor) else float(normalizer))


_EDGE = [0.0, 1e-3, -1e-3, 17.0, -17.0, 30.0, -30.0, 88.0, -88.0, 1e4, -1e4,
         float("nan"), float("inf"), -float("inf")]


@pytest.mark.filterwarnings("ignore:invalid value")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reference_matches_old_formula(dtype, seed):
    """Loss and gradient of the rewritten reference equal the old formula's, on random logits with edge
    values (saturated, huge, NaN, +-inf) in positive, negative, background and ignored anchors."""
    g = torch.Generator().manual_seed(seed)
    C = 7
    x = torch.randn(3, 40, C, generator=g) * 6
    edge = torch.tensor(_EDGE)
    pick = torch.rand(x.shape, generator=g) < 0.15
    x[pick] = edge[torch.randint(0, len(_EDGE), (int(pick.sum()),), generator=g)]
    t = make_targets((3, 40), C, g, p_pos=0.3, p_ignore=0.15)
    t[0, :3] = torch.tensor([C, 100, -7])               # no class column: all-negative anchors
    x = x.to(dtype)
    finite_rows = x.isfinite().all(-1)
    for gamma, alpha, smoothing, ignore_index in [(1.5, 0.25, 0.0, -2), (2.0, 0.5, 0.1, -2),
                                                  (0.0, 0.25, 0.1, -2), (0.5, 0.25, 0.0, -1)]:
        kw = dict(alpha=alpha, gamma=gamma, label_smoothing=smoothing, ignore_index=ignore_index)
        tt = t.clone()
        # two cases: only finite logits in counted anchors (finite loss), and everything (NaN loss)
        for case in (torch.where(finite_rows, tt, ignore_index), tt):
            xn, xo = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
            ln = focal_loss_reference(xn, case, torch.tensor(3.0), **kw)
            lo = _old_focal_loss_reference(xo, case, torch.tensor(3.0), **kw)
            ln.backward()
            lo.backward()
            assert ln.dtype == lo.dtype
            n = x.numel()
            assert_close(ln, lo, *tolerance(lowest_precision(x.dtype, torch.float32), n), f"loss {kw}")
            assert_close(xn.grad, xo.grad, *tolerance(lowest_precision(x.dtype, torch.float32)), f"grad {kw}")
        assert torch.isfinite(focal_loss_reference(x, torch.where(finite_rows, tt, ignore_index), 3.0, **kw))


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.5])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_reference_single_non_finite_logit_like_old_formula(gamma, smoothing):
    """One NaN / +-inf logit alone (positive, negative, background, ignored anchor): same loss (NaN unless
    ignored) and gradient (NaN exactly there) as the old formula."""
    for v in (float("nan"), float("inf"), -float("inf")):
        for tv in (0, 1, -1, -2):
            x = torch.tensor([[0.5, -3.0, 2.0], [v, 0.5, -3.0]])
            t = torch.tensor([2, tv])
            xn, xo = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
            ln = focal_loss_reference(xn, t, 2.0, gamma=gamma, label_smoothing=smoothing)
            lo = _old_focal_loss_reference(xo, t, 2.0, gamma=gamma, label_smoothing=smoothing)
            ln.backward()
            lo.backward()
            assert ln.isnan().item() == (tv != -2), (v, tv)
            assert_close(ln, lo, *F32, f"loss v={v} t={tv}")
            assert_close(xn.grad, xo.grad, *F32, f"grad v={v} t={tv}")


# --------------------------------------------------------------------------------------------------
# Triton (interpreter on CPU)


@settings(max_examples=20)
@given(batch=st.integers(1, 3), anchors=st.integers(1, 45), classes=st.integers(1, 13),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       scale=st.sampled_from([1.0, 6.0, 40.0]), smoothing=st.sampled_from([0.0, 0.1]),
       gamma=st.sampled_from([0.0, 1.5, 2.0]), alpha=st.sampled_from([0.25, 0.5]),
       seed=st.integers(0, 2**16))
def test_matches_reference(batch, anchors, classes, dtype, scale, smoothing, gamma, alpha, seed):
    # bf16 *reads* are exact in the interpreter and the math is fp32; the gradient's cast to bf16 happens in
    # the backward kernel's store (compared within bf16's tolerance), so bf16 inputs are exercised here too.
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(batch, anchors, classes, generator=g) * scale).to(dtype)
    t = make_targets((batch, anchors), classes, g)
    norm = (t >= 0).sum().float() + 1.0
    check(x, t, norm, alpha=alpha, gamma=gamma, label_smoothing=smoothing)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_extreme_logits_and_ties(smoothing, dtype):
    vals = torch.tensor([0.0, 0.0, 30.0, -30.0, 1e4, -1e4, 88.0, -88.0, 17.0, -17.0, 1e-3, -1e-3])
    if dtype == torch.float16:
        vals = vals.clamp(-6e4, 6e4)
    x = vals.repeat(5, 1).to(dtype)                     # 5 anchors x 12 classes; col 4 = +1e4, col 5 = -1e4
    t = torch.tensor([0, 3, -1, 5, 4])                  # positive at x=0, x=-30, background, x=-1e4, x=+1e4
    rtol = tolerance(dtype)[0]
    lt, gt = check(x, t, torch.tensor(3.0), label_smoothing=smoothing)
    assert gt[2].abs().sum() > 0                        # background anchor still has gradient
    assert gt[4, 4].item() == 0.0                       # confident, correct positive: mod = 0
    assert gt[0, 5].item() == 0.0                       # confident, correct negative: mod = 0
    # confident, wrong negative (x = +1e4, p = 1): d/dx = (1-alpha) * (p - 0.5*s) / normalizer
    assert gt[2, 4].float().item() == pytest.approx(0.75 * (1 - 0.5 * smoothing) / 3.0, rel=rtol)
    # confident, wrong positive (x = -1e4, p = 0): d/dx = alpha * (p - (1 - 0.5*s)) / normalizer
    assert gt[3, 5].float().item() == pytest.approx(-0.25 * (1 - 0.5 * smoothing) / 3.0, rel=rtol)


@pytest.mark.parametrize("gamma", [1.5, 0.0])
def test_relative_accuracy_per_element_vs_float64(gamma):
    """Each loss term and gradient element within 1e-5 RELATIVE of a float64 reference over x in [-20, 20].

    Where the easy negatives live (x ~ -5..-9 for the -4.6 prior bias) the terms are ~1e-3..1e-6, so an
    absolute tolerance hides errors there. Measured with this test's grids, gamma 1.5 (interpreter, 2-core
    CPU, no GPU): ``log(1 + e)`` in fp32 is off by up to 2.3e-4 (loss) / 3.0e-4 (gradient) relative near
    x = +-9.2 and fails; the exact log1p form stays within 1.6e-6 / 1.7e-6.
    Column 0 of each row is a positive, column 1 a negative (C = 2)."""
    def reference_terms(x):                   # float64, one loss term per element (vmap over elements)
        xd = x.double().reshape(-1, 1, 1).requires_grad_(True)
        t = torch.tensor([0, -1]).repeat(x.shape[0]).reshape(-1, 1)
        terms = torch.func.vmap(lambda a, b: focal_loss_reference(a, b, 1.0, gamma=gamma))(xd, t)
        (grad,) = torch.autograd.grad(terms.sum(), xd)
        return terms.detach().reshape(x.shape), grad.reshape(x.shape)

    # gradient: every element of a dense grid (the stored fp32 gradient of the loss sum)
    x = torch.linspace(-20, 20, 801).repeat_interleave(2).reshape(-1, 2)
    _, grad_k = fl._forward_partials(x, torch.zeros(801, dtype=torch.int64), 0.25, gamma, 0.0, -2, True,
                                     block=1024)
    assert_close(grad_k, reference_terms(x)[1], 1e-5, 0.0, "per-element gradient (relative)")
    # loss terms: one element per program (block=1), so each partial sum is one term; the interpreter
    # runs programs one by one, hence a coarser grid, dense where log(1 + e) was worst
    pts = torch.cat([torch.linspace(-20, 20, 21), torch.linspace(5, 9.5, 19), -torch.linspace(5, 9.5, 19)])
    x = pts.repeat_interleave(2).reshape(-1, 2)
    partial, _ = fl._forward_partials(x, torch.zeros(len(pts), dtype=torch.int64), 0.25, gamma, 0.0, -2,
                                      False, block=1)
    assert_close(partial.reshape(x.shape), reference_terms(x)[0], 1e-5, 0.0, "per-element loss (relative)")


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")   # numpy in the interpreter: inf * 0
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("gamma", [0.0, 1.5])
def test_nan_and_inf_logits_match_reference(dtype, smoothing, gamma):
    """NaN / +-inf in positive, negative, background and ignored positions: the same loss (NaN when a counted
    element is non-finite) and the same gradient (NaN exactly there, 0 in ignored anchors) as the reference."""
    special = [float("nan"), float("inf"), -float("inf")]
    rows, tgts = [], []
    for v in special:
        for tv in (0, 1, -1, -2):                       # positive at col 0, negative at col 0, background, ignored
            rows.append([v, 0.5, -3.0])
            tgts.append(tv)
    x = torch.tensor(rows).to(dtype)
    t = torch.tensor(tgts)
    for sel in ([i for i, tv in enumerate(tgts) if tv == -2], list(range(len(tgts)))):   # ignored only, all
        lt, gt, lr, gr = run_both(x[sel], t[sel], torch.tensor(2.0), gamma=gamma, label_smoothing=smoothing)
        assert_close(lt, lr, *tolerance(torch.float32, x.numel()), "loss")
        assert_close(gt, gr.to(dtype), *tolerance(dtype), "grad")
    # ignored anchors alone: exactly zero loss and gradient whatever their logits
    lt, gt, _, _ = run_both(x[t == -2], t[t == -2], torch.tensor(2.0))
    assert lt.item() == 0.0 and (gt == 0).all()
    # every counted non-finite element has a NaN gradient, the finite ones none
    _, gt, _, _ = run_both(x, t, torch.tensor(2.0), gamma=gamma, label_smoothing=smoothing)
    counted = (t != -2).unsqueeze(-1).expand_as(x)
    assert torch.equal(gt.isnan(), counted & ~x.isfinite())


def test_ignored_anchors_give_no_loss_and_no_gradient():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 20, 5, generator=g) * 3
    t = make_targets((1, 20), 5, g, p_ignore=0.0)
    t[0, ::3] = -2
    lt, gt = check(x, t, torch.tensor(4.0))
    assert (gt[0, ::3] == 0).all()
    # flipping the logits of ignored anchors changes nothing
    x2 = x.clone()
    x2[0, ::3] = -x2[0, ::3] * 5
    lt2, _, _, _ = run_both(x2, t, torch.tensor(4.0))
    assert lt2.item() == pytest.approx(lt.item(), rel=1e-6)
    # all ignored -> exactly zero
    lt3, gt3, _, _ = run_both(x, torch.full((1, 20), -2), torch.tensor(4.0))
    assert lt3.item() == 0.0 and (gt3 == 0).all()


def test_custom_ignore_index_and_out_of_range_class():
    x = torch.randn(1, 6, 4)
    t = torch.tensor([[0, -1, 7, -5, 3, 2]])           # 7 is no class column: treated as all-negative
    check(x, t, torch.tensor(1.0), ignore_index=-5)
    check(x, t, torch.tensor(1.0), ignore_index=-1)
    # int64 classes past int32: compared in their own dtype, not wrapped (2**32 + 1 would read as class 1)
    t = torch.tensor([[2 ** 32 + 1, 2 ** 32, -2 ** 32 - 5, 1, 2 ** 40, 0]])
    check(x, t, torch.tensor(1.0), ignore_index=-5)


@pytest.mark.parametrize("shape", [(0, 5), (2, 0, 5), (3, 4, 0)])
def test_empty(shape):
    x = torch.randn(shape, requires_grad=True)
    t = torch.full(shape[:-1], -1, dtype=torch.int64)
    loss = focal_loss(x, t, torch.tensor(1.0), backend="triton")
    loss.backward()
    assert loss.item() == 0.0 and x.grad.shape == x.shape


def test_normalizer_forms_and_scaling():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 10, 3, generator=g)
    t = make_targets((2, 10), 3, g)
    base = focal_loss(x, t, 1.0, backend="triton")
    for norm in (5, 5.0, torch.tensor(5), torch.tensor([5.0]), torch.tensor(5.0, dtype=torch.float64)):
        out = focal_loss(x, t, norm, backend="triton")
        assert out.item() == pytest.approx(base.item() / 5.0, rel=1e-6), norm
    # the gradient is divided by the normalizer and scaled by grad_output (the backward kernel)
    xr, xe = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    (focal_loss(xr, t, torch.tensor(2.0), backend="triton") * 3.0).backward()
    (focal_loss_reference(xe, t, torch.tensor(2.0)) * 3.0).backward()
    assert_close(xr.grad, xe.grad, *F32, "scaled")


def test_multi_tile_programs_and_determinism(monkeypatch):
    """Force several tiles per program (the large-batch path) and check the result is bitwise stable."""
    monkeypatch.setattr(fl, "_BLOCK", 64)
    monkeypatch.setattr(fl, "_MAX_PROGRAMS", 3)
    monkeypatch.setattr(fl, "_REDUCE_BLOCK", 2)       # reduce kernel loops too
    monkeypatch.setattr(fl, "_BWD_BLOCK", 64)         # the gradient's unmasked full tiles, then a masked one
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 41, 7, generator=g) * 4          # 861 elements = 14 tiles of 64 -> 5 per program
    t = make_targets((3, 41), 7, g)
    lt, gt = check(x, t, torch.tensor(9.0))
    lt2, gt2, _, _ = run_both(x, t, torch.tensor(9.0))
    assert torch.equal(lt, lt2) and torch.equal(gt, gt2)


def test_no_grad_path_skips_gradient():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 7, 3, generator=g)
    t = make_targets((2, 7), 3, g)
    with torch.no_grad():
        out = focal_loss(x, t, torch.tensor(2.0), backend="triton")
    assert_close(out, focal_loss_reference(x, t, torch.tensor(2.0)), *tolerance(torch.float32, x.numel()),
                 "no-grad loss")


def test_input_validation():
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="targets shape"):
        focal_loss(x, torch.zeros(2, 4, dtype=torch.int64), 1.0)
    with pytest.raises(TypeError, match="integer"):
        focal_loss(x, torch.zeros(2, 3), 1.0)
    with pytest.raises(TypeError, match="floating"):
        focal_loss(x.long(), torch.zeros(2, 3, dtype=torch.int64), 1.0)
    for s in (-0.1, 1.5, float("nan")):  # the kernel smooths only above 0, the reference takes any value
        for backend in ("torch", "triton"):
            with pytest.raises(ValueError, match="label_smoothing must be in"):
                focal_loss(x, torch.zeros(2, 3, dtype=torch.int64), 1.0, label_smoothing=s, backend=backend)


@pytest.mark.parametrize("dtype,bits", [(torch.int8, 8), (torch.int16, 16), (torch.int32, 32)])
def test_ignore_index_outside_the_targets_dtype_matches_no_anchor(dtype, bits):
    """An ignore_index no target of that dtype can hold (56 - 2**bits: -200 for int8) ignores no anchor; a
    comparison in the targets' dtype would wrap it to class 56 and ignore those anchors."""
    g = torch.Generator().manual_seed(12)
    x = torch.randn(2, 9, 60, generator=g) * 3
    t = torch.randint(-1, 60, (2, 9), generator=g).to(dtype)
    t[0, :3] = 56
    ignore = 56 - 2**bits
    lt, gt = check(x, t, torch.tensor(4.0), ignore_index=ignore)
    lr = focal_loss_reference(x, t.long(), torch.tensor(4.0), ignore_index=ignore)
    assert_close(lt, lr, *tolerance(torch.float32, x.numel()), "as int64 targets")
    assert (gt[0, :3] != 0).any()  # the class-56 anchors count


@pytest.mark.parametrize("dtype", [torch.uint8, torch.uint16, torch.uint32, torch.uint64])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_unsigned_targets_are_refused(dtype, backend):
    """Unsigned targets cannot hold -1 (background) or -2 (ignored): 255 would be read as a wrapped -1 by one
    path and as class 255 by the other. Both paths refuse them in one line."""
    x = torch.randn(1, 4, 3)
    t = torch.tensor([[0, 1, 2, 1]]).to(dtype)
    with pytest.raises(TypeError, match="signed integer") as e:
        focal_loss(x, t, 1.0, backend=backend)
    assert "\n" not in str(e.value)
    check(x, torch.tensor([[0, -1, -2, 1]], dtype=torch.int8), torch.tensor(2.0))   # signed 8 bits: fine


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_huge_and_infinite_logits_overflow_like_reference(dtype):
    """Logits at the dtype's max, 1e30 / 3e38 and +-inf in positive, negative and background anchors, a
    gradient scale above 1 (grad_output 3, normalizer 0.5): the same finite / inf / NaN pattern as the
    reference, loss and gradient. Finite logits give a finite gradient (no inf * 0 inside the reference's
    autograd), an overflowing loss sum is NaN on both paths."""
    big = min(torch.finfo(dtype).max, 3e38)
    inf = float("inf")
    rows = [[big, 0.5, -3.0], [-big, 0.5, -3.0], [big, -big, 0.0], [1e30, -1e30, 2.0], [inf, 0.5, -3.0],
            [-inf, 0.5, -3.0]]
    for smoothing in (0.0, 0.1):
        for gamma in (0.0, 1.5):
            for tv in (0, 1, -1):
                for r in range(len(rows)):
                    x = torch.tensor([rows[r], [0.3, -0.2, 1.0]]).to(dtype)
                    t = torch.tensor([tv, 2])
                    got, want = [], []
                    for be, out in (("triton", got), ("torch", want)):
                        xr = x.clone().requires_grad_(True)
                        loss = focal_loss(xr, t, torch.tensor(0.5), gamma=gamma, label_smoothing=smoothing,
                                          backend=be)
                        loss.backward(torch.tensor(3.0))
                        out += [loss.detach(), xr.grad]
                    what = f"{dtype} row {rows[r]} target {tv} gamma {gamma} s {smoothing}"
                    assert_close(got[0], want[0], *tolerance(torch.float32, 6), "loss " + what)
                    assert_close(got[1], want[1], *tolerance(lowest_precision(dtype, torch.float32)), "grad " + what)
                    if x.isfinite().all():
                        assert got[1].isfinite().all(), what
    if dtype == torch.float16:
        return                                          # 65504 cannot overflow the fp32 sum
    # the loss sum overflows: NaN, as the reference turns an inf total into NaN; the gradient stays finite
    x = torch.tensor([[big, big, 0.0]]).to(dtype)
    lt, gt, lr, gr = run_both(x, torch.tensor([-1]), torch.tensor(2.0))
    assert lr.isnan() and lt.isnan() and gt.isfinite().all() and gr.isfinite().all()


@pytest.mark.parametrize("norm_dtype", [torch.float32, torch.float64])
def test_normalizer_that_needs_a_gradient_gets_it(norm_dtype):
    """A normalizer tensor with requires_grad: d loss / d normalizer = -loss / normalizer, as the reference
    (the Triton path used to drop it silently: None)."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 9, 4, generator=g)
    t = make_targets((2, 9), 4, g)
    grads = {}
    for be in ("triton", "torch"):
        xr = x.clone().requires_grad_(True)
        n = torch.tensor(3.0, dtype=norm_dtype, requires_grad=True)
        (focal_loss(xr, t, n, backend=be) * 2.0).backward()
        grads[be] = (n.grad, xr.grad)
    assert grads["triton"][0] is not None and grads["triton"][0].dtype == norm_dtype
    assert_close(grads["triton"][0], grads["torch"][0], *tolerance(torch.float32, x.numel()), "d normalizer")
    assert_close(grads["triton"][1], grads["torch"][1], *F32, "d logits")
    # only the normalizer needs a gradient
    n = torch.tensor(3.0, requires_grad=True)
    focal_loss(x, t, n, backend="triton").backward()
    n_ref = torch.tensor(3.0, requires_grad=True)
    focal_loss_reference(x, t, n_ref).backward()
    assert_close(n.grad, n_ref.grad, *tolerance(torch.float32, x.numel()), "d normalizer alone")


def test_double_backward_is_a_clear_error():
    """create_graph=True, then a backward through the Triton path's gradient: a one-line error naming the op
    and the way out, not the autograd engine's message about register_autograd."""
    g = torch.Generator().manual_seed(12)
    x = torch.randn(2, 5, 3, generator=g).requires_grad_(True)
    t = make_targets((2, 5), 3, g)
    (gx,) = torch.autograd.grad(focal_loss(x, t, 2.0, backend="triton"), x, create_graph=True)
    with pytest.raises(RuntimeError, match="kernels.focal_loss: the Triton path has no second derivative") as e:
        torch.autograd.grad(gx.pow(2).sum(), x)
    assert "backend='torch'" in str(e.value) and "\n" not in str(e.value)
    # the reference has one
    (gr,) = torch.autograd.grad(focal_loss_reference(x, t, 2.0), x, create_graph=True)
    assert torch.autograd.grad(gr.pow(2).sum(), x)[0].isfinite().all()


# --------------------------------------------------------------------------------------------------
# torch.compile through the custom op / the reference


def test_torch_compile_fullgraph_cpu():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 9, 4, generator=g)
    t = make_targets((2, 9), 4, g)
    norm = torch.tensor(3.0)
    expected_x = x.clone().requires_grad_(True)
    expected = focal_loss_reference(expected_x, t, norm)
    expected.backward()

    # public function, backend="torch": traced as plain torch ops
    f = torch.compile(lambda v: focal_loss(v, t, norm, backend="torch"), fullgraph=True, backend="eager")
    xa = x.clone().requires_grad_(True)
    out = f(xa)
    out.backward()
    assert_close(out, expected, *tolerance(torch.float32, x.numel()), "compiled public fn")
    assert_close(xa.grad, expected_x.grad, *F32, "compiled public fn grad")

    # the custom op (what CUDA + triton uses): fake impl + register_autograd traced by aot_eager
    op = torch.compile(lambda v: torch.ops.effdet.focal_loss_fwd(v, t, norm, 0.25, 1.5, 0.0, -2, True)[0],
                       fullgraph=True, backend="aot_eager")
    xb = x.clone().requires_grad_(True)
    out = op(xb)
    out.backward()
    assert_close(out, expected, *tolerance(torch.float32, x.numel()), "compiled custom op")
    assert_close(xb.grad, expected_x.grad, *F32, "compiled custom op grad")


# --------------------------------------------------------------------------------------------------
# CUDA (real compilation)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 37, 7), (3, 1111, 90)])
def test_cuda_matches_reference(cuda_device, dtype, smoothing, shape):
    g = torch.Generator().manual_seed(8)
    x = (torch.randn(shape, generator=g) * 6).to(dtype)
    x.view(-1)[:4] = torch.tensor([1e4, -1e4, 30.0, -30.0])[: x.numel()].to(dtype)
    t = make_targets(shape[:-1], shape[-1], g)
    check(x, t, (t >= 0).sum().float() + 1.0, device=cuda_device, label_smoothing=smoothing)


@pytest.mark.cuda
def test_cuda_large_grid_and_determinism(cuda_device):
    g = torch.Generator().manual_seed(9)
    x = (torch.randn(4, 49104, 90, generator=g) * 4).half()      # > _MAX_PROGRAMS tiles
    t = make_targets((4, 49104), 90, g, p_pos=0.002, p_ignore=0.01)
    norm = (t >= 0).sum().float() + 1.0
    lt, gt = check(x, t, norm, device=cuda_device)
    lt2, gt2, _, _ = run_both(x, t, norm, device=cuda_device)
    assert torch.equal(lt, lt2) and torch.equal(gt, gt2)


@pytest.mark.cuda
def test_cuda_torch_compile_inductor(cuda_device):
    g = torch.Generator().manual_seed(10)
    x = torch.randn(2, 300, 90, generator=g).to(cuda_device)
    t = make_targets((2, 300), 90, g).to(cuda_device)
    norm = (t >= 0).sum().float() + 1.0
    f = torch.compile(lambda v: focal_loss(v, t, norm, backend="triton"), fullgraph=True)
    xa = x.clone().requires_grad_(True)
    out = f(xa)
    out.backward()
    xr = x.clone().requires_grad_(True)
    ref = focal_loss_reference(xr, t, norm)
    ref.backward()
    assert_close(out, ref, *tolerance(torch.float32, x.numel()), "inductor loss")
    assert_close(xa.grad, xr.grad, *F32, "inductor grad")


# --------------------------------------------------------------------------------------------------
# GPU code generation without a GPU: compile the kernels for sm_90 with the real Triton compiler


def test_kernels_compile_for_cuda_without_gpu():
    sig = {"x_ptr": "*fp16", "tgt_ptr": "*i64", "grad_ptr": "*fp32", "partial_ptr": "*fp32", "n_elem": "i64",
           "alpha": "fp32", "gamma": "fp32", "smoothing": "fp32", "ignore_index": "i32", "tiles": "i32"}
    aot_compile("kernels.focal_loss", [
        ("_focal_fwd_kernel", sig, {"C": 90, "BLOCK": 1024, "SMOOTH": False, "WRITE_GRAD": True}),
        ("_focal_fwd_kernel", dict(sig, x_ptr="*bf16"), {"C": 7, "BLOCK": 1024, "SMOOTH": True,
                                                         "WRITE_GRAD": False}),
        ("_focal_reduce_kernel", {"partial_ptr": "*fp32", "n_partial": "i32", "norm_ptr": "*fp32",
                                  "out_ptr": "*fp32", "iters": "i32"}, {"BLOCK": 1024}),
        ("_focal_bwd_kernel", {"grad_ptr": "*fp32", "grad_out_ptr": "*fp32", "norm_ptr": "*fp32",
                               "out_ptr": "*fp16", "n_elem": "i64"}, {"BLOCK": 2048}),
        ("_focal_bwd_kernel", {"grad_ptr": "*fp32", "grad_out_ptr": "*fp32", "norm_ptr": "*fp32",
                               "out_ptr": "*bf16", "n_elem": "i64"}, {"BLOCK": 2048})])
