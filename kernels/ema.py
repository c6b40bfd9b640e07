"""In-place exponential moving average of many tensors: ``ema = decay*ema + (1-decay)*model``.

Computed in fp32 as ``ema + (1-decay)*(model - ema)`` (torch's lerp) and stored in the ema dtype, the
same as ``torch._foreach_lerp_(ema, model, 1 - decay)`` up to fp32 rounding. ``decay`` is a Python
float or a 0-dim device tensor (a warm-up schedule computed on the device needs no host sync).

Triton design: a **pointer table**, not a flat buffer. One int64 device tensor per launch holds, per
tensor, the ema address, the model address and the element count, and per tile of ``_BLOCK`` elements
the tensor it belongs to and its start. A program reads its tile's row and casts the addresses to typed
pointers (``int64 -> tl.pointer_type``, the idiom of Triton's grouped-GEMM tutorial; in the interpreter
CPU tensors are read at their real host addresses). Full tiles are read and written without a mask and,
when both tensors start on a 16-byte boundary, with alignment hints, so the accesses are 16-byte vectors
(``LDG.E.128`` on sm_90); the last tile of each tensor is masked. A flat buffer would need the model's
parameters in one allocation (they are not) or a gather copy every step (2x traffic).

Host side: everything that depends only on the tensors (validation, grouping by dtype/alignment, the
tables) is a *plan*, built once and cached (``_PLANS``) under the tensors' addresses and element counts; a
call recomputes those, checks that the cached plan holds the very same tensor objects, and launches: no
table copy, no per-tensor validation. A tensor moved to new storage (``.to()``, ``.data = ...``), resized or
sliced at the same address (``resize_``, ``.data = p.data[:k]``), or replaced in the list by another tensor
(even a view at the same address) rebuilds the plan. Not noticed: the same tensor object given another
dtype or strides at the same address and size through ``.data = ...``. The plan keeps its tensors alive, so
their addresses cannot be reused by other tensors while it is cached.

One launch per (ema dtype, model dtype, aligned) group, normally exactly one. Pairs must be dense
(contiguous, channels-last or any non-overlapping dense layout) with identical strides so that element
``i`` of both storages is the same logical element; any other pair (rare: views, expanded tensors) is
updated with the reference's torch ops instead. Integer, bool and complex tensors are rejected (the EMA
class copies integer buffers itself).

Aliasing: the kernel's tiles read and write in no fixed order, so an ema tensor that shares memory with
another ema tensor (the same tensor twice, e.g. a tied parameter) or with any model tensor (the same
storage, or overlapping views) would give an order-dependent result. The plan finds such overlaps once
(address ranges); ``"auto"`` then runs the reference (which reads every model value before it writes),
``"triton"`` refuses them by name, and the custom op (what ``torch.compile`` runs) updates them with the
reference's torch ops.

Custom op: ``effdet::ema_update_(ema, model, decay_tensor, decay_value) -> ()`` mutating ``ema``, what
``torch.compile`` traces. Eager calls run the same launcher without the op's Python dispatch, which for
two lists of ~640 tensors costs more than the whole host budget of a step (see the tests); they bump the
ema tensors' autograd version counters themselves, as the op's in-place schema does.
"""
import collections
import contextlib
import logging
import operator
from typing import Optional, Sequence

import torch

from ._dispatch import dispatch, triton_available, triton_op

__all__ = ["ema_update", "ema_update_reference"]

