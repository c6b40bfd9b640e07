"""In-place exponential moving average of many tensors: ``ema = decay*ema + (1-decay)*model``.

Computed in fp32 as ``ema + (1-decay)*(model - ema)`` (torch's lerp) and stored in the ema dtype, the
same as ``torch._foreach_lerp_(ema, model, 1 - decay)`` up to fp32 rounding. ``decay`` is a Python
float or a 0-dim device tensor (a warm-up schedule computed on the device needs no host sync).

Layout choice: a **pointer table**, not a flat buffer. Each launch gets one int64 device tensor that
holds, per tensor, the ema address, the model address and the element count, and per tile of
``_BLOCK`` elements the tensor it belongs to and its start. A program reads its tile's row and casts
the addresses to typed pointers inside the kernel (``int64 -> tl.pointer_type``, the long-standing
idiom of Triton's grouped-GEMM tutorial; it works on GPUs with Triton 3.6 and 3.8 and in the
interpreter, where CPU tensors are read at their real host addresses). A flat buffer would need the
model's parameters to live in one allocation (they do not) or a gather copy every step (2x traffic).
The table depends only on addresses and sizes, so it is built once per parameter set and cached
(``_TABLE_CACHE``); steady-state steps do no host->device copy at all.

One launch per (ema dtype, model dtype) pair, normally exactly one. Pairs must be dense (contiguous,
channels-last or any non-overlapping dense layout) with identical strides so that element ``i`` of
both storages is the same logical element; any other pair (rare: views, expanded tensors) is updated
with plain torch ops in fp32 instead, so nothing is rejected for its layout. Integer and bool tensors
are rejected (the EMA class copies integer buffers itself); complex too.

Custom op: ``effdet::ema_update_(ema, model, decay_tensor, decay_value) -> ()`` mutating ``ema``; CPU =
reference, CUDA = Triton launcher, a fake implementation for torch.compile.
"""
from __future__ import annotations

import collections
import logging
from typing import Optional, Sequence

import torch

from ._dispatch import resolve, triton_available

__all__ = ["ema_update", "ema_update_reference"]

OP_NAME = "ema_update"
_BLOCK = 2048
_TABLE_CACHE: "collections.OrderedDict[tuple, torch.Tensor]" = collections.OrderedDict()
_TABLE_CACHE_SIZE = 8
log = logging.getLogger("kernels")

# --------------------------------------------------------------------------------------------------
# reference
# --------------------------------------------------------------------------------------------------


def _decay_weight(decay, device) -> "float | torch.Tensor":
    """1 - decay as a float or as a 0-dim fp32 tensor on ``device``."""
    if isinstance(decay, torch.Tensor):
        return 1.0 - decay.detach().to(device=device, dtype=torch.float32).reshape(())
    return 1.0 - float(decay)


def ema_update_reference(ema_tensors: Sequence[torch.Tensor], model_tensors: Sequence[torch.Tensor],
                         decay) -> None:
    """In place ``ema += (1 - decay) * (model - ema)`` in fp32, stored in the ema dtype (foreach ops)."""
    if len(ema_tensors) == 0:
        return
    w = _decay_weight(decay, ema_tensors[0].device)
    ema32 = [e.float() for e in ema_tensors]               # the same tensor for fp32
    diff = torch._foreach_sub([m.float() for m in model_tensors], ema32)
    torch._foreach_mul_(diff, w)
    torch._foreach_add_(ema32, diff)
    low = [(e, e32) for e, e32 in zip(ema_tensors, ema32) if e.dtype != torch.float32]
    if low:
        torch._foreach_copy_([e for e, _ in low], [e32 for _, e32 in low])


