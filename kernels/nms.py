"""Batched greedy non-maximum suppression: many images, many classes, one call.

``batched_nms(boxes, scores, classes, iou_threshold, batch_index=None)`` returns the kept indices
(int64), highest score first. The specification is torchvision's *exact per-group* path: for every
(image, class) group, ``torchvision.ops.nms`` on float32 boxes (``torchvision.ops.boxes.
_batched_nms_vanilla``). ``torchvision.ops.batched_nms`` itself takes that path only for large inputs
(more than 4,000 coordinates on the CPU, 100,000 on CUDA); for smaller ones it offsets every group's
boxes by ``group_id * (max_coordinate + 1)`` and runs one NMS, and those offset coordinates are
rounded in float32, so its result can differ from the per-group result. The rules:

* a box is suppressed by a *kept* box of the same (image, class) group with a higher rank whose IoU
  with it is strictly greater than ``iou_threshold``; rank = score descending, equal scores: the
  lower index first (stable sort). The threshold is compared as torchvision's CPU kernel does (a
  float32 IoU against the threshold in double), i.e. against the largest float32 <= the threshold;
* IoU is torchvision's formula in float32: ``area = (x2-x1)*(y2-y1)``, ``inter = clamp(min(x2) -
  max(x1), 0) * clamp(min(y2) - max(y1), 0)``, ``iou = inter / (area_i + area_j - inter)``, so
  zero-area and inverted boxes behave the same;
* NaN: a box with a NaN coordinate has a NaN area, so every IoU it takes part in is NaN and never
  exceeds the threshold: it is never suppressed and suppresses nothing (this holds whichever way
  ``min``/``max`` treat NaN, so torchvision's ``std::max``, ``torch.maximum`` and the GPU's ``max``
  all agree; an infinite coordinate can only give a NaN intersection when an area is NaN too). A NaN
  score ranks above every number (``torch.sort``'s order), NaN scores among themselves by index;
* the output is ordered by score descending, ties (NaN included) by lower index.

fp16 boxes are converted to float32 before any arithmetic (torchvision's CPU kernel computes fp16
boxes in fp16: compare against it on ``boxes.float()``).

Preparation (both paths, PyTorch on the tensors' device): three stable sorts put the boxes in
(image, class, score desc, index) order, so every (image, class) group is one contiguous *segment*
of the sorted boxes.

* The reference (:func:`batched_nms_reference`) computes IoU only for pairs inside a segment. Short
  segments (<= ``_SHORT_SEGMENT`` boxes): every pair at once, in chunks, and the greedy suppression
  by a fixed-point iteration (see :func:`_greedy_fixed_point` for the exactness argument). Long
  segments: blocks of surviving boxes in rank order, the first small and then doubling, each decided
  by the same fixed point and then suppressing the later boxes it reaches, so IoU is computed from
  kept boxes only, as torchvision's loop does (:func:`_greedy_blocks`).
* The Triton path runs two kernels for the whole batch. The sorted positions are cut into 64-box
  blocks (global, not per segment). (1) ``_nms_mask_kernel``, grid (row block ``b``, 8): the
  64x64 IoU tiles of row block ``b`` against column blocks ``b + w`` (program ``s`` takes ``w = s,
  s + 8, ...``), computed only while both blocks hold boxes of a common segment (boxes are sorted,
  so only tiles with column >= row block are needed), packed into one int64 word per row: bit ``j``
  of ``mask[w, p]`` = box ``p`` would suppress box ``64 (b + w) + j`` (later in the same segment,
  IoU > threshold). (2)
  ``_nms_scan_kernel``, one program per row block, handling the segments that *start* in that
  block: it walks each segment block by block keeping a "removed" bitset in device scratch; inside a
  block it decides the boxes in order from the diagonal words (a scalar loop on one 64-bit word),
  then ORs the rows of the block's kept boxes into the removed words of every later block of the
  segment.
  The mask has ``W`` words per box, ``W = min(blocks, 64 MiB / (8 N))`` (at least 1). A segment longer
  than ``W`` blocks is still exact: the scan computes the IoU tiles beyond the band on the fly.
  Sizes come from shapes only: no host synchronisation inside the launcher. The public function
  synchronises once, for the output's data-dependent length.

On CUDA the kernels are compiled with ``enable_fp_fusion=False`` and use ``div_rn`` so the IoU is
bitwise the float32 value the reference computes (no FMA contraction, IEEE division).
"""