OP_NAME = "ema_update"
_BLOCK = 2048
_PLANS: "collections.OrderedDict[tuple, _Plan]" = collections.OrderedDict()
_PLAN_CACHE_SIZE = 4
_BY_ID: "dict[tuple, _Plan]" = {}       # (id(ema sequence), id(model sequence)) of the last call -> plan
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

    @triton.jit(do_not_specialize=["n_tensors"])
    def _ema_kernel(table_ptr, n_tensors, decay_ptr, weight_value,
                    EMA_DTYPE: tl.constexpr, MODEL_DTYPE: tl.constexpr,
                    DECAY_FROM_PTR: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
        # table layout (int64): [ema_ptr * n | model_ptr * n | numel * n | tile_tensor * T | tile_start * T]
        tile = tl.program_id(0)
        idx = tl.load(table_ptr + 3 * n_tensors + tile)
        start = tl.load(table_ptr + 3 * n_tensors + tl.num_programs(0) + tile)
        ema_addr = tl.load(table_ptr + idx)
        model_addr = tl.load(table_ptr + n_tensors + idx)
        numel = tl.load(table_ptr + 2 * n_tensors + idx)
        start = tl.multiple_of(start, BLOCK)                   # tiles start at multiples of BLOCK
        ema_ptr = ema_addr.to(tl.pointer_type(EMA_DTYPE))
        model_ptr = model_addr.to(tl.pointer_type(MODEL_DTYPE))
        if ALIGNED:   # both storages start on 16 bytes (the hint must sit on the pointer, not the int64)
            ema_ptr = tl.multiple_of(ema_ptr, 16)
            model_ptr = tl.multiple_of(model_ptr, 16)
        if DECAY_FROM_PTR:
            w = 1.0 - tl.load(decay_ptr).to(tl.float32)
        else:                                                  # 1 - decay from the host, as the reference
            w = weight_value
        offs = start + tl.arange(0, BLOCK)
        if start + BLOCK <= numel:                             # full tile: no mask, vector accesses
            e = tl.load(ema_ptr + offs).to(tl.float32)
            x = tl.load(model_ptr + offs).to(tl.float32)
            tl.store(ema_ptr + offs, (e + w * (x - e)).to(EMA_DTYPE))
        else:                                                  # the tensor's last tile
            m = offs < numel
            e = tl.load(ema_ptr + offs, mask=m, other=0.0).to(tl.float32)
            x = tl.load(model_ptr + offs, mask=m, other=0.0).to(tl.float32)
            tl.store(ema_ptr + offs, (e + w * (x - e)).to(EMA_DTYPE), mask=m)

    _TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
                  torch.float64: tl.float64}
else:  # pragma: no cover - no Triton: the reference path only
    _TL_DTYPES = {}


# --------------------------------------------------------------------------------------------------
# plan (validation, grouping, tables: once per set of tensors) and launcher
# --------------------------------------------------------------------------------------------------


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


def _validate(ema: Sequence, model: Sequence) -> torch.device:
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
    return device


def _aliasing(ema: Sequence[torch.Tensor], model: Sequence[torch.Tensor]) -> Optional[str]:
    """Why these tensors cannot be updated by independent tiles: an ema tensor whose memory overlaps another
    ema tensor or a model tensor (model tensors may share memory among themselves: they are only read).
    None when no memory is shared. Address ranges from sizes and strides, one sort."""
    spans = []
    for kind, tensors in (("ema", ema), ("model", model)):
        for i, t in enumerate(tensors):
            if t.numel() == 0:
                continue
            extent = 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
            spans.append((t.data_ptr(), t.data_ptr() + extent * t.element_size(), kind, i))
    spans.sort()
    end_all = end_ema = -1
    last_all = last_ema = None
    for lo, hi, kind, i in spans:
        other = last_all if kind == "ema" and lo < end_all else last_ema if lo < end_ema else None
        if other is not None:
            a, b = sorted([(kind, i), other])
            return (f"ema tensors that share memory with other tensors of the call ({a[0]} tensor {a[1]} and "
                    f"{b[0]} tensor {b[1]} overlap)")
        if hi > end_all:
            end_all, last_all = hi, (kind, i)
        if kind == "ema" and hi > end_ema:
            end_ema, last_ema = hi, (kind, i)
    return None


