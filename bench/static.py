"""Compiled-code evidence for the Triton kernels, without a GPU: which kernel variants a workload launches,
and what each one compiles to for sm_90 / sm_80.

1. :func:`capture_launches` records every Triton launch made inside it (interpreter or real JIT) and turns
   it into a :class:`Variant` the way a real CUDA launch would specialize it (Triton 3.8's
   ``JITFunction`` binder, ``triton/runtime/jit.py:create_function_from_signature``, run with the CUDA
   backend): ints equal to 1 and ``None`` become constants, ints divisible by 16 and pointers whose address
   is 16-byte aligned get ``tt.divisibility = 16``, ``do_not_specialize`` arguments are not specialized,
   floats and bools are never specialized, constexprs and ``num_warps`` / ``num_stages`` as passed. One
   variant = (kernel, signature dtypes, specialization, constexprs, launch options): exactly what makes
   Triton compile again.
2. :func:`compile_variants` compiles each variant with ``triton.compile(ASTSource(...),
   target=GPUTarget("cuda", arch, 32))`` in worker subprocesses without ``TRITON_INTERPRET`` (a CPU-time
   limit per compile, enforced with ``RLIMIT_CPU``; a timeout is a failure), times it in CPU seconds (this
   process and its ``ptxas`` child: a figure that other load on a shared machine hardly changes), reads ``REG``/``STACK``/``LOCAL``/``SHARED`` from the cubin with
   ``cuobjdump --dump-resource-usage`` and counts the SASS instructions of ``nvdisasm -c``. Results are
   cached on disk (``~/.cache/effdet-triton-static/``, or ``$EFFDET_STATIC_CACHE``) by a hash of the
   kernel's module sources, the variant, the arch and the Triton version, so a pathological variant is not
   compiled again until its source changes.
3. :func:`capture_d0` runs the workload of the static checks: one EfficientDet-D0 training step (forward,
   loss, backward, SGD step, EMA update) and one inference pass (model + ``decode_topk`` + ``batched_nms``),
   with every op on its Triton path.

Per-element figures (:func:`rows`), defined so that they are honest:

* **elements per program** = the product of the launch's integer constexprs whose name contains ``BLOCK``
  (the tile one program handles per loop iteration); a kernel without such constexprs has none (``n/a``).
* **SASS per element** = static SASS instruction count of the kernel (every instruction ``nvdisasm -c``
  prints, loop bodies counted once) / elements per program. It is a code-size figure, not a dynamic count.
* **bytes per element** = bytes of all tensor arguments of the launch (each tensor counted once, as if
  read or written once; pointer tables and partial buffers included) / the number of elements of the
  largest tensor argument (the problem size), for the largest launch of the variant. Memory a kernel
  reaches through a table of pointers (the EMA kernel's) is not seen by this figure: there it says only
  what the table costs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib
import inspect
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

REPO_ROOT = Path(__file__).resolve().parent.parent
ARCHS = (90, 80)
CACHE_DIR = Path(os.environ.get("EFFDET_STATIC_CACHE") or Path.home() / ".cache" / "effdet-triton-static")
COMPILE_TIMEOUT_S = 60.0   # CPU seconds
WORKER_START_TIMEOUT_S = 120.0


# --------------------------------------------------------------------------------------------------
# variants
# --------------------------------------------------------------------------------------------------


def _encode(v):
    """A constexpr / signature value as JSON: tuples as lists, ``tl.dtype`` and jit functions by name."""
    if isinstance(v, (tuple, list)):
        return [_encode(x) for x in v]
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if type(v).__name__ == "dtype" and type(v).__module__.startswith("triton"):
        return {"tl": v.name}
    fn = getattr(v, "fn", None)
    if fn is not None and hasattr(fn, "__qualname__"):  # a JITFunction / InterpretedFunction
        return {"jit": f"{fn.__module__}:{fn.__qualname__}"}
    if hasattr(v, "value") and type(v).__name__ == "constexpr":
        return _encode(v.value)
    return {"repr": repr(v)}


def _decode(v):
    if isinstance(v, list):
        return tuple(_decode(x) for x in v)
    if isinstance(v, dict):
        if "tl" in v:  # a dtype by its Triton name ("fp32", "bf16", ...)
            import triton.language as tl
            return tl.dtype(v["tl"])
        if "jit" in v:
            mod, qual = v["jit"].split(":")
            return _resolve(mod, qual)
        raise ValueError(f"cannot rebuild constexpr {v}")
    return v


def _resolve(module: str, qualname: str):
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


@dataclasses.dataclass
class Variant:
    """One compiled form of a kernel (see the module docstring)."""

    module: str
    qualname: str
    signature: dict          # argument name -> Triton type ("*fp32", "i32", "constexpr", ...)
    constexprs: list         # [[path], value] - constexpr arguments and the ones specialized to constants
    attrs: list              # [[path], [["tt.divisibility", 16]]]
    options: dict            # num_warps, num_stages and any other launch option passed
    source_hash: str
    launches: int = 0
    elems_per_program: Optional[int] = None
    max_bytes: int = 0
    max_elems: int = 0
    grid: Optional[list] = None
    run_s: float = 0.0       # seconds spent running the launches (interpreter time on the CPU)

    @property
    def kernel(self) -> str:
        return self.qualname

    def key(self) -> str:
        return json.dumps([self.module, self.qualname, self.signature, self.constexprs, self.attrs, self.options],
                          sort_keys=True)

    def _name(self, path) -> str:
        if len(path) == 1:
            return path[0] if isinstance(path[0], str) else list(self.signature)[path[0]]
        return str(path)

    def summary(self) -> str:
        """Short text: pointer / scalar dtypes, the divisible (D) ints and pointers, constants, options."""
        const = {self._name(p): v for p, v in self.constexprs}
        div = [self._name(p) for p, a in self.attrs if a]
        sig = ",".join(f"{k}:{t}" for k, t in self.signature.items() if t != "constexpr")
        cs = ",".join(f"{k}={v}" for k, v in const.items())
        opts = ",".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return f"{sig} | const {cs or '-'} | D16 {','.join(div) or '-'} | {opts}"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Variant":
        return cls(**d)

    @classmethod
    def from_spec(cls, module: str, name: str, signature: dict, constexprs: dict, attrs: Optional[dict] = None,
                  options: Optional[dict] = None) -> "Variant":
        """A hand-written variant: ``signature`` maps the non-constexpr arguments to Triton types,
        ``constexprs`` the constexpr arguments to values (``"tl.float16"`` stands for ``tl.float16``),
        ``attrs`` argument names to ``[["tt.divisibility", 16]]``. No attributes: nothing assumed aligned."""
        import importlib.util

        spec = importlib.util.find_spec(module)
        source = Path(spec.origin).read_bytes() if spec and spec.origin else module.encode()

        def enc(v):
            if isinstance(v, str) and v.startswith("tl."):
                import triton.language as tl
                return {"tl": getattr(tl, v[3:]).name}
            return _encode(v)

        sig = dict(signature, **{k: "constexpr" for k in constexprs})
        return cls(module=module, qualname=name, signature=sig,
                   constexprs=sorted([[k], enc(v)] for k, v in constexprs.items()),
                   attrs=sorted([[k], a] for k, a in (attrs or {}).items()),
                   options=dict(options or {}), source_hash=hashlib.sha256(source).hexdigest()[:16])


_SOURCE_HASHES: dict = {}


def _source_hash(fn) -> str:
    """Hash of the kernel's module source and of every module whose jit functions that module uses."""
    key = fn.__module__
    if key in _SOURCE_HASHES:
        return _SOURCE_HASHES[key]
    files = {inspect.getsourcefile(fn)}
    for v in list(fn.__globals__.values()):
        inner = getattr(v, "fn", None)
        if inner is not None and callable(inner) and hasattr(inner, "__code__") and type(v).__module__.startswith(
                "triton"):
            files.add(inner.__code__.co_filename)
    h = hashlib.sha256()
    for f in sorted(x for x in files if x):
        h.update(Path(f).read_bytes())
    _SOURCE_HASHES[key] = h.hexdigest()[:16]
    return _SOURCE_HASHES[key]