import contextlib
from typing import Optional

import numpy as np
import torch

from ._dispatch import dispatch, triton_available, triton_op

__all__ = ["batched_nms", "batched_nms_reference"]

OP_NAME = "batched_nms"
# Pairs per chunk in the reference's IoU pass (bounds memory: ~40 bytes per pair).
_PAIR_CHUNK = 1 << 22
# The reference: segments longer than this go through blocks of _REF_BLOCK sorted positions (its Python loop
# runs over these blocks), shorter ones through all their pairs at once.
_SHORT_SEGMENT = 1024
_REF_BLOCK = 16
_REF_BLOCK_MAX = 256
# Boxes per block = bits per mask word.
_BLOCK = 64
# Upper bound on the suppression mask of the Triton path (bytes); see the module docstring.
_MASK_BUDGET_BYTES = 64 << 20
# Programs per row block in the mask kernel (each loops over every _MASK_SPLIT-th column block it needs):
# enough for a single long segment to fill the GPU, few idle programs when segments are short.
_MASK_SPLIT = 8
# Mask words the scan reads at once when it applies a kept box's band (a power of two).
_SCAN_WCHUNK = 16


def _check_inputs(boxes, scores, classes, batch_index):
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"kernels/nms.py: boxes must be (N, 4), got {tuple(boxes.shape)}")
    n = boxes.shape[0]
    if scores.shape != (n,) or classes.shape != (n,):
        raise ValueError(f"kernels/nms.py: scores and classes must be ({n},), got {tuple(scores.shape)}, "
                         f"{tuple(classes.shape)}")
    if batch_index is not None and batch_index.shape != (n,):
        raise ValueError(f"kernels/nms.py: batch_index must be ({n},), got {tuple(batch_index.shape)}")
    if not boxes.is_floating_point():
        raise TypeError(f"kernels/nms.py: boxes must be floating point, got {boxes.dtype}")
    if classes.is_floating_point() or (batch_index is not None and batch_index.is_floating_point()):
        raise TypeError("kernels/nms.py: classes and batch_index must be integer tensors")


def _threshold_f32(t: float) -> float:
    """The largest float32 <= ``t``.

    torchvision's CPU kernel compares the float32 IoU with the threshold as a double; for a float32
    ``x``, ``x > t`` (in double) is the same as ``x > largest_f32_le(t)``, which both our paths use.
    """
    t = float(t)
    t32 = np.float32(t)
    if float(t32) > t:
        t32 = np.nextafter(t32, np.float32(-np.inf))
    return float(t32)


def _sort_groups(scores, classes, batch_index):
    """Three stable sorts: ``order`` (original index at each sorted position, (image, class, score
    desc, index) order) and ``score_perm`` (original indices by score desc, index asc)."""
    score_perm = torch.sort(scores, descending=True, stable=True).indices
    order = score_perm[torch.sort(classes[score_perm], stable=True).indices]
    if batch_index is not None:
        order = order[torch.sort(batch_index[order], stable=True).indices]
    return order, score_perm


def _segment_starts(order, classes, batch_index):
    """(N,) bool: sorted position p starts a new (image, class) segment."""
    n = order.numel()
    new = torch.ones(n, dtype=torch.bool, device=order.device)
    if n > 1:
        c = classes[order]
        diff = c[1:] != c[:-1]
        if batch_index is not None:
            b = batch_index[order]
            diff |= b[1:] != b[:-1]
        new[1:] = diff
    return new


def _kept_indices(keep_sorted, order, score_perm):
    """Kept flags in sorted order -> kept original indices, score descending (ties: lower index)."""
    keep_orig = torch.zeros_like(keep_sorted)
    keep_orig[order] = keep_sorted
    return score_perm[keep_orig[score_perm]]


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------