class _Plan:
    """Everything about one list of tensor pairs that does not change between steps."""

    def __init__(self, ema: Sequence[torch.Tensor], model: Sequence[torch.Tensor]):
        self.device = _validate(ema, model)
        self.ema, self.model = tuple(ema), tuple(model)          # keeps the tensors (and addresses) alive
        self.aliasing = _aliasing(self.ema, self.model)          # None, or why the kernel cannot take them
        self._groups = None                                      # built on the first Triton launch

    def same_tensors(self, ema, model) -> bool:
        return all(map(operator.is_, ema, self.ema)) and all(map(operator.is_, model, self.model))

    def groups(self):
        """-> ([(table, n_tensors, n_tiles, ema dtype, model dtype, aligned, block)], fallback ema,
        fallback model): one kernel launch per entry, torch ops for the fallback pairs."""
        if self._groups is None:
            by_key: dict[tuple, tuple[list, list]] = {}
            fb_e, fb_m = [], []
            for e, m in zip(self.ema, self.model):
                if e.numel() == 0:
                    continue
                if _dense_same_layout(e, m) and e.dtype in _TL_DTYPES and m.dtype in _TL_DTYPES:
                    aligned = e.data_ptr() % 16 == 0 and m.data_ptr() % 16 == 0
                    g = by_key.setdefault((e.dtype, m.dtype, aligned), ([], []))
                    g[0].append(e)
                    g[1].append(m)
                else:
                    fb_e.append(e)
                    fb_m.append(m)
            launches = []
            for (edt, mdt, aligned), (es, ms) in by_key.items():
                table, n_tiles = _build_table(es, ms, self.device)
                launches.append((table, len(es), n_tiles, edt, mdt, aligned, _BLOCK))
            if fb_e:
                log.debug("kernels.ema_update: %d non-dense or mismatched-layout pairs updated with torch ops",
                          len(fb_e))
            self._groups = (launches, fb_e, fb_m)
        return self._groups


def _key(tensors: Sequence[torch.Tensor]) -> tuple:
    """Per tensor, its address and element count (C-level passes, no Python loop): with the tensor objects
    themselves (``_Plan.same_tensors``) what a cached plan is checked against on every call."""
    return tuple(map(torch.Tensor.data_ptr, tensors)), tuple(map(torch.Tensor.numel, tensors))


def _plan(ema: Sequence[torch.Tensor], model: Sequence[torch.Tensor]) -> "_Plan":
    """The cached plan for these tensors (rebuilt, with full validation, when any address or size changed).

    Fast path: the same two sequence objects as last time, holding the same tensor objects, with the same
    addresses and element counts (a few C-level passes over the tensors, no per-tensor Python work).
    Otherwise the plan is looked up by addresses and counts and reused when it holds the very same tensor
    objects (e.g. the lists torch.compile rebuilds every call)."""
    try:
        key = (_key(ema), _key(model))
    except TypeError:                     # not tensors: let _validate name the item
        _validate(ema, model)
        raise
    ids = (id(ema), id(model))
    plan = _BY_ID.get(ids)
    if (plan is not None and plan.key == key and plan.seqs[0] is ema and plan.seqs[1] is model
            and plan.same_tensors(ema, model)):
        return plan
    plan = _PLANS.get(key)
    if plan is None or not plan.same_tensors(ema, model):
        plan = _Plan(ema, model)
        plan.key = key
        _PLANS[key] = plan
        while len(_PLANS) > _PLAN_CACHE_SIZE:
            _PLANS.popitem(last=False)
    plan.seqs = (ema, model)              # kept alive with the plan, so their ids stay unique
    _BY_ID.clear()
    _BY_ID[ids] = plan
    return plan


def _build_table(ema: list[torch.Tensor], model: list[torch.Tensor], device) -> tuple[torch.Tensor, int]:
    sizes = torch.tensor([e.numel() for e in ema], dtype=torch.int64)
    tiles = (sizes + _BLOCK - 1) // _BLOCK
    tile_tensor = torch.repeat_interleave(torch.arange(len(ema), dtype=torch.int64), tiles)
    first_tile = torch.cumsum(tiles, 0) - tiles
    tile_start = (torch.arange(len(tile_tensor), dtype=torch.int64) - first_tile[tile_tensor]) * _BLOCK
    host = torch.cat([torch.tensor([e.data_ptr() for e in ema], dtype=torch.int64),
                      torch.tensor([m.data_ptr() for m in model], dtype=torch.int64),
                      sizes, tile_tensor, tile_start])
    table = host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host
    return table, int(tile_tensor.numel())


