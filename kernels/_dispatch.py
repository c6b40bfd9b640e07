"""The one place that decides whether an op runs its Triton kernel or its PyTorch reference.

Every public op in ``kernels`` takes ``backend="auto" | "triton" | "torch"``:

* ``"torch"``  - the plain-PyTorch reference (the spec), on any device.
* ``"triton"`` - the Triton kernel. On CUDA tensors it is compiled for the GPU; on CPU tensors it
  runs only under the Triton interpreter (``TRITON_INTERPRET=1`` set before ``triton`` is first
  imported), which is how the test-suite exercises the real kernel code on machines without a GPU.
* ``"auto"``   - Triton for CUDA tensors when Triton imports, else the reference.

The environment variable ``EFFDET_KERNEL_BACKEND`` (``auto`` / ``triton`` / ``torch``) replaces
``"auto"`` everywhere, so a whole run can be forced onto one path without touching code; an explicit
``backend=`` argument still wins. Each decision is logged once per (op, device, choice) at DEBUG level
on the ``kernels`` logger (``logging.basicConfig(level="DEBUG")`` shows it; the package adds no handler of its own).
"""
from __future__ import annotations

import functools
import logging
import os

import torch

ENV_VAR = "EFFDET_KERNEL_BACKEND"
BACKENDS = ("auto", "triton", "torch")
log = logging.getLogger("kernels")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when ``import triton`` works (it is Linux x86-64 only)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # pragma: no cover - depends on the platform
        return False
    return True


def interpreter_enabled() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _check(name: str, value: str) -> str:
    value = value.lower().strip()
    if value not in BACKENDS:
        raise ValueError(f"{name} must be one of {BACKENDS}, got {value!r}")
    return value


def default_backend() -> str:
    """The backend ``"auto"`` stands for: the environment variable if set, else ``"auto"``."""
    return _check(ENV_VAR, os.environ.get(ENV_VAR, "auto") or "auto")


@functools.lru_cache(maxsize=None)
def _log_choice(op: str, device_type: str, choice: str, why: str) -> None:
    log.debug("kernels.%s on %s: %s backend (%s)", op, device_type, choice, why)


def resolve(op: str, backend: str, device: torch.device | str, unsupported: str | None = None) -> str:
    """Return ``"triton"`` or ``"torch"`` for ``op`` on ``device`` and log the choice.

    ``unsupported``: why the Triton path cannot compute this call as the reference would (e.g. float64
    inputs, which the kernels compute in float32), or None. ``"auto"`` then takes the reference.

    Raises a clear error when Triton is asked for but cannot run (no Triton, CPU tensors without the
    interpreter, or an ``unsupported`` call).
    """
    backend = _check("backend", backend)
    device_type = torch.device(device).type
    why = "argument"
    if backend == "auto":
        backend, why = default_backend(), f"{ENV_VAR}"
    if backend == "auto":
        use_triton = device_type == "cuda" and triton_available()
        choice = "triton" if use_triton and unsupported is None else "torch"
        why = ("auto: no CUDA tensors or no Triton" if not use_triton else f"auto: {unsupported}" if unsupported
               else "auto: CUDA tensors and Triton present")
    else:
        choice = backend
    if choice == "triton":
        if unsupported is not None:
            raise ValueError(f"kernels.{op}: the Triton path cannot take {unsupported} (backend 'triton' set by "
                             f"{why}); use backend='torch'")
        if not triton_available():
            raise RuntimeError(f"kernels.{op}: backend='triton' asked for, but Triton does not import here")
        if device_type != "cuda" and not interpreter_enabled():
            raise RuntimeError(
                f"kernels.{op}: backend='triton' on {device_type} tensors needs the Triton interpreter; "
                "set TRITON_INTERPRET=1 before importing triton, or use backend='torch'")
    if not torch.compiler.is_compiling():  # logging is not traceable by torch.compile(fullgraph=True)
        _log_choice(op, device_type, choice, why)
    return choice


def dispatch(op: str, backend: str, device: torch.device | str, triton_path, reference, *args,
             unsupported: str | None = None, **kwargs):
    """The one call every public op makes: ``resolve`` the backend (``unsupported``: see there), then run
    ``triton_path`` (which calls the op's custom op) or ``reference`` with the same arguments. Both must
    accept ``*args, **kwargs``."""
    if resolve(op, backend, device, unsupported) == "triton":
        return triton_path(*args, **kwargs)
    return reference(*args, **kwargs)


def _first_tensor_device(args) -> torch.device | None:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
        if isinstance(a, (list, tuple)):
            for b in a:
                if isinstance(b, torch.Tensor):
                    return b.device
    return None


def no_double_backward(op, where: str) -> None:
    """Register on ``op`` (a backward launcher's custom op) an autograd formula that refuses a derivative of
    it: double backward through the Triton path is a one-line error naming ``where``, not autograd's
    message about ``register_autograd``."""
    def refuse(ctx, *grads):
        raise RuntimeError(f"{where}: the Triton path has no second derivative (its backward is not "
                           "differentiable); use backend='torch' for double backward")

    op.register_autograd(refuse)


def triton_op(qualname: str, *, mutates_args=()):
    """Decorator: make a Triton launcher the ``torch.library`` custom op ``qualname``.

    The launcher is the op's only implementation. On CUDA tensors it runs under
    ``torch.cuda.device(<the tensors' device>)``, so tensors on ``cuda:1`` work while the current device is 0;
    on CPU tensors it runs in the Triton interpreter (``TRITON_INTERPRET=1``) and is refused otherwise
    (``resolve`` never sends CPU tensors here without the interpreter). Register the fake implementation
    and the autograd formula on the returned op as usual (``@op.register_fake``, ``op.register_autograd``).
    The launcher's type annotations give the op's schema.
    """
    def wrap(launcher):
        @functools.wraps(launcher)
        def impl(*args, **kwargs):
            device = _first_tensor_device(args)
            if device is not None and device.type == "cuda":
                with torch.cuda.device(device):
                    return launcher(*args, **kwargs)
            if not interpreter_enabled():
                raise RuntimeError(f"{qualname} on {device} tensors needs the Triton interpreter "
                                   "(TRITON_INTERPRET=1 before triton is imported); use backend='torch'")
            return launcher(*args, **kwargs)
        return torch.library.custom_op(qualname, mutates_args=mutates_args)(impl)
    return wrap
