"""One BiFPN node: resample the inputs, fuse them with normalized edge weights, SiLU, depthwise 3x3.

``bifpn_fusion(inputs, resample, edge_weights, dw_weight, out_size, method="fast",
pool_padding="symmetric", eps=1e-4)`` is effdet's ``Fnode`` minus the pointwise conv + BN:
``FpnCombine`` (resample each input to the node's size, weighted sum) followed by
``after_combine``'s activation and the depthwise half of its ``SeparableConv2d``:

* ``resample[i]``: ``"same"`` (already ``out_size``), ``"up"`` (nearest neighbour, exactly
  ``F.interpolate(x, size=out_size, mode="nearest")``: ``src = min(floor(dst * float32(in/out)),
  in-1)``, computed in float32 as PyTorch does - it differs from integer ``dst*in//out`` for some
  sizes), ``"down"`` (3x3 stride-2 max-pool; ``pool_padding="symmetric"`` = ``nn.MaxPool2d(3, 2, 1)``,
  ``"same"`` = TensorFlow SAME: total pad ``max((out-1)*2 + 3 - in, 0)``, top/left ``pad//2``, -inf);
  the 1x1 conv + BN that projects channels stays in PyTorch, before this op;
* ``method``: ``"fast"`` = ``sum relu(w_i) x_i / (sum relu(w_i) + eps)``, ``"softmax"`` =
  ``sum softmax(w)_i x_i``, ``"sum"`` = ``sum x_i`` (``edge_weights`` may be None);
* then ``SiLU`` and a depthwise 3x3 conv (stride 1, padding 1, no bias) with ``dw_weight`` (C,1,3,3).

Inputs fp32/fp16/bf16 (the reference also takes fp64), NCHW or channels-last; the output has the first
input's dtype and is channels-last when the first input is. All math is float32. NaN and +-inf follow
PyTorch: a max-pool window holding a NaN yields NaN, and its gradient goes where ``F.max_pool2d``'s
backward sends it (the last NaN of the window, else the first maximum in row-major order; an all -inf
window sends it to the window's first cell - with ``"same"`` padding that may be a padding cell, so the
gradient is dropped, exactly as the reference's ``F.pad(-inf)`` + ``F.max_pool2d``).

Triton design. The Triton path makes every input dense in one layout (channels-last when the inputs
are, else NCHW - a no-op for a model's tensors), so a kernel addresses a tensor from its sizes alone
and each input slot costs two integer arguments (its H, W); the layout is one constexpr (``CL``). The
edge weights are normalized by a few tiny torch ops (autograd handles their backward; no host sync).

* forward, two kernels over [pixels x channels] tiles: (1) ``f = sum_i nw_i * resample(x_i)`` in float32
  (nearest index math, or a rolled 3x3 max over the pooling window), stored; (2) ``silu(f)`` and the
  depthwise 3x3 (9 rolled taps reading f). Training keeps ``f`` for the backward (``save_f``); the older
  one-kernel design recomputed the resampling at all 9 taps (81 window loads per pooled input) and spilled.
* backward kernel 1 (fused): ``dL/df = (dw^T * g) * silu'(f)`` from ``f``; per-program partial sums of the
  depthwise weight gradient (``g * silu(f)`` at the 9 shifted positions) and of the normalized weights'
  gradient (``dL/df * resampled input``, inputs re-read); the partials are summed by torch (deterministic,
  no atomics). ``"same"`` inputs get their gradient ``nw_i * dL/df`` here directly; ``"down"`` inputs get
  their windows' arg-max stored (int8, PyTorch's rule).
* backward kernel 2, once per ``"up"``/``"down"`` input: gathers ``dL/dx``. ``"up"`` sums the output
  pixels whose nearest source is this pixel (the range is found in the kernel with the forward's float32
  index math: no tables, nothing built on the host); ``"down"`` visits the <= 9 windows holding the pixel
  and takes the gradient of those whose stored arg-max is this pixel.

Compile-time constants are only what changes the code: the number of inputs and their resample modes,
the layout, the tile shape. Sizes that change per level (H, W, each input's H, W, the padding flag,
the slot index) are ``do_not_specialize``, so one model at any image size compiles a fixed, small
set of variants: a BiFPN (nodes (same, up), (same, same, down), (same, down)) in one dtype and layout
compiles 9 - three fuse, one silu+depthwise, three fused-backward, two gather. Offsets are int32: the
launchers refuse tensors of 2**31 or more elements.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ._dispatch import dispatch, no_double_backward, triton_available, triton_op

__all__ = ["bifpn_fusion", "bifpn_fusion_reference", "normalized_edge_weights"]

OP_NAME = "bifpn_fusion"
_WHERE = "kernels/bifpn_fusion.py"
_MODES = {"same": 0, "up": 1, "down": 2}
_METHODS = ("fast", "softmax", "sum")
_POOL_PADDINGS = ("symmetric", "same")
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_TRITON_INPUTS = 3
_INT32_LIMIT = 2 ** 31


# ----------------------------------------------------------------------------------------------
# shapes and weights (shared by both paths)
# ----------------------------------------------------------------------------------------------


def _pool_pad(size_in: int, size_out: int, pool_padding: str):
    """(pad_before, pad_after) of the 3x3 stride-2 pool along one axis; checks the output size."""
    if pool_padding == "symmetric":
        before = after = 1
    else:
        total = max((size_out - 1) * 2 + 3 - size_in, 0)
        before, after = total // 2, total - total // 2
    got = (size_in + before + after - 3) // 2 + 1
    if got != size_out:
        raise ValueError(f"{_WHERE}: inputs: a 3x3 stride-2 max-pool ({pool_padding} padding) maps size {size_in} "
                         f"to {got}, not the node's {size_out}")
    return before, after


def _check(inputs, resample, edge_weights, dw_weight, out_size, method, pool_padding):
    if len(inputs) == 0 or len(inputs) != len(resample):
        raise ValueError(f"{_WHERE}: resample: need one mode per input, got {len(inputs)} inputs, "
                         f"{len(resample)} modes")
    if method not in _METHODS:
        raise ValueError(f"{_WHERE}: method must be one of {_METHODS}, got {method!r}")
    if pool_padding not in _POOL_PADDINGS:
        raise ValueError(f"{_WHERE}: pool_padding must be one of {_POOL_PADDINGS}, got {pool_padding!r}")
    if method != "sum" and (edge_weights is None or tuple(edge_weights.shape) != (len(inputs),)):
        raise ValueError(f"{_WHERE}: edge_weights: method {method!r} needs shape ({len(inputs)},)")
    if inputs[0].dim() != 4:
        raise ValueError(f"{_WHERE}: inputs must be (B, C, H, W), got shape {tuple(inputs[0].shape)}")
    B, C = inputs[0].shape[:2]
    H, W = (int(s) for s in out_size)
    if dw_weight.shape != (C, 1, 3, 3):
        raise ValueError(f"{_WHERE}: dw_weight must be ({C}, 1, 3, 3), got {tuple(dw_weight.shape)}")
    for x, mode in zip(inputs, resample):
        if mode not in _MODES:
            raise ValueError(f"{_WHERE}: resample mode must be one of {tuple(_MODES)}, got {mode!r}")
        if x.dim() != 4 or x.shape[:2] != (B, C) or x.dtype != inputs[0].dtype:
            raise ValueError(f"{_WHERE}: inputs must all be (B={B}, C={C}, H, W) of one dtype, got "
                             f"{tuple(x.shape)} {x.dtype}")
        if mode == "same" and tuple(x.shape[2:]) != (H, W):
            raise ValueError(f"{_WHERE}: inputs: a 'same' input has size {tuple(x.shape[2:])}, node size is {(H, W)}")
        if mode == "down":
            _pool_pad(x.shape[2], H, pool_padding)
            _pool_pad(x.shape[3], W, pool_padding)
    return B, C, H, W


def normalized_edge_weights(edge_weights: Optional[torch.Tensor], n: int, method: str, eps: float,
                            device) -> torch.Tensor:
    """The (n,) float32 weights the inputs are multiplied by (differentiable w.r.t. edge_weights)."""
    if method == "sum":
        return torch.ones(n, dtype=torch.float32, device=device)
    w = edge_weights.double() if edge_weights.dtype == torch.float64 else edge_weights.float()
    if method == "softmax":
        return torch.softmax(w, dim=0)
    w = F.relu(w)
    return w / (w.sum() + eps)


def _out_format(x: torch.Tensor):
    """channels_last when ``x`` is (and is not also plain contiguous), else contiguous."""
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


# ----------------------------------------------------------------------------------------------
# Reference (the spec)
# ----------------------------------------------------------------------------------------------


def _resample_reference(x, mode, out_size, pool_padding):
    if mode == "up":
        return F.interpolate(x, size=out_size, mode="nearest")
    if mode == "down":
        if pool_padding == "symmetric":
            return F.max_pool2d(x, 3, 2, padding=1)
        t, b = _pool_pad(x.shape[2], out_size[0], "same")
        l, r = _pool_pad(x.shape[3], out_size[1], "same")
        return F.max_pool2d(F.pad(x, (l, r, t, b), value=float("-inf")), 3, 2)
    return x


def bifpn_fusion_reference(inputs: Sequence[torch.Tensor], resample: Sequence[str],
                           edge_weights: Optional[torch.Tensor], dw_weight: torch.Tensor, out_size,
                           method: str = "fast", pool_padding: str = "symmetric", eps: float = 1e-4):
    """Plain PyTorch (float32 math - float64 stays float64 so gradcheck can run; autograd for the
    backward); the spec of :func:`bifpn_fusion`."""
    B, C, H, W = _check(inputs, resample, edge_weights, dw_weight, out_size, method, pool_padding)
    md = torch.float64 if inputs[0].dtype == torch.float64 else torch.float32
    nw = normalized_edge_weights(edge_weights, len(inputs), method, eps, inputs[0].device).to(md)
    f = None
    for k, (x, mode) in enumerate(zip(inputs, resample)):
        r = _resample_reference(x.to(md), mode, (H, W), pool_padding)
        f = nw[k] * r if f is None else torch.addcmul(f, nw[k], r)  # f + w*r in one pass, no temporary
    out = F.conv2d(F.silu(f), dw_weight.to(md), padding=1, groups=C)
    return out.to(inputs[0].dtype).contiguous(memory_format=_out_format(inputs[0]))


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _offsets(b, h, w, cc, C, hs, ws, CL: tl.constexpr):
        """[pixels x channels] element offsets of rows ``h``, columns ``w`` (pixel vectors), channels ``cc``
        of image ``b`` in a dense (B, C, hs, ws) tensor: channels-last when ``CL`` else NCHW."""
        if CL:
            return (((b * hs + h) * ws + w) * C)[:, None] + cc[None, :]
        else:
            return ((b * C + cc) * (hs * ws))[None, :] + (h * ws + w)[:, None]

    @triton.jit
    def _tile(pid, size, BLOCK_P: tl.constexpr):
        """Image index and the (flat) pixel vector of pixel tile ``pid`` over images of ``size`` pixels."""
        tiles = tl.cdiv(size, BLOCK_P)
        return pid // tiles, (pid % tiles) * BLOCK_P + tl.arange(0, BLOCK_P)

    @triton.jit
    def _nearest(o, size_out, size_in):
        """PyTorch's nearest source index: min(floor(o * float32(in / out)), in - 1), float32 math."""
        scale = tl.math.div_rn(size_in.to(tl.float32), size_out.to(tl.float32))
        return tl.minimum(tl.floor(o.to(tl.float32) * scale).to(tl.int32), size_in - 1)

    @triton.jit
    def _up_first(i, size_in, size_out):
        """First output index whose nearest source is >= i (i in 0..size_in). It is within 2 of
        ceil(i * out / in) - 1 (float32 rounding moves a boundary by less than one index), so count
        the candidates whose source (the forward's own index math) is still below i."""
        o = (i * size_out + size_in - 1) // size_in - 1
        first = o
        for d in tl.static_range(2):
            src = tl.where(o + d >= size_out, size_in, _nearest(o + d, size_out, size_in))
            first += (src < i).to(tl.int32)
        return first

    @triton.jit
    def _pool_origin(o, size_in, size_out, pool_same):
        """Input index of the first cell of output ``o``'s 3x3 stride-2 window (may be padding)."""
        pad = tl.where(pool_same != 0, tl.maximum((size_out - 1) * 2 + 3 - size_in, 0) // 2, 1)
        return o * 2 - pad

    @triton.jit
    def _pool_argmax(x_ptr, b, hh, ww, cc, m2, C, H, W, hin, win, pool_same, CL: tl.constexpr):
        """Max over the 3x3 stride-2 window of outputs (hh, ww) and its cell (0..8, row-major) by
        PyTorch's rule: the max starts at -inf with its index at the first cell inside the (padded, for
        "same") input, and a cell takes over when it is greater or NaN."""
        h0 = _pool_origin(hh, hin, H, pool_same)
        w0 = _pool_origin(ww, win, W, pool_same)
        first = tl.where(pool_same != 0, 0, 3 * (h0 < 0).to(tl.int32) + (w0 < 0).to(tl.int32))
        arg = tl.zeros(m2.shape, tl.int32) + first[:, None]
        best = tl.full(m2.shape, float("-inf"), tl.float32)
        for u in range(9):  # rolled: unrolled windows inside the 9 taps spilled and compiled for minutes
            ih = h0 + u // 3
            iw = w0 + u % 3
            ok = (ih >= 0) & (ih < hin) & (iw >= 0) & (iw < win)
            x = tl.load(x_ptr + _offsets(b, ih, iw, cc, C, hin, win, CL), mask=m2 & ok[:, None],
                        other=float("-inf")).to(tl.float32)
            take = (x > best) | (x != x)
            best = tl.where(take, x, best)
            arg = tl.where(take, u, arg)
        return tl.where(m2, best, 0.0), arg

    @triton.jit
    def _resampled(x_ptr, b, hh, ww, cc, m2, C, H, W, hin, win, pool_same,
                   MODE: tl.constexpr, CL: tl.constexpr):
        """Input resampled to the node grid at pixels (hh, ww), channels cc: a float32 [pixels x channels]
        tile, 0 where ``m2`` is false."""
        if MODE == 0:
            v = tl.load(x_ptr + _offsets(b, hh, ww, cc, C, H, W, CL), mask=m2, other=0.0).to(tl.float32)
        elif MODE == 1:
            sh = _nearest(hh, H, hin)
            sw = _nearest(ww, W, win)
            v = tl.load(x_ptr + _offsets(b, sh, sw, cc, C, hin, win, CL), mask=m2, other=0.0).to(tl.float32)
        else:
            v, _ = _pool_argmax(x_ptr, b, hh, ww, cc, m2, C, H, W, hin, win, pool_same, CL)
        return v

    _PER_LEVEL = ["H", "W", "h0", "w0", "h1", "w1", "h2", "w2", "pool_same"]

    @triton.jit(do_not_specialize=_PER_LEVEL)
    def _bifpn_fuse_kernel(f_ptr, nw_ptr, x0, x1, x2, C, H, W, h0, w0, h1, w1, h2, w2, pool_same,
                           N: tl.constexpr, M0: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr,
                           CL: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        """f = sum_i nw_i * resampled x_i (float32), in input order as the reference."""
        b, pix = _tile(tl.program_id(0), H * W, BLOCK_P)
        oh = pix // W
        ow = pix % W
        cc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        m2 = (pix < H * W)[:, None] & (cc < C)[None, :]
        f = tl.load(nw_ptr + 0) * _resampled(x0, b, oh, ow, cc, m2, C, H, W, h0, w0, pool_same, M0, CL)
        if N > 1:
            f = f + tl.load(nw_ptr + 1) * _resampled(x1, b, oh, ow, cc, m2, C, H, W, h1, w1, pool_same, M1, CL)
        if N > 2:
            f = f + tl.load(nw_ptr + 2) * _resampled(x2, b, oh, ow, cc, m2, C, H, W, h2, w2, pool_same, M2, CL)
        tl.store(f_ptr + _offsets(b, oh, ow, cc, C, H, W, CL), f, mask=m2)

    @triton.jit(do_not_specialize=["H", "W"])
    def _bifpn_silu_dwconv_kernel(out_ptr, f_ptr, dw_ptr, C, H, W, CL: tl.constexpr, BLOCK_P: tl.constexpr,
                                  BLOCK_C: tl.constexpr):
        """out = depthwise 3x3 (zero padding) of silu(f)."""
        b, pix = _tile(tl.program_id(0), H * W, BLOCK_P)
        pmask = pix < H * W
        oh = pix // W
        ow = pix % W
        cc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cc < C
        acc = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
        for t in range(9):
            qh = oh + (t // 3 - 1)
            qw = ow + (t % 3 - 1)
            qm = pmask & (qh >= 0) & (qh < H) & (qw >= 0) & (qw < W)
            f = tl.load(f_ptr + _offsets(b, qh, qw, cc, C, H, W, CL), mask=qm[:, None] & cmask[None, :], other=0.0)
            wt = tl.load(dw_ptr + cc * 9 + t, mask=cmask, other=0.0)
            acc += (f * tl.sigmoid(f)) * wt[None, :]
        tl.store(out_ptr + _offsets(b, oh, ow, cc, C, H, W, CL), acc.to(out_ptr.dtype.element_ty),
                 mask=pmask[:, None] & cmask[None, :])

    @triton.jit
    def _slot_backward(x_ptr, gx_ptr, am_ptr, nw_ptr, k, gf, pnw_ptr, slot, b, oh, ow, cc, m2, C, H, W, hin, win,
                       pool_same, MODE: tl.constexpr, CL: tl.constexpr):
        """This program's partial dL/d nw_k; a "same" input's gradient nw_k * dL/df; a "down" input's
        window arg-max (int8) for the gather kernel."""
        off = _offsets(b, oh, ow, cc, C, H, W, CL)
        if MODE == 2:
            r, arg = _pool_argmax(x_ptr, b, oh, ow, cc, m2, C, H, W, hin, win, pool_same, CL)
            tl.store(am_ptr + off, arg.to(tl.int8), mask=m2)
        else:
            r = _resampled(x_ptr, b, oh, ow, cc, m2, C, H, W, hin, win, pool_same, MODE, CL)
        tl.store(pnw_ptr + slot + k, tl.sum(tl.sum(gf * r, axis=1), axis=0))
        if MODE == 0:
            gx = gf * tl.load(nw_ptr + k)
            tl.store(gx_ptr + off, gx.to(gx_ptr.dtype.element_ty), mask=m2)

    @triton.jit(do_not_specialize=_PER_LEVEL)
    def _bifpn_bwd_fused_kernel(g_ptr, f_ptr, gf_ptr, pnw_ptr, pdw_ptr, nw_ptr, dw_ptr, x0, x1, x2, gx0, gx1, gx2,
                                am0, am1, am2, C, H, W, h0, w0, h1, w1, h2, w2, pool_same,
                                N: tl.constexpr, M0: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr,
                                CL: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        """dL/df (stored), partial dL/d(dw) and dL/d(nw_i) per program, dL/dx of "same" inputs, arg-max of
        "down" inputs."""
        pid = tl.program_id(0)
        pid_c = tl.program_id(1)
        b, pix = _tile(pid, H * W, BLOCK_P)
        pmask = pix < H * W
        oh = pix // W
        ow = pix % W
        cc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cc < C
        m2 = pmask[:, None] & cmask[None, :]
        off = _offsets(b, oh, ow, cc, C, H, W, CL)
        g_c = tl.load(g_ptr + off, mask=m2, other=0.0).to(tl.float32)
        gs = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
        for t in range(9):
            dy = t // 3 - 1
            dx = t % 3 - 1
            wt = tl.load(dw_ptr + cc * 9 + t, mask=cmask, other=0.0)
            # silu(f) at q feeds out(q - d_t) with weight dw[t]
            ph = oh - dy
            pw = ow - dx
            pm = pmask & (ph >= 0) & (ph < H) & (pw >= 0) & (pw < W)
            gp = tl.load(g_ptr + _offsets(b, ph, pw, cc, C, H, W, CL), mask=pm[:, None] & cmask[None, :],
                         other=0.0).to(tl.float32)
            gs += gp * wt[None, :]
            # dL/d dw[c, t] = sum_p g(p) * silu(f)(p + d_t)
            qh = oh + dy
            qw = ow + dx
            qm = pmask & (qh >= 0) & (qh < H) & (qw >= 0) & (qw < W)
            fq = tl.load(f_ptr + _offsets(b, qh, qw, cc, C, H, W, CL), mask=qm[:, None] & cmask[None, :],
                         other=0.0)
            tl.store(pdw_ptr + (pid * 9 + t) * C + cc, tl.sum(g_c * (fq * tl.sigmoid(fq)), axis=0), mask=cmask)
        f = tl.load(f_ptr + off, mask=m2, other=0.0)
        sig = tl.sigmoid(f)
        gf = tl.where(m2, gs * (sig * (1.0 + f * (1.0 - sig))), 0.0)
        tl.store(gf_ptr + off, gf, mask=m2)
        slot = (pid * tl.num_programs(1) + pid_c) * 3
        _slot_backward(x0, gx0, am0, nw_ptr, 0, gf, pnw_ptr, slot, b, oh, ow, cc, m2, C, H, W, h0, w0, pool_same,
                       M0, CL)
        if N > 1:
            _slot_backward(x1, gx1, am1, nw_ptr, 1, gf, pnw_ptr, slot, b, oh, ow, cc, m2, C, H, W, h1, w1,
                           pool_same, M1, CL)
        if N > 2:
            _slot_backward(x2, gx2, am2, nw_ptr, 2, gf, pnw_ptr, slot, b, oh, ow, cc, m2, C, H, W, h2, w2,
                           pool_same, M2, CL)

    @triton.jit(do_not_specialize=["k", "H", "W", "hin", "win", "pool_same"])
    def _bifpn_bwd_input_kernel(gx_ptr, am_ptr, gf_ptr, nw_ptr, k, C, H, W, hin, win, pool_same,
                                MODE: tl.constexpr, CL: tl.constexpr, BLOCK_P: tl.constexpr,
                                BLOCK_C: tl.constexpr):
        """dL/dx_k of an "up" (MODE 1) or "down" (MODE 2) input, at its own pixels."""
        b, pix = _tile(tl.program_id(0), hin * win, BLOCK_P)
        pmask = pix < hin * win
        ih = pix // win
        iw = pix % win
        cc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cc < C
        acc = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
        if MODE == 1:
            # output rows [r0, r1) and columns [c0, c1) take this pixel: at most ceil(out / in) + 1 each
            r0 = _up_first(ih, hin, H)
            r1 = _up_first(ih + 1, hin, H)
            c0 = _up_first(iw, win, W)
            c1 = _up_first(iw + 1, win, W)
            for dr in range((H + hin - 1) // hin + 1):
                for dc in range((W + win - 1) // win + 1):
                    ok = pmask & (r0 + dr < r1) & (c0 + dc < c1)
                    acc += tl.load(gf_ptr + _offsets(b, r0 + dr, c0 + dc, cc, C, H, W, CL),
                                   mask=ok[:, None] & cmask[None, :], other=0.0)
        else:
            ph = ih - _pool_origin(0, hin, H, pool_same)  # this pixel's row in the padded input
            pw = iw - _pool_origin(0, win, W, pool_same)
            for t in range(9):  # this pixel is cell t of output (oh, ow)'s window
                nh = ph - t // 3
                nv = pw - t % 3
                oh = nh // 2  # negative nh is masked below (// of a negative int differs across backends)
                ow = nv // 2
                ok = pmask & (nh >= 0) & (nv >= 0) & (nh % 2 == 0) & (nv % 2 == 0) & (oh < H) & (ow < W)
                okm = ok[:, None] & cmask[None, :]
                off = _offsets(b, oh, ow, cc, C, H, W, CL)
                arg = tl.load(am_ptr + off, mask=okm, other=-1).to(tl.int32)
                acc += tl.load(gf_ptr + off, mask=okm & (arg == t), other=0.0)
        acc = acc * tl.load(nw_ptr + k)
        tl.store(gx_ptr + _offsets(b, ih, iw, cc, C, hin, win, CL), acc.to(gx_ptr.dtype.element_ty),
                 mask=pmask[:, None] & cmask[None, :])


# ----------------------------------------------------------------------------------------------
# launchers = the custom ops effdet::bifpn_fusion_fwd / effdet::bifpn_fusion_bwd
# ----------------------------------------------------------------------------------------------


def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _blocks(C: int):
    """(BLOCK_P, BLOCK_C): [pixels x channels] tiles, channels innermost; a function of C only (a size
    that changes per level would compile a variant per level), and the same on every device, so the
    interpreter launches exactly the variants a GPU compiles (the compiled-code tests capture them there)."""
    bc = min(_next_pow2(max(C, 1)), 64)
    return max(2048 // bc, 16), bc


def _kernel_layout(inputs) -> bool:
    """True = channels-last kernels. Channels-last when the first input is, or when it is ambiguous
    (C == 1 or H*W == 1: both layouts) and another input is; else NCHW."""
    def strict(x, fmt, other):
        return x.is_contiguous(memory_format=fmt) and not x.is_contiguous(memory_format=other)
    cl, nchw = torch.channels_last, torch.contiguous_format
    if strict(inputs[0], cl, nchw):
        return True
    if strict(inputs[0], nchw, cl):
        return False
    return any(strict(x, cl, nchw) for x in inputs[1:])


def _fmt(cl: bool):
    return torch.channels_last if cl else torch.contiguous_format


def _check_launch(tensors, names, cl, modes, out_h, out_w):
    """The kernels address dense tensors with int32 offsets: refuse what they cannot address."""
    fmt = _fmt(cl)
    for t, name in zip(tensors, names):
        if t.numel() >= _INT32_LIMIT:
            raise ValueError(f"{_WHERE}: {name} has {t.numel()} elements; the int32 offsets need fewer than 2**31")
        if t.dim() == 4 and not t.is_contiguous(memory_format=fmt):
            raise ValueError(f"{_WHERE}: {name} must be dense in the kernels' layout ({fmt}); "
                             "bifpn_fusion() makes it so")
    for x, m in zip(tensors, modes):
        if m == 1 and max((x.shape[2] + 1) * out_h, (x.shape[3] + 1) * out_w) >= _INT32_LIMIT:
            raise ValueError(f"{_WHERE}: inputs: 'up' sizes {tuple(x.shape[2:])} -> {(out_h, out_w)} overflow "
                             "the int32 index math")


def _slot_args(inputs):
    """Pointers and (H, W) of the 3 input slots; unused slots repeat input 0 (compiled out by ``N``)."""
    xs = [inputs[k] if k < len(inputs) else inputs[0] for k in range(MAX_TRITON_INPUTS)]
    sizes = [s for x in xs for s in (x.shape[2], x.shape[3])]
    return xs, sizes


def _modes3(modes):
    return [modes[k] if k < len(modes) else 0 for k in range(MAX_TRITON_INPUTS)]


@triton_op("effdet::bifpn_fusion_fwd")
def _fwd_launcher(inputs: list[torch.Tensor], modes: list[int], nw: torch.Tensor, dw_weight: torch.Tensor,
                  out_h: int, out_w: int, pool_same: bool, save_f: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (out, f): out (B, C, out_h, out_w) in the inputs' dtype and kernel layout; f the float32
    pre-activation (same layout) when ``save_f`` (for the backward), else an empty tensor."""
    x0 = inputs[0]
    B, C = x0.shape[:2]
    cl = _kernel_layout(inputs)
    out = torch.empty((B, C, out_h, out_w), dtype=x0.dtype, device=x0.device, memory_format=_fmt(cl))
    f = torch.empty((B, C, out_h, out_w), dtype=torch.float32, device=x0.device, memory_format=_fmt(cl))
    _check_launch([*inputs, f], [f"inputs[{k}]" for k in range(len(inputs))] + ["f"], cl, modes, out_h, out_w)
    if out.numel() != 0:
        bp, bc = _blocks(C)
        grid = (B * triton.cdiv(out_h * out_w, bp), triton.cdiv(C, bc))
        xs, sizes = _slot_args(inputs)
        m = _modes3(modes)
        _bifpn_fuse_kernel[grid](f, nw.float().contiguous(), *xs, C, out_h, out_w, *sizes, int(pool_same),
                                 N=len(inputs), M0=m[0], M1=m[1], M2=m[2], CL=cl, BLOCK_P=bp, BLOCK_C=bc)
        _bifpn_silu_dwconv_kernel[grid](out, f, dw_weight.reshape(C, 9).float().contiguous(), C, out_h, out_w,
                                        CL=cl, BLOCK_P=bp, BLOCK_C=bc)
    return out, (f if save_f else f.new_empty((0,)))


@_fwd_launcher.register_fake
def _fwd_fake(inputs, modes, nw, dw_weight, out_h, out_w, pool_same, save_f):
    x0 = inputs[0]
    B, C = x0.shape[:2]
    fmt = _fmt(_kernel_layout(inputs))
    out = torch.empty((B, C, out_h, out_w), dtype=x0.dtype, device=x0.device, memory_format=fmt)
    f = torch.empty((B, C, out_h, out_w) if save_f else (0,), dtype=torch.float32, device=x0.device,
                    memory_format=fmt if save_f else torch.contiguous_format)
    return out, f


@triton_op("effdet::bifpn_fusion_bwd")
def _bwd_launcher(grad: torch.Tensor, f: torch.Tensor, inputs: list[torch.Tensor], modes: list[int],
                  nw: torch.Tensor, dw_weight: torch.Tensor, out_h: int, out_w: int,
                  pool_same: bool) -> list[torch.Tensor]:
    """-> [dL/d nw, dL/d dw_weight, dL/d inputs[0], ...] given dL/d out and the forward's saved f."""
    x0 = inputs[0]
    B, C = x0.shape[:2]
    n = len(inputs)
    dev = x0.device
    cl = _kernel_layout(inputs)
    grad = grad.contiguous(memory_format=_fmt(cl))  # no-op for the usual dense gradient
    gxs = [torch.empty(x.shape, dtype=x.dtype, device=dev, memory_format=_fmt(cl)) for x in inputs]
    if grad.numel() == 0:
        return [torch.zeros_like(nw), torch.zeros_like(dw_weight), *[g.zero_() for g in gxs]]
    _check_launch([*inputs, grad, f], [f"inputs[{k}]" for k in range(n)] + ["grad", "f"], cl, modes, out_h, out_w)
    nw32 = nw.float().contiguous()
    dw = dw_weight.reshape(C, 9).float().contiguous()
    bp, bc = _blocks(C)
    grid = (B * triton.cdiv(out_h * out_w, bp), triton.cdiv(C, bc))
    gf = torch.empty((B, C, out_h, out_w), dtype=torch.float32, device=dev, memory_format=_fmt(cl))
    pnw = torch.empty((grid[0] * grid[1], 3), dtype=torch.float32, device=dev)
    pdw = torch.empty((grid[0], 9, C), dtype=torch.float32, device=dev)
    xs, sizes = _slot_args(inputs)
    gx3 = [gxs[k] if k < n else gxs[0] for k in range(MAX_TRITON_INPUTS)]
    # int8 arg-max of each "down" input's windows; other slots get a 1-byte placeholder
    dummy = torch.empty(1, dtype=torch.int8, device=dev)
    am3 = [torch.empty((B, C, out_h, out_w), dtype=torch.int8, device=dev, memory_format=_fmt(cl))
           if k < n and modes[k] == 2 else dummy for k in range(MAX_TRITON_INPUTS)]
    m = _modes3(modes)
    _bifpn_bwd_fused_kernel[grid](grad, f, gf, pnw, pdw, nw32, dw, *xs, *gx3, *am3, C, out_h, out_w, *sizes,
                                  int(pool_same), N=n, M0=m[0], M1=m[1], M2=m[2], CL=cl, BLOCK_P=bp, BLOCK_C=bc)
    for k, (x, mode, gx) in enumerate(zip(inputs, modes, gxs)):
        if mode == 0 or gx.numel() == 0:
            continue
        hin, win = x.shape[2], x.shape[3]
        bpi, bci = _blocks(C)
        _bifpn_bwd_input_kernel[(B * triton.cdiv(hin * win, bpi), triton.cdiv(C, bci))](
            gx, am3[k], gf, nw32, k, C, out_h, out_w, hin, win, int(pool_same),
            MODE=mode, CL=cl, BLOCK_P=bpi, BLOCK_C=bci)
    gnw = pnw[:, :n].sum(0).to(nw.dtype)
    gdw = pdw.sum(0).t().reshape(C, 1, 3, 3).to(dw_weight.dtype)
    return [gnw, gdw, *gxs]


@_bwd_launcher.register_fake
def _bwd_fake(grad, f, inputs, modes, nw, dw_weight, out_h, out_w, pool_same):
    fmt = _fmt(_kernel_layout(inputs))
    return [torch.empty_like(nw), torch.empty_like(dw_weight),
            *[torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt) for x in inputs]]


def _fwd_setup_context(ctx, inputs, output):
    xs, modes, nw, dw_weight, out_h, out_w, pool_same, save_f = inputs
    ctx.save_for_backward(output[1], nw, dw_weight, *xs)
    ctx.meta = (list(modes), out_h, out_w, pool_same)


def _fwd_backward(ctx, grad_out, grad_f):
    f, nw, dw_weight, *xs = ctx.saved_tensors
    modes, out_h, out_w, pool_same = ctx.meta
    if f.numel() == 0 and grad_out.numel() != 0:
        raise RuntimeError(f"{_WHERE}: effdet::bifpn_fusion_fwd ran with save_f=False; its backward needs f")
    g = _bwd_launcher(grad_out, f, xs, modes, nw, dw_weight, out_h, out_w, pool_same)
    return list(g[2:]), None, g[0], g[1], None, None, None, None


_fwd_launcher.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


no_double_backward(_bwd_launcher, _WHERE)


# ----------------------------------------------------------------------------------------------
# public function
# ----------------------------------------------------------------------------------------------


def _triton_path(inputs, resample, edge_weights, dw_weight, out_size, method="fast", pool_padding="symmetric",
                 eps=1e-4):
    """Normalize the weights (torch autograd), make the inputs dense in the kernels' layout, call the op."""
    H, W = (int(s) for s in out_size)
    nw = normalized_edge_weights(edge_weights, len(inputs), method, eps, inputs[0].device)
    fmt = _fmt(_kernel_layout(inputs))
    xs = [x.contiguous(memory_format=fmt) for x in inputs]  # no-op for dense inputs of that layout
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (*inputs, edge_weights, dw_weight))
    out, _ = _fwd_launcher(xs, [_MODES[r] for r in resample], nw, dw_weight, H, W, pool_padding == "same",
                           needs_grad)
    return out.contiguous(memory_format=_out_format(inputs[0]))  # no-op unless the layouts were mixed


def _triton_unsupported(inputs: list) -> Optional[str]:
    """Why the Triton path cannot take these inputs (``"auto"`` then runs the reference), or None."""
    if len(inputs) > MAX_TRITON_INPUTS:
        return f"{len(inputs)} inputs (it takes at most {MAX_TRITON_INPUTS})"
    if inputs[0].dtype not in _TRITON_DTYPES:
        return f"{inputs[0].dtype} inputs (it takes {', '.join(str(d) for d in _TRITON_DTYPES)})"
    return None


def bifpn_fusion(inputs: Sequence[torch.Tensor], resample: Sequence[str], edge_weights: Optional[torch.Tensor],
                 dw_weight: torch.Tensor, out_size, method: str = "fast", pool_padding: str = "symmetric",
                 eps: float = 1e-4, backend: str = "auto") -> torch.Tensor:
    """One BiFPN node (see the module docstring) -> (B, C, H, W) in the first input's dtype/layout.

    backend: "torch" = the reference; "triton" = the custom op ``effdet::bifpn_fusion_fwd`` (CUDA tensors,
    or CPU tensors under the Triton interpreter); "auto" = see ``kernels/_dispatch.py``.
    """
    inputs = list(inputs)
    _check(inputs, resample, edge_weights, dw_weight, out_size, method, pool_padding)
    return dispatch(OP_NAME, backend, inputs[0].device, _triton_path, bifpn_fusion_reference,
                    inputs, resample, edge_weights, dw_weight, out_size, method, pool_padding, eps,
                    unsupported=_triton_unsupported(inputs))
