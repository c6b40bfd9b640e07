"""Box decoding (anchor + regression deltas -> xyxy pixels) and the fused top-k decode of post-processing.

Channel order: the box head predicts ``(dy, dx, dh, dw)`` per anchor (effdet's order, kept so that
published checkpoints keep their meaning); everything else in the project is xyxy pixels. Decoding::

    cya, cxa, ha, wa from the xyxy anchor
    cy = dy*ha + cya;  cx = dx*wa + cxa
    h = exp(min(dh, BBOX_XFORM_CLIP))*ha;  w = exp(min(dw, BBOX_XFORM_CLIP))*wa,  BBOX_XFORM_CLIP = log(1000/16)
    box = (cx - w/2, cy - h/2, cx + w/2, cy + h/2)
    optional clip: x into [0, W], y into [0, H]

(effdet's ``decode_box_outputs`` is the same without the clamp of ``dh, dw`` and without the clip.)

NaN and inf follow PyTorch: a NaN delta, anchor coordinate or clip size gives NaN coordinates (the
clamp and the clip propagate NaN, as ``torch.clamp``/``torch.minimum`` do); ``dh, dw = +inf`` are
clamped like any large value, ``-inf`` gives a zero-size box.

``decode_topk`` selects the ``k`` largest logits over all anchors x classes of each image (sorted
descending, both backends; NaN logits rank first, as in ``torch.topk``; a two-stage top-k, exact: see
``_topk_select``), then ONE Triton
kernel turns each chosen flat index into (anchor, class), gathers that anchor's deltas and box,
decodes, clips and writes ``sigmoid(logit)`` computed in fp32. Inference ops: no autograd.

Triton design: one program per 256 boxes (or selected candidates), every box decoded by one lane in
fp32 from its 4 deltas and 4 anchor coordinates; no reductions, no shared memory.

Each launcher is the op's custom op (``effdet::decode_boxes``, ``effdet::decode_topk_gather``, via
``kernels._dispatch.triton_op``), with a fake implementation for torch.compile; the public functions
choose between it and the reference with ``kernels._dispatch.dispatch``.
"""
import math
from typing import Optional

import torch

from ._dispatch import dispatch, triton_available, triton_op

__all__ = ["decode_boxes", "decode_topk", "decode_boxes_reference", "decode_topk_reference",
           "BBOX_XFORM_CLIP"]

BBOX_XFORM_CLIP = math.log(1000.0 / 16.0)
_BLOCK = 256
_CLIP_NONE, _CLIP_SCALAR, _CLIP_TENSOR = 0, 1, 2

# --------------------------------------------------------------------------------------------------
# clip_to handling
# --------------------------------------------------------------------------------------------------


def _parse_clip(clip_to, batch_shape: tuple, device) -> tuple[int, Optional[torch.Tensor], float, float]:
    """-> (mode, per-image (prod(batch), 2) fp32 tensor or None, H, W)."""
    if clip_to is None:
        return _CLIP_NONE, None, 0.0, 0.0
    if isinstance(clip_to, torch.Tensor):
        if clip_to.shape[-1:] != (2,):
            raise ValueError(f"kernels/decode.py: clip_to tensor must have shape (..., 2) = (height, width), got "
                             f"{tuple(clip_to.shape)}")
        try:
            c = clip_to.to(device=device, dtype=torch.float32).expand(*batch_shape, 2)
        except RuntimeError as err:
            raise ValueError(f"kernels/decode.py: clip_to shape {tuple(clip_to.shape)} does not broadcast to the batch "
                             f"shape {batch_shape} + (2,)") from err
        return _CLIP_TENSOR, c.reshape(-1, 2).contiguous(), 0.0, 0.0
    try:
        h, w = clip_to
        return _CLIP_SCALAR, None, float(h), float(w)
    except (TypeError, ValueError) as err:
        raise ValueError(f"kernels/decode.py: clip_to must be None, an (H, W) pair or a (..., 2) tensor, "
                         f"got {clip_to!r}") from err