_BINDERS: dict = {}


def _binder(fn, do_not_specialize, do_not_specialize_on_alignment):
    """Triton's own argument binder + specializer, built for the CUDA backend (sm_90)."""
    key = (fn, tuple(do_not_specialize or ()), tuple(do_not_specialize_on_alignment or ()))
    if key not in _BINDERS:
        from triton.backends.compiler import GPUTarget
        from triton.compiler.compiler import make_backend
        from triton.runtime.jit import KernelParam, create_function_from_signature

        dns, dnsoa = key[1], key[2]
        sig = inspect.signature(fn)
        params = [KernelParam(i, p, i in dns or p.name in dns, i in dnsoa or p.name in dnsoa)
                  for i, p in enumerate(sig.parameters.values())]
        backend = make_backend(GPUTarget("cuda", 90, 32))
        _BINDERS[key] = (create_function_from_signature(sig, params, backend), backend, [p.name for p in params])
    return _BINDERS[key]


def variant_of(fn, jit_kwargs: dict, args, kwargs) -> Variant:
    """The variant a CUDA launch ``kernel[grid](*args, **kwargs)`` of the jit function ``fn`` compiles."""
    from triton.runtime.jit import find_paths_if, get_iterable_path

    binder, backend, names = _binder(fn, jit_kwargs.get("do_not_specialize"),
                                     jit_kwargs.get("do_not_specialize_on_alignment"))
    bound_args, specialization, options = binder(*args, **kwargs)
    sigvals = [x[0] for x in specialization]
    signature = {k: _encode(v) for k, v in zip(names, sigvals)}
    cpaths = find_paths_if(sigvals, lambda _, val: val == "constexpr")
    constexprs = sorted([list(p), _encode(get_iterable_path(list(bound_args.values()), p))] for p in cpaths)
    attrvals = ["" if x[0] == "constexpr" else x[1] for x in specialization]
    apaths = find_paths_if(attrvals, lambda _, x: isinstance(x, str))
    attrs = sorted([list(p), backend.parse_attr(get_iterable_path(attrvals, p))] for p in apaths)
    attrs = [a for a in attrs if a[1]]
    parsed = backend.parse_options(dict(options))
    opts = {k: _encode(v) for k, v in options.items() if k not in ("debug", "instrumentation_mode")}
    opts.setdefault("num_warps", parsed.num_warps)
    opts.setdefault("num_stages", parsed.num_stages)
    return Variant(module=fn.__module__, qualname=fn.__qualname__, signature=signature, constexprs=constexprs,
                   attrs=attrs, options=opts, source_hash=_source_hash(fn))