# --------------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------------

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _ema_kernel(table_ptr, n_tensors, decay_ptr, decay_value,
                    EMA_DTYPE: tl.constexpr, MODEL_DTYPE: tl.constexpr,
                    DECAY_FROM_PTR: tl.constexpr, BLOCK: tl.constexpr):
        # table layout (int64): [ema_ptr * n | model_ptr * n | numel * n | tile_tensor * T | tile_start * T]
        tile = tl.program_id(0)
        idx = tl.load(table_ptr + 3 * n_tensors + tile)
        start = tl.load(table_ptr + 3 * n_tensors + tl.num_programs(0) + tile)
        ema_ptr = tl.load(table_ptr + idx).to(tl.pointer_type(EMA_DTYPE))
        model_ptr = tl.load(table_ptr + n_tensors + idx).to(tl.pointer_type(MODEL_DTYPE))
        numel = tl.load(table_ptr + 2 * n_tensors + idx)
        if DECAY_FROM_PTR:
            decay = tl.load(decay_ptr).to(tl.float32)
        else:
            decay = decay_value
        w = 1.0 - decay
        offs = start + tl.arange(0, BLOCK)
        m = offs < numel
        e = tl.load(ema_ptr + offs, mask=m, other=0.0).to(tl.float32)
        x = tl.load(model_ptr + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(ema_ptr + offs, (e + w * (x - e)).to(EMA_DTYPE), mask=m)

    _TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
                  torch.float64: tl.float64}


