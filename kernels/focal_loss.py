"""Sigmoid focal loss over class-index targets, with the gradient written in the forward pass.

The loss is effdet's ("new" focal loss of the TF EfficientDet port)::

    p = sigmoid(x); t = 1 for the target class of the anchor, else 0
    p_t = t*p + (1-t)*(1-p);   alpha_t = t*alpha + (1-t)*(1-alpha);   mod = (1-p_t)**gamma
    target = t*(1-s) + 0.5*s            (label smoothing s, on the BCE target only)
    loss = sum(alpha_t * mod * bce_with_logits(x, target)) / normalizer

summed over all classes of every anchor whose target is not ``ignore_index``. ``targets`` holds one
integer per anchor: ``k >= 0`` = class ``k`` positive (every other class negative), ``-1`` (or any other
value that is no class column) = background, ``ignore_index`` = ignored (zero loss, zero gradient).

Triton path (one pass over the logits):

* ``_focal_fwd_kernel`` walks the logits as one flat array (``M*C`` elements, no padding of the class
  axis to a power of two); each element finds its anchor row and class column, reads the anchor's
  class index (never a one-hot), computes loss and ``d(loss_sum)/dx`` in fp32 with log-sigmoid forms
  (finite for |x| up to 1e4 and beyond), writes the gradient and one partial loss sum per program.
* ``_focal_reduce_kernel`` (one program) sums the partials in a fixed order and divides by the
  normalizer, read from device memory: deterministic, no atomics, no host sync.
* backward only scales the stored gradient by ``grad_output / normalizer``.

The stored gradient is **fp32 for every logits dtype**: the unnormalized per-element gradient of the
bulk of easy negatives is ~1e-5..1e-8, which in fp16 is subnormal (few mantissa bits) or zero, and the
later scaling by ``grad_output / normalizer`` (GradScaler's 2**16 under AMP) would amplify that loss of
precision; fp32 costs 2 extra bytes per logit in memory and traffic for fp16/bf16 inputs but keeps the
gradient as exact as the reference's. The final gradient handed to autograd is in the logits dtype.

Custom op: ``effdet::focal_loss_fwd(logits, targets, normalizer, alpha, gamma, label_smoothing,
ignore_index, compute_grad) -> (loss, grad)`` with CPU = reference (gradient via autograd of the
reference), CUDA = Triton, a fake implementation and ``register_autograd``; the public function uses it
for CUDA tensors with the Triton backend so ``torch.compile(fullgraph=True)`` traces through.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import resolve, triton_available

__all__ = ["focal_loss", "focal_loss_reference"]

OP_NAME = "focal_loss"
_BLOCK = 1024          # logits elements per tile
_MAX_PROGRAMS = 8192   # partial sums; a program loops over several tiles above this
_REDUCE_BLOCK = 1024

# --------------------------------------------------------------------------------------------------
# reference
# --------------------------------------------------------------------------------------------------


def focal_loss_reference(logits: torch.Tensor, targets: torch.Tensor, normalizer, alpha: float = 0.25,
                         gamma: float = 1.5, label_smoothing: float = 0.0,
                         ignore_index: int = -2) -> torch.Tensor:
    """Plain-PyTorch focal loss (the spec). fp32 math, differentiable by autograd.

    With ``t`` the one-hot target, ``1 - p_t`` is ``sigmoid(x)`` for a negative and ``sigmoid(-x)`` for a
    positive, i.e. ``sigmoid(x * (1 - 2t))``; masks enter as float factors so every step is one dense op.
    fp16/bf16 are promoted to fp32; float64 stays float64 (for gradcheck).
    """
    x = logits if logits.dtype == torch.float64 else logits.float()
    t = (targets.unsqueeze(-1) == torch.arange(x.shape[-1], device=x.device)).to(x.dtype)
    # (1 - p_t) ** gamma; the floor keeps the gradient finite (0, not inf * 0) for gamma < 1 at saturated logits
    mod = torch.sigmoid(x * (1.0 - 2.0 * t)).clamp_min(torch.finfo(x.dtype).tiny).pow(gamma)
    alpha_t = (1.0 - alpha) + t * (2.0 * alpha - 1.0)  # alpha for positives, 1 - alpha for negatives
    bce_target = t * (1.0 - label_smoothing) + 0.5 * label_smoothing if label_smoothing > 0 else t
    ce = F.binary_cross_entropy_with_logits(x, bce_target, reduction="none")
    valid = (targets != ignore_index).unsqueeze(-1).to(x.dtype)
    loss = (alpha_t * mod * ce * valid).sum()
    if not isinstance(normalizer, torch.Tensor):
        return loss / float(normalizer)
    return loss / normalizer.to(x.dtype)


def _focal_grad_reference(logits, targets, alpha, gamma, label_smoothing, ignore_index):
    """Analytic d(loss sum)/d logits in fp32 torch (the custom op's CPU implementation runs below
    autograd, so it cannot differentiate the reference; the tests check this against autograd)."""
    x = logits.float()
    t = targets.unsqueeze(-1) == torch.arange(x.shape[-1], device=x.device)
    z = torch.where(t, -x, x)
    sgn = torch.where(t, -1.0, 1.0)
    mod = torch.exp(gamma * F.logsigmoid(z))
    y = torch.where(t, 1.0 - 0.5 * label_smoothing, 0.5 * label_smoothing)
    ce = F.binary_cross_entropy_with_logits(x, y, reduction="none")
    g = torch.where(t, alpha, 1.0 - alpha) * (sgn * gamma * mod * torch.sigmoid(-z) * ce
                                              + mod * (torch.sigmoid(x) - y))
    return torch.where((targets != ignore_index).unsqueeze(-1), g, 0.0)


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _focal_fwd_kernel(x_ptr, tgt_ptr, grad_ptr, partial_ptr, n_elem, C,
                          alpha, gamma, smoothing, ignore_index, tiles,
                          BLOCK: tl.constexpr,
                          SMOOTH: tl.constexpr, WRITE_GRAD: tl.constexpr):
        pid = tl.program_id(0)
        lane = tl.arange(0, BLOCK)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for it in range(tiles):                      # runtime bound: no recompile per problem size
            start = (pid.to(tl.int64) * tiles + it) * BLOCK      # int64: B*N*C may pass 2**31
            row0 = start // C                                     # scalar int64 divisions only
            local = (start - row0 * C).to(tl.int32) + lane        # < C + BLOCK: int32 is enough
            row = row0 + local // C
            col = local % C
            offs = start + lane
            m = offs < n_elem
            x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
            tgt = tl.load(tgt_ptr + row, mask=m, other=0).to(tl.int32)
            valid = m & (tgt != ignore_index)
            pos = tgt == col
            z = tl.where(pos, -x, x)                 # 1 - p_t = sigmoid(z)
            e = tl.exp(-tl.abs(x))                   # in (0, 1]; |z| == |x|
            l1p = tl.where(e < 1e-4, e * (1.0 - 0.5 * e), tl.log(1.0 + e))   # log1p(e)
            inv = 1.0 / (1.0 + e)
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
            loss = alpha_t * mod * ce
            acc += tl.where(valid, loss, 0.0)
            if WRITE_GRAD:
                # d mod / dx = sgn * gamma * mod * sigmoid(-z)
                g = alpha_t * (sgn * gamma * mod * sig_nz * ce + mod * dce)
                g = tl.where(valid, g, 0.0)
                tl.store(grad_ptr + offs, g, mask=m)
        tl.store(partial_ptr + pid, tl.sum(acc, axis=0))

    @triton.jit
    def _focal_reduce_kernel(partial_ptr, n_partial, norm_ptr, out_ptr, iters, BLOCK: tl.constexpr):
        lane = tl.arange(0, BLOCK)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for it in range(iters):                 # fixed order: deterministic
            offs = it * BLOCK + lane
            acc += tl.load(partial_ptr + offs, mask=offs < n_partial, other=0.0)
        total = tl.sum(acc, axis=0)
        norm = tl.load(norm_ptr).to(tl.float32)
        tl.store(out_ptr, total / norm)


def _launch(logits: torch.Tensor, targets: torch.Tensor, normalizer: torch.Tensor, alpha: float,
            gamma: float, label_smoothing: float, ignore_index: int, compute_grad: bool):
    """Run the Triton kernels; returns (0-dim fp32 loss, fp32 gradient of the loss sum or empty)."""
    x = logits.contiguous()
    tgt = targets.contiguous()
    C = x.shape[-1] if x.dim() else 1
    n = x.numel()
    dev = x.device
    grad = torch.empty(x.shape if compute_grad else (0,), dtype=torch.float32, device=dev)
    norm = normalizer.reshape(()).contiguous()
    out = torch.empty((), dtype=torch.float32, device=dev)
    n_tiles = triton.cdiv(n, _BLOCK) if n else 0
    tiles_per_prog = max(1, triton.cdiv(n_tiles, _MAX_PROGRAMS))
    n_prog = triton.cdiv(n_tiles, tiles_per_prog) if n_tiles else 0
    partial = torch.empty(max(n_prog, 1), dtype=torch.float32, device=dev)
    if n_prog:
        _focal_fwd_kernel[(n_prog,)](
            x, tgt, grad if compute_grad else partial, partial, n, C,
            float(alpha), float(gamma), float(label_smoothing), int(ignore_index), tiles_per_prog,
            BLOCK=_BLOCK, SMOOTH=bool(label_smoothing > 0),
            WRITE_GRAD=bool(compute_grad), num_warps=4)
    _focal_reduce_kernel[(1,)](partial, n_prog, norm, out, max(1, triton.cdiv(n_prog, _REDUCE_BLOCK)),
                               BLOCK=_REDUCE_BLOCK, num_warps=4)
    return out, grad


def _scale_grad(grad_sum: torch.Tensor, grad_out: torch.Tensor, normalizer: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
    """d loss / d logits = stored d(sum)/d logits * grad_output / normalizer, in the logits dtype."""
    return (grad_sum * (grad_out.float() / normalizer.float())).to(dtype)


# --------------------------------------------------------------------------------------------------
# custom op (torch.compile) and autograd
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("effdet::focal_loss_fwd", mutates_args=())
def _focal_loss_fwd_op(logits: torch.Tensor, targets: torch.Tensor, normalizer: torch.Tensor,
                       alpha: float, gamma: float, label_smoothing: float, ignore_index: int,
                       compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    raise NotImplementedError("effdet::focal_loss_fwd has CPU and CUDA implementations only")


@_focal_loss_fwd_op.register_kernel("cpu")
def _focal_loss_fwd_cpu(logits, targets, normalizer, alpha, gamma, label_smoothing, ignore_index,
                        compute_grad):
    if not compute_grad:
        loss = focal_loss_reference(logits, targets, normalizer, alpha, gamma, label_smoothing,
                                    ignore_index)
        return loss, logits.new_empty((0,), dtype=torch.float32)
    loss = focal_loss_reference(logits, targets, normalizer, alpha, gamma, label_smoothing, ignore_index)
    return loss, _focal_grad_reference(logits, targets, alpha, gamma, label_smoothing, ignore_index)


@_focal_loss_fwd_op.register_kernel("cuda")
def _focal_loss_fwd_cuda(logits, targets, normalizer, alpha, gamma, label_smoothing, ignore_index,
                         compute_grad):
    return _launch(logits, targets, normalizer, alpha, gamma, label_smoothing, ignore_index, compute_grad)


@_focal_loss_fwd_op.register_fake
def _focal_loss_fwd_fake(logits, targets, normalizer, alpha, gamma, label_smoothing, ignore_index,
                         compute_grad):
    loss = logits.new_empty((), dtype=torch.float32)
    grad = logits.new_empty(logits.shape if compute_grad else (0,), dtype=torch.float32)
    return loss, grad


def _op_setup_context(ctx, inputs, output):
    logits, _targets, normalizer, *_ = inputs
    ctx.logits_dtype = logits.dtype
    ctx.save_for_backward(output[1], normalizer)


def _op_backward(ctx, grad_loss, _grad_grad):
    grad_sum, normalizer = ctx.saved_tensors
    if grad_sum.numel() == 0 and ctx.needs_input_grad[0]:
        raise RuntimeError("focal_loss: forward ran with compute_grad=False; cannot backpropagate")
    return _scale_grad(grad_sum, grad_loss, normalizer, ctx.logits_dtype), None, None, None, None, \
        None, None, None


_focal_loss_fwd_op.register_autograd(_op_backward, setup_context=_op_setup_context)


class _FocalLossTriton(torch.autograd.Function):
    """The Triton launcher called directly (CPU tensors under the interpreter)."""

    @staticmethod
    def forward(ctx, logits, targets, normalizer, alpha, gamma, label_smoothing, ignore_index,
                compute_grad):
        loss, grad = _launch(logits, targets, normalizer, alpha, gamma, label_smoothing, ignore_index,
                             compute_grad)
        ctx.logits_dtype = logits.dtype
        ctx.save_for_backward(grad, normalizer)
        ctx.mark_non_differentiable(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_sum, normalizer = ctx.saved_tensors
        return _scale_grad(grad_sum, grad_loss, normalizer, ctx.logits_dtype), None, None, None, None, \
            None, None, None


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
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"focal_loss: targets shape {tuple(targets.shape)} must equal logits shape "
                         f"without the class dimension {tuple(logits.shape[:-1])}")
    if targets.device != logits.device:
        raise ValueError(f"focal_loss: targets on {targets.device}, logits on {logits.device}")


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, normalizer, alpha: float = 0.25,
               gamma: float = 1.5, label_smoothing: float = 0.0, ignore_index: int = -2,
               backend: str = "auto") -> torch.Tensor:
    """Sigmoid focal loss summed over anchors and classes, divided by ``normalizer``.

    Args:
        logits: ``(..., C)`` fp32/fp16/bf16 class logits (the detector passes ``(B, N_anchors, C)``).
        targets: ``(...)`` integer class index per anchor: ``k >= 0`` positive for class ``k``,
            ``-1`` background, ``ignore_index`` ignored (no loss, no gradient).
        normalizer: 0-dim tensor on the logits' device (or a Python number); never read on the host.
        alpha, gamma, label_smoothing: as in effdet (smoothing changes only the BCE target).
        backend: ``"auto" | "triton" | "torch"`` (see ``kernels._dispatch``).

    Returns:
        0-dim float32 tensor. Differentiable w.r.t. ``logits``.
    """
    _check_inputs(logits, targets)
    choice = resolve(OP_NAME, backend, logits.device)
    if choice == "torch":
        return focal_loss_reference(logits, targets, normalizer, alpha, gamma, label_smoothing,
                                    ignore_index)
    if not isinstance(normalizer, torch.Tensor):
        normalizer = torch.full((), float(normalizer), dtype=torch.float32, device=logits.device)
    elif normalizer.numel() != 1:
        raise ValueError(f"focal_loss: normalizer must be a single value, got shape "
                         f"{tuple(normalizer.shape)}")
    normalizer = normalizer.detach().reshape(()).to(device=logits.device, dtype=torch.float32)
    compute_grad = torch.is_grad_enabled() and logits.requires_grad
    args = (logits, targets, normalizer, float(alpha), float(gamma), float(label_smoothing),
            int(ignore_index), bool(compute_grad))
    if logits.device.type == "cuda":
        return _focal_loss_fwd_op(*args)[0]
    return _FocalLossTriton.apply(*args)
