"""Sigmoid focal loss over class-index targets, with the gradient written in the forward pass.

The loss is effdet's ("new" focal loss of the TF EfficientDet port)::

    p = sigmoid(x); t = 1 for the target class of the anchor, else 0
    p_t = t*p + (1-t)*(1-p);   alpha_t = t*alpha + (1-t)*(1-alpha);   mod = (1-p_t)**gamma
    target = t*(1-s) + 0.5*s            (label smoothing s, on the BCE target only)
    loss = sum(alpha_t * mod * bce_with_logits(x, target)) / normalizer

summed over all classes of every anchor whose target is not ``ignore_index``. ``targets`` holds one
integer per anchor: ``k >= 0`` = class ``k`` positive (every other class negative), ``-1`` (or any other
value that is no class column) = background, ``ignore_index`` = ignored (zero loss, zero gradient).

Non-finite logits: the logits of an ignored anchor are never used (zero loss and gradient even when they
are NaN or inf); a NaN or +-inf logit of a counted anchor makes the loss NaN and that element's gradient
NaN (a diverged model is reported, e.g. to GradScaler, instead of being averaged away).

Triton path:

* ``_focal_fwd_kernel`` walks the logits as one flat array (``M*C`` elements, no padding of the class
  axis); each element finds its anchor row and class column (``C`` is a compile-time constant, so the
  division is a multiply-shift), reads the anchor's class index (never a one-hot), computes the loss
  and ``d(loss_sum)/dx`` in fp32 with log-sigmoid forms and an exact ``log1p`` (finite for any finite
  logit), writes the gradient (fp32) and one partial loss sum per program.
* ``_focal_reduce_kernel`` (one program) sums the partials in a fixed order and divides by the
  normalizer, read from device memory: deterministic, no atomics, no host sync.
* ``_focal_bwd_kernel`` is the whole backward: stored fp32 gradient * grad_output / normalizer (both
  read on the device), written in the logits dtype.

The stored gradient is **fp32 for every logits dtype**: the unnormalized per-element gradient of the
bulk of easy negatives is ~1e-5..1e-8, which in fp16 is subnormal or zero, and the later scaling by
``grad_output / normalizer`` (GradScaler's 2**16 under AMP) would amplify that loss of precision.

Custom ops: ``effdet::focal_loss_fwd(logits, targets, normalizer, alpha, gamma, label_smoothing,
ignore_index, compute_grad) -> (loss, grad)`` and ``effdet::focal_loss_bwd(grad, grad_output,
normalizer, dtype) -> grad_logits``; the forward's autograd formula calls the backward op.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import dispatch, no_double_backward, triton_available, triton_op

__all__ = ["focal_loss", "focal_loss_reference"]

OP_NAME = "focal_loss"
_BLOCK = 1024          # logits elements per tile
_MAX_PROGRAMS = 8192   # partial sums; a program loops over several tiles above this
_REDUCE_BLOCK = 1024
_BWD_BLOCK = 2048

# --------------------------------------------------------------------------------------------------
# reference
# --------------------------------------------------------------------------------------------------


class _ModulatedBCE(torch.autograd.Function):
    """``exp(-gamma q) * (q - c u)`` with ``q = softplus(u)``, elementwise: the focal modulation times the
    smoothed BCE. Its derivative ``mod (sigmoid(u) - c) - gamma (mod sigmoid(u)) ce`` is what autograd
    derives, taken in an order that cannot form ``inf * 0`` at a finite ``u``: ``mod * sigmoid(u)`` is 0
    wherever the modulation's slope is before it meets a huge ``ce`` (|u| near the dtype's max, where
    autograd's chain multiplied an overflowed ``ce * grad`` by that 0 and gave NaN). Non-finite ``u`` still
    gives NaN. Fewer passes than autograd's chain: this is the CPU training path."""

    generate_vmap_rule = True  # (torch.func: the tests take per-element float64 gradients with vmap)

    @staticmethod
    def forward(u, gamma: float, c: float):
        q = F.softplus(u)
        ce = q.sub(u, alpha=c)
        mod = q.mul(-gamma).exp_()  # (1 - p_t) ** gamma
        return mod * ce, mod, ce

    @staticmethod
    def setup_context(ctx, inputs, output):
        u, ctx.gamma, ctx.c = inputs
        _, mod, ce = output
        ctx.mark_non_differentiable(mod, ce)
        ctx.save_for_backward(u, mod, ce)

    @staticmethod
    def backward(ctx, grad, _grad_mod, _grad_ce):
        u, mod, ce = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the same derivative, differentiable, from u alone
            q = F.softplus(u)
            mod, ce = torch.exp(q * -ctx.gamma), q.sub(u, alpha=ctx.c)
            ms = torch.sigmoid(u) * mod
            return (ms - ctx.c * mod - ctx.gamma * (ms * ce)) * grad, None, None
        ms = torch.sigmoid(u).mul_(mod)                          # mod * sigmoid(u): 0 where mod's slope is
        d = torch.sub(ms, mod, alpha=ctx.c).addcmul_(ms, ce, value=-ctx.gamma)
        return d.mul_(grad), None, None