def _clip_reference(boxes: torch.Tensor, mode: int, clip: Optional[torch.Tensor], h: float, w: float):
    if mode == _CLIP_NONE:
        return boxes
    b = boxes.clamp(min=0.0)
    if mode == _CLIP_SCALAR:
        return torch.stack([b[..., 0].clamp(max=w), b[..., 1].clamp(max=h), b[..., 2].clamp(max=w),
                            b[..., 3].clamp(max=h)], dim=-1)
    # clip: (prod(batch), 2) as (H, W); boxes: (*batch, M, 4)
    return torch.minimum(b, clip.flip(-1).repeat(1, 2).reshape(*boxes.shape[:-2], 1, 4))


# --------------------------------------------------------------------------------------------------
# references
# --------------------------------------------------------------------------------------------------


def _decode_math(deltas: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    d = deltas if deltas.dtype == torch.float64 else deltas.float()     # float64 kept for gradcheck
    a = anchors.to(d.dtype)
    wa, ha = a[..., 2] - a[..., 0], a[..., 3] - a[..., 1]
    cxa, cya = a[..., 0] + 0.5 * wa, a[..., 1] + 0.5 * ha
    cy = d[..., 0] * ha + cya
    cx = d[..., 1] * wa + cxa
    h = torch.exp(d[..., 2].clamp(max=BBOX_XFORM_CLIP)) * ha
    w = torch.exp(d[..., 3].clamp(max=BBOX_XFORM_CLIP)) * wa
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def _decode_reference_parsed(deltas, anchors, clip_mode, clip, clip_h, clip_w):
    """The reference with ``clip_to`` already parsed (the same arguments as the custom op)."""
    return _clip_reference(_decode_math(deltas, anchors), clip_mode, clip, clip_h, clip_w)


def decode_boxes_reference(deltas: torch.Tensor, anchors: torch.Tensor, clip_to=None) -> torch.Tensor:
    """Plain-PyTorch decode (the spec): (..., N, 4) (dy, dx, dh, dw) + (N, 4) xyxy -> (..., N, 4) xyxy fp32
    (fp64 for fp64 deltas)."""
    _check_decode(deltas, anchors)
    mode, clip, h, w = _parse_clip(clip_to, tuple(deltas.shape[:-2]), deltas.device)
    return _clip_reference(_decode_math(deltas, anchors), mode, clip, h, w)


def _topk_select(class_logits: torch.Tensor, k: int):
    """The ``k`` largest logits of each image over all anchors x classes: ``(values, flat_index)``, (B, k)
    each, values sorted descending (NaN first, as ``torch.topk`` ranks it), ``flat_index = anchor*C + class``.

    Two stages instead of one ``torch.topk`` over ``N*C`` (D0 at 512 px: 49104 x 90 logits, the flat top-k
    was most of the CPU post-processing): (1) the max over classes of every anchor and the ``k`` anchors with
    the largest max; (2) ``torch.topk`` over the ``k x C`` logits of those anchors only.

    Exactness. Order values as ``torch.topk`` does (NaN above every number, NaNs equal to each other) and
    let ``v`` be the k-th largest logit of the image, ``g < k`` the number of logits strictly above ``v``.
    (a) Every anchor holding a logit ``> v`` has max ``> v``; there are at most ``g < k`` such anchors, so the
    k-th largest anchor max ``M`` is ``<= v`` and all of them are strictly above ``M``: stage 1 picks every one
    of them, whichever way it breaks ties. So all ``g`` logits ``> v`` are candidates.
    (b) Candidates hold at least ``k`` logits ``>= v``: if ``M < v`` every anchor with a logit ``>= v`` is
    strictly above ``M`` and picked; if ``M = v`` each of the ``k`` picked anchors has its max ``>= v``, one
    distinct logit each. The candidates are some of the image's logits, so they hold exactly the ``g`` logits
    above ``v`` (a) and at least ``k - g`` equal to ``v`` (b): stage 2 returns those ``g`` and ``k - g`` logits
    equal to ``v``, i.e. the same values, in the same sorted order,
    as the flat top-k; when no other logit ties with the k-th value (the usual case) the same (anchor, class)
    set too. Ties at the k-th value: which of the tied logits are chosen is unspecified, as for
    ``torch.topk`` itself (the values, and every (anchor, class) above the tie, are exact). The order among
    equal values is unspecified too (``torch.topk``'s). ``k >= N`` (every anchor is a candidate) uses the
    flat top-k directly; ``k`` is clipped to ``N*C``.
    """
    B, N, C = class_logits.shape
    k = max(0, min(int(k), N * C))
    if k >= N or C == 1:
        return torch.topk(class_logits.reshape(B, N * C), k, dim=1, largest=True, sorted=True)
    anchor_max = class_logits.amax(dim=2)                                  # (B, N); NaN if any logit is NaN
    cand = torch.topk(anchor_max, k, dim=1, largest=True, sorted=False).indices        # (B, k) anchors
    rows = (cand + torch.arange(B, device=cand.device).unsqueeze(1) * N).reshape(-1)
    cand_logits = torch.index_select(class_logits.reshape(B * N, C), 0, rows)          # (B*k, C)
    values, pos = torch.topk(cand_logits.reshape(B, k * C), k, dim=1, largest=True, sorted=True)
    slot = torch.div(pos, C, rounding_mode="floor")
    flat_index = torch.gather(cand, 1, slot) * C + (pos - slot * C)
    return values, flat_index


def _topk_gather_reference(values, flat_index, box_deltas, anchors, mode, clip, h, w, num_classes):
    anchor_index = torch.div(flat_index, num_classes, rounding_mode="floor")
    classes = flat_index - anchor_index * num_classes
    d = torch.gather(box_deltas, 1, anchor_index.unsqueeze(-1).expand(-1, -1, 4))
    boxes = _clip_reference(_decode_math(d, anchors[anchor_index]), mode, clip, h, w)
    return boxes, torch.sigmoid(values.float()), classes, anchor_index


def decode_topk_reference(class_logits: torch.Tensor, box_deltas: torch.Tensor, anchors: torch.Tensor,
                          k: int, clip_to=None):
    """Plain-PyTorch top-k + gather + decode: -> (boxes (B,k,4), scores (B,k), classes, anchor_index)."""
    _check_topk(class_logits, box_deltas, anchors)
    mode, clip, h, w = _parse_clip(clip_to, (class_logits.shape[0],), class_logits.device)
    values, flat_index = _topk_select(class_logits, k)
    return _topk_gather_reference(values, flat_index, box_deltas, anchors, mode, clip, h, w,
                                  class_logits.shape[-1])


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _clip_nan(v, hi):
        """min(max(v, 0), hi), NaN in either operand -> NaN (torch.clamp / torch.minimum semantics)."""
        return tl.minimum(tl.maximum(v, 0.0, propagate_nan=tl.PropagateNan.ALL), hi,
                          propagate_nan=tl.PropagateNan.ALL)

    @triton.jit
    def _decode_one(d_ptr, a_ptr, m, clip_ptr, clip_h, clip_w, img, out_ptr, XFORM_CLIP: tl.constexpr,
                    CLIP_MODE: tl.constexpr):
        """Decode boxes whose 4 deltas start at d_ptr and 4 anchor coords at a_ptr; store at out_ptr."""
        dy = tl.load(d_ptr + 0, mask=m, other=0.0).to(tl.float32)
        dx = tl.load(d_ptr + 1, mask=m, other=0.0).to(tl.float32)
        dh = tl.load(d_ptr + 2, mask=m, other=0.0).to(tl.float32)
        dw = tl.load(d_ptr + 3, mask=m, other=0.0).to(tl.float32)
        x1a = tl.load(a_ptr + 0, mask=m, other=0.0).to(tl.float32)
        y1a = tl.load(a_ptr + 1, mask=m, other=0.0).to(tl.float32)
        x2a = tl.load(a_ptr + 2, mask=m, other=0.0).to(tl.float32)
        y2a = tl.load(a_ptr + 3, mask=m, other=0.0).to(tl.float32)
        wa = x2a - x1a
        ha = y2a - y1a
        cx = dx * wa + (x1a + 0.5 * wa)
        cy = dy * ha + (y1a + 0.5 * ha)
        # propagate_nan: a NaN delta stays NaN, as in torch.clamp (the default drops it)
        hw = 0.5 * (tl.exp(tl.minimum(dw, XFORM_CLIP, propagate_nan=tl.PropagateNan.ALL)) * wa)
        hh = 0.5 * (tl.exp(tl.minimum(dh, XFORM_CLIP, propagate_nan=tl.PropagateNan.ALL)) * ha)
        x1 = cx - hw
        y1 = cy - hh
        x2 = cx + hw
        y2 = cy + hh
        if CLIP_MODE != 0:
            if CLIP_MODE == 1:
                H = clip_h
                W = clip_w
            else:
                H = tl.load(clip_ptr + img * 2, mask=m, other=0.0)
                W = tl.load(clip_ptr + img * 2 + 1, mask=m, other=0.0)
            x1 = _clip_nan(x1, W)
            x2 = _clip_nan(x2, W)
            y1 = _clip_nan(y1, H)
            y2 = _clip_nan(y2, H)
        tl.store(out_ptr + 0, x1, mask=m)
        tl.store(out_ptr + 1, y1, mask=m)
        tl.store(out_ptr + 2, x2, mask=m)
        tl.store(out_ptr + 3, y2, mask=m)

    @triton.jit(do_not_specialize=["n_boxes", "N"])
    def _decode_boxes_kernel(d_ptr, a_ptr, clip_ptr, out_ptr, n_boxes, N, clip_h, clip_w,
                             XFORM_CLIP: tl.constexpr, CLIP_MODE: tl.constexpr, BLOCK: tl.constexpr):
        box = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = box < n_boxes
        img = box // N
        anchor = box - img * N
        _decode_one(d_ptr + box * 4, a_ptr + anchor * 4, m, clip_ptr, clip_h, clip_w, img,
                    out_ptr + box * 4, XFORM_CLIP, CLIP_MODE)

    @triton.jit(do_not_specialize=["n_sel", "k", "N", "C"])
    def _topk_gather_kernel(val_ptr, idx_ptr, d_ptr, a_ptr, clip_ptr, box_ptr, score_ptr, cls_ptr,
                            aidx_ptr, n_sel, k, N, C, clip_h, clip_w,
                            XFORM_CLIP: tl.constexpr, CLIP_MODE: tl.constexpr, BLOCK: tl.constexpr):
        sel = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = sel < n_sel
        img = sel // k
        flat = tl.load(idx_ptr + sel, mask=m, other=0).to(tl.int64)
        anchor = flat // C
        cls = flat - anchor * C
        _decode_one(d_ptr + (img * N + anchor) * 4, a_ptr + anchor * 4, m, clip_ptr, clip_h, clip_w, img,
                    box_ptr + sel * 4, XFORM_CLIP, CLIP_MODE)
        v = tl.load(val_ptr + sel, mask=m, other=0.0).to(tl.float32)
        e = tl.exp(-tl.abs(v))                       # stable sigmoid: no exp overflow
        score = tl.where(v >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
        tl.store(score_ptr + sel, score, mask=m)
        tl.store(cls_ptr + sel, cls, mask=m)
        tl.store(aidx_ptr + sel, anchor, mask=m)


# --------------------------------------------------------------------------------------------------
# launchers = custom ops
# --------------------------------------------------------------------------------------------------


@triton_op("effdet::decode_boxes")
def _decode_boxes_op(deltas: torch.Tensor, anchors: torch.Tensor, clip_mode: int, clip: Optional[torch.Tensor],
                     clip_h: float, clip_w: float) -> torch.Tensor:
    d = deltas.contiguous()
    a = anchors.contiguous()
    out = torch.empty(d.shape, dtype=torch.float32, device=d.device)
    n_boxes = d.numel() // 4
    if n_boxes:
        _decode_boxes_kernel[(triton.cdiv(n_boxes, _BLOCK),)](
            d, a, clip if clip is not None else out, out, n_boxes, a.shape[0], float(clip_h), float(clip_w),
            XFORM_CLIP=BBOX_XFORM_CLIP, CLIP_MODE=clip_mode, BLOCK=_BLOCK, num_warps=4)
    return out


@_decode_boxes_op.register_fake
def _decode_boxes_fake(deltas, anchors, clip_mode, clip, clip_h, clip_w):
    return deltas.new_empty(deltas.shape, dtype=torch.float32)


@triton_op("effdet::decode_topk_gather")
def _topk_gather_op(values: torch.Tensor, flat_index: torch.Tensor, box_deltas: torch.Tensor,
                    anchors: torch.Tensor, clip_mode: int, clip: Optional[torch.Tensor], clip_h: float,
                    clip_w: float, num_classes: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    B, k = values.shape
    dev = values.device
    boxes = torch.empty((B, k, 4), dtype=torch.float32, device=dev)
    scores = torch.empty((B, k), dtype=torch.float32, device=dev)
    classes = torch.empty((B, k), dtype=torch.int64, device=dev)
    anchor_index = torch.empty((B, k), dtype=torch.int64, device=dev)
    n_sel = B * k
    if n_sel:
        d = box_deltas.contiguous()
        _topk_gather_kernel[(triton.cdiv(n_sel, _BLOCK),)](
            values.contiguous(), flat_index.contiguous(), d, anchors.contiguous(),
            clip if clip is not None else scores, boxes, scores, classes, anchor_index,
            n_sel, k, d.shape[1], num_classes, float(clip_h), float(clip_w),
            XFORM_CLIP=BBOX_XFORM_CLIP, CLIP_MODE=clip_mode, BLOCK=_BLOCK, num_warps=4)
    return boxes, scores, classes, anchor_index


@_topk_gather_op.register_fake
def _topk_gather_fake(values, flat_index, box_deltas, anchors, clip_mode, clip, clip_h, clip_w, num_classes):
    B, k = values.shape
    return (values.new_empty((B, k, 4), dtype=torch.float32), values.new_empty((B, k), dtype=torch.float32),
            values.new_empty((B, k), dtype=torch.int64), values.new_empty((B, k), dtype=torch.int64))


# --------------------------------------------------------------------------------------------------
# public functions
# --------------------------------------------------------------------------------------------------


def _check_decode(deltas: torch.Tensor, anchors: torch.Tensor) -> None:
    if not deltas.is_floating_point() or not anchors.is_floating_point():
        raise TypeError(f"kernels/decode.py: decode_boxes: deltas and anchors must be floating point, got "
                        f"{deltas.dtype}, {anchors.dtype}")
    if deltas.dim() < 2 or deltas.shape[-1] != 4:
        raise ValueError(f"kernels/decode.py: decode_boxes: deltas must be (..., N, 4), got {tuple(deltas.shape)}")
    if anchors.dim() != 2 or anchors.shape[-1] != 4 or anchors.shape[0] != deltas.shape[-2]:
        raise ValueError(f"kernels/decode.py: decode_boxes: anchors must be (N, 4) with N = {deltas.shape[-2]}, got "
                         f"{tuple(anchors.shape)}")
    if anchors.device != deltas.device:
        raise ValueError(f"kernels/decode.py: decode_boxes: anchors on {anchors.device}, deltas on {deltas.device}")


def _check_topk(class_logits, box_deltas, anchors) -> None:
    if class_logits.dim() != 3 or not class_logits.is_floating_point():
        raise ValueError(f"kernels/decode.py: decode_topk: class_logits must be a floating (B, N, C) tensor, got "
                         f"{tuple(class_logits.shape)} {class_logits.dtype}")
    B, N, _ = class_logits.shape
    if tuple(box_deltas.shape) != (B, N, 4):
        raise ValueError(f"kernels/decode.py: decode_topk: box_deltas must be (B, N, 4) = {(B, N, 4)}, got "
                         f"{tuple(box_deltas.shape)}")
    _check_decode(box_deltas, anchors)
    if class_logits.device != box_deltas.device:
        raise ValueError(f"kernels/decode.py: decode_topk: class_logits on {class_logits.device}, box_deltas on "
                         f"{box_deltas.device}")


def _triton_unsupported(deltas: torch.Tensor, anchors: torch.Tensor, clip_to) -> Optional[str]:
    """Why the Triton path cannot decode these inputs as the reference does (``"auto"`` then runs the
    reference), or None: it computes in float32 and has no backward (deltas, anchors or a ``clip_to`` tensor
    that needs a gradient would silently get none)."""
    if deltas.dtype == torch.float64:
        return "float64 deltas (it decodes in float32)"
    if torch.is_grad_enabled():
        for name, t in (("deltas that need", deltas), ("anchors that need", anchors),
                        ("a clip_to tensor that needs", clip_to)):
            if isinstance(t, torch.Tensor) and t.requires_grad:
                return f"{name} a gradient (it has no backward)"
    return None


def decode_boxes(deltas: torch.Tensor, anchors: torch.Tensor, clip_to=None, backend: str = "auto"
                 ) -> torch.Tensor:
    """Decode regression deltas into xyxy pixel boxes.

    Args:
        deltas: ``(..., N, 4)`` in the box head's channel order **(dy, dx, dh, dw)** (effdet's), any
            float dtype.
        anchors: ``(N, 4)`` xyxy pixels.
        clip_to: ``None``, an ``(H, W)`` pair, or a ``(..., 2)`` tensor of per-image ``(height, width)``
            (broadcast over the leading dims of ``deltas``): x is clamped to ``[0, W]``, y to ``[0, H]``.
        backend: ``"auto" | "triton" | "torch"``.

    Returns:
        ``(..., N, 4)`` float32 xyxy boxes (float64 for float64 deltas, which ``"auto"`` decodes with the
        reference, as it does deltas, anchors or a ``clip_to`` tensor that need a gradient: the Triton path
        refuses both); ``dh, dw`` are
        clamped to ``log(1000/16)`` before ``exp``.
    """
    _check_decode(deltas, anchors)
    mode, clip, h, w = _parse_clip(clip_to, tuple(deltas.shape[:-2]), deltas.device)
    return dispatch("decode_boxes", backend, deltas.device, _decode_boxes_op, _decode_reference_parsed,
                    deltas, anchors, mode, clip, h, w, unsupported=_triton_unsupported(deltas, anchors, clip_to))


def decode_topk(class_logits: torch.Tensor, box_deltas: torch.Tensor, anchors: torch.Tensor, k: int,
                clip_to=None, backend: str = "auto"):
    """Top-k candidates over all anchors x classes of each image, decoded.

    Args:
        class_logits: ``(B, N, C)`` logits (any float dtype).
        box_deltas: ``(B, N, 4)`` in **(dy, dx, dh, dw)** order.
        anchors: ``(N, 4)`` xyxy pixels.
        k: candidates per image (clipped to ``N*C``): the ``k`` largest logits, sorted descending, as a flat
            ``torch.topk`` ranks them (computed in two exact stages, see ``_topk_select``).
        clip_to: ``None``, an ``(H, W)`` pair or a ``(B, 2)`` tensor of per-image ``(height, width)``.
        backend: ``"auto" | "triton" | "torch"``.

    Returns:
        ``boxes (B, k, 4) float32 xyxy, scores (B, k) float32 sigmoid(logit), classes (B, k) int64,
        anchor_index (B, k) int64``.
    """
    _check_topk(class_logits, box_deltas, anchors)
    mode, clip, h, w = _parse_clip(clip_to, (class_logits.shape[0],), class_logits.device)
    values, flat_index = _topk_select(class_logits, k)
    return dispatch("decode_topk", backend, class_logits.device, _topk_gather_op, _topk_gather_reference,
                    values, flat_index, box_deltas, anchors, mode, clip, h, w, class_logits.shape[-1],
                    unsupported=_triton_unsupported(box_deltas, anchors, clip_to) or (
                        "class logits that need a gradient (it has no backward)"
                        if class_logits.requires_grad and torch.is_grad_enabled() else None))