def _dense_same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when both tensors cover exactly ``numel`` consecutive elements with the same strides."""
    if a.stride() != b.stride():
        return False
    if a.is_contiguous() or a.is_contiguous(memory_format=torch.channels_last):
        return True
    dims = sorted((s, n) for s, n in zip(a.stride(), a.shape) if n != 1)
    expected = 1
    for s, n in dims:
        if s != expected:
            return False
        expected *= n
    return True


def _build_table(ema: list[torch.Tensor], model: list[torch.Tensor], device) -> torch.Tensor:
    key = (device, _BLOCK, tuple((e.data_ptr(), m.data_ptr(), e.numel()) for e, m in zip(ema, model)))
    table = _TABLE_CACHE.get(key)
    if table is not None:
        _TABLE_CACHE.move_to_end(key)
        return table
    sizes = torch.tensor([e.numel() for e in ema], dtype=torch.int64)
    tiles = (sizes + _BLOCK - 1) // _BLOCK
    tile_tensor = torch.repeat_interleave(torch.arange(len(ema), dtype=torch.int64), tiles)
    first_tile = torch.cumsum(tiles, 0) - tiles
    tile_start = (torch.arange(len(tile_tensor), dtype=torch.int64) - first_tile[tile_tensor]) * _BLOCK
    host = torch.cat([torch.tensor([e.data_ptr() for e in ema], dtype=torch.int64),
                      torch.tensor([m.data_ptr() for m in model], dtype=torch.int64),
                      sizes, tile_tensor, tile_start])
    if torch.device(device).type == "cuda":
        table = host.pin_memory().to(device, non_blocking=True)
    else:
        table = host
    _TABLE_CACHE[key] = table
    while len(_TABLE_CACHE) > _TABLE_CACHE_SIZE:
        _TABLE_CACHE.popitem(last=False)
    return table


def _launch(ema: list[torch.Tensor], model: list[torch.Tensor], decay_tensor: Optional[torch.Tensor],
            decay_value: float) -> None:
    """One kernel launch per (ema dtype, model dtype) group; non-dense pairs go through torch."""
    groups: dict[tuple, tuple[list, list]] = {}
    fallback_e, fallback_m = [], []
    for e, m in zip(ema, model):
        if e.numel() == 0:
            continue
        if _dense_same_layout(e, m) and e.dtype in _TL_DTYPES and m.dtype in _TL_DTYPES:
            g = groups.setdefault((e.dtype, m.dtype), ([], []))
            g[0].append(e)
            g[1].append(m)
        else:
            fallback_e.append(e)
            fallback_m.append(m)
    for (edt, mdt), (es, ms) in groups.items():
        table = _build_table(es, ms, es[0].device)
        n_tiles = (table.numel() - 3 * len(es)) // 2
        _ema_kernel[(n_tiles,)](
            table, len(es), decay_tensor if decay_tensor is not None else table, float(decay_value),
            EMA_DTYPE=_TL_DTYPES[edt], MODEL_DTYPE=_TL_DTYPES[mdt],
            DECAY_FROM_PTR=decay_tensor is not None, BLOCK=_BLOCK, num_warps=4)
    if fallback_e:
        log.debug("kernels.ema_update: %d non-dense or mismatched-layout pairs updated with torch ops",
                  len(fallback_e))
        ema_update_reference(fallback_e, fallback_m,
                             decay_tensor if decay_tensor is not None else decay_value)


# --------------------------------------------------------------------------------------------------
# custom op
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("effdet::ema_update_", mutates_args=("ema_tensors",))
def _ema_update_op(ema_tensors: list[torch.Tensor], model_tensors: list[torch.Tensor],
                   decay_tensor: Optional[torch.Tensor], decay_value: float) -> None:
    raise NotImplementedError("effdet::ema_update_ has CPU and CUDA implementations only")


@_ema_update_op.register_kernel("cpu")
def _ema_update_cpu(ema_tensors, model_tensors, decay_tensor, decay_value):
    ema_update_reference(ema_tensors, model_tensors, decay_tensor if decay_tensor is not None else decay_value)


@_ema_update_op.register_kernel("cuda")
def _ema_update_cuda(ema_tensors, model_tensors, decay_tensor, decay_value):
    _launch(list(ema_tensors), list(model_tensors), decay_tensor, decay_value)


@_ema_update_op.register_fake
def _ema_update_fake(ema_tensors, model_tensors, decay_tensor, decay_value):
    return None


# --------------------------------------------------------------------------------------------------
# public function
# --------------------------------------------------------------------------------------------------


def _validate(ema: list, model: list, decay) -> torch.device | None:
    if len(ema) != len(model):
        raise ValueError(f"ema_update: {len(ema)} ema tensors but {len(model)} model tensors")
    device = None
    for i, (e, m) in enumerate(zip(ema, model)):
        if not isinstance(e, torch.Tensor) or not isinstance(m, torch.Tensor):
            raise TypeError(f"ema_update: item {i} is not a pair of tensors")
        for name, t in (("ema", e), ("model", m)):
            if not t.is_floating_point():
                raise TypeError(
                    f"ema_update: {name} tensor {i} has dtype {t.dtype}; only floating-point tensors are "
                    "averaged (copy integer buffers such as BatchNorm's num_batches_tracked yourself)")
        if e.shape != m.shape:
            raise ValueError(f"ema_update: tensor {i}: ema shape {tuple(e.shape)} != model shape "
                             f"{tuple(m.shape)}")
        if e.device != m.device or (device is not None and e.device != device):
            raise ValueError(f"ema_update: tensor {i}: all tensors must be on one device, got "
                             f"{e.device} and {m.device}" + (f" (first was {device})" if device else ""))
        device = e.device
        if e.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(f"ema_update: ema tensor {i} requires grad; call under torch.no_grad()")
    if isinstance(decay, torch.Tensor):
        if decay.numel() != 1:
            raise ValueError(f"ema_update: decay must be a scalar, got shape {tuple(decay.shape)}")
    else:
        float(decay)
    return device


def ema_update(ema_tensors: Sequence[torch.Tensor], model_tensors: Sequence[torch.Tensor], decay,
               backend: str = "auto") -> None:
    """``ema = decay * ema + (1 - decay) * model`` in place, for every pair, fp32 math.

    Args:
        ema_tensors: floating-point tensors updated in place (fp32 / fp16 / bf16).
        model_tensors: the current model tensors, same shapes, same device.
        decay: Python float or 0-dim tensor (read on the device, never on the host).
        backend: ``"auto" | "triton" | "torch"``.
    """
    ema, model = list(ema_tensors), list(model_tensors)
    device = _validate(ema, model, decay)
    if device is None:
        return
    choice = resolve(OP_NAME, backend, device)
    if choice == "torch":
        ema_update_reference(ema, model, decay)
        return
    if isinstance(decay, torch.Tensor):
        decay_tensor, decay_value = decay.detach().reshape(()).to(device=device, dtype=torch.float32), 0.0
    else:
        decay_tensor, decay_value = None, float(decay)
    if device.type == "cuda":
        _ema_update_op(ema, model, decay_tensor, decay_value)
    else:
        _launch(ema, model, decay_tensor, decay_value)