def _launch_size(args, kwargs) -> tuple[int, int]:
    """(bytes of the tensor arguments, each counted once; elements of the largest one)."""
    seen, nbytes, elems = set(), 0, 0

    def visit(a):
        nonlocal nbytes, elems
        if isinstance(a, (tuple, list)):
            for b in a:
                visit(b)
        elif hasattr(a, "data_ptr") and hasattr(a, "element_size"):
            key = (a.data_ptr(), a.numel(), a.element_size())
            if key not in seen:
                seen.add(key)
                nbytes += a.numel() * a.element_size()
                elems = max(elems, a.numel())

    for a in list(args) + list(kwargs.values()):
        visit(a)
    return nbytes, elems


def _elems_per_program(variant: Variant) -> Optional[int]:
    names = list(variant.signature)
    prod = None
    for path, v in variant.constexprs:
        if len(path) == 1 and "BLOCK" in names[path[0]].upper() and isinstance(v, int) and not isinstance(v, bool):
            prod = (prod or 1) * v
    return prod


class Capture:
    """The variants recorded by :func:`capture_launches`, keyed by :meth:`Variant.key`."""

    def __init__(self):
        self.variants: dict[str, Variant] = {}
        self.errors: list[str] = []
        self.launches = 0
        self.seconds = 0.0
        self.host_sync: Optional[list] = None

    def record(self, fn, jit_kwargs, args, kwargs, grid) -> Optional[Variant]:
        self.launches += 1
        try:
            v = variant_of(fn, jit_kwargs, args, kwargs)
        except Exception as err:  # never break the workload; report it instead
            self.errors.append(f"{fn.__module__}.{fn.__qualname__}: {type(err).__name__}: {err}")
            return None
        v = self.variants.setdefault(v.key(), v)
        v.launches += 1
        v.elems_per_program = _elems_per_program(v)
        nbytes, elems = _launch_size(args, kwargs)
        if nbytes >= v.max_bytes:
            v.max_bytes, v.max_elems = nbytes, elems
            v.grid = list(grid) if isinstance(grid, (tuple, list)) else None
        return v

    def timed(self, fn, jit_kwargs, args, kwargs, grid, run):
        v = self.record(fn, jit_kwargs, args, kwargs, grid)
        t0 = time.perf_counter()
        try:
            return run()
        finally:
            if v is not None:
                v.run_s += time.perf_counter() - t0

    def to_json(self) -> dict:
        return {"variants": [v.to_json() for v in self.variants.values()], "errors": self.errors,
                "launches": self.launches, "seconds": self.seconds, "host_sync": self.host_sync}

    @classmethod
    def from_json(cls, d: dict) -> "Capture":
        cap = cls()
        cap.errors, cap.launches = list(d["errors"]), d["launches"]
        cap.seconds, cap.host_sync = d.get("seconds", 0.0), d.get("host_sync")
        for vd in d["variants"]:
            v = Variant.from_json(vd)
            cap.variants[v.key()] = v
        return cap


@contextlib.contextmanager
def capture_launches():
    """Record every Triton kernel launch (interpreter or JIT) made inside the ``with`` block."""
    from triton.runtime.jit import JITFunction

    cap = Capture()
    patched = []
    orig_jit = JITFunction.run

    def jit_run(self, *args, grid, warmup, **kwargs):
        run = lambda: orig_jit(self, *args, grid=grid, warmup=warmup, **kwargs)  # noqa: E731
        if warmup:
            return run()
        return cap.timed(self.fn, {"do_not_specialize": self.do_not_specialize,
                                   "do_not_specialize_on_alignment": self.do_not_specialize_on_alignment},
                         args, kwargs, grid, run)

    patched.append((JITFunction, "run", orig_jit))
    JITFunction.run = jit_run
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except Exception:  # pragma: no cover - older layouts
        InterpretedFunction = None
    if InterpretedFunction is not None:
        orig_interp = InterpretedFunction.run

        def interp_run(self, *args, grid, warmup, **kwargs):
            run = lambda: orig_interp(self, *args, grid=grid, warmup=warmup, **kwargs)  # noqa: E731
            if warmup:
                return run()
            return cap.timed(self.fn, self.kwargs, args, kwargs, grid, run)

        patched.append((InterpretedFunction, "run", orig_interp))
        InterpretedFunction.run = interp_run
    try:
        yield cap
    finally:
        for cls, name, orig in patched:
            setattr(cls, name, orig)


# --------------------------------------------------------------------------------------------------
# host synchronisations in launchers
# --------------------------------------------------------------------------------------------------

# torch functions that make a tensor from host data, and tensor methods / functions that read a tensor back
_FROM_HOST = ("tensor", "as_tensor", "scalar_tensor", "full")
_TO_HOST_METHODS = ("item", "cpu", "tolist", "numpy", "nonzero")
_TO_HOST_FUNCS = ("nonzero",)
_TO_HOST_CASTS = ("__bool__", "__int__", "__float__", "__index__")


def _is_host_data(x) -> bool:
    import torch

    if isinstance(x, torch.Tensor):
        return False
    if isinstance(x, (list, tuple)):
        return any(_is_host_data(y) for y in x) or len(x) == 0
    return True  # Python scalars, numpy arrays, ...