def focal_loss_reference(logits: torch.Tensor, targets: torch.Tensor, normalizer, alpha: float = 0.25,
                         gamma: float = 1.5, label_smoothing: float = 0.0,
                         ignore_index: int = -2) -> torch.Tensor:
    """Plain-PyTorch focal loss (the spec, and the CPU training path). fp32 math, differentiable (autograd,
    with the elementwise core's derivative written out in ``_ModulatedBCE``).

    With ``u = x`` for the target class and ``u = -x`` otherwise, ``1 - p_t = sigmoid(-u)``, so with
    ``q = softplus(u) = -log(1 - p_t)`` each term is ``alpha_t * exp(-gamma q) * (q - (1 - s/2) u)`` (the
    smoothed BCE of either class is ``softplus(-u) + (s/2) u = q - (1 - s/2) u``): one transcendental and a
    few dense passes, no float one-hot, per-anchor masks broadcast, and a finite gradient for ``gamma < 1`` at
    saturated logits (no ``pow`` of a zero). Ignored anchors have ``alpha_t = 0`` and their logits are
    replaced by 0 first (zero loss and gradient whatever they hold). A counted non-finite logit gives a NaN
    term (``inf - inf``) or an inf term and NaN gradient there; an inf total is turned into NaN. Finite
    logits have a finite gradient, huge ones too (``_ModulatedBCE``).
    fp16/bf16 are promoted to fp32; float64 stays float64 (for gradcheck).
    """
    x = logits if logits.dtype == torch.float64 else logits.float()
    pos = targets.unsqueeze(-1) == torch.arange(x.shape[-1], device=x.device)  # bool, never a float one-hot
    # per-anchor mask, broadcast over the classes; compared as int64, so an ignore_index outside the targets'
    # dtype (-200 for int8) matches no anchor instead of wrapping to another class (56)
    valid = (targets.long() != ignore_index).unsqueeze(-1)
    zero, one = x.new_zeros(()), x.new_ones(())
    alpha_t = torch.where(pos, torch.where(valid, alpha, zero), torch.where(valid, 1.0 - alpha, zero))
    u = torch.where(valid, x, 0.0) * torch.where(pos, one, -one)
    term = _ModulatedBCE.apply(u, float(gamma), 1.0 - 0.5 * label_smoothing)[0]
    loss = torch.dot(term.flatten(), alpha_t.flatten())
    loss = loss + (loss - loss)  # an inf total (a +-inf logit) becomes NaN; finite: + 0, same gradient
    if not isinstance(normalizer, torch.Tensor):
        return loss / float(normalizer)
    return loss / normalizer.to(x.dtype)


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------