def _launch(plan: "_Plan", decay_tensor: Optional[torch.Tensor], decay_value: float) -> None:
    """One kernel launch per (ema dtype, model dtype, aligned) group; non-dense pairs go through torch.
    ``decay_value`` is used where ``decay_tensor`` is None. Tensors that share memory (``plan.aliasing``;
    the public function sends them to the reference, the custom op gets here) all go through torch."""
    if plan.aliasing is not None:
        ema_update_reference(plan.ema, plan.model, decay_tensor if decay_tensor is not None else decay_value)
        return
    launches, fb_e, fb_m = plan.groups()
    for table, n, n_tiles, edt, mdt, aligned, block in launches:
        _ema_kernel[(n_tiles,)](
            table, n, decay_tensor if decay_tensor is not None else table, _decay_weight(decay_value, None),
            EMA_DTYPE=_TL_DTYPES[edt], MODEL_DTYPE=_TL_DTYPES[mdt], DECAY_FROM_PTR=decay_tensor is not None,
            ALIGNED=aligned, BLOCK=block, num_warps=4)
    if fb_e:
        ema_update_reference(fb_e, fb_m, decay_tensor if decay_tensor is not None else decay_value)


# --------------------------------------------------------------------------------------------------
# custom op
# --------------------------------------------------------------------------------------------------


@triton_op("effdet::ema_update_", mutates_args=("ema_tensors",))
def _ema_update_op(ema_tensors: list[torch.Tensor], model_tensors: list[torch.Tensor],
                   decay_tensor: Optional[torch.Tensor], decay_value: float) -> None:
    _launch(_plan(ema_tensors, model_tensors), decay_tensor, decay_value)


@_ema_update_op.register_fake
def _(ema_tensors, model_tensors, decay_tensor, decay_value):
    return None


# --------------------------------------------------------------------------------------------------
# public function
# --------------------------------------------------------------------------------------------------


def _triton_path(ema, model, decay, plan):
    """``plan``: ``_plan(ema, model)``, or None while torch.compile traces (the custom op then)."""
    device = ema[0].device
    if isinstance(decay, torch.Tensor):
        decay_tensor, decay_value = decay.detach().reshape(()).to(device=device, dtype=torch.float32), 0.0
    else:
        decay_tensor, decay_value = None, float(decay)
    if torch.compiler.is_compiling():
        _ema_update_op(list(ema), list(model), decay_tensor, decay_value)
    else:                               # CUDA, or CPU tensors in the interpreter (resolve() checked it is on)
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            _launch(plan, decay_tensor, decay_value)
        torch.autograd.graph.increment_version(list(ema))  # written through raw addresses: say so to autograd


def _reference_path(ema, model, decay, plan):
    ema_update_reference(ema, model, decay)  # (validated by ``plan``, built by the caller)


def ema_update(ema_tensors: Sequence[torch.Tensor], model_tensors: Sequence[torch.Tensor], decay,
               backend: str = "auto") -> None:
    """``ema = decay * ema + (1 - decay) * model`` in place, for every pair, fp32 math.

    Args:
        ema_tensors: floating-point tensors updated in place (fp32 / fp16 / bf16).
        model_tensors: the current model tensors, same shapes, same device.
        decay: Python float or 0-dim tensor (read on the device, never on the host).
        backend: ``"auto" | "triton" | "torch"``.

    Pass the same two lists every step: the per-list work (validation, tables) is done once and cached.
    Ema tensors that share memory with each other or with model tensors run the reference (``"auto"``;
    ``"triton"`` refuses them): give a tied parameter once.
    """
    if len(ema_tensors) != len(model_tensors):
        raise ValueError(f"ema_update: {len(ema_tensors)} ema tensors but {len(model_tensors)} model tensors")
    if len(ema_tensors) == 0:
        return
    if isinstance(decay, torch.Tensor):
        if decay.numel() != 1:
            raise ValueError(f"ema_update: decay must be a scalar, got shape {tuple(decay.shape)}")
    else:
        decay = float(decay)
    first = ema_tensors[0]
    if not isinstance(first, torch.Tensor):
        raise TypeError("ema_update: item 0 is not a pair of tensors")
    if first.requires_grad and torch.is_grad_enabled():
        raise RuntimeError("ema_update: ema tensors require grad; call under torch.no_grad()")
    plan = None if torch.compiler.is_compiling() else _plan(ema_tensors, model_tensors)   # cached: validation,
    dispatch(OP_NAME, backend, first.device, _triton_path, _reference_path,             # aliasing, tables
             ema_tensors, model_tensors, decay, plan=plan, unsupported=plan.aliasing if plan is not None else None)