class HostSyncRecorder:
    """Records calls that move data between host and device when made *directly* by code in ``roots``
    (default: the ``kernels`` package), outside Triton kernels (the interpreter copies tensors to the host
    legitimately, and its own frames live in triton's files anyway):

    * ``torch.tensor`` / ``torch.as_tensor`` / ``torch.scalar_tensor`` with Python data, and ``torch.full``
      of a one-element tensor from a Python number (a host scalar moved to the device; ``torch.full`` of a
      bigger buffer with a constant is a device fill, not a copy, and is allowed);
    * ``Tensor.item`` / ``.cpu`` / ``.tolist`` / ``.numpy`` / ``.nonzero`` and ``torch.nonzero``;
    * the implicit reads: a tensor as a Python ``bool`` / ``int`` / ``float`` / index (``if t:``,
      ``int(t.sum())``, ``range(t)``), ``Tensor.to("cpu")``, ``torch.equal``, ``repeat_interleave`` of tensor
      repeats without ``output_size`` (its output size is data), ``torch.where(cond)`` alone, and reading or
      writing through a boolean mask.

    Use as a context manager; ``calls`` lists ``(what, "file:line")``.
    """

    def __init__(self, roots=None):
        self.roots = [str(Path(r).resolve()) + os.sep for r in (roots or [REPO_ROOT / "kernels"])]
        self.calls: list[tuple[str, str]] = []
        self._saved = []
        self._in_kernel = 0

    def _caller(self):
        f = sys._getframe(2)
        name = f.f_code.co_filename
        if self._in_kernel or not any(name.startswith(r) for r in self.roots):
            return None
        return f"{os.path.relpath(name, REPO_ROOT)}:{f.f_lineno}"

    def _wrap(self, owner, attr, label, check=None):
        orig = getattr(owner, attr)
        rec = self

        def wrapper(*args, **kwargs):
            where = rec._caller()
            if where is not None and (check is None or check(*args, **kwargs)):
                rec.calls.append((label, where))
            return orig(*args, **kwargs)

        self._saved.append((owner, attr, orig, attr in vars(owner)))
        setattr(owner, attr, wrapper)

    def __enter__(self):
        import torch

        def data_check(data=None, *a, **k):
            return _is_host_data(data)

        def full_check(size=None, fill_value=None, *a, **k):
            n = 1
            for d in (size if isinstance(size, (tuple, list)) else [size]):
                n *= int(d) if isinstance(d, int) else 2
            return n <= 1 and not isinstance(fill_value, torch.Tensor)

        for name in _FROM_HOST:
            self._wrap(torch, name, f"torch.{name}", full_check if name == "full" else data_check)
        for name in _TO_HOST_FUNCS:
            self._wrap(torch, name, f"torch.{name}")
        for name in _TO_HOST_METHODS:
            self._wrap(torch.Tensor, name, f"Tensor.{name}")
        for name in _TO_HOST_CASTS:
            self._wrap(torch.Tensor, name, f"Tensor.{name}")

        def to_cpu(self_, *a, **k):  # named as a string: here every device is the CPU, ``x.device`` included
            where = k.get("device", a[0] if a else None)
            return isinstance(where, str) and torch.device(where).type == "cpu"

        def data_sized(*a, **k):  # repeat_interleave(input, repeats) / Tensor.repeat_interleave(repeats)
            return isinstance(k.get("repeats", a[1] if len(a) > 1 else None), torch.Tensor) and \
                k.get("output_size") is None

        def mask_index(self_, index):
            parts = index if isinstance(index, tuple) else (index,)
            return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in parts)

        self._wrap(torch.Tensor, "to", "Tensor.to(cpu)", to_cpu)
        self._wrap(torch, "equal", "torch.equal")
        self._wrap(torch, "repeat_interleave", "torch.repeat_interleave", data_sized)
        self._wrap(torch.Tensor, "repeat_interleave", "Tensor.repeat_interleave", data_sized)
        self._wrap(torch.Tensor, "__getitem__", "Tensor[bool mask]", mask_index)
        self._wrap(torch.Tensor, "__setitem__", "Tensor[bool mask] =", lambda self_, index, value: mask_index(self_, index))
        self._wrap(torch, "where", "torch.where(cond)", lambda *a, **k: len(a) + len(k) == 1)  # = nonzero
        try:
            from triton.runtime.interpreter import InterpretedFunction
            orig = InterpretedFunction.run
            rec = self

            def run(self_, *args, **kwargs):
                rec._in_kernel += 1
                try:
                    return orig(self_, *args, **kwargs)
                finally:
                    rec._in_kernel -= 1

            self._saved.append((InterpretedFunction, "run", orig, True))
            InterpretedFunction.run = run
        except Exception:  # pragma: no cover
            pass
        return self

    def __exit__(self, *exc):
        for owner, attr, orig, own in reversed(self._saved):
            if own:
                setattr(owner, attr, orig)
            else:  # inherited (e.g. Tensor.__bool__ from the C base class): drop the wrapper
                delattr(owner, attr)
        self._saved.clear()
        return False


# --------------------------------------------------------------------------------------------------
# the D0 workload
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _env(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: str(v) for k, v in values.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def size_hw(size) -> tuple[int, int]:
    """``128`` -> (128, 128); ``(128, 256)`` or ``"128x256"`` -> (128, 256) (height, width)."""
    if isinstance(size, str):
        parts = [int(x) for x in size.lower().split("x")]
        return (parts[0], parts[-1])
    if isinstance(size, int):
        return (size, size)
    return (int(size[0]), int(size[1]))


def size_label(size) -> str:
    h, w = size_hw(size)
    return str(h) if h == w else f"{h}x{w}"


def d0_workload(size=128, batch: int = 2, device="cpu", model_name: str = "efficientdet_d0",
                backend: str = "triton", seed: int = 0, channels_last: bool = False
                ) -> tuple[Callable[[], object], Callable[[], object]]:
    """``(train_step, infer)`` for one model: forward, loss, backward, SGD step and EMA update; and the
    model + post-processing (``decode_topk`` + ``batched_nms``) under ``torch.inference_mode``."""
    import torch

    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    import detector
    from bench.model import random_targets
    from detector.ema import ModelEma

    device = torch.device(device)
    h, w = size_hw(size)
    torch.manual_seed(seed)
    model = detector.create_model(model_name, image_size=(h, w), backend=backend).to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    ema = ModelEma(model, backend=backend)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    images = torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed)).to(device)
    images = images.contiguous(memory_format=fmt)
    boxes, labels = random_targets(batch, min(h, w), model.config.num_classes, seed=seed)
    boxes, labels = boxes.to(device), labels.to(device)

    def train_step():
        model.train()
        opt.zero_grad(set_to_none=True)
        loss = detector.compute_loss(model, images, boxes, labels, backend=backend)["loss"]
        loss.backward()
        opt.step()
        ema.update(model)
        return loss

    def infer():
        model.eval()
        with torch.inference_mode():
            return detector.predict(model, images, backend=backend)

    return train_step, infer