if triton_available():
    import triton
    import triton.language as tl

    # n_elem stays specialized: when it is a multiple of 16 (always for D0's 49104 x 90 logits per image)
    # the masked logits load and gradient store become 16-byte vectors; at most two variants per C
    @triton.jit(do_not_specialize=["tiles"])
    def _focal_fwd_kernel(x_ptr, tgt_ptr, grad_ptr, partial_ptr, n_elem,
                          alpha, gamma, smoothing, ignore_index, tiles,
                          C: tl.constexpr, BLOCK: tl.constexpr,
                          SMOOTH: tl.constexpr, WRITE_GRAD: tl.constexpr):
        pid = tl.program_id(0)
        lane = tl.arange(0, BLOCK)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for it in range(tiles):                      # runtime bound: no recompile per problem size
            start = (pid.to(tl.int64) * tiles + it) * BLOCK      # int64: B*N*C may pass 2**31
            row0 = start // C                                     # scalar int64 division by a constant
            local = (start - row0 * C).to(tl.int32) + lane        # < C + BLOCK: int32 is enough
            row = row0 + local // C                               # constant divisor: multiply-shift
            col = local - (local // C) * C
            offs = start + lane
            m = offs < n_elem
            x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
            tgt = tl.load(tgt_ptr + row, mask=m, other=0)  # its own dtype: int64 values past 2**31 stay
            counted = m & (tgt != ignore_index)
            finite = tl.abs(x) < float("inf")            # False for NaN and +-inf
            pos = tgt == col
            z = tl.where(pos, -x, x)                 # 1 - p_t = sigmoid(z)
            e = tl.exp(-tl.abs(x))                   # in (0, 1]; |z| == |x|
            u = 1.0 + e
            inv = 1.0 / u
            # exact log1p(e): log(u) * e / (u - 1) cancels the rounding of u (u - 1 is exact)
            l1p = tl.where(u == 1.0, e, tl.log(u) * (e / (u - 1.0)))
            sig_z = tl.where(z >= 0, inv, e * inv)   # sigmoid(z)
            sig_nz = tl.where(z >= 0, e * inv, inv)  # sigmoid(-z) = p_t
            log_sig_z = tl.minimum(z, 0.0) - l1p     # logsigmoid(z)
            mod = tl.exp(gamma * log_sig_z)          # (1 - p_t) ** gamma
            alpha_t = tl.where(pos, alpha, 1.0 - alpha)
            sgn = tl.where(pos, -1.0, 1.0)           # dz/dx
            if SMOOTH:
                y = tl.where(pos, 1.0 - 0.5 * smoothing, 0.5 * smoothing)
                ce = tl.maximum(x, 0.0) - x * y + l1p
                sig_x = tl.where(pos, sig_nz, sig_z)
                dce = sig_x - y
            else:
                ce = tl.maximum(z, 0.0) + l1p         # softplus(z) = bce(x, t)
                dce = sgn * sig_z
            loss = tl.where(finite, alpha_t * mod * ce, float("nan"))
            acc += tl.where(counted, loss, 0.0)
            if WRITE_GRAD:
                # d mod / dx = sgn * gamma * mod * sigmoid(-z)
                g = alpha_t * (sgn * gamma * mod * sig_nz * ce + mod * dce)
                g = tl.where(counted, tl.where(finite, g, float("nan")), 0.0)
                tl.store(grad_ptr + offs, g, mask=m)
        tl.store(partial_ptr + pid, tl.sum(acc, axis=0))

    @triton.jit(do_not_specialize=["n_partial", "iters"])
    def _focal_reduce_kernel(partial_ptr, n_partial, norm_ptr, out_ptr, iters, BLOCK: tl.constexpr):
        lane = tl.arange(0, BLOCK)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for it in range(iters):                 # fixed order: deterministic
            offs = it * BLOCK + lane
            acc += tl.load(partial_ptr + offs, mask=offs < n_partial, other=0.0)
        total = tl.sum(acc, axis=0)
        total = total + (total - total)         # an inf total (overflow) becomes NaN, as the reference
        norm = tl.load(norm_ptr).to(tl.float32)
        tl.store(out_ptr, total / norm)

    @triton.jit(do_not_specialize=["n_elem"])
    def _focal_bwd_kernel(grad_ptr, grad_out_ptr, norm_ptr, out_ptr, n_elem, BLOCK: tl.constexpr):
        start = tl.program_id(0).to(tl.int64) * BLOCK
        offs = start + tl.arange(0, BLOCK)
        scale = tl.load(grad_out_ptr).to(tl.float32) / tl.load(norm_ptr).to(tl.float32)
        if start + BLOCK <= n_elem:            # full tile: unmasked, so the accesses are vectorized
            g = tl.load(grad_ptr + offs)
            tl.store(out_ptr + offs, (g * scale).to(out_ptr.dtype.element_ty))
        else:                                  # the last tile
            m = offs < n_elem
            g = tl.load(grad_ptr + offs, mask=m, other=0.0)
            tl.store(out_ptr + offs, (g * scale).to(out_ptr.dtype.element_ty), mask=m)


# --------------------------------------------------------------------------------------------------
# launchers = custom ops
# --------------------------------------------------------------------------------------------------


def _forward_partials(x: torch.Tensor, tgt: torch.Tensor, alpha: float, gamma: float, label_smoothing: float,
                      ignore_index: int, compute_grad: bool, block: int):
    """Run ``_focal_fwd_kernel``; returns (per-program loss sums, fp32 gradient of the loss sum or empty)."""
    n = x.numel()
    grad = torch.empty(x.shape if compute_grad else (0,), dtype=torch.float32, device=x.device)
    n_tiles = triton.cdiv(n, block) if n else 0
    tiles_per_prog = max(1, triton.cdiv(n_tiles, _MAX_PROGRAMS))
    n_prog = triton.cdiv(n_tiles, tiles_per_prog) if n_tiles else 0
    partial = torch.empty(max(n_prog, 1), dtype=torch.float32, device=x.device)
    if n_prog:
        _focal_fwd_kernel[(n_prog,)](
            x, tgt, grad if compute_grad else partial, partial, n,
            float(alpha), float(gamma), float(label_smoothing), int(ignore_index), tiles_per_prog,
            C=x.shape[-1], BLOCK=block, SMOOTH=bool(label_smoothing > 0), WRITE_GRAD=bool(compute_grad),
            num_warps=4)
    return partial[:n_prog], grad


@triton_op("effdet::focal_loss_fwd")
def _focal_loss_fwd(logits: torch.Tensor, targets: torch.Tensor, normalizer: torch.Tensor,
                    alpha: float, gamma: float, label_smoothing: float, ignore_index: int,
                    compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (0-dim fp32 loss, fp32 d(loss sum)/d logits, or an empty tensor when ``compute_grad`` is False)."""
    x, tgt = logits.contiguous(), targets.contiguous()
    partial, grad = _forward_partials(x, tgt, alpha, gamma, label_smoothing, ignore_index, compute_grad,
                                      _BLOCK)
    out = torch.empty((), dtype=torch.float32, device=x.device)
    n_prog = partial.numel()
    _focal_reduce_kernel[(1,)](partial, n_prog, normalizer, out, max(1, triton.cdiv(n_prog, _REDUCE_BLOCK)),
                               BLOCK=_REDUCE_BLOCK, num_warps=4)
    return out, grad


@_focal_loss_fwd.register_fake
def _(logits, targets, normalizer, alpha, gamma, label_smoothing, ignore_index, compute_grad):
    return (logits.new_empty((), dtype=torch.float32),
            logits.new_empty(logits.shape if compute_grad else (0,), dtype=torch.float32))


@triton_op("effdet::focal_loss_bwd")
def _focal_loss_bwd(grad: torch.Tensor, grad_output: torch.Tensor, normalizer: torch.Tensor,
                    dtype: torch.dtype) -> torch.Tensor:
    """d loss / d logits = stored fp32 d(sum)/d logits * grad_output / normalizer, in ``dtype``."""
    out = torch.empty(grad.shape, dtype=dtype, device=grad.device)
    n = grad.numel()
    if n:
        _focal_bwd_kernel[(triton.cdiv(n, _BWD_BLOCK),)](grad, grad_output.reshape(()), normalizer, out, n,
                                                         BLOCK=_BWD_BLOCK, num_warps=4)
    return out


@_focal_loss_bwd.register_fake
def _(grad, grad_output, normalizer, dtype):
    return torch.empty(grad.shape, dtype=dtype, device=grad.device)


def _setup_context(ctx, inputs, output):
    logits, _targets, normalizer, *_ = inputs
    ctx.logits_dtype, ctx.logits_numel = logits.dtype, logits.numel()
    ctx.save_for_backward(output[1], normalizer, output[0])


def _backward(ctx, grad_loss, _grad_grad):
    grad_sum, normalizer, loss = ctx.saved_tensors
    grad_logits = grad_norm = None
    if ctx.needs_input_grad[0]:
        if grad_sum.numel() != ctx.logits_numel:
            raise RuntimeError("focal_loss: forward ran with compute_grad=False; cannot backpropagate")
        grad_logits = _focal_loss_bwd(grad_sum, grad_loss, normalizer, ctx.logits_dtype)
    if ctx.needs_input_grad[2]:        # loss = sum / normalizer: d loss / d normalizer = -loss / normalizer
        grad_norm = -(grad_loss * loss.detach()) / normalizer.detach()
    return grad_logits, None, grad_norm, None, None, None, None, None


_focal_loss_fwd.register_autograd(_backward, setup_context=_setup_context)


no_double_backward(_focal_loss_bwd, "kernels.focal_loss")


# --------------------------------------------------------------------------------------------------
# public function
# --------------------------------------------------------------------------------------------------


def _check_inputs(logits: torch.Tensor, targets: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError(f"focal_loss: logits must be a floating-point tensor, got "
                        f"{getattr(logits, 'dtype', type(logits))}")
    if logits.dim() < 1:
        raise ValueError("focal_loss: logits must have a class dimension (..., C)")
    if not isinstance(targets, torch.Tensor) or targets.is_floating_point() or targets.is_complex() \
            or targets.dtype == torch.bool:
        raise TypeError(f"focal_loss: targets must be an integer tensor of class indices, got "
                        f"{getattr(targets, 'dtype', type(targets))}")
    if not targets.dtype.is_signed:
        raise TypeError(f"focal_loss: targets must be a signed integer tensor (-1 = background, "
                        f"ignore_index = ignored), got {targets.dtype}")
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"focal_loss: targets shape {tuple(targets.shape)} must equal logits shape "
                         f"without the class dimension {tuple(logits.shape[:-1])}")
    if targets.device != logits.device:
        raise ValueError(f"focal_loss: targets on {targets.device}, logits on {logits.device}")


def _triton_path(logits, targets, normalizer, alpha, gamma, label_smoothing, ignore_index):
    if not isinstance(normalizer, torch.Tensor):
        # a Python number: a one-off host->device copy (pass a device tensor in hot loops)
        normalizer = torch.full((), float(normalizer), dtype=torch.float32, device=logits.device)
    elif normalizer.numel() != 1:
        raise ValueError(f"focal_loss: normalizer must be a single value, got shape "
                         f"{tuple(normalizer.shape)}")
    # not detached: a normalizer that needs a gradient gets one (the op's autograd formula)
    normalizer = normalizer.reshape(()).to(device=logits.device, dtype=torch.float32)
    compute_grad = torch.is_grad_enabled() and logits.requires_grad
    return _focal_loss_fwd(logits, targets, normalizer, float(alpha), float(gamma), float(label_smoothing),
                           int(ignore_index), bool(compute_grad))[0]


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, normalizer, alpha: float = 0.25,
               gamma: float = 1.5, label_smoothing: float = 0.0, ignore_index: int = -2,
               backend: str = "auto") -> torch.Tensor:
    """Sigmoid focal loss summed over anchors and classes, divided by ``normalizer``.

    Args:
        logits: ``(..., C)`` fp32/fp16/bf16 class logits (the detector passes ``(B, N_anchors, C)``); float64
            runs the reference in float64 (``"auto"``; the Triton path refuses it).
        targets: ``(...)`` signed integer class index per anchor (unsigned dtypes are refused: they cannot
            hold -1): ``k >= 0`` positive for class ``k``,
            ``-1`` background, ``ignore_index`` ignored (no loss, no gradient).
        normalizer: 0-dim tensor on the logits' device (or a Python number), > 0 (effdet's is the positive
            count + 1); never read on the host, so not checked: with 0 the loss is inf or NaN, and which
            gradient entries are inf and which NaN differs between the two paths.
        alpha, gamma: as in effdet.
        label_smoothing: in [0, 1], as in effdet (it changes only the BCE target); anything else is refused.
        backend: ``"auto" | "triton" | "torch"`` (see ``kernels._dispatch``).

    Returns:
        0-dim float32 tensor (float64 for float64 logits). Differentiable w.r.t. ``logits`` and a tensor
        ``normalizer`` (the Triton path: first derivatives only; double backward is a clear error).
    """
    _check_inputs(logits, targets)
    if not 0.0 <= label_smoothing <= 1.0:  # NaN fails this too
        raise ValueError(f"focal_loss: label_smoothing must be in [0, 1], got {label_smoothing}")
    unsupported = "float64 logits (it computes in float32)" if logits.dtype == torch.float64 else None
    return dispatch(OP_NAME, backend, logits.device, _triton_path, focal_loss_reference, logits, targets,
                    normalizer, alpha, gamma, label_smoothing, ignore_index, unsupported=unsupported)
