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

Inputs fp32/fp16/bf16, NCHW or channels-last (the fast path: tiles are [pixels x channels] and the
channel axis is contiguous); the output has the first input's dtype and is channels-last when the
first input is. All math is float32.

Triton path: the edge weights are normalized by a few tiny torch ops on the device (autograd
handles their backward; no host sync). ONE forward kernel reads every input with the resampling done
on the fly (nearest index math / 3x3 max over the window), forms the weighted sum, applies SiLU and
the depthwise 3x3; the fused pre-activation ``f`` of each tap is recomputed from the inputs (9 taps)
rather than read back, and - only when a gradient is needed - the centre tap's ``f`` is saved
(float32, channels-last) for the backward. Backward: kernel 1 computes ``dL/df = (dw^T * g) *
silu'(f)`` from the saved ``f`` and, in the same pass, per-program partial sums for the depthwise
weight gradient (``g * silu(f)`` at the 9 shifted positions) and for the normalized edge weights
(``dL/df * resampled input``, the inputs re-read); the partials are summed by torch (deterministic,
no atomics). Kernel 2, once per input, gathers ``dL/dx``: "same" copies, "up" sums the output pixels
that map to each input pixel (ranges from a tiny device-side table), "down" sends each window's
gradient to its arg-max (first max in row-major order, as PyTorch), recomputing the arg-max.
Up to 3 inputs per node in the Triton path (every BiFPN node has 2 or 3).

Limitations (both paths agree otherwise): inputs containing NaN or -inf in a pooled window may route
the max-pool gradient differently from PyTorch.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from ._dispatch import resolve, triton_available

__all__ = ["bifpn_fusion", "bifpn_fusion_reference", "normalized_edge_weights"]

_MODES = {"same": 0, "up": 1, "down": 2}
_METHODS = ("fast", "softmax", "sum")
_POOL_PADDINGS = ("symmetric", "same")
MAX_TRITON_INPUTS = 3


# ----------------------------------------------------------------------------------------------
# shapes and weights (shared)
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
        raise ValueError(f"3x3 stride-2 max-pool ({pool_padding} padding) maps {size_in} to {got}, not {size_out}")
    return before, after


def _check(inputs, resample, edge_weights, dw_weight, out_size, method, pool_padding):
    if len(inputs) == 0 or len(inputs) != len(resample):
        raise ValueError(f"need one resample mode per input, got {len(inputs)} inputs, {len(resample)} modes")
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if pool_padding not in _POOL_PADDINGS:
        raise ValueError(f"pool_padding must be one of {_POOL_PADDINGS}, got {pool_padding!r}")
    if method != "sum" and (edge_weights is None or edge_weights.shape != (len(inputs),)):
        raise ValueError(f"method {method!r} needs edge_weights of shape ({len(inputs)},)")
    B, C = inputs[0].shape[:2]
    H, W = (int(s) for s in out_size)
    if dw_weight.shape != (C, 1, 3, 3):
        raise ValueError(f"dw_weight must be ({C}, 1, 3, 3), got {tuple(dw_weight.shape)}")
    for x, mode in zip(inputs, resample):
        if mode not in _MODES:
            raise ValueError(f"resample mode must be one of {tuple(_MODES)}, got {mode!r}")
        if x.dim() != 4 or x.shape[:2] != (B, C) or x.dtype != inputs[0].dtype:
            raise ValueError(f"inputs must all be (B={B}, C={C}, H, W) of one dtype, got {tuple(x.shape)} {x.dtype}")
        if mode == "same" and tuple(x.shape[2:]) != (H, W):
            raise ValueError(f"'same' input has size {tuple(x.shape[2:])}, node size is {(H, W)}")
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


def _channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _out_format(x: torch.Tensor):
    return torch.channels_last if _channels_last(x) else torch.contiguous_format


# ----------------------------------------------------------------------------------------------
# Reference
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


def _math_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 math; float64 inputs stay float64 (so gradcheck can run on the reference)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _fused_reference(inputs, resample, nw, out_size, pool_padding):
    f = None
    md = _math_dtype(inputs[0])
    nw = nw.to(md)
    for k, (x, mode) in enumerate(zip(inputs, resample)):
        term = nw[k] * _resample_reference(x.to(md), mode, out_size, pool_padding)
        f = term if f is None else f + term
    return f