def capture_d0(sizes: Iterable = (128,), batch: int = 2, device=None, host_sync: bool = False
               ) -> dict[int, Capture]:
    """Per image size, the variants one D0 train step + one inference pass launch on the Triton path.
    Without CUDA this needs ``TRITON_INTERPRET=1`` set before ``triton`` was imported.

    ``host_sync=True`` then runs the step and the inference a second time under :class:`HostSyncRecorder`
    (the first run is the warm-up: tables built once and cached are allowed) and stores the calls in the
    capture's ``host_sync`` list."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = {}
    with _env(EFFDET_KERNEL_BACKEND="triton"):
        for size in sizes:
            train_step, infer = d0_workload(size, batch, device)
            t0 = time.perf_counter()
            with capture_launches() as cap:
                train_step()
                infer()
            cap.seconds = time.perf_counter() - t0
            if host_sync:
                with HostSyncRecorder() as rec:
                    train_step()
                    infer()
                cap.host_sync = [list(c) for c in rec.calls]
            out[size] = cap
    return out


_CAPTURE_SCRIPT = (
    "import json, sys, torch; torch.set_num_threads(1); from bench.static import capture_d0; "
    "cap = capture_d0([sys.argv[1]], int(sys.argv[2]), host_sync=sys.argv[3] == '1')[sys.argv[1]]; "
    "print('\\nCAPTURE-JSON ' + json.dumps(cap.to_json()))")


def _workload_hash(batch: int) -> str:
    """Hash of everything the D0 capture depends on: the sources of ``kernels/`` and ``detector/``, this file
    and ``bench/model.py``, the torch and Triton versions, the batch."""
    import torch

    h = hashlib.sha256(f"{torch.__version__}|{_triton_version()}|{batch}".encode())
    files = sorted(list((REPO_ROOT / "kernels").rglob("*.py")) + list((REPO_ROOT / "detector").rglob("*.py"))
                   + [REPO_ROOT / "bench" / "static.py", REPO_ROOT / "bench" / "model.py"])
    for f in files:
        h.update(str(f.relative_to(REPO_ROOT)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:24]


def capture_d0_subprocess(sizes: Iterable = (128, (128, 256)), batch: int = 2, timeout: float = 1500.0,
                          host_sync_sizes: Iterable[int] = (), use_cache: bool = True) -> dict:
    """:func:`capture_d0`, one subprocess per size, all at once (the interpreter is single-threaded, so
    two sizes take about the time of one on two cores). Without CUDA the subprocesses run the interpreter.
    Sizes in ``host_sync_sizes`` also record host synchronisations (a second pass, see :func:`capture_d0`).
    ``use_cache``: reuse a capture made with the very same sources (:func:`_workload_hash`) from the cache
    folder; a capture with specialization errors is never cached."""
    import torch

    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONWARNINGS"] = "ignore"
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    sizes = list(sizes)
    order = list(sizes)
    sync_labels = {size_label(s) for s in host_sync_sizes}
    out = {}
    cache_files = {}
    if use_cache:
        code = _workload_hash(batch)
        for s in sizes:
            path = CACHE_DIR / f"capture-{code}-{size_label(s)}-{int(size_label(s) in sync_labels)}.json"
            cache_files[s] = path
            if path.exists():
                try:
                    out[s] = Capture.from_json(json.loads(path.read_text()))
                except (ValueError, KeyError, TypeError):
                    pass
        sizes = [s for s in sizes if s not in out]
    procs = {s: subprocess.Popen([sys.executable, "-c", _CAPTURE_SCRIPT, size_label(s), str(batch),
                                  "1" if size_label(s) in sync_labels else "0"], cwd=str(REPO_ROOT),
                                 env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for s in sizes}
    deadline = time.monotonic() + timeout
    try:
        for s, p in procs.items():
            try:
                stdout, stderr = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"capturing the D0 launches at {size_label(s)} px took more than "
                                   f"{timeout:.0f} s") from None
            line = next((ln for ln in stdout.splitlines() if ln.startswith("CAPTURE-JSON ")), None)
            if p.returncode != 0 or line is None:
                raise RuntimeError(f"capturing the D0 launches at {size_label(s)} px failed (exit {p.returncode}):"
                                   "\n" + (stdout + stderr)[-3000:])
            out[s] = Capture.from_json(json.loads(line[len("CAPTURE-JSON "):]))
            if s in cache_files and not out[s].errors:
                cache_files[s].parent.mkdir(parents=True, exist_ok=True)
                cache_files[s].write_text(line[len("CAPTURE-JSON "):])
    finally:
        for q in procs.values():
            if q.poll() is None:
                q.kill()
                q.wait()
    return {s: out[s] for s in order}


@functools.lru_cache(maxsize=None)
def cached_d0_captures(sizes: tuple = (128, (128, 256)), batch: int = 2, host_sync_sizes: tuple = (128,)
                       ) -> dict[int, Capture]:
    """:func:`capture_d0_subprocess`, once per process for these arguments (the compiled-code and the
    host-sync tests share one run of the D0 workload)."""
    return capture_d0_subprocess(sizes, batch, host_sync_sizes=host_sync_sizes)


def union(captures: Iterable[Capture]) -> list[Variant]:
    merged: dict[str, Variant] = {}
    for cap in captures:
        for k, v in cap.variants.items():
            if k in merged:
                m = merged[k]
                m.launches += v.launches
                m.run_s += v.run_s
                if v.max_bytes > m.max_bytes:
                    m.max_bytes, m.max_elems, m.grid = v.max_bytes, v.max_elems, v.grid
            else:
                merged[k] = dataclasses.replace(v)
    return sorted(merged.values(), key=lambda v: (v.module, v.qualname, v.key()))


# --------------------------------------------------------------------------------------------------
# ahead-of-time compile (worker subprocesses)
# --------------------------------------------------------------------------------------------------


def tool_path(name: str) -> str:
    """``cuobjdump`` / ``nvdisasm`` / ``ptxas``: Triton's bundled copy, else the one on ``PATH``."""
    import importlib.util

    spec = importlib.util.find_spec("triton")
    if spec and spec.origin:
        p = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / name
        if p.exists():
            return str(p)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found (neither in triton/backends/nvidia/bin nor on PATH)")
    return found


