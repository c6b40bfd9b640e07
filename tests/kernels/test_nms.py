"""kernels.batched_nms: Triton (interpreter / CUDA) == reference == torchvision's per-group NMS, exactly.

The oracle is torchvision's exact per-group path (``_batched_nms_vanilla``: ``torchvision.ops.nms`` per
(image, class) group); the public ``torchvision.ops.batched_nms`` rounds offset coordinates in float32
on small inputs, so it is compared only on integer boxes where the offsets stay exact."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.nms import (_columns, _pair_iou, _threshold_f32, _triton_path, batched_nms, batched_nms_mask,
                         batched_nms_reference)

from .aot import aot_compile

try:
    import torchvision
    from torchvision.ops import boxes as tv_boxes
except Exception:  # pragma: no cover
    torchvision = None

needs_tv = pytest.mark.skipif(torchvision is None, reason="torchvision not importable")


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def _show(name, a, b):
    a, b = a.tolist(), b.tolist()
    first = next((k for k in range(min(len(a), len(b))) if a[k] != b[k]), min(len(a), len(b)))
    return (f"{name}: lengths {len(a)} vs {len(b)}, first difference at {first}: "
            f"{a[first:first + 5]} vs {b[first:first + 5]}")


def assert_same(a, b, name="kept"):
    assert a.dtype == torch.int64 and b.dtype == torch.int64, (a.dtype, b.dtype)
    assert torch.equal(a.cpu(), b.cpu()), _show(name, a, b)


def tv_oracle(boxes, scores, classes, t, batch_index=None):
    """torchvision's exact per-group NMS (the path batched_nms takes for large inputs) on float32
    boxes, re-ordered by (score desc, index asc): torchvision's final sort is not stable, so ties
    are put in our documented order before comparing (the kept SET is compared unchanged)."""
    idx = classes.long() if batch_index is None else batch_index.long() * (int(classes.max()) + 1) + classes.long()
    keep = tv_boxes._batched_nms_vanilla(boxes.float(), scores.float(), idx, t)
    keep = keep.sort().values
    return keep[torch.sort(scores[keep], descending=True, stable=True).indices]


def rand_boxes(n, gen, spread=60.0, size=30.0, dtype=torch.float32):
    xy = torch.rand(n, 2, generator=gen) * spread
    wh = torch.rand(n, 2, generator=gen) * size
    return torch.cat([xy, xy + wh], 1).to(dtype)


def cluster_boxes(n, gen, centers=3):
    """Many strongly overlapping boxes: jittered copies of a few boxes."""
    base = torch.tensor([[10., 10, 50, 40], [30, 20, 70, 60], [100, 100, 120, 140]])[:centers]
    pick = torch.randint(0, centers, (n,), generator=gen)
    return base[pick] + torch.randn(n, 4, generator=gen) * 2.0


def run_all(boxes, scores, classes, t, batch_index=None, bands=(0,), tv=True):
    """Reference, Triton (for each mask band width: 0 = default, 1 = only the diagonal words, so
    every later block is suppressed through IoU tiles computed in the scan) and torchvision agree."""
    ref = batched_nms_reference(boxes, scores, classes, t, batch_index)
    for band in bands:
        tri = _triton_path(boxes, scores, classes, t, batch_index, band_words=band)
        assert_same(tri, ref, f"triton (band {band}) vs reference")
    if tv and torchvision is not None and boxes.numel():
        assert_same(ref, tv_oracle(boxes, scores, classes, t, batch_index), "reference vs torchvision")
    return ref


# ---------------------------------------------------------------------------------------------
# Triton (interpreter) vs reference vs torchvision
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,images,classes,bands", [
    (1, 1, 1, (0,)), (2, 1, 1, (0,)), (7, 2, 3, (0,)), (33, 3, 2, (0,)), (130, 2, 3, (0, 1)), (200, 1, 1, (0, 2))])
def test_random_matches(dtype, n, images, classes, bands):
    gen = torch.Generator().manual_seed(n * 7 + images)
    boxes = rand_boxes(n, gen, dtype=dtype)
    scores = torch.rand(n, generator=gen).to(dtype)
    cls = torch.randint(0, classes, (n,), generator=gen)
    bi = torch.randint(0, images, (n,), generator=gen, dtype=torch.int32)
    for t in ((0.3, 0.7) if n < 100 else (0.5,)):
        run_all(boxes, scores, cls, t, bi, bands=bands)
    run_all(boxes, scores, cls, 0.5, None, bands=bands)


def test_clusters_many_classes_images():
    gen = torch.Generator().manual_seed(1)
    n = 300
    boxes = cluster_boxes(n, gen)
    scores = torch.rand(n, generator=gen)
    cls = torch.randint(0, 5, (n,), generator=gen)
    bi = torch.randint(0, 3, (n,), generator=gen)
    keep = run_all(boxes, scores, cls, 0.5, bi)
    assert 0 < keep.numel() < n // 4  # the case really suppresses


def test_long_segment_band_and_on_the_fly():
    """One class, 5 blocks of 64: segments spanning more blocks than the mask band are exact too."""
    gen = torch.Generator().manual_seed(2)
    n = 300
    boxes = torch.cat([cluster_boxes(n // 2, gen), rand_boxes(n - n // 2, gen, spread=120.0)])
    scores = torch.rand(n, generator=gen)
    keep = run_all(boxes, scores, torch.zeros(n, dtype=torch.long), 0.5, bands=(0, 1, 3))
    assert 10 < keep.numel() < n - 10


@pytest.mark.parametrize("split,wchunk", [(2, 2), (1, 4)])
def test_long_segment_with_looping_mask_programs_and_scan_chunks(monkeypatch, split, wchunk):
    """The loops the GPU sizes never reach on small inputs: a mask program looping over several column
    blocks (``_MASK_SPLIT`` below the block count) and the scan reading the band in several chunks
    (``_SCAN_WCHUNK`` below the band's words)."""
    import kernels.nms as nms_mod

    monkeypatch.setattr(nms_mod, "_MASK_SPLIT", split)
    monkeypatch.setattr(nms_mod, "_SCAN_WCHUNK", wchunk)
    gen = torch.Generator().manual_seed(3)
    n = 600                                         # one class: 10 blocks of 64, a band of up to 9 words
    boxes = torch.cat([cluster_boxes(n // 2, gen), rand_boxes(n - n // 2, gen, spread=150.0)])
    scores = torch.rand(n, generator=gen)
    keep = run_all(boxes, scores, torch.zeros(n, dtype=torch.long), 0.5, bands=(0, 3))
    assert 10 < keep.numel() < n - 10


def test_identical_boxes_equal_scores_keep_lowest_index():
    boxes = torch.tensor([[0., 0, 10, 10]] * 6)
    scores = torch.tensor([0.5, 0.9, 0.9, 0.5, 0.9, 0.1])
    cls = torch.tensor([0, 0, 0, 1, 1, 1])
    keep = run_all(boxes, scores, cls, 0.5)
    assert keep.tolist() == [1, 4], keep  # one per class, the earliest of the top score


def test_equal_scores_order_by_index():
    boxes = torch.tensor([[0., 0, 1, 1], [5, 5, 6, 6], [9, 9, 10, 10], [20, 20, 21, 21]])
    scores = torch.tensor([0.3, 0.7, 0.3, 0.7])
    keep = run_all(boxes, scores, torch.zeros(4, dtype=torch.long), 0.5)
    assert keep.tolist() == [1, 3, 0, 2]


def test_degenerate_boxes():
    boxes = torch.tensor([
        [5., 5, 5, 5], [5, 5, 5, 5],          # zero area, identical: IoU = 0/0 = NaN never suppresses
        [0, 0, 0, 10], [0, 0, 0, 10],         # zero width
        [10, 10, 2, 2], [10, 10, 2, 2],       # inverted
        [0, 0, 10, 10], [1, 1, 9, 9],         # normal, IoU 0.64
        [2, 2, 8, 8], [10, 10, 0, 0]])        # inside, inverted twin of a normal box
    scores = torch.linspace(1.0, 0.1, len(boxes))
    cls = torch.zeros(len(boxes), dtype=torch.long)
    keep = run_all(boxes, scores, cls, 0.5)
    assert set(range(6)) <= set(keep.tolist()) and 7 not in keep.tolist()
    run_all(boxes, scores, cls, 0.0)
    run_all(boxes, scores.flip(0), cls, 0.3)


def test_iou_exactly_at_threshold_does_not_suppress():
    boxes = torch.tensor([[0., 0, 2, 1], [1, 0, 3, 1], [0, 0, 2, 1], [0, 0, 2, 2]])  # IoU 1/3 and 1/2
    scores = torch.tensor([0.9, 0.8, 0.1, 0.05])
    cls = torch.tensor([0, 0, 1, 1])
    assert run_all(boxes, scores, cls, 0.5).tolist() == [0, 1, 2, 3]
    assert run_all(boxes, scores, cls, 0.49).tolist() == [0, 1, 2]
    # 1/3 is not a float32: the float32 IoU 0.33333334 > 1/3 (in double) suppresses, as in torchvision
    assert run_all(boxes, scores, cls, 1 / 3).tolist() == [0, 2]
    assert _threshold_f32(1 / 3) < 1 / 3 and _threshold_f32(0.5) == 0.5


def test_chain_needs_propagation_across_blocks():
    """Each box overlaps only its neighbours: greedy keeps every other one (tests the fixed point
    over a long chain and the propagation across 64-box blocks, in the band and beyond it)."""
    n = 161
    x = torch.arange(n, dtype=torch.float32) * 4.0
    boxes = torch.stack([x, torch.zeros(n), x + 10, torch.ones(n)], 1)  # IoU(k,k+1)=0.43, (k,k+2)=0.11
    scores = torch.linspace(1.0, 0.5, n)
    keep = run_all(boxes, scores, torch.zeros(n, dtype=torch.long), 0.4, bands=(0, 1))
    assert keep.tolist() == list(range(0, n, 2))


def test_segments_straddle_blocks():
    """Many short segments whose boundaries fall inside 64-box blocks (several starts per block)."""
    gen = torch.Generator().manual_seed(4)
    n = 260
    boxes = cluster_boxes(n, gen)
    scores = torch.rand(n, generator=gen)
    cls = torch.randint(0, 7, (n,), generator=gen)
    bi = torch.randint(0, 5, (n,), generator=gen)
    run_all(boxes, scores, cls, 0.5, bi, bands=(0, 1))


def test_nan_and_inf_inputs():
    """NaN coordinates: never suppressed, suppress nothing; NaN scores rank first (by index); inf
    coordinates and scores; all three agree with torchvision's per-group NMS."""
    nan, inf = float("nan"), float("inf")
    boxes = torch.tensor([
        [0., 0, 10, 10], [0, 0, 10, 10], [nan, 0, 10, 10], [0, 0, 10, 10], [1, 1, 10, nan],
        [0, 0, inf, 10], [0, 0, inf, 10], [-inf, -inf, inf, inf], [0, 0, 10, 10], [inf, 0, inf, 10],
        [0, 0, 10, 10], [0, 0, 10, 10]])
    scores = torch.tensor([0.9, nan, 0.95, 0.8, nan, 0.7, 0.6, 0.5, inf, -inf, nan, 0.85])
    cls = torch.tensor([0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
    keep = run_all(boxes, scores, cls, 0.5, bands=(0, 1))
    kl = keep.tolist()
    assert kl[:2] == [1, 4] and 2 in kl  # NaN scores first, by index; the NaN box survives
    assert 0 not in kl and 3 not in kl   # suppressed by box 1 (NaN score, ranked first)
    gen = torch.Generator().manual_seed(6)
    n = 150
    boxes = cluster_boxes(n, gen)
    scores = torch.rand(n, generator=gen)
    boxes[::7, 1] = nan
    scores[3::11] = nan
    boxes[5::13, 2] = inf
    run_all(boxes, scores, torch.randint(0, 2, (n,), generator=gen), 0.5, bands=(0, 1))


def test_one_box_and_empty():
    b = torch.tensor([[1., 2, 3, 4]])
    assert run_all(b, torch.tensor([0.2]), torch.tensor([3]), 0.5).tolist() == [0]
    e = torch.zeros(0, 4)
    for be in ("torch", "triton"):
        out = batched_nms(e, torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.5, backend=be)
        assert out.dtype == torch.int64 and out.shape == (0,)
    out = batched_nms(e, torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.5,
                      batch_index=torch.zeros(0, dtype=torch.long), backend="triton")
    assert out.shape == (0,)


def test_different_images_never_suppress():
    boxes = torch.tensor([[0., 0, 10, 10]] * 4)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    cls = torch.zeros(4, dtype=torch.long)
    bi = torch.tensor([0, 1, 1, 2])
    assert run_all(boxes, scores, cls, 0.5, bi).tolist() == [0, 1, 3]


def test_public_backends_agree():
    gen = torch.Generator().manual_seed(3)
    boxes, scores = cluster_boxes(80, gen), torch.rand(80, generator=gen)
    cls, bi = torch.randint(0, 4, (80,), generator=gen), torch.randint(0, 2, (80,), generator=gen)
    a = batched_nms(boxes, scores, cls, 0.5, bi, backend="torch")
    b = batched_nms(boxes, scores, cls, 0.5, bi, backend="triton")
    c = batched_nms(boxes, scores, cls, 0.5, bi)  # auto: reference on CPU
    assert_same(a, b)
    assert_same(a, c)


@needs_tv
def test_public_torchvision_batched_nms_integer_boxes():
    """The public torchvision.ops.batched_nms (coordinate-offset trick for small N) on boxes whose
    offset coordinates stay exact: same kept indices."""
    gen = torch.Generator().manual_seed(5)
    n = 200
    boxes = rand_boxes(n, gen).round()
    scores = torch.randperm(n, generator=gen).float() / n  # distinct: torchvision's sort is unstable
    cls, bi = torch.randint(0, 6, (n,), generator=gen), torch.randint(0, 3, (n,), generator=gen)
    ours = batched_nms_reference(boxes, scores, cls, 0.5, bi)
    assert_same(ours, torchvision.ops.batched_nms(boxes, scores, bi * 6 + cls, 0.5))


@pytest.mark.parametrize("short_segment,block,block_max,chunk", [
    (1024, 32, 256, 97),     # all pairs, chunked
    (0, 32, 256, 1 << 22),   # every segment through blocks, one IoU matrix per block
    (0, 3, 8, 97),           # tiny blocks, column chunks
    (40, 1, 1, 5),           # long and short segments mixed, one box per block
])
def test_reference_paths_and_chunking_are_exact(monkeypatch, short_segment, block, block_max, chunk):
    import kernels.nms as nms_mod

    gen = torch.Generator().manual_seed(9)
    n = 300
    boxes, scores = cluster_boxes(n, gen), torch.rand(n, generator=gen)
    cls = torch.randint(0, 4, (n,), generator=gen)
    cls[:120] = 0                                   # one long segment beside short ones
    bi = torch.randint(0, 2, (n,), generator=gen)
    full = batched_nms_reference(boxes, scores, cls, 0.5, bi)
    assert_same(full, tv_oracle(boxes, scores, cls, 0.5, bi))
    for name, v in (("_SHORT_SEGMENT", short_segment), ("_REF_BLOCK", block), ("_REF_BLOCK_MAX", block_max),
                    ("_PAIR_CHUNK", chunk)):
        monkeypatch.setattr(nms_mod, name, v)
    assert_same(batched_nms_reference(boxes, scores, cls, 0.5, bi), full)
    one = torch.zeros_like(cls)
    assert_same(batched_nms_reference(boxes, scores, one, 0.3), tv_oracle(boxes, scores, one, 0.3))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compile_fullgraph_through_custom_op(backend):
    boxes = torch.tensor([[0., 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]])
    scores, cls = torch.tensor([0.9, 0.8, 0.7]), torch.tensor([0, 0, 0])
    fn = torch.compile(lambda b, s, c: batched_nms(b, s, c, 0.5, backend=backend), fullgraph=True,
                       backend="aot_eager")
    assert fn(boxes, scores, cls).tolist() == [0, 2]


def test_opcheck():
    boxes = torch.tensor([[0., 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]])
    scores, cls = torch.tensor([0.9, 0.8, 0.7]), torch.tensor([0, 0, 0])
    torch.library.opcheck(torch.ops.effdet.batched_nms_reference.default, (boxes, scores, cls, None, 0.5),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.effdet.batched_nms.default, (boxes, scores, cls, torch.zeros(3, dtype=torch.long),
                                                                 0.5, 0), test_utils=("test_schema", "test_faketensor"))


def test_too_many_boxes_for_the_kernels_go_to_the_reference(monkeypatch):
    """Above the kernels' int32 offsets (2**29 boxes; lowered here) "triton" refuses by name and "torch" (and
    "auto", which then picks the reference) still answer, for both the indices and the mask."""
    import kernels.nms as nms_mod

    gen = torch.Generator().manual_seed(4)
    boxes, scores = cluster_boxes(40, gen), torch.rand(40, generator=gen)
    cls = torch.zeros(40, dtype=torch.long)
    expect = batched_nms(boxes, scores, cls, 0.5, backend="triton")
    monkeypatch.setattr(nms_mod, "_MAX_TRITON_BOXES", 40)
    for fn in (batched_nms, batched_nms_mask):
        with pytest.raises(ValueError, match="cannot take 40 boxes"):
            fn(boxes, scores, cls, 0.5, backend="triton")
    assert_same(batched_nms(boxes, scores, cls, 0.5, backend="torch"), expect)
    assert batched_nms_mask(boxes, scores, cls, 0.5, backend="torch").nonzero().flatten().sort().values.tolist() \
        == expect.sort().values.tolist()
    assert nms_mod._unsupported(boxes) is not None and nms_mod._unsupported(boxes[:39]) is None


def test_validation_names_file_and_field():
    b, s, c = torch.zeros(3, 4), torch.zeros(3), torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"nms\.py: boxes must be \(N, 4\)"):
        batched_nms(torch.zeros(3, 5), s, c, 0.5)
    with pytest.raises(ValueError, match="scores and classes"):
        batched_nms(b, torch.zeros(2), c, 0.5)
    with pytest.raises(ValueError, match="batch_index"):
        batched_nms(b, s, c, 0.5, batch_index=torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="classes and batch_index must be integer"):
        batched_nms(b, s, c.float(), 0.5)


# ---------------------------------------------------------------------------------------------
# hypothesis properties of the reference (and agreement with the kernel)
# ---------------------------------------------------------------------------------------------

@st.composite
def nms_inputs(draw):
    n = draw(st.integers(0, 40))
    coord = st.integers(0, 20).map(float)
    rows = draw(st.lists(st.tuples(coord, coord, coord, coord), min_size=n, max_size=n))
    boxes = torch.tensor(rows, dtype=torch.float32).reshape(n, 4)
    if draw(st.booleans()):  # mostly proper boxes, sometimes raw (inverted / degenerate) ones
        boxes = torch.cat([torch.minimum(boxes[:, :2], boxes[:, 2:]), torch.maximum(boxes[:, :2], boxes[:, 2:])], 1)
    scores = torch.tensor(draw(st.lists(st.sampled_from([0.1, 0.2, 0.5, 0.9, float("nan")]), min_size=n,
                                        max_size=n)))
    if n and draw(st.booleans()):  # a NaN coordinate
        boxes[draw(st.integers(0, n - 1)), draw(st.integers(0, 3))] = float("nan")
    cls = torch.tensor(draw(st.lists(st.integers(0, 2), min_size=n, max_size=n)), dtype=torch.long)
    bi = torch.tensor(draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)), dtype=torch.long)
    t = draw(st.sampled_from([0.0, 0.25, 0.5, 0.75]))
    return boxes, scores.reshape(n), cls.reshape(n), bi.reshape(n), t


def _iou_matrix(boxes):
    n = boxes.shape[0]
    i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    return _pair_iou(_columns(boxes), i.flatten(), j.flatten()).reshape(n, n)


@given(nms_inputs())
def test_reference_properties(case):
    boxes, scores, cls, bi, t = case
    keep = batched_nms_reference(boxes, scores, cls, t, bi)
    n = boxes.shape[0]
    assert keep.dtype == torch.int64
    kl = keep.tolist()
    assert len(set(kl)) == len(kl) and all(0 <= k < n for k in kl)  # a subset
    for a, b in zip(kl, kl[1:]):  # score descending, NaN first, ties (NaN included) by index
        sa, sb = scores[a].item(), scores[b].item()
        if math.isnan(sa):
            assert not math.isnan(sb) or a < b
        else:
            assert not math.isnan(sb) and (sa > sb or (sa == sb and a < b))
    if n == 0:
        return
    iou = _iou_matrix(boxes)
    same = (cls[:, None] == cls[None, :]) & (bi[:, None] == bi[None, :])
    rank = torch.empty(n, dtype=torch.long)
    rank[torch.sort(scores, descending=True, stable=True).indices] = torch.arange(n)
    kept = torch.zeros(n, dtype=torch.bool)
    kept[keep] = True
    for a in kl:
        for b in kl:
            if a != b and same[a, b]:
                hi, lo = (a, b) if rank[a] < rank[b] else (b, a)
                assert not (iou[hi, lo] > t), f"kept {hi} and {lo} overlap {iou[hi, lo]} > {t}"
    for j in range(n):
        if not kept[j]:
            assert any(same[i, j] and rank[i] < rank[j] and iou[i, j] > t for i in kl), f"{j} suppressed by nobody"
    if torchvision is not None:
        assert_same(keep, tv_oracle(boxes, scores, cls, t, bi), "reference vs torchvision")


@settings(max_examples=40)
@given(nms_inputs(), st.integers(1, 5), st.integers(1, 16))
def test_reference_block_path_properties(case, block, block_max):
    """The reference's block path (segments longer than _SHORT_SEGMENT; here every segment, with tiny
    blocks) has every property above and gives the all-pairs path's result."""
    import kernels.nms as nms_mod

    boxes, scores, cls, bi, t = case
    want = batched_nms_reference(boxes, scores, cls, t, bi)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(nms_mod, "_SHORT_SEGMENT", 0)
        m.setattr(nms_mod, "_REF_BLOCK", block)
        m.setattr(nms_mod, "_REF_BLOCK_MAX", max(block, block_max))
        m.setattr(nms_mod, "_PAIR_CHUNK", 7)
        assert_same(batched_nms_reference(boxes, scores, cls, t, bi), want, "block path vs all pairs")
        test_reference_properties.hypothesis.inner_test(case)


@settings(max_examples=10)
@given(nms_inputs(), st.sampled_from([0, 1]))
def test_triton_matches_reference_property(case, band):
    boxes, scores, cls, bi, t = case
    assert_same(_triton_path(boxes, scores, cls, t, bi, band_words=band),
                batched_nms_reference(boxes, scores, cls, t, bi))


def test_gradcheck_not_applicable():
    """NMS returns integer indices: there is no gradient to check; the IoU helper is the only float
    math, checked here in float64 against a direct formula."""
    b = torch.tensor([[0., 0, 4, 3], [1, 1, 5, 5], [6, 6, 5, 5]], dtype=torch.float64)
    iou = _pair_iou(_columns(b), torch.tensor([0, 0, 1]), torch.tensor([1, 2, 2]))
    assert math.isclose(iou[0].item(), 6 / (12 + 16 - 6))
    assert iou[1].item() == 0.0 and iou[2].item() == 0.0


# ---------------------------------------------------------------------------------------------
# CUDA: real compilation
# ---------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,images,classes", [(1, 1, 1), (300, 3, 5), (5000, 4, 90), (4000, 2, 1)])
def test_cuda_matches_reference(dtype, n, images, classes):
    gen = torch.Generator().manual_seed(n)
    boxes = torch.cat([rand_boxes(n // 2, gen, spread=200.0), cluster_boxes(n - n // 2, gen)]).to(dtype)
    scores = torch.rand(n, generator=gen).to(dtype)
    cls = torch.randint(0, classes, (n,), generator=gen)
    bi = torch.randint(0, images, (n,), generator=gen)
    ref = batched_nms_reference(boxes, scores, cls, 0.5, bi)
    dev = [x.cuda() for x in (boxes, scores, cls, bi)]
    out = batched_nms(dev[0], dev[1], dev[2], 0.5, dev[3], backend="triton")
    assert_same(out.cpu(), ref, "cuda triton vs cpu reference")
    ref_cuda = batched_nms(dev[0], dev[1], dev[2], 0.5, dev[3], backend="torch")
    assert_same(ref_cuda.cpu(), ref, "cuda reference vs cpu reference")


@pytest.mark.cuda
@pytest.mark.parametrize("band", [0, 3])
def test_cuda_one_long_segment(band):
    """One class x 20,000 boxes (313 blocks): full mask band, and a 3-word band (IoU tiles in the scan)."""
    gen = torch.Generator().manual_seed(11)
    n = 20000
    boxes = torch.cat([rand_boxes(n // 2, gen, spread=1000.0, size=80.0), cluster_boxes(n - n // 2, gen)]).cuda()
    scores = torch.rand(n, generator=gen).cuda()
    boxes[::97, 0] = float("nan")
    scores[::89] = float("nan")
    cls = torch.zeros(n, dtype=torch.long, device="cuda")
    out = _triton_path(boxes, scores, cls, 0.5, None, band_words=band)
    assert_same(out, batched_nms(boxes, scores, cls, 0.5, backend="torch"), "cuda triton vs cuda reference")
    if torchvision is not None:  # torchvision's CPU kernel: its sort is stable (NaN scores tie)
        assert_same(out.cpu(), tv_oracle(boxes.cpu(), scores.cpu(), cls.cpu(), 0.5),
                    "cuda triton vs torchvision per-group")


@pytest.mark.cuda
def test_cuda_compile_through_custom_op():
    boxes = torch.tensor([[0., 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], device="cuda")
    scores, cls = torch.tensor([0.9, 0.8, 0.7], device="cuda"), torch.tensor([0, 0, 0], device="cuda")
    fn = torch.compile(lambda b, s, c: batched_nms(b, s, c, 0.5, backend="triton"), fullgraph=True)
    assert fn(boxes, scores, cls).tolist() == [0, 2]


# ---------------------------------------------------------------------------------------------
# GPU code generation without a GPU: compile the kernel for sm_90 with the real Triton compiler
# ---------------------------------------------------------------------------------------------


def test_kernels_compile_for_cuda_without_gpu():
    import kernels.nms as nms_mod

    # as launched by _batched_nms_op: float32 sorted boxes, int32 segment tables, int64 mask words
    mask = {"boxes_ptr": "*fp32", "seg_end_ptr": "*i32", "mask_ptr": "*i64", "n": "i32", "W": "i32", "W_SPLIT": "i32",
            "thr": "fp32"}
    scan = {"boxes_ptr": "*fp32", "mask_ptr": "*i64", "seg_start_ptr": "*i32", "seg_end_ptr": "*i32",
            "seg_id_ptr": "*i32", "removed_ptr": "*i64", "keep_ptr": "*i8", "n": "i32", "W": "i32", "thr": "fp32"}
    aot_compile("kernels.nms", [
        ("_nms_mask_kernel", mask, {"BLOCK": nms_mod._BLOCK}),
        ("_nms_scan_kernel", scan, {"BLOCK": nms_mod._BLOCK, "WCHUNK": nms_mod._SCAN_WCHUNK})])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_keep_mask_marks_exactly_the_kept_boxes(backend):
    """batched_nms_mask (fixed size, no host sync) keeps exactly what batched_nms keeps."""
    gen = torch.Generator().manual_seed(7)
    boxes = cluster_boxes(300, gen)
    scores = torch.rand(300, generator=gen).round(decimals=2)   # ties on purpose
    classes = torch.randint(0, 4, (300,), generator=gen)
    image = torch.randint(0, 3, (300,), generator=gen)
    kept = batched_nms(boxes, scores, classes, 0.5, batch_index=image, backend=backend)
    mask = batched_nms_mask(boxes, scores, classes, 0.5, batch_index=image, backend=backend)
    assert mask.dtype == torch.bool and mask.shape == (300,)
    assert 0 < int(mask.sum()) < 300
    assert_same(mask.nonzero().flatten(), kept.sort().values, f"mask ({backend})")
