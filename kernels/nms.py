"""Batched greedy non-maximum suppression: many images, many classes, one call.

``batched_nms(boxes, scores, classes, iou_threshold, batch_index=None)`` returns the kept indices
(int64), highest score first, and is identical to
``torchvision.ops.batched_nms(boxes, scores, idxs)`` with ``idxs`` encoding the (image, class) pair:

* a box is suppressed by a *kept* box of the same (image, class) group with a higher rank whose IoU
  with it is strictly greater than ``iou_threshold``; rank = score descending, equal scores: the
  lower index first (stable sort);
* IoU is torchvision's formula in float32: ``area = (x2-x1)*(y2-y1)``, ``inter = clamp(min(x2) -
  max(x1), 0) * clamp(min(y2) - max(y1), 0)``, ``iou = inter / (area_i + area_j - inter)``, so
  zero-area and inverted boxes behave the same (a NaN IoU never suppresses);
* the output is ordered by score descending, ties by lower index.

Both paths share the same preparation in PyTorch (on the tensors' device): three stable sorts put
the boxes in (image, class, score desc, index) order, so every (image, class) group is one
contiguous *segment*; then

* the reference (:func:`batched_nms_reference`) computes IoU only for pairs inside a segment, in
  chunks, and resolves the greedy suppression by a fixed-point iteration (see
  :func:`_greedy_fixed_point` for the exactness argument);
* the Triton path launches ONE kernel for the whole batch, one program per segment; each program
  walks its segment in blocks of ``BLOCK`` boxes: it resolves the block against itself with the
  sequential greedy scan (IoU tile in registers), then lets the block's kept boxes suppress every
  later block of the segment (IoU tiles computed on the fly, i.e. the suppression bitmask is built
  tile by tile and never stored or copied to the host). The per-box "removed" flags live in a
  device scratch buffer.

Host synchronisations: the number of segments (one ``nonzero``) and the final number of kept boxes
(the output's length is data dependent). None per image, class or block.

fp16 boxes are converted to float32 before any arithmetic (torchvision's CPU kernel computes fp16
boxes in fp16, so for fp16 inputs compare against torchvision on ``boxes.float()``). On CUDA the
Triton kernel is compiled with ``enable_fp_fusion=False`` and uses ``div_rn`` so the IoU is bitwise
the same float32 value the reference computes (no FMA contraction, IEEE division).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from ._dispatch import resolve, triton_available

__all__ = ["batched_nms", "batched_nms_reference"]

# Pairs per chunk in the reference's IoU pass (bounds memory: ~40 bytes per pair).
_PAIR_CHUNK = 1 << 22

# ----------------------------------------------------------------------------------------------
# Shared preparation
# ----------------------------------------------------------------------------------------------


def _check_inputs(boxes, scores, classes, batch_index):
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be (N, 4), got {tuple(boxes.shape)}")
    n = boxes.shape[0]
    if scores.shape != (n,) or classes.shape != (n,):
        raise ValueError(f"scores and classes must be ({n},), got {tuple(scores.shape)}, {tuple(classes.shape)}")
    if batch_index is not None and batch_index.shape != (n,):
        raise ValueError(f"batch_index must be ({n},), got {tuple(batch_index.shape)}")
    if not boxes.is_floating_point():
        raise TypeError(f"boxes must be floating point, got {boxes.dtype}")


def _group_order(scores, classes, batch_index):
    """Sort into (image, class, score desc, index asc) order with three stable sorts.

    Returns ``order`` (N,) int64 - original index at each sorted position -, ``score_perm`` (N,)
    int64 - original indices by (score desc, index asc) -, and ``seg`` (S+1,) int64 - segment
    starts in sorted order followed by N.
    """
    score_perm = torch.sort(scores, descending=True, stable=True).indices
    order = score_perm[torch.sort(classes[score_perm], stable=True).indices]
    if batch_index is not None:
        order = order[torch.sort(batch_index[order], stable=True).indices]
    n = order.numel()
    c = classes[order]
    new = torch.ones(n, dtype=torch.bool, device=order.device)
    if n > 1:
        diff = c[1:] != c[:-1]
        if batch_index is not None:
            b = batch_index[order]
            diff |= b[1:] != b[:-1]
        new[1:] = diff
    starts = torch.nonzero(new).flatten()  # host sync: the number of segments
    seg = torch.cat([starts, starts.new_tensor([n])])
    return order, score_perm, seg


def _finish(keep_sorted, order, score_perm):
    """Kept flags in sorted order -> kept original indices, score descending (ties: lower index)."""
    keep_orig = torch.zeros_like(keep_sorted)
    keep_orig[order] = keep_sorted
    return score_perm[keep_orig[score_perm]]


def _threshold_f32(t: float) -> float:
    """The largest float32 <= ``t``.

    torchvision's CPU kernel compares the float32 IoU with the threshold as a double; for a float32
    ``x``, ``x > t`` (in double) is the same as ``x > largest_f32_le(t)``, which both our paths use.
    """
    t = float(t)
    t32 = torch.tensor(t, dtype=torch.float32)
    if t32.item() > t:
        t32 = torch.nextafter(t32, torch.tensor(float("-inf")))
    return t32.item()


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


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------


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


def batched_nms_reference(boxes, scores, classes, iou_threshold, batch_index=None):
    """Plain-PyTorch exact batched greedy NMS (float32 IoU); see the module docstring.

    Vectorized: no N x N matrix, no Python loop over images, classes or boxes (only over chunks of
    candidate pairs and over fixed-point steps).
    """
    _check_inputs(boxes, scores, classes, batch_index)
    n = boxes.shape[0]
    if n == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    order, score_perm, seg = _group_order(scores, classes, batch_index)
    sboxes = boxes[order].float()
    src, dst = _suppression_edges(sboxes, seg, _threshold_f32(iou_threshold))
    keep_sorted = _greedy_fixed_point(n, src, dst, boxes.device)
    return _finish(keep_sorted, order, score_perm)


# ----------------------------------------------------------------------------------------------
# Triton
# ----------------------------------------------------------------------------------------------

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _iou_tile(rx1, ry1, rx2, ry2, rarea, cx1, cy1, cx2, cy2, carea):
        # rows (dim 0) rank above columns (dim 1); torchvision's formula and evaluation order.
        xx1 = tl.maximum(rx1[:, None], cx1[None, :])
        yy1 = tl.maximum(ry1[:, None], cy1[None, :])
        xx2 = tl.minimum(rx2[:, None], cx2[None, :])
        yy2 = tl.minimum(ry2[:, None], cy2[None, :])
        w = tl.maximum(xx2 - xx1, 0.0)
        h = tl.maximum(yy2 - yy1, 0.0)
        inter = w * h
        return tl.math.div_rn(inter, (rarea[:, None] + carea[None, :]) - inter)

    @triton.jit
    def _nms_segments_kernel(boxes_ptr, seg_ptr, state_ptr, iou_threshold, BLOCK: tl.constexpr):
        """One program per (image, class) segment of the sorted boxes.

        ``state[p]`` = 1 once sorted box p is suppressed. Blocks of the segment are visited in rank
        order; when block b is reached every suppression by kept boxes of earlier blocks has been
        applied, so the in-block sequential scan decides block b exactly; its kept boxes then
        suppress boxes of all later blocks.
        """
        s = tl.program_id(0)
        start = tl.load(seg_ptr + s)
        end = tl.load(seg_ptr + s + 1)
        offs = tl.arange(0, BLOCK)
        upper = offs[:, None] < offs[None, :]  # strictly later position inside the block
        for b0 in range(start, end, BLOCK):
            rows = b0 + offs
            rmask = rows < end
            rx1 = tl.load(boxes_ptr + rows * 4 + 0, mask=rmask, other=0.0)
            ry1 = tl.load(boxes_ptr + rows * 4 + 1, mask=rmask, other=0.0)
            rx2 = tl.load(boxes_ptr + rows * 4 + 2, mask=rmask, other=0.0)
            ry2 = tl.load(boxes_ptr + rows * 4 + 3, mask=rmask, other=0.0)
            rarea = (rx2 - rx1) * (ry2 - ry1)
            iou = _iou_tile(rx1, ry1, rx2, ry2, rarea, rx1, ry1, rx2, ry2, rarea)
            over = ((iou > iou_threshold) & upper & rmask[None, :]).to(tl.int32)
            removed = tl.load(state_ptr + rows, mask=rmask, other=1)
            n_valid = tl.minimum(end - b0, BLOCK)
            for i in range(0, n_valid):  # sequential greedy scan inside the block
                r_i = tl.sum(tl.where(offs == i, removed, 0), axis=0)
                row_i = tl.sum(tl.where(offs[:, None] == i, over, 0), axis=0)
                removed = tl.where((row_i > 0) & (r_i == 0), 1, removed)
            tl.store(state_ptr + rows, removed, mask=rmask)
            kept = (removed == 0) & rmask
            if tl.max(kept.to(tl.int32), axis=0) > 0:
                for c0 in range(b0 + BLOCK, end, BLOCK):
                    cols = c0 + offs
                    cmask = cols < end
                    cx1 = tl.load(boxes_ptr + cols * 4 + 0, mask=cmask, other=0.0)
                    cy1 = tl.load(boxes_ptr + cols * 4 + 1, mask=cmask, other=0.0)
                    cx2 = tl.load(boxes_ptr + cols * 4 + 2, mask=cmask, other=0.0)
                    cy2 = tl.load(boxes_ptr + cols * 4 + 3, mask=cmask, other=0.0)
                    carea = (cx2 - cx1) * (cy2 - cy1)
                    iou_c = _iou_tile(rx1, ry1, rx2, ry2, rarea, cx1, cy1, cx2, cy2, carea)
                    hit = tl.where((iou_c > iou_threshold) & kept[:, None], 1, 0)
                    sup = tl.max(hit, axis=0)
                    st = tl.load(state_ptr + cols, mask=cmask, other=1)
                    tl.store(state_ptr + cols, st | sup, mask=cmask)
            # make this block's stores visible to all threads before the next block reads them
            tl.debug_barrier()


@contextlib.contextmanager
def _quiet_interpreter(device):
    """The interpreter computes with numpy, which warns on 0/0 (degenerate boxes, masked lanes)."""
    if torch.device(device).type == "cuda":
        yield
        return
    import numpy as np

    with np.errstate(invalid="ignore", divide="ignore"):
        yield


def _default_block(device) -> int:
    return 64 if torch.device(device).type == "cuda" else 16


def batched_nms_triton(boxes, scores, classes, iou_threshold, batch_index=None, block=None):
    """The Triton path (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``). ``block``: boxes per tile."""
    _check_inputs(boxes, scores, classes, batch_index)
    n = boxes.shape[0]
    if n == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    if n >= 2**29:
        raise ValueError("batched_nms: too many boxes for int32 offsets")
    order, score_perm, seg = _group_order(scores, classes, batch_index)
    sboxes = boxes[order].float().contiguous()
    seg32 = seg.to(torch.int32)
    state = torch.zeros(n, dtype=torch.int32, device=boxes.device)
    block = block or _default_block(boxes.device)
    with _quiet_interpreter(boxes.device):
        _nms_segments_kernel[(seg.numel() - 1,)](
            sboxes, seg32, state, _threshold_f32(iou_threshold), BLOCK=block, enable_fp_fusion=False)
    return _finish(state == 0, order, score_perm)


# ----------------------------------------------------------------------------------------------
# torch custom op (so torch.compile(fullgraph=True) traces through) and the public function
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("effdet::batched_nms", mutates_args=())
def _batched_nms_op(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor,
                    batch_index: Optional[torch.Tensor], iou_threshold: float) -> torch.Tensor:
    return batched_nms_reference(boxes, scores, classes, iou_threshold, batch_index)


@_batched_nms_op.register_kernel("cuda")
def _batched_nms_op_cuda(boxes, scores, classes, batch_index, iou_threshold):
    if triton_available():
        return batched_nms_triton(boxes, scores, classes, iou_threshold, batch_index)
    return batched_nms_reference(boxes, scores, classes, iou_threshold, batch_index)


@_batched_nms_op.register_fake
def _batched_nms_fake(boxes, scores, classes, batch_index, iou_threshold):
    k = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty((k,), dtype=torch.int64)


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, iou_threshold: float,
                batch_index: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """Exact greedy NMS per (image, class) group; returns kept indices (int64), highest score first.

    boxes (N, 4) xyxy float32/float16, scores (N,), classes (N,) integer, batch_index (N,) integer
    image index or None (one image). Same result as ``torchvision.ops.batched_nms`` with
    ``idxs = batch_index * num_classes + classes``; see the module docstring.

    backend: "torch" on CPU runs the reference through the ``effdet::batched_nms`` custom op (so it
    compiles with ``fullgraph=True``), on other devices the reference directly; "triton" on CUDA
    runs the custom op (whose CUDA kernel is the Triton path), on CPU under the interpreter the
    Triton launcher directly.
    """
    choice = resolve("batched_nms", backend, boxes.device.type)
    thr = float(iou_threshold)
    if choice == "triton":
        if boxes.device.type == "cuda":
            return _batched_nms_op(boxes, scores, classes, batch_index, thr)
        return batched_nms_triton(boxes, scores, classes, thr, batch_index)
    if boxes.device.type == "cpu":
        return _batched_nms_op(boxes, scores, classes, batch_index, thr)
    return batched_nms_reference(boxes, scores, classes, thr, batch_index)