_RES_RE = re.compile(r"\b(REG|STACK|SHARED|LOCAL):(\d+)")
_SASS_RE = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+\S", re.MULTILINE)


def cubin_resources(cubin: bytes, name: Optional[str] = None) -> dict:
    """``{"regs", "stack", "local", "shared_static", "sass"}`` of a cubin (cuobjdump + nvdisasm)."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "k.cubin"
        path.write_bytes(cubin)
        res = subprocess.run([tool_path("cuobjdump"), "--dump-resource-usage", str(path)], capture_output=True,
                             text=True, timeout=60)
        if res.returncode != 0:
            raise RuntimeError(f"cuobjdump failed: {res.stderr.strip()[:300]}")
        text = res.stdout
        if name and f"Function {name}" in text:
            text = text[text.index(f"Function {name}"):]
        vals = {k: int(v) for k, v in _RES_RE.findall(text.split("Function", 2)[1] if "Function" in text else text)}
        dis = subprocess.run([tool_path("nvdisasm"), "-c", str(path)], capture_output=True, text=True, timeout=60)
        if dis.returncode != 0:
            raise RuntimeError(f"nvdisasm failed: {dis.stderr.strip()[:300]}")
    return {"regs": vals.get("REG"), "stack": vals.get("STACK"), "local": vals.get("LOCAL"),
            "shared_static": vals.get("SHARED"), "sass": len(_SASS_RE.findall(dis.stdout))}


def compile_one(variant: dict, arch: int) -> dict:
    """Compile one variant (a :meth:`Variant.to_json` dict) for ``sm_<arch>``; in a process without
    ``TRITON_INTERPRET``. Returns the resources and the compile seconds."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _resolve(variant["module"], variant["qualname"])
    if not hasattr(fn, "arg_names"):
        raise RuntimeError(f"{variant['qualname']} is not a JITFunction here (is TRITON_INTERPRET set?)")
    signature = {k: _decode(v) if isinstance(v, list) else v for k, v in variant["signature"].items()}
    def path(p):  # [3] / [3, 0] (argument index path) or ["NAME"]
        return p[0] if len(p) == 1 and isinstance(p[0], str) else tuple(p)

    constexprs = {path(p): _decode(v) for p, v in variant["constexprs"]}
    attrs = {path(p): [list(x) for x in a] for p, a in variant["attrs"]}
    attrs = {(fn.arg_names.index(k),) if isinstance(k, str) else k: a for k, a in attrs.items()}
    options = {k: _decode(v) for k, v in variant["options"].items()}
    t0, c0 = time.perf_counter(), _cpu_seconds()
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                            options=options)
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    out = cubin_resources(kernel.asm["cubin"], kernel.metadata.name)
    out.update(compile_s=cpu, compile_wall_s=wall, shared=int(kernel.metadata.shared), name=kernel.metadata.name)
    return out


