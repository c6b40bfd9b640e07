"""Host settings fitted to the machine: data-loader workers per CPU core, and the C allocator on Linux.

* ``default_workers()``: one loader process per core beyond the first (at most 4); for a CPU run on at most
  2 cores, none. There the step's own threads need both cores and a loader process only takes them
  away: on 2 cores, the built-in run trained at 23-29 img/s loading in the main process and at 21-22 img/s
  with one loader process (``python train.py --benchmark -j 0`` / ``-j 1``, 2026-12-01). A GPU step leaves
  the cores to the loaders.
* ``tune_allocator()``: glibc serves every allocation above its mmap threshold (at most 32 MB) with fresh
  pages from the kernel and returns them on free, so each large activation, gradient or loss intermediate of
  a CPU step is page-faulted in anew, every step. Keeping freed memory in the heap instead
  (``M_MMAP_MAX = 0``, a high trim threshold) removes that cost; the process keeps its peak memory.
  ``EFFDET_MALLOC=default`` leaves glibc's settings alone. Called by train.py / evaluate.py on the CPU only.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameter numbers (malloc.h)
_tuned: bool | None = None


def cpu_cores() -> int:
    """CPU cores this process may run on (the affinity mask, e.g. a container's or taskset's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def uses_cuda(device: str) -> bool:
    """Whether a ``--device`` value (``auto``, ``cpu``, ``cuda``, ``cuda:N``) runs on a GPU here; a one-line
    error for any other value, and for a GPU this machine does not have."""
    import torch

    from .errors import UserError

    if device == "auto":
        return torch.cuda.is_available()
    if device == "cpu":
        return False
    if device not in ("cuda", "cuda:0"):  # a process uses GPU 0 of what it sees (--nproc: its local rank's)
        raise UserError(f"--device must be auto, cpu or cuda, got {device!r}", None, "--device",
                        "pick another GPU with CUDA_VISIBLE_DEVICES=N and --device cuda")
    if not torch.cuda.is_available():
        raise UserError(f"--device {device}: this machine has no CUDA GPU", None, "--device",
                        "pass --device cpu, or auto to use a GPU where there is one")
    return True


def check_kernel_backend(backend: str, cuda: bool) -> None:
    """A one-line error now, not a traceback once data and model are built, for kernels this machine cannot
    run: ``--kernel-backend triton`` (or ``auto`` with ``EFFDET_KERNEL_BACKEND=triton``) without CUDA or the
    Triton interpreter, without Triton, or an ``EFFDET_KERNEL_BACKEND`` that names no backend."""
    from kernels import _dispatch

    from .errors import UserError

    if backend != "auto":  # the flag wins over the environment variable, as backend= does in kernels
        chosen, field = backend, "--kernel-backend"
    else:
        try:
            chosen, field = _dispatch.default_backend(), _dispatch.ENV_VAR
        except ValueError as e:
            raise UserError(str(e), None, _dispatch.ENV_VAR, "set it to auto, triton or torch, or unset it") from None
    if chosen != "triton":
        return
    if not _dispatch.triton_available():
        raise UserError("the Triton kernels were asked for, but Triton does not import here", None, field,
                        "use the PyTorch reference: --kernel-backend torch")
    if not cuda and not _dispatch.interpreter_enabled():
        raise UserError("the Triton kernels need a CUDA GPU, or the Triton interpreter on a CPU", None, field,
                        "pass --kernel-backend torch (or auto), or set TRITON_INTERPRET=1 to interpret them (slow)")


def default_workers(cores: int | None = None, cuda: bool = False) -> int:
    """Data-loader worker processes for ``-j`` left unset: ``cores - 1``, between 0 and 4; 0 for a CPU step on
    at most 2 cores (see the module doc)."""
    cores = cpu_cores() if cores is None else cores
    if not cuda and cores <= 2:
        return 0
    return max(0, min(4, cores - 1))


def tune_allocator() -> bool:
    """Make glibc keep freed memory for reuse (see the module doc); True when the setting took effect.
    Idempotent; a no-op off Linux/glibc or with ``EFFDET_MALLOC=default``."""
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    if os.environ.get("EFFDET_MALLOC", "").lower() == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _tuned = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _tuned