def bifpn_fusion_reference(inputs: Sequence[torch.Tensor], resample: Sequence[str],
                           edge_weights: Optional[torch.Tensor], dw_weight: torch.Tensor, out_size,
                           method: str = "fast", pool_padding: str = "symmetric", eps: float = 1e-4):
    """Plain PyTorch (float32 math, autograd for the backward); the spec of :func:`bifpn_fusion`."""
    B, C, H, W = _check(inputs, resample, edge_weights, dw_weight, out_size, method, pool_padding)
    nw = normalized_edge_weights(edge_weights, len(inputs), method, eps, inputs[0].device)
    f = _fused_reference(inputs, resample, nw, (H, W), pool_padding)
    out = F.conv2d(F.silu(f), dw_weight.to(f.dtype), padding=1, groups=C)
    return out.to(inputs[0].dtype).contiguous(memory_format=_out_format(inputs[0]))


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _resampled(x_ptr, sb, sc, sh, sw, hin, win, pad_t, pad_l, scale_h, scale_w,
                   b, hh, ww, cc, pmask, cmask, MODE: tl.constexpr):
        """Input resampled to the node grid at pixels (hh, ww) (BLOCK_P,), channels cc (BLOCK_C,):
        a float32 [BLOCK_P, BLOCK_C] tile, 0 where ``pmask``/``cmask`` is false."""
        m2 = pmask[:, None] & cmask[None, :]
        base = x_ptr + b * sb + cc[None, :] * sc
        if MODE == 0:
            v = tl.load(base + (hh * sh + ww * sw)[:, None], mask=m2, other=0.0).to(tl.float32)
        elif MODE == 1:
            # PyTorch's nearest: floor(dst * float32(in / out)), clamped to in - 1
            sh_i = tl.minimum(tl.floor(hh.to(tl.float32) * scale_h).to(tl.int32), hin - 1)
            sw_i = tl.minimum(tl.floor(ww.to(tl.float32) * scale_w).to(tl.int32), win - 1)
            v = tl.load(base + (sh_i * sh + sw_i * sw)[:, None], mask=m2, other=0.0).to(tl.float32)
        else:
            v = tl.full(m2.shape, float("-inf"), tl.float32)
            for t in tl.static_range(9):
                ih = hh * 2 - pad_t + (t // 3)
                iw = ww * 2 - pad_l + (t % 3)
                ok = (ih >= 0) & (ih < hin) & (iw >= 0) & (iw < win)
                x = tl.load(base + (ih * sh + iw * sw)[:, None], mask=m2 & ok[:, None], other=float("-inf"))
                v = tl.maximum(v, x.to(tl.float32))
            v = tl.where(m2, v, 0.0)
        return v

    @triton.jit
    def _fused(nw_ptr, b, hh, ww, cc, pmask, cmask,
               x0, s0b, s0c, s0h, s0w, h0, w0, pt0, pl0, sh0, sw0,
               x1, s1b, s1c, s1h, s1w, h1, w1, pt1, pl1, sh1, sw1,
               x2, s2b, s2c, s2h, s2w, h2, w2, pt2, pl2, sh2, sw2,
               N: tl.constexpr, M0: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr):
        """sum_i nw_i * resampled x_i at (hh, ww), in input order (as the reference)."""
        f = tl.load(nw_ptr + 0) * _resampled(x0, s0b, s0c, s0h, s0w, h0, w0, pt0, pl0, sh0, sw0,
                                             b, hh, ww, cc, pmask, cmask, M0)
        if N > 1:
            f = f + tl.load(nw_ptr + 1) * _resampled(x1, s1b, s1c, s1h, s1w, h1, w1, pt1, pl1, sh1, sw1,
                                                     b, hh, ww, cc, pmask, cmask, M1)
        if N > 2:
            f = f + tl.load(nw_ptr + 2) * _resampled(x2, s2b, s2c, s2h, s2w, h2, w2, pt2, pl2, sh2, sw2,
                                                     b, hh, ww, cc, pmask, cmask, M2)
        return f

    @triton.jit
    def _bifpn_fwd_kernel(
            out_ptr, so_b, so_c, so_h, so_w, f_ptr, nw_ptr, dw_ptr, C, H, W, tiles_per_img,
            x0, s0b, s0c, s0h, s0w, h0, w0, pt0, pl0, sh0, sw0,
            x1, s1b, s1c, s1h, s1w, h1, w1, pt1, pl1, sh1, sw1,
            x2, s2b, s2c, s2h, s2w, h2, w2, pt2, pl2, sh2, sw2,
            N: tl.constexpr, M0: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr,
            SAVE_F: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        pid = tl.program_id(0)
        b = pid // tiles_per_img
        pix = (pid % tiles_per_img) * BLOCK_P + tl.arange(0, BLOCK_P)
        pmask = pix < H * W
        oh = pix // W
        ow = pix % W
        cc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cc < C
        acc = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
        for t in tl.static_range(9):
            qh = oh + (t // 3 - 1)
            qw = ow + (t % 3 - 1)
            qmask = pmask & (qh >= 0) & (qh < H) & (qw >= 0) & (qw < W)
            f = _fused(nw_ptr, b, qh, qw, cc, qmask, cmask,
                       x0, s0b, s0c, s0h, s0w, h0, w0, pt0, pl0, sh0, sw0,
                       x1, s1b, s1c, s1h, s1w, h1, w1, pt1, pl1, sh1, sw1,
                       x2, s2b, s2c, s2h, s2w, h2, w2, pt2, pl2, sh2, sw2, N, M0, M1, M2)
            s = f * tl.sigmoid(f)  # 0 outside the image: the conv's zero padding
            wt = tl.load(dw_ptr + cc * 9 + t, mask=cmask, other=0.0).to(tl.float32)
            acc += s * wt[None, :]
            if SAVE_F:
                if t == 4:
                    fo = ((b * H + oh) * W + ow) * C
                    tl.store(f_ptr + fo[:, None] + cc[None, :], f, mask=pmask[:, None] & cmask[None, :])
        optr = out_ptr + b * so_b + (oh * so_h + ow * so_w)[:, None] + cc[None, :] * so_c
        tl.store(optr, acc.to(out_ptr.dtype.element_ty), mask=pmask[:, None] & cmask[None, :])

    @triton.jit
    def _bifpn_bwd_fused_kernel(
            g_ptr, sg_b, sg_c, sg_h, sg_w, f_ptr, gf_ptr, pnw_ptr, pdw_ptr, nw_ptr, dw_ptr,
            C, H, W, tiles_per_img,
            x0, s0b, s0c, s0h, s0w, h0, w0, pt0, pl0, sh0, sw0,
            x1, s1b, s1c, s1h, s1w, h1, w1, pt1, pl1, sh1, sw1,
            x2, s2b, s2c, s2h, s2w, h2, w2, pt2, pl2, sh2, sw2,
            N: tl.constexpr, M0: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr,
            BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        """dL/df (stored), partial dL/d(dw) per program, partial dL/d(nw_i) per program."""
        pid = tl.program_id(0)
        pid_c = tl.program_id(1)
        b = pid // tiles_per_img
        pix = (pid % tiles_per_img) * BLOCK_P + tl.arange(0, BLOCK_P)
        pmask = pix < H * W
        oh = pix // W
        ow = pix % W
        cc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cc < C
        m2 = pmask[:, None] & cmask[None, :]
        fbase = f_ptr + cc[None, :]
        g_c = tl.load(g_ptr + b * sg_b + (oh * sg_h + ow * sg_w)[:, None] + cc[None, :] * sg_c,
                      mask=m2, other=0.0).to(tl.float32)
        gs = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
        for t in tl.static_range(9):
            dy = t // 3 - 1
            dx = t % 3 - 1
            wt = tl.load(dw_ptr + cc * 9 + t, mask=cmask, other=0.0).to(tl.float32)
            # s(q) feeds out(q - d_t) with weight dw[t]
            ph = oh - dy
            pw = ow - dx
            pm = pmask & (ph >= 0) & (ph < H) & (pw >= 0) & (pw < W)
            gp = tl.load(g_ptr + b * sg_b + (ph * sg_h + pw * sg_w)[:, None] + cc[None, :] * sg_c,
                         mask=pm[:, None] & cmask[None, :], other=0.0).to(tl.float32)
            gs += gp * wt[None, :]
            # dL/d dw[c, t] = sum_p g(p) * s(p + d_t)
            qh = oh + dy
            qw = ow + dx
            qm = pmask & (qh >= 0) & (qh < H) & (qw >= 0) & (qw < W)
            fq = tl.load(fbase + (((b * H + qh) * W + qw) * C)[:, None], mask=qm[:, None] & cmask[None, :],
                         other=0.0)
            part = tl.sum(g_c * (fq * tl.sigmoid(fq)), axis=0)
            tl.store(pdw_ptr + (pid * 9 + t) * C + cc, part, mask=cmask)
        f = tl.load(fbase + (((b * H + oh) * W + ow) * C)[:, None], mask=m2, other=0.0)
        sig = tl.sigmoid(f)
        gf = gs * (sig * (1.0 + f * (1.0 - sig)))
        gf = tl.where(m2, gf, 0.0)
        tl.store(gf_ptr + (((b * H + oh) * W + ow) * C)[:, None] + cc[None, :], gf, mask=m2)
        slot = (pid * tl.num_programs(1) + pid_c) * 3
        r = _resampled(x0, s0b, s0c, s0h, s0w, h0, w0, pt0, pl0, sh0, sw0, b, oh, ow, cc, pmask, cmask, M0)
        tl.store(pnw_ptr + slot + 0, tl.sum(tl.sum(gf * r, axis=1), axis=0))
        if N > 1:
            r = _resampled(x1, s1b, s1c, s1h, s1w, h1, w1, pt1, pl1, sh1, sw1, b, oh, ow, cc, pmask, cmask, M1)
            tl.store(pnw_ptr + slot + 1, tl.sum(tl.sum(gf * r, axis=1), axis=0))
        if N > 2:
            r = _resampled(x2, s2b, s2c, s2h, s2w, h2, w2, pt2, pl2, sh2, sw2, b, oh, ow, cc, pmask, cmask, M2)
            tl.store(pnw_ptr + slot + 2, tl.sum(tl.sum(gf * r, axis=1), axis=0))

    @triton.jit
    def _bifpn_bwd_input_kernel(
            gx_ptr, x_ptr, sb, sc, sh, sw, hin, win, pad_t, pad_l,
            gf_ptr, nw_ptr, k, rows_ptr, cols_ptr, C, H, W, tiles_per_img,
            MODE: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr,
            BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        """dL/dx_k at input pixels; gx has x's strides."""
        pid = tl.program_id(0)
        b = pid // tiles_per_img
        pix = (pid % tiles_per_img) * BLOCK_P + tl.arange(0, BLOCK_P)
        pmask = pix < hin * win
        ih = pix // win
        iw = pix % win
        cc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cc < C
        m2 = pmask[:, None] & cmask[None, :]
        gbase = gf_ptr + b * H * W * C + cc[None, :]
        acc = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
        if MODE == 0:
            acc = tl.load(gbase + ((ih * W + iw) * C)[:, None], mask=m2, other=0.0)
        elif MODE == 1:
            # output rows [rows[ih], rows[ih+1]) and columns [cols[iw], cols[iw+1]) read this pixel
            r0 = tl.load(rows_ptr + ih, mask=pmask, other=0)
            r1 = tl.load(rows_ptr + ih + 1, mask=pmask, other=0)
            c0 = tl.load(cols_ptr + iw, mask=pmask, other=0)
            c1 = tl.load(cols_ptr + iw + 1, mask=pmask, other=0)
            for dr in tl.static_range(RH):
                for dc in tl.static_range(RW):
                    oh = r0 + dr
                    ow = c0 + dc
                    ok = pmask & (oh < r1) & (ow < c1)
                    acc += tl.load(gbase + ((oh * W + ow) * C)[:, None], mask=ok[:, None] & cmask[None, :],
                                   other=0.0)
        else:
            xbase = x_ptr + b * sb + cc[None, :] * sc
            for t in tl.static_range(9):  # the window position this pixel takes in output (oh, ow)
                ky = t // 3
                kx = t % 3
                nh = ih + pad_t - ky
                nwp = iw + pad_l - kx
                oh = nh // 2
                ow = nwp // 2
                ok = pmask & (nh >= 0) & (nwp >= 0) & (nh % 2 == 0) & (nwp % 2 == 0) & (oh < H) & (ow < W)
                okm = ok[:, None] & cmask[None, :]
                # arg-max of window (oh, ow): first maximum in row-major order, as PyTorch
                best = tl.full((BLOCK_P, BLOCK_C), float("-inf"), tl.float32)
                arg = tl.full((BLOCK_P, BLOCK_C), -1, tl.int32)
                for u in tl.static_range(9):
                    jh = oh * 2 - pad_t + (u // 3)
                    jw = ow * 2 - pad_l + (u % 3)
                    okj = (jh >= 0) & (jh < hin) & (jw >= 0) & (jw < win)
                    v = tl.load(xbase + (jh * sh + jw * sw)[:, None], mask=okm & okj[:, None],
                                other=float("-inf")).to(tl.float32)
                    take = v > best
                    best = tl.where(take, v, best)
                    arg = tl.where(take, u, arg)
                gq = tl.load(gbase + ((oh * W + ow) * C)[:, None], mask=okm, other=0.0)
                acc += tl.where(okm & (arg == t), gq, 0.0)
        acc = acc * tl.load(nw_ptr + k)
        gptr = gx_ptr + b * sb + (ih * sh + iw * sw)[:, None] + cc[None, :] * sc
        tl.store(gptr, acc.to(gx_ptr.dtype.element_ty), mask=m2)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------


def _blocks(C: int, HW: int, device):
    """(BLOCK_P, BLOCK_C): [pixels x channels] tiles, channels innermost."""
    bc = min(triton.next_power_of_2(max(C, 1)), 64)
    if torch.device(device).type == "cuda":
        return max(2048 // bc, 16), bc
    # interpreter: its cost is per op, not per element, so few large programs are fastest
    return min(triton.next_power_of_2(max(HW, 1)), 256), min(bc, 32)


def _slot_args(inputs, modes, H, W, pool_padding, dummy):
    """Per-input kernel arguments for the 3 slots: (ptr, 4 strides, hin, win, pad_t, pad_l, scale_h,
    scale_w); unused slots point at ``dummy`` and are compiled out (``N``)."""
    args, mcodes = [], []
    for k in range(MAX_TRITON_INPUTS):
        if k < len(inputs):
            x, mode = inputs[k], modes[k]
            hin, win = x.shape[2], x.shape[3]
            pt = _pool_pad(hin, H, pool_padding)[0] if mode == 2 else 0
            pl = _pool_pad(win, W, pool_padding)[0] if mode == 2 else 0
            sch = float(torch.tensor(hin / H, dtype=torch.float32))  # PyTorch's float32 scale
            scw = float(torch.tensor(win / W, dtype=torch.float32))
            args += [x, *x.stride(), hin, win, pt, pl, sch, scw]
            mcodes.append(mode)
        else:
            args += [dummy, 0, 0, 0, 0, 1, 1, 0, 0, 1.0, 1.0]
            mcodes.append(0)
    return args, mcodes


def _fwd_triton(inputs, modes, nw, dw_weight, H, W, pool_padding, save_f):
    x0 = inputs[0]
    B, C = x0.shape[:2]
    out = torch.empty((B, C, H, W), dtype=x0.dtype, device=x0.device, memory_format=_out_format(x0))
    f = torch.empty((B, H, W, C) if save_f else (0,), dtype=torch.float32, device=x0.device)
    if out.numel() == 0:
        return out, f
    nw = nw.float().contiguous()
    dw = dw_weight.reshape(C, 9).float().contiguous()
    bp, bc = _blocks(C, H * W, x0.device)
    tiles = triton.cdiv(H * W, bp)
    args, m = _slot_args(inputs, modes, H, W, pool_padding, nw)
    _bifpn_fwd_kernel[(B * tiles, triton.cdiv(C, bc))](
        out, *out.stride(), f if save_f else nw, nw, dw, C, H, W, tiles, *args,
        N=len(inputs), M0=m[0], M1=m[1], M2=m[2], SAVE_F=save_f, BLOCK_P=bp, BLOCK_C=bc)
    return out, f


def _up_table(size_in: int, size_out: int, device):
    """start[i] = first output index whose nearest source is >= i (i = 0..size_in), on ``device``."""
    scale = torch.tensor(size_in / size_out, dtype=torch.float32, device=device)
    src = torch.clamp(torch.floor(torch.arange(size_out, device=device, dtype=torch.float32) * scale),
                      max=size_in - 1).to(torch.int32)
    want = torch.arange(size_in + 1, device=device, dtype=torch.int32)
    return torch.searchsorted(src, want).to(torch.int32)


def _bwd_triton(grad, f, inputs, modes, nw, dw_weight, H, W, pool_padding):
    x0 = inputs[0]
    B, C = x0.shape[:2]
    n = len(inputs)
    dev = x0.device
    gxs = [torch.empty_like(x) for x in inputs]  # keeps each input's memory format
    if grad.numel() == 0:
        return torch.zeros(n, device=dev), torch.zeros_like(dw_weight), [g.zero_() for g in gxs]
    nw = nw.float().contiguous()
    dw = dw_weight.reshape(C, 9).float().contiguous()
    bp, bc = _blocks(C, max(H * W, max(x.shape[2] * x.shape[3] for x in inputs)), dev)
    tiles = triton.cdiv(H * W, bp)
    grid = (B * tiles, triton.cdiv(C, bc))
    gf = torch.empty((B, H, W, C), dtype=torch.float32, device=dev)
    pnw = torch.empty((grid[0] * grid[1], 3), dtype=torch.float32, device=dev)
    pdw = torch.zeros((grid[0], 9, C), dtype=torch.float32, device=dev)
    args, m = _slot_args(inputs, modes, H, W, pool_padding, nw)
    _bifpn_bwd_fused_kernel[grid](
        grad, *grad.stride(), f, gf, pnw, pdw, nw, dw, C, H, W, tiles, *args,
        N=n, M0=m[0], M1=m[1], M2=m[2], BLOCK_P=bp, BLOCK_C=bc)
    gnw = pnw[:, :n].sum(0)
    gdw = pdw.sum(0).t().reshape(C, 1, 3, 3).to(dw_weight.dtype)
    for k, (x, mode, gx) in enumerate(zip(inputs, modes, gxs)):
        hin, win = x.shape[2], x.shape[3]
        if gx.numel() == 0:
            continue
        pt = _pool_pad(hin, H, pool_padding)[0] if mode == 2 else 0
        pl = _pool_pad(win, W, pool_padding)[0] if mode == 2 else 0
        if mode == 1:
            rows, cols = _up_table(hin, H, dev), _up_table(win, W, dev)
            rh, rw = -(-H // hin) + 1, -(-W // win) + 1  # >= max outputs per source (float rounding: +1)
        else:
            rows = cols = nw
            rh = rw = 1
        tin = triton.cdiv(hin * win, bp)
        _bifpn_bwd_input_kernel[(B * tin, triton.cdiv(C, bc))](
            gx, x, *x.stride(), hin, win, pt, pl, gf, nw, k, rows, cols, C, H, W, tin,
            MODE=mode, RH=rh, RW=rw, BLOCK_P=bp, BLOCK_C=bc)
    return gnw, gdw, gxs


def _grad_needed(tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class _BiFPNFusionTriton(torch.autograd.Function):
    """Triton forward/backward; the edge-weight normalization happens outside (torch autograd)."""

    @staticmethod
    def forward(ctx, nw, dw_weight, H, W, modes, pool_padding, save_f, *inputs):
        out, f = _fwd_triton(inputs, modes, nw, dw_weight, H, W, pool_padding, save_f)
        ctx.save_for_backward(nw, dw_weight, f, *inputs)
        ctx.meta = (H, W, modes, pool_padding)
        return out

    @staticmethod
    def backward(ctx, grad):
        nw, dw_weight, f, *inputs = ctx.saved_tensors
        H, W, modes, pool_padding = ctx.meta
        gnw, gdw, gxs = _bwd_triton(grad, f, inputs, modes, nw, dw_weight, H, W, pool_padding)
        return (gnw, gdw, None, None, None, None, None, *gxs)


# ----------------------------------------------------------------------------------------------
# torch custom ops (CPU = reference, CUDA = Triton), so torch.compile(fullgraph=True) traces them
# ----------------------------------------------------------------------------------------------

_POOL_CODE = {"symmetric": 0, "same": 1}
_MODE_NAMES = {v: k for k, v in _MODES.items()}


def _ref_fwd_with_f(inputs, modes, nw, dw_weight, H, W, pool_padding):
    names = [_MODE_NAMES[m] for m in modes]
    f = _fused_reference(inputs, names, nw, (H, W), pool_padding)
    out = F.conv2d(F.silu(f), dw_weight.to(f.dtype), padding=1, groups=f.shape[1])
    return out.to(inputs[0].dtype).contiguous(memory_format=_out_format(inputs[0])), f


@torch.library.custom_op("effdet::bifpn_fusion_fwd", mutates_args=())
def _fwd_op(inputs: List[torch.Tensor], modes: List[int], nw: torch.Tensor, dw_weight: torch.Tensor,
            out_h: int, out_w: int, pool_same: bool, save_f: bool) -> tuple[torch.Tensor, torch.Tensor]:
    pp = "same" if pool_same else "symmetric"
    out, f = _ref_fwd_with_f(inputs, modes, nw, dw_weight, out_h, out_w, pp)
    f = f.permute(0, 2, 3, 1).contiguous() if save_f else f.new_empty((0,))
    return out, f


@_fwd_op.register_kernel("cuda")
def _fwd_op_cuda(inputs, modes, nw, dw_weight, out_h, out_w, pool_same, save_f):
    return _fwd_triton(inputs, modes, nw, dw_weight, out_h, out_w, "same" if pool_same else "symmetric", save_f)


@_fwd_op.register_fake
def _fwd_op_fake(inputs, modes, nw, dw_weight, out_h, out_w, pool_same, save_f):
    x0 = inputs[0]
    B, C = x0.shape[:2]
    out = torch.empty((B, C, out_h, out_w), dtype=x0.dtype, device=x0.device, memory_format=_out_format(x0))
    f = x0.new_empty((B, out_h, out_w, C) if save_f else (0,), dtype=torch.float32)
    return out, f


@torch.library.custom_op("effdet::bifpn_fusion_bwd", mutates_args=())
def _bwd_op(grad: torch.Tensor, f: torch.Tensor, inputs: List[torch.Tensor], modes: List[int], nw: torch.Tensor,
            dw_weight: torch.Tensor, out_h: int, out_w: int, pool_same: bool) -> List[torch.Tensor]:
    # CPU kernel: the reference's backward written out in torch ops (autograd is not available
    # below the custom op's dispatch, so no torch.autograd.grad here).
    pp = "same" if pool_same else "symmetric"
    H, W = out_h, out_w
    C = inputs[0].shape[1]
    md = _math_dtype(inputs[0])
    nw_m = nw.to(md)
    dw_m = dw_weight.to(md)
    g = grad.to(md)
    f = f.permute(0, 3, 1, 2).to(md)  # saved channels-last (B, H, W, C)
    sig = torch.sigmoid(f)
    gdw = torch.nn.grad.conv2d_weight(f * sig, dw_m.shape, g, padding=1, groups=C)
    gf = torch.nn.grad.conv2d_input(f.shape, dw_m, g, padding=1, groups=C) * (sig * (1 + f * (1 - sig)))
    gnw, gxs = [], []
    for k, (x, mode) in enumerate(zip(inputs, modes)):
        xm = x.to(md)
        gk = gf * nw_m[k]
        if mode == 0:
            r, gx = xm, gk
        elif mode == 1:
            r = F.interpolate(xm, size=(H, W), mode="nearest")
            gx = torch.ops.aten.upsample_nearest2d_backward(gk, [H, W], list(xm.shape))
        else:
            t, b = _pool_pad(x.shape[2], H, pp)
            l, rr = _pool_pad(x.shape[3], W, pp)
            xp = F.pad(xm, (l, rr, t, b), value=float("-inf"))
            r, idx = F.max_pool2d(xp, 3, 2, return_indices=True)
            gx = torch.zeros_like(xp).flatten(2).scatter_add_(2, idx.flatten(2), gk.flatten(2)).view_as(xp)
            gx = gx[:, :, t:t + x.shape[2], l:l + x.shape[3]]
        gnw.append((gf * r).sum())
        gxs.append(gx.to(x.dtype).contiguous(memory_format=_out_format(x)))
    return [torch.stack(gnw).to(nw.dtype), gdw.to(dw_weight.dtype), *gxs]


@_bwd_op.register_kernel("cuda")
def _bwd_op_cuda(grad, f, inputs, modes, nw, dw_weight, out_h, out_w, pool_same):
    gnw, gdw, gxs = _bwd_triton(grad, f, inputs, modes, nw, dw_weight, out_h, out_w,
                                "same" if pool_same else "symmetric")
    return [gnw, gdw, *gxs]


@_bwd_op.register_fake
def _bwd_op_fake(grad, f, inputs, modes, nw, dw_weight, out_h, out_w, pool_same):
    return [torch.empty_like(nw), torch.empty_like(dw_weight), *[torch.empty_like(x) for x in inputs]]


def _fwd_op_setup(ctx, inputs, output):
    inp, modes, nw, dw_weight, out_h, out_w, pool_same, save_f = inputs
    ctx.save_for_backward(output[1], nw, dw_weight, *inp)
    ctx.meta = (list(modes), out_h, out_w, pool_same)


def _fwd_op_backward(ctx, grad_out, grad_f):
    f, nw, dw_weight, *inp = ctx.saved_tensors
    modes, out_h, out_w, pool_same = ctx.meta
    if f.numel() == 0 and grad_out.numel() != 0:
        raise RuntimeError("effdet::bifpn_fusion_fwd: backward needs the forward to run with save_f=True")
    g = _bwd_op(grad_out, f, inp, modes, nw, dw_weight, out_h, out_w, pool_same)
    return (list(g[2:]), None, g[0], g[1], None, None, None, None)


_fwd_op.register_autograd(_fwd_op_backward, setup_context=_fwd_op_setup)


def bifpn_fusion_custom_op(inputs, resample, edge_weights, dw_weight, out_size, method="fast",
                           pool_padding="symmetric", eps=1e-4):
    """:func:`bifpn_fusion` through the ``effdet::bifpn_fusion_fwd/bwd`` custom ops (CPU kernel =
    reference, CUDA kernel = Triton). Used by the public function for Triton on CUDA."""
    _, _, H, W = _check(inputs, resample, edge_weights, dw_weight, out_size, method, pool_padding)
    nw = normalized_edge_weights(edge_weights, len(inputs), method, eps, inputs[0].device)
    save_f = _grad_needed([*inputs, edge_weights, dw_weight])
    out, _ = _fwd_op(list(inputs), [_MODES[r] for r in resample], nw, dw_weight, H, W,
                     pool_padding == "same", save_f)
    return out


# ----------------------------------------------------------------------------------------------
# public function
# ----------------------------------------------------------------------------------------------


def bifpn_fusion(inputs: Sequence[torch.Tensor], resample: Sequence[str], edge_weights: Optional[torch.Tensor],
                 dw_weight: torch.Tensor, out_size, method: str = "fast", pool_padding: str = "symmetric",
                 eps: float = 1e-4, backend: str = "auto") -> torch.Tensor:
    """One BiFPN node (see the module docstring) -> (B, C, H, W) in the first input's dtype/layout.

    backend: "torch" = the reference (plain autograd; compiles natively); "triton" = the Triton
    kernels (CUDA: through the custom ops; CPU: the autograd.Function directly, interpreter only).
    """
    choice = resolve("bifpn_fusion", backend, inputs[0].device.type)
    if choice == "torch":
        return bifpn_fusion_reference(inputs, resample, edge_weights, dw_weight, out_size, method, pool_padding, eps)
    if len(inputs) > MAX_TRITON_INPUTS:
        raise ValueError(f"bifpn_fusion: the Triton path takes at most {MAX_TRITON_INPUTS} inputs, got {len(inputs)}")
    if inputs[0].device.type == "cuda":
        return bifpn_fusion_custom_op(inputs, resample, edge_weights, dw_weight, out_size, method, pool_padding, eps)
    _, _, H, W = _check(inputs, resample, edge_weights, dw_weight, out_size, method, pool_padding)
    nw = normalized_edge_weights(edge_weights, len(inputs), method, eps, inputs[0].device)
    save_f = _grad_needed([*inputs, edge_weights, dw_weight])
    return _BiFPNFusionTriton.apply(nw, dw_weight, H, W, tuple(_MODES[r] for r in resample), pool_padding,
                                    save_f, *inputs)