def _cpu_seconds() -> float:
    """CPU seconds of this process and of its finished children (``ptxas``): unlike wall time, hardly
    changed by other processes loading a shared machine."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _worker_main() -> int:
    """Worker loop: one JSON job per stdin line -> one JSON result per stdout line."""
    real_stdout = sys.stdout
    sys.stdout = sys.stderr  # anything a kernel module prints must not corrupt the protocol
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    real_stdout.write(json.dumps({"ready": True}) + "\n")
    real_stdout.flush()
    import resource

    for line in sys.stdin:
        job = json.loads(line)
        # the compile's CPU-time limit: past it the kernel stops this process with SIGXCPU (ptxas, a child,
        # inherits a limit at least as large)
        _, hard = resource.getrlimit(resource.RLIMIT_CPU)
        used = resource.getrusage(resource.RUSAGE_SELF)
        soft = int(used.ru_utime + used.ru_stime + job["cpu_limit"]) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))
        try:
            res = compile_one(job["variant"], job["arch"])
            res["error"] = None
        except Exception as err:
            res = {"error": f"{type(err).__name__}: {err}".splitlines()[0][:400] if str(err) else type(err).__name__}
        resource.setrlimit(resource.RLIMIT_CPU, (hard, hard))
        real_stdout.write(json.dumps(res) + "\n")
        real_stdout.flush()
    return 0


class _Worker:
    def __init__(self):
        self.proc = None
        self.lines: "queue.Queue[Optional[str]]" = queue.Queue()

    def start(self):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        self.cache = tempfile.mkdtemp(prefix="effdet-static-triton-cache-")
        env["TRITON_CACHE_DIR"] = self.cache  # fresh: compile times are real compiles
        env["TRITON_ALWAYS_COMPILE"] = "1"
        env["PYTHONWARNINGS"] = "ignore"
        self.proc = subprocess.Popen([sys.executable, "-c", "import sys; from bench.static import _worker_main; "
                                      "sys.exit(_worker_main())"], cwd=str(REPO_ROOT), env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.lines = queue.Queue()
        threading.Thread(target=self._read, args=(self.proc, self.lines), daemon=True).start()
        first = self._get(WORKER_START_TIMEOUT_S)
        if not first or "ready" not in first:
            self.stop()
            raise RuntimeError("the compile worker did not start")

    @staticmethod
    def _read(proc, lines):
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    def _get(self, timeout):
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            return "TIMEOUT"
        return line

    def run(self, job: dict, cpu_limit: float) -> dict:
        """Compile one job; past ``cpu_limit`` CPU seconds (or ``4 x cpu_limit + 120`` wall seconds on a
        very busy machine) it is a timeout."""
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        self.proc.stdin.write(json.dumps(dict(job, cpu_limit=cpu_limit)) + "\n")
        self.proc.stdin.flush()
        line = self._get(4 * cpu_limit + 120)
        timeout = {"error": f"timeout: compile took more than {cpu_limit:.0f} CPU s", "timeout": True,
                   "compile_s": None}
        if line == "TIMEOUT":
            self.stop()
            return timeout
        if line is None:
            code = self.proc.wait()
            self.stop()
            if code in (-signal.SIGXCPU, -signal.SIGKILL):
                return timeout
            return {"error": f"the compile worker died (exit {code})", "compile_s": None}
        return json.loads(line)

    def stop(self):
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.proc = None
            shutil.rmtree(self.cache, ignore_errors=True)


def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def _triton_version() -> str:
    try:
        import triton
        return triton.__version__
    except Exception:
        return "none"


def _cache_path(variant: Variant, arch: int, cache_dir: Path) -> Path:
    h = hashlib.sha256(f"v2|{variant.key()}|{variant.source_hash}|sm_{arch}|{_triton_version()}".encode())
    return cache_dir / f"{h.hexdigest()[:32]}.json"


def compile_variants(variants: list[Variant], archs: Iterable[int] = ARCHS, workers: int = 2,
                     timeout: float = COMPILE_TIMEOUT_S, cache_dir=None, use_cache: bool = True,
                     progress: Optional[Callable[[str], None]] = None) -> list[dict]:
    """Compile every (variant, arch); one result dict per pair (cached ones included, ``cached`` = True)."""
    cache_dir = Path(cache_dir) if cache_dir is not None else CACHE_DIR
    cache_dir.mkdir(parents=True, exist_ok=True)
    jobs, results = [], []
    for v in variants:
        for arch in archs:
            path = _cache_path(v, arch, cache_dir)
            cached = None
            if use_cache and path.exists():
                try:
                    cached = json.loads(path.read_text())
                except ValueError:
                    cached = None
                # a cached timeout counts only when it waited at least as long as we would
                if cached and cached.get("timeout") and cached.get("timeout_s", 0) < timeout:
                    cached = None
            if cached is not None:
                results.append({**cached, "variant": v, "arch": arch, "cached": True})
            else:
                jobs.append((v, arch, path))
    lock = threading.Lock()
    todo = list(jobs)

    def work():
        w = _Worker()
        try:
            while True:
                with lock:
                    if not todo:
                        return
                    v, arch, path = todo.pop(0)
                try:
                    res = w.run({"variant": v.to_json(), "arch": arch}, timeout)
                except Exception as err:
                    res = {"error": f"{type(err).__name__}: {err}", "compile_s": None}
                if res.get("timeout"):
                    res["timeout_s"] = timeout
                if res.get("error") is None or res.get("timeout"):
                    path.write_text(json.dumps(res))
                with lock:
                    results.append({**res, "variant": v, "arch": arch, "cached": False})
                if progress:
                    secs = res.get("compile_s")
                    progress(f"sm_{arch} {v.qualname}: " + (res.get("error") or f"{secs:.1f} s"))
        finally:
            w.stop()

    threads = [threading.Thread(target=work) for _ in range(max(1, min(workers, len(jobs))))] if jobs else []
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    order = {(v.key(), a): i for i, (v, a) in enumerate((v, a) for v in variants for a in archs)}
    results.sort(key=lambda r: order[(r["variant"].key(), r["arch"])])
    return results


# --------------------------------------------------------------------------------------------------
# rows, checks, table
# --------------------------------------------------------------------------------------------------

MAX_VARIANTS = 24
MAX_REGS = 255
MAX_COMPILE_S = 20.0


def rows(results: list[dict]) -> list[dict]:
    """One flat dict per (variant, arch) with the per-element figures of the module docstring."""
    out = []
    for r in results:
        v: Variant = r["variant"]
        spill = None if r.get("stack") is None else (r.get("stack") or 0) + (r.get("local") or 0)
        epp = v.elems_per_program
        out.append({
            "kernel": v.qualname, "module": v.module, "variant": v.summary(), "arch": f"sm_{r['arch']}",
            "regs": r.get("regs"), "stack": r.get("stack"), "local": r.get("local"), "spill_bytes": spill,
            "shared": r.get("shared"), "shared_static": r.get("shared_static"), "sass": r.get("sass"),
            "elems_per_program": epp,
            "sass_per_elem": (r["sass"] / epp) if (epp and r.get("sass") is not None) else None,
            "bytes_per_elem": (v.max_bytes / v.max_elems) if v.max_elems else None,
            "compile_s": r.get("compile_s"), "cached": r.get("cached", False), "launches": v.launches,
            "error": r.get("error"), "key": v.key(),
        })
    return out


def problems(row_list: list[dict], max_regs: int = MAX_REGS, max_compile_s: float = MAX_COMPILE_S) -> list[str]:
    """Every (variant, arch) that fails to compile, spills, uses too many registers or compiles too slowly."""
    bad = []
    for r in row_list:
        label = f"{r['arch']} {r['kernel']} [{r['variant']}]"
        if r["error"]:
            bad.append(f"{label}: {r['error']}")
            continue
        if r["stack"] or r["local"]:
            bad.append(f"{label}: spills (STACK {r['stack']} B, LOCAL {r['local']} B, {r['regs']} registers)")
        if r["regs"] is None or r["regs"] > max_regs:
            bad.append(f"{label}: {r['regs']} registers > {max_regs}")
        if r["compile_s"] is not None and r["compile_s"] >= max_compile_s:
            bad.append(f"{label}: compile took {r['compile_s']:.1f} s >= {max_compile_s:.0f} s")
    return bad


CAPTION = ("compile s = CPU seconds of triton.compile, ptxas included. SASS/elem = static SASS instruction count / elements one program handles per tile (product of the "
           "BLOCK* constexprs; n/a without them). B/elem = bytes of the launch's tensor arguments (each counted "
           "once; memory behind pointer tables not seen) / elements of its largest tensor, for the variant's largest "
           "launch. spill = STACK + LOCAL bytes.")


def _f(v, spec):
    return "n/a" if v is None else format(v, spec)


def print_table(row_list: list[dict], title: str, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=220)
    table = Table(title=title, caption=CAPTION, show_lines=False)
    for col in ("kernel", "variant", "arch", "regs", "spill B", "shared B", "SASS", "SASS/elem", "B/elem",
                "compile s", "error"):
        table.add_column(col, justify="left" if col in ("kernel", "variant", "error") else "right",
                         overflow="fold")
    for r in row_list:
        table.add_row(r["kernel"], r["variant"], r["arch"], _f(r["regs"], "d"), _f(r["spill_bytes"], "d"),
                      _f(r["shared"], "d"), _f(r["sass"], "d"), _f(r["sass_per_elem"], ".2f"),
                      _f(r["bytes_per_elem"], ".2f"),
                      _f(r["compile_s"], ".1f") + (" (cached)" if r["cached"] else ""), r["error"] or "")
    console.print(table)


def run_static(sizes=(128, (128, 256)), batch: int = 2, archs=ARCHS, workers: int = 2, timeout: float = COMPILE_TIMEOUT_S,
               results_dir=None, use_cache: bool = True, console=None) -> dict:
    """Capture, compile, print the table, append ``static-sm<arch>.jsonl``; returns the pieces."""
    import datetime

    from bench.harness import DEFAULT_RESULTS_DIR, git_commit

    t0 = time.perf_counter()
    caps = capture_d0_subprocess(sizes, batch, use_cache=use_cache)
    capture_s = time.perf_counter() - t0
    variants = union(caps.values())
    t1 = time.perf_counter()
    results = compile_variants(variants, archs, workers, timeout, use_cache=use_cache,
                               progress=lambda s: print("[static]", s, file=sys.stderr))
    compile_s = time.perf_counter() - t1
    row_list = rows(results)
    per_size = {size_label(s): len(c.variants) for s, c in caps.items()}
    title = (f"Triton kernel variants of one D0 train step + inference (batch {batch}, sizes "
             f"{', '.join(map(size_label, sizes))} px): {len(variants)} distinct ({per_size} per size); "
             f"capture {capture_s:.0f} s, compile {compile_s:.0f} s")
    print_table(row_list, title, console)
    bad = problems(row_list)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": git_commit(), "triton": _triton_version(), "sizes": [size_label(x) for x in sizes],
            "batch": batch,
            "variants": len(variants), "variants_per_size": per_size}
    out_dir = Path(results_dir) if results_dir is not None else DEFAULT_RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    for arch in archs:
        with open(out_dir / f"static-sm{arch}.jsonl", "a") as f:
            for r in row_list:
                if r["arch"] == f"sm_{arch}":
                    f.write(json.dumps({**meta, **r}, default=str) + "\n")
    for err in sum((c.errors for c in caps.values()), []):
        print(f"[static] could not specialize a launch: {err}", file=sys.stderr)
    print(f"{len(variants)} variants (limit {MAX_VARIANTS}); {len(bad)} problems", file=sys.stderr)
    for b in bad:
        print("  " + b, file=sys.stderr)
    return {"captures": caps, "variants": variants, "rows": row_list, "problems": bad, "capture_s": capture_s,
            "compile_s": compile_s}
