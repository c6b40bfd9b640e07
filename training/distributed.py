"""Process-group set-up that works the same under ``--nproc N``, ``torchrun`` (one or many nodes) and SLURM.

Rank and world size come from the environment: ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (torchrun, or set by
``spawn``), else ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``; with neither, one process. NCCL on
GPUs, gloo on the CPU.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .host import uses_cuda


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(*names, default=None):
    for n in names:
        if os.environ.get(n) not in (None, ""):
            return int(os.environ[n])
    return default


def init(device: str = "auto", local_rank: int = 0) -> DistInfo:
    """Read the environment, pick the device and join the process group when there is more than one.

    ``local_rank``: the ``--local_rank`` flag that ``torch.distributed.launch`` and NVIDIA's ``bind_launch``
    pass; the ``LOCAL_RANK`` variable wins when set.
    """
    if os.environ.get("WORLD_SIZE"):  # torchrun, torch.distributed.launch, bind_launch or our --nproc spawn
        world, rank = _env_int("WORLD_SIZE"), _env_int("RANK", default=0)
        local = _env_int("LOCAL_RANK", default=local_rank)
    elif os.environ.get("SLURM_STEP_NUM_TASKS"):  # a task of `srun` (not a plain command in an salloc shell)
        world = _env_int("SLURM_STEP_NUM_TASKS")
        rank, local = _env_int("SLURM_PROCID", default=0), _env_int("SLURM_LOCALID", default=0)
    else:
        world, rank, local = 1, 0, 0
    use_cuda = uses_cuda(device)
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"local rank {local} has no GPU: this node has {torch.cuda.device_count()}; "
                               "start at most that many processes per node (--nproc / --nproc-per-node)")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", os.environ.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1"))
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    return DistInfo(rank, world, local, dev)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# How long a worker whose collective failed because a peer process went away waits for ``spawn`` to kill it
# before it prints its own traceback. A peer that failed has printed the error that matters, and ``spawn``
# kills the other workers as soon as one exits with an error (milliseconds), so the wait ends in a traceback
# only when no peer failed that way: ``spawn`` itself is gone, or a peer left early with status 0 (a bug).
PEER_LOST_GRACE_S = 10.0
# How long a rank other than 0 holds back its one-line user error. Bad input (a flag, a file, a batch larger than
# each rank's share of the data) is usually found by every rank at once; rank 0 prints it and exits, and ``spawn``
# kills the others before their copy of the same line. An error only one rank meets is still printed, this late.
SAME_ERROR_GRACE_S = 5.0
# gloo's words for it (seen in a torch 2.14 run), and NCCL's: its ncclGetErrorString text for ncclRemoteError,
# which PyTorch's NCCL errors quote. (On GPUs the watchdog thread often aborts such a worker before Python sees
# an error; then there is no second traceback to hold back.)
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer",
              "remote process exited or there was a network error")


def peer_lost(e: BaseException) -> bool:
    """``e`` is a collective's error saying that another worker of the process group went away."""
    return isinstance(e, RuntimeError) and any(words in str(e) for words in _PEER_LOST)


def _spawned(local_rank: int, nproc: int, port: int, fn, args):
    os.environ.update(RANK=str(local_rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(local_rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if "OMP_NUM_THREADS" not in os.environ:  # the processes share the cores (torchrun sets 1 for the same
        from .host import cpu_cores          # reason): 2 processes x 2 threads on 2 cores ran 5x slower

        torch.set_num_threads(max(1, cpu_cores() // nproc))
    from .errors import EXIT_USER_ERROR, debug_requested, report, user_error_types

    try:
        fn(args)
    except user_error_types() as e:  # bad input: this worker's one line, then status 2 (no traceback)
        if getattr(args, "debug", False) or debug_requested([]):
            raise
        if local_rank:  # most bad input is met by every rank alike: rank 0 says it, and ``spawn`` kills the rest
            try:
                time.sleep(SAME_ERROR_GRACE_S)
            except KeyboardInterrupt:
                pass
        report(e)
        sys.exit(EXIT_USER_ERROR)
    except Exception as e:
        if peer_lost(e):  # most likely not this worker's error: let the failed peer's line stand alone
            try:
                time.sleep(PEER_LOST_GRACE_S)
            except KeyboardInterrupt:  # a Ctrl-C ends the wait: this error, not a second traceback for it
                pass
        raise


def spawn(nproc: int, fn, args) -> None:
    """Run ``fn(args)`` in ``nproc`` local worker processes (what ``--nproc N`` does).

    When one worker fails, the others are killed at once (they would wait in a collective for it forever)
    and :class:`~training.errors.WorkerFailed` is raised; the failed worker has printed its own error. A
    Ctrl-C reaches every worker, which saves and exits; this process waits for them.
    """
    import multiprocessing.connection

    import torch.multiprocessing as mp

    from .errors import WorkerFailed

    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_spawned, args=(r, nproc, port, fn, args), daemon=False) for r in range(nproc)]
    for p in procs:
        p.start()

    def forward(signum, frame):  # kill / docker stop / a scheduler's SIGTERM: the workers save and exit too
        for p in procs:          # (the launcher alone died, and they trained on)
            if p.is_alive():
                os.kill(p.pid, signum)
    previous = signal.signal(signal.SIGTERM, forward)
    failed = None
    try:
        alive = list(procs)
        while alive and failed is None:
            try:
                multiprocessing.connection.wait([p.sentinel for p in alive])
            except KeyboardInterrupt:  # the workers got it too: they save a checkpoint and exit
                continue
            for p in [p for p in alive if not p.is_alive()]:
                p.join()
                alive.remove(p)
                if p.exitcode != 0 and failed is None:
                    failed = p
    finally:
        signal.signal(signal.SIGTERM, previous)
        for p in procs:  # after a failure (or an error here): no worker outlives this process
            if p.is_alive():
                p.kill()
            p.join()
    if failed is not None:
        raise WorkerFailed(procs.index(failed), failed.exitcode)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_gather_objects(obj) -> list:
    if dist.is_available() and dist.is_initialized():
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def distribute_bn(model: torch.nn.Module, reduce: bool) -> None:
    """BN running statistics of every worker made equal: their mean (``reduce``) or rank 0's (broadcast)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    world = dist.get_world_size()
    for name, buf in model.named_buffers():
        if name.endswith(("running_mean", "running_var")):
            if reduce:
                dist.all_reduce(buf)
                buf /= world
            else:
                dist.broadcast(buf, 0)