def _pair_iou(cols, i, j):
    """torchvision's IoU of sorted boxes ``i`` (ranked higher) and ``j``, float32.

    ``cols`` = (x1, y1, x2, y2, area) as contiguous 1-D tensors; ``index_select`` is used because it
    is several times faster than advanced indexing on the CPU.
    """
    x1, y1, x2, y2, area = cols
    g = torch.index_select
    w = (torch.minimum(g(x2, 0, i), g(x2, 0, j)) - torch.maximum(g(x1, 0, i), g(x1, 0, j))).clamp_(min=0)
    h = (torch.minimum(g(y2, 0, i), g(y2, 0, j)) - torch.maximum(g(y1, 0, i), g(y1, 0, j))).clamp_(min=0)
    inter = w.mul_(h)
    return inter / (g(area, 0, i) + g(area, 0, j) - inter)


def _columns(sboxes):
    x1, y1, x2, y2 = (sboxes[:, k].contiguous() for k in range(4))
    return x1, y1, x2, y2, (x2 - x1) * (y2 - y1)


def _suppression_edges(sboxes, seg, iou_threshold):
    """All pairs (i, j), i < j in the same segment (sorted positions), with IoU(i, j) > threshold.

    Pairs are enumerated per position (partners = the rest of its segment) in chunks of about
    ``_PAIR_CHUNK`` pairs; the Python loop is over chunks, not images, classes or boxes.
    """
    n = sboxes.shape[0]
    dev = sboxes.device
    pos = torch.arange(n, device=dev)
    seg_len = seg[1:] - seg[:-1]
    seg_end = torch.repeat_interleave(seg[1:], seg_len)  # end of each position's segment
    cnt = seg_end - pos - 1  # partners after each position
    cum = torch.cumsum(cnt, 0)
    total = int(cum[-1])
    src, dst = [], []
    cols = _columns(sboxes)
    if total == 0:
        return pos[:0], pos[:0]
    # chunk boundaries on positions so each chunk holds <= ~_PAIR_CHUNK pairs (a long segment's
    # single position has < N partners, so a chunk may exceed the budget by at most N).
    marks = torch.arange(1, (total - 1) // _PAIR_CHUNK + 1, device=dev) * _PAIR_CHUNK
    cuts = torch.searchsorted(cum, marks, right=True).tolist()
    bounds = sorted(set([0] + [c + 1 for c in cuts if c + 1 < n] + [n]))
    for p0, p1 in zip(bounds[:-1], bounds[1:]):
        c = cnt[p0:p1]
        p = pos[p0:p1]
        i = torch.repeat_interleave(p, c)
        if i.numel() == 0:
            continue
        first = torch.cumsum(c, 0) - c  # offset of each position's first pair inside the chunk
        # pair k of position p (k counted inside the chunk) is (p, p + 1 + k - first[p])
        j = torch.arange(i.numel(), device=dev) + torch.repeat_interleave(p + 1 - first, c)
        hit = torch.nonzero(_pair_iou(cols, i, j) > iou_threshold).flatten()
        src.append(torch.index_select(i, 0, hit))
        dst.append(torch.index_select(j, 0, hit))
    return torch.cat(src), torch.cat(dst)


def _greedy_fixed_point(n, src, dst, device):
    """Exact greedy NMS from the suppression edges (src ranks above dst, same segment).

    Greedy NMS keeps j iff no *kept* i ranked before j in its segment has IoU(i, j) > t. Read as a
    rule on the edge graph, ``keep[j] = not any(keep[i] for edges i -> j)``; since every edge goes
    from a lower to a higher sorted position the graph is acyclic, so this rule has exactly one
    solution (decide positions in increasing order), and that solution is the greedy answer.
    We iterate ``keep <- F(keep)`` from all-kept. A box with no incoming edge is right after step 1
    and stays right; by induction a box all of whose predecessors are already final is final one
    step later, so after d steps every box at depth < d (longest edge path ending at it) is final:
    the iteration reaches the unique fixed point in at most (longest chain + 1) steps. We stop as
    soon as ``F(keep) == keep``; that state is a fixed point, hence THE fixed point, hence exact.
    In practice it stops after a handful of steps (a cluster's top box settles it for everyone).
    """
    keep = torch.ones(n, dtype=torch.bool, device=device)
    if src.numel() == 0:
        return keep
    while True:
        hits = torch.zeros(n, dtype=torch.int32, device=device)
        hits.index_add_(0, dst, torch.index_select(keep, 0, src).to(torch.int32))
        new = hits == 0
        if torch.equal(new, keep):
            return keep
        keep = new


def _iou_rows_cols(cols, rows, c):
    """(len(rows), len(c)) float32 IoU of sorted boxes ``rows`` (ranked higher) with boxes ``c``, the same
    operations, in the same order, as :func:`_pair_iou` (so the same float32 values)."""
    x1, y1, x2, y2, area = cols
    g = torch.index_select
    w = (torch.minimum(g(x2, 0, rows)[:, None], g(x2, 0, c)[None])
         - torch.maximum(g(x1, 0, rows)[:, None], g(x1, 0, c)[None])).clamp_(min=0)
    h = (torch.minimum(g(y2, 0, rows)[:, None], g(y2, 0, c)[None])
         - torch.maximum(g(y1, 0, rows)[:, None], g(y1, 0, c)[None])).clamp_(min=0)
    inter = w.mul_(h)
    return inter / (g(area, 0, rows)[:, None] + g(area, 0, c)[None] - inter)


def _block_fixed_point(edge):
    """Greedy NMS inside one block from its (a, a) edge matrix (``edge[i, j]``: i ranks above j, same
    segment, IoU > threshold; every box alive on entry). ``keep[j] = not any(keep[i] for edges i -> j)``
    has exactly one solution since edges go forward (decide boxes in rank order), and it is the greedy
    answer. Iterating ``keep <- F(keep)`` from all-kept: a box with no incoming edge is right after one
    step, and a box whose predecessors are all final is final one step later, so after d steps every box
    at depth < d is final; we stop at the first ``F(keep) == keep``, which is that unique fixed point. In
    practice a few steps (a cluster's top box settles it)."""
    keep = torch.ones(edge.shape[0], dtype=torch.bool, device=edge.device)
    if not bool(edge.any()):
        return keep
    while True:
        new = ~(edge & keep[:, None]).any(0)
        if torch.equal(new, keep):
            return keep
        keep = new


def _greedy_blocks(sboxes, seg_end, iou_threshold):
    """Exact greedy NMS of boxes in sorted (segment, rank) order; ``seg_end[p]`` = end of p's segment.

    Positions are taken in blocks of ``_REF_BLOCK``, in order. When a block is reached, ``removed`` holds
    every suppression by the kept boxes of earlier blocks (each block's kept boxes mark all later boxes of
    their segments); the block's surviving boxes are then decided among themselves
    (:func:`_block_fixed_point`), so each block's decisions are the greedy ones and, by induction, so is
    the whole. IoU is only computed from kept (or still alive) boxes, as torchvision's loop skips
    suppressed ones: work ~ kept x segment length instead of all pairs. Python loops: over blocks and
    column chunks of at most ``_PAIR_CHUNK`` pairs, never over boxes.
    """
    n = sboxes.shape[0]
    dev = sboxes.device
    cols = _columns(sboxes)
    removed = torch.zeros(n, dtype=torch.bool, device=dev)
    keep = torch.zeros(n, dtype=torch.bool, device=dev)
    block, p = max(1, int(_REF_BLOCK)), 0
    while p < n:
        alive = p + torch.nonzero(~removed[p:]).flatten()  # boxes from p on that nothing suppressed yet
        if alive.numel() == 0:
            break
        nr = min(block, alive.numel())
        last = int(alive[nr - 1])
        end = int(seg_end[last])                 # seg_end is non-decreasing: the last row reaches furthest
        reach = alive[:int(torch.searchsorted(alive, end))]  # the block's rows, then the alive boxes they reach
        rows = reach[:nr]
        one_segment = int(seg_end[int(rows[0])]) == end
        if nr * reach.numel() <= _PAIR_CHUNK:   # one IoU matrix: rows x (rows + later)
            hit = _iou_rows_cols(cols, rows, reach) > iou_threshold
            if not one_segment:                  # segments are contiguous: the same end = the same segment
                hit &= torch.index_select(seg_end, 0, rows)[:, None] == torch.index_select(seg_end, 0, reach)[None]
            k = _block_fixed_point(hit[:, :nr].triu(diagonal=1))  # rows are in rank order: higher -> lower
            keep[rows[k]] = True
            if reach.numel() > nr:
                removed[reach[nr:]] |= hit[k, nr:].any(0)
        else:                                    # the same in column chunks of about _PAIR_CHUNK pairs
            same = torch.index_select(seg_end, 0, rows)
            edge = (_iou_rows_cols(cols, rows, rows) > iou_threshold) & (same[:, None] == same[None, :])
            kept = rows[_block_fixed_point(edge.triu_(diagonal=1))]
            keep[kept] = True
            later = reach[nr:]
            kept_end = torch.index_select(seg_end, 0, kept)[:, None]
            step = max(1, _PAIR_CHUNK // max(1, kept.numel()))
            for c0 in range(0, later.numel() if kept.numel() else 0, step):
                c = later[c0:c0 + step]
                hit = (_iou_rows_cols(cols, kept, c) > iou_threshold) & (kept_end == torch.index_select(seg_end, 0, c))
                removed[c] |= hit.any(0)
        p = last + 1
        block = min(2 * block, _REF_BLOCK_MAX)  # the top boxes first, in a small block: they suppress most
    return keep


def batched_nms_reference(boxes, scores, classes, iou_threshold, batch_index=None):
    """Plain-PyTorch exact batched greedy NMS (float32 IoU); see the module docstring.

    Vectorized: no N x N matrix, no Python loop over images, classes or boxes (only over blocks of sorted
    positions, column chunks and fixed-point steps). It synchronises with the host (block reach, chunk
    bounds, the fixed-point test): it is the spec, not the GPU path.
    """
    _check_inputs(boxes, scores, classes, batch_index)
    n = boxes.shape[0]
    if n == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    order, score_perm = _sort_groups(scores, classes, batch_index)
    new = _segment_starts(order, classes, batch_index)
    pos = torch.arange(n, device=boxes.device)
    last = torch.roll(new, -1)  # p is the last of its segment (p = n-1: new[0] is True)
    seg_end = torch.flip(torch.cummin(torch.flip(torch.where(last, pos + 1, n), [0]), 0).values, [0])
    sboxes = boxes[order].float()
    thr = _threshold_f32(iou_threshold)
    # Segments are independent. Short ones: every pair's IoU, then one fixed point (few pairs, no loop over
    # blocks); long ones: blocks in rank order, IoU only from surviving boxes (all pairs would be ~L^2/2).
    seg_start = torch.cummax(torch.where(new, pos, 0), 0).values
    long = (seg_end - seg_start) > _SHORT_SEGMENT
    keep_sorted = torch.zeros(n, dtype=torch.bool, device=boxes.device)
    for part in (~long, long):
        idx = torch.nonzero(part).flatten()
        m = idx.numel()
        if m == 0:
            continue
        sub = sboxes[idx]
        sub_new = new[idx]  # a segment is wholly in one part: its start stays a start
        if part is long:
            sub_pos = torch.arange(m, device=boxes.device)
            sub_last = torch.roll(sub_new, -1)
            sub_end = torch.flip(torch.cummin(torch.flip(torch.where(sub_last, sub_pos + 1, m), [0]), 0).values, [0])
            keep_sorted[idx] = _greedy_blocks(sub, sub_end, thr)
        else:
            starts = torch.nonzero(sub_new).flatten()
            src, dst = _suppression_edges(sub, torch.cat([starts, starts.new_tensor([m])]), thr)
            keep_sorted[idx] = _greedy_fixed_point(m, src, dst, boxes.device)
    return _kept_indices(keep_sorted, order, score_perm)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _bit_or(a, b):
        return a | b

    @triton.jit
    def _load_boxes(boxes_ptr, idx, m):
        x1 = tl.load(boxes_ptr + idx * 4 + 0, mask=m, other=0.0)
        y1 = tl.load(boxes_ptr + idx * 4 + 1, mask=m, other=0.0)
        x2 = tl.load(boxes_ptr + idx * 4 + 2, mask=m, other=0.0)
        y2 = tl.load(boxes_ptr + idx * 4 + 3, mask=m, other=0.0)
        return x1, y1, x2, y2, (x2 - x1) * (y2 - y1)

    @triton.jit
    def _suppress_words(boxes_ptr, rows, rmask, cols, cmask, end_r, thr, BLOCK: tl.constexpr):
        """(BLOCK,) int64: bit j of word r = row box r (ranked higher) has IoU > thr with column box j,
        j later than r in r's segment. torchvision's IoU formula and evaluation order."""
        rx1, ry1, rx2, ry2, ra = _load_boxes(boxes_ptr, rows, rmask)
        cx1, cy1, cx2, cy2, ca = _load_boxes(boxes_ptr, cols, cmask)
        w = tl.maximum(tl.minimum(rx2[:, None], cx2[None, :]) - tl.maximum(rx1[:, None], cx1[None, :]), 0.0)
        h = tl.maximum(tl.minimum(ry2[:, None], cy2[None, :]) - tl.maximum(ry1[:, None], cy1[None, :]), 0.0)
        inter = w * h
        iou = tl.math.div_rn(inter, (ra[:, None] + ca[None, :]) - inter)
        hit = (iou > thr) & (cols[None, :] > rows[:, None]) & (cols[None, :] < end_r[:, None])
        bit = tl.full([BLOCK], 1, tl.int64) << tl.arange(0, BLOCK).to(tl.int64)
        return tl.sum(tl.where(hit, bit[None, :], 0), 1)  # distinct bits: the sum is their OR

    @triton.jit(do_not_specialize=["n", "W", "W_SPLIT"])
    def _nms_mask_kernel(boxes_ptr, seg_end_ptr, mask_ptr, n, W, W_SPLIT, thr, BLOCK: tl.constexpr):
        """Program (b, s): tiles of row block b x column blocks b + w, w = s, s + W_SPLIT, ... while the
        block's segments reach them -> mask[w, 64 b : 64 b + 64]."""
        b = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        rows = b * BLOCK + offs
        rmask = rows < n
        # seg_end is non-decreasing in the sorted position: the block's last row reaches furthest
        reach = tl.load(seg_end_ptr + tl.minimum(b * BLOCK + BLOCK, n) - 1)
        w_end = tl.minimum(W, (reach + BLOCK - 1) // BLOCK - b)
        end_r = tl.load(seg_end_ptr + rows, mask=rmask, other=0)
        for w in range(tl.program_id(1), w_end, W_SPLIT):
            cols = (b + w) * BLOCK + offs
            word = _suppress_words(boxes_ptr, rows, rmask, cols, cols < n, end_r, thr, BLOCK)
            tl.store(mask_ptr + n.to(tl.int64) * w + rows, word, mask=rmask)

    @triton.jit(do_not_specialize=["n", "W"])
    def _nms_scan_kernel(boxes_ptr, mask_ptr, seg_start_ptr, seg_end_ptr, seg_id_ptr, removed_ptr, keep_ptr,
                         n, W, thr, BLOCK: tl.constexpr, WCHUNK: tl.constexpr):
        """Program b: greedy scan of every segment starting in sorted positions [64 b, 64 b + 64).

        ``removed_ptr + seg_id + c`` is the removed word of global block c for that segment (segments
        own disjoint word ranges). Blocks are visited in rank order; when block c is reached every
        suppression by kept boxes of earlier blocks is in its word, so the in-block scan is exact.
        """
        b = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        one = tl.full([BLOCK], 1, tl.int64)
        for q in range(b * BLOCK, tl.minimum(b * BLOCK + BLOCK, n)):
            if tl.load(seg_start_ptr + q) == q:
                end = tl.load(seg_end_ptr + q)
                rbase = removed_ptr + tl.load(seg_id_ptr + q)
                c_last = (end - 1) // BLOCK
                for c in range(q // BLOCK, c_last + 1):
                    lo = tl.maximum(q, c * BLOCK)
                    hi = tl.minimum(end, c * BLOCK + BLOCK)
                    r = tl.load(rbase + c)
                    for p in range(lo, hi):  # the greedy decisions of this block, in rank order
                        diag = tl.load(mask_ptr + p)  # mask[0, p]: p's suppressions inside block c
                        alive = ((r >> (p - c * BLOCK)) & 1) == 0
                        r = tl.where(alive, r | diag, r)
                    pos = c * BLOCK + offs
                    inseg = (pos >= lo) & (pos < hi)
                    kept = inseg & (((r >> offs.to(tl.int64)) & one) == 0)
                    tl.store(keep_ptr + pos, kept.to(tl.int8), mask=inseg)
                    if (c < c_last) & (tl.max(kept.to(tl.int32), 0) > 0):
                        # later blocks inside the mask's band: OR the kept rows' words
                        w_hi = tl.minimum(c_last - c, W - 1)
                        for w0 in range(1, w_hi + 1, WCHUNK):
                            wv = w0 + tl.arange(0, WCHUNK)
                            wm = wv <= w_hi
                            words = tl.load(mask_ptr + wv[None, :].to(tl.int64) * n + pos[:, None],
                                            mask=kept[:, None] & wm[None, :], other=0)
                            acc = tl.reduce(words, 0, _bit_or)
                            old = tl.load(rbase + c + wv, mask=wm, other=0)
                            tl.store(rbase + c + wv, old | acc, mask=wm)
                        # later blocks beyond the band: IoU tiles on the fly
                        end_r = tl.where(kept, end, 0)
                        for c2 in range(c + W, c_last + 1):
                            cols = c2 * BLOCK + offs
                            word = _suppress_words(boxes_ptr, pos, kept, cols, cols < end, end_r, thr, BLOCK)
                            acc2 = tl.reduce(word, 0, _bit_or)
                            tl.store(rbase + c2, tl.load(rbase + c2) | acc2)
                    # this block's stores must be visible to every thread before later blocks read them
                    tl.debug_barrier()


@contextlib.contextmanager
def _quiet_interpreter(device):
    """The interpreter computes with numpy, which warns on 0/0 (degenerate boxes, masked lanes)."""
    if torch.device(device).type == "cuda":
        yield
        return
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        yield


def _band_words(n: int, budget_bytes: int) -> int:
    """Mask words per box: enough for the longest possible segment (all ``n`` boxes) within the budget."""
    return max(1, min(-(-n // _BLOCK), budget_bytes // (8 * max(n, 1))))


# ----------------------------------------------------------------------------------------------
# Launcher = custom op, and the public function
# ----------------------------------------------------------------------------------------------


@triton_op("effdet::batched_nms")
def _batched_nms_op(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor,
                    batch_index: Optional[torch.Tensor], iou_threshold: float, band_words: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (score_perm (N,) int64: indices by score desc, index asc; keep (N,) bool in that order).

    ``band_words``: mask words per box, 0 = from the 64 MiB budget (tests pass small values to cover
    the on-the-fly path). No host synchronisation.
    """
    n = boxes.shape[0]
    dev = boxes.device
    if n == 0:
        return torch.empty(0, dtype=torch.int64, device=dev), torch.empty(0, dtype=torch.bool, device=dev)
    order, score_perm = _sort_groups(scores, classes, batch_index)
    new = _segment_starts(order, classes, batch_index)
    pos = torch.arange(n, device=dev, dtype=torch.int32)
    seg_start = torch.cummax(torch.where(new, pos, 0), 0).values
    seg_id = torch.cumsum(new, 0, dtype=torch.int32) - 1
    last = torch.roll(new, -1)  # p is the last of its segment (p = n-1: new[0] is True)
    seg_end = torch.flip(torch.cummin(torch.flip(torch.where(last, pos + 1, n), [0]), 0).values, [0])
    seg_end = seg_end.to(torch.int32)
    sboxes = boxes[order].float().contiguous()
    nb = -(-n // _BLOCK)
    W = band_words if band_words > 0 else _band_words(n, _MASK_BUDGET_BYTES)
    W = max(1, min(W, nb))
    mask = torch.empty((W, n), dtype=torch.int64, device=dev)
    removed = torch.zeros(n + nb + 1, dtype=torch.int64, device=dev)  # seg_id + block < n + nb
    keep_sorted = torch.empty(n, dtype=torch.int8, device=dev)
    thr = _threshold_f32(iou_threshold)
    # num_warps: 8 (mask) and 16 (scan) keep both kernels under 255 registers without spills on sm_90 and
    # sm_80 (4 warps: the scan uses 255 registers on sm_90 and spills on sm_80, per cuobjdump
    # --dump-resource-usage of an ahead-of-time compile with Triton 3.8); the scan's serial part is scalar
    # (one load and a few integer ops per box, no barrier), so the extra warps only share the 64x64 tiles.
    with _quiet_interpreter(dev):
        split = min(W, _MASK_SPLIT)
        _nms_mask_kernel[(nb, split)](sboxes, seg_end, mask, n, W, split, thr, BLOCK=_BLOCK, num_warps=8,
                                      enable_fp_fusion=False)
        _nms_scan_kernel[(nb,)](sboxes, mask, seg_start, seg_end, seg_id, removed, keep_sorted, n, W, thr,
                                BLOCK=_BLOCK, WCHUNK=_SCAN_WCHUNK, num_warps=16,
                                enable_fp_fusion=False)
    keep_orig = torch.empty(n, dtype=torch.bool, device=dev)
    keep_orig[order] = keep_sorted.bool()
    return score_perm, keep_orig[score_perm]


@_batched_nms_op.register_fake
def _batched_nms_fake(boxes, scores, classes, batch_index, iou_threshold, band_words):
    n = boxes.shape[0]
    return boxes.new_empty((n,), dtype=torch.int64), boxes.new_empty((n,), dtype=torch.bool)


_MAX_TRITON_BOXES = 2**29  # 4 * position must fit the kernels' int32 offsets


def _unsupported(boxes: torch.Tensor) -> Optional[str]:
    """Why the Triton path cannot take these boxes (``"auto"`` then runs the reference), or None."""
    n = boxes.shape[0]
    return f"{n} boxes (it takes fewer than {_MAX_TRITON_BOXES})" if n >= _MAX_TRITON_BOXES else None


def _triton_path(boxes, scores, classes, iou_threshold, batch_index, band_words=0):
    score_perm, keep = _batched_nms_op(boxes, scores, classes, batch_index, float(iou_threshold), int(band_words))
    return score_perm[keep]  # the one host synchronisation: the output's length


# The reference is data dependent (segment count, fixed-point loop): wrapped as an opaque op so that
# torch.compile(fullgraph=True) traces post-processing with backend="torch" too.
@torch.library.custom_op("effdet::batched_nms_reference", mutates_args=())
def _batched_nms_reference_op(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor,
                              batch_index: Optional[torch.Tensor], iou_threshold: float) -> torch.Tensor:
    return batched_nms_reference(boxes, scores, classes, iou_threshold, batch_index)


@_batched_nms_reference_op.register_fake
def _batched_nms_reference_fake(boxes, scores, classes, batch_index, iou_threshold):
    return boxes.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.int64)


def _reference_path(boxes, scores, classes, iou_threshold, batch_index, band_words=0):
    return _batched_nms_reference_op(boxes, scores, classes, batch_index, float(iou_threshold))


def _triton_mask_path(boxes, scores, classes, iou_threshold, batch_index):
    score_perm, keep = _batched_nms_op(boxes, scores, classes, batch_index, float(iou_threshold), 0)
    return torch.zeros_like(keep).index_put_((score_perm,), keep)


def _reference_mask_path(boxes, scores, classes, iou_threshold, batch_index):
    kept = _reference_path(boxes, scores, classes, iou_threshold, batch_index)
    return torch.zeros(boxes.shape[0], dtype=torch.bool, device=boxes.device).index_fill_(0, kept, True)


def batched_nms_mask(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, iou_threshold: float,
                     batch_index: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """``batched_nms`` as a keep mask: ``(N,)`` bool, True for the boxes it keeps, aligned with the input.

    Its size does not depend on the data, so on the Triton path nothing is read back to the host (the
    post-processing of a batch uses it and stays free of host synchronisation).
    """
    _check_inputs(boxes, scores, classes, batch_index)
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.bool, device=boxes.device)
    return dispatch(OP_NAME, backend, boxes.device, _triton_mask_path, _reference_mask_path,
                    boxes, scores, classes, iou_threshold, batch_index, unsupported=_unsupported(boxes))


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, iou_threshold: float,
                batch_index: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """Exact greedy NMS per (image, class) group; returns kept indices (int64), highest score first.

    boxes (N, 4) xyxy float32/float16, scores (N,), classes (N,) integer, batch_index (N,) integer
    image index or None (one image). Same result as torchvision's per-group NMS
    (``torchvision.ops.nms`` on each (image, class) group of ``boxes.float()``); see the module
    docstring for ties, NaN and why ``torchvision.ops.batched_nms`` itself may differ on small inputs.
    """
    _check_inputs(boxes, scores, classes, batch_index)
    if boxes.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    return dispatch(OP_NAME, backend, boxes.device, _triton_path, _reference_path,
                    boxes, scores, classes, iou_threshold, batch_index, unsupported=_unsupported(boxes))
