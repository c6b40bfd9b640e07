"""Batching on the host, normalization on the device.

* ``collate(samples)`` -> uint8 NHWC images plus zero/-1 padded boxes and labels.
* ``build_loader(...)`` -> an ``EpochDataLoader`` (a torch ``DataLoader``) whose sampler yields
  ``(index, epoch)`` pairs, so the augmentation of every sample depends only on
  ``(seed, epoch, index)`` even in persistent worker processes. Call ``loader.set_epoch(epoch)``
  before each epoch (it also sets the ``DistributedSampler``'s epoch); shuffling is a
  permutation drawn from ``(seed, epoch)``, so an epoch's order is reproducible, and
  ``set_epoch(epoch, skip_batches=k)`` resumes an epoch after its first ``k`` batches.
* ``DevicePrefetcher(loader, device)`` -> batches on the device with float32 NCHW normalized
  images (on CUDA the next batch is copied and converted on a side stream while the current one
  is used).
"""
from __future__ import annotations

import atexit
import multiprocessing.util
import time
import weakref

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

__all__ = ["collate", "build_loader", "EpochDataLoader", "EpochSampler", "DevicePrefetcher",
           "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = tuple(v * 255 for v in (0.485, 0.456, 0.406))
IMAGENET_STD = tuple(v * 255 for v in (0.229, 0.224, 0.225))


def collate(samples) -> dict:
    """Stack samples of equal image size into a batch dict:

    ``images`` uint8 (B, H, W, 3); ``boxes`` float32 (B, M, 4) zero-padded; ``labels`` int64
    (B, M) padded with -1; ``image_id`` int64 (B,); ``scale`` float32 (B,); ``orig_size`` int64
    (B, 2) as (h, w); ``bad_images`` int64 (K,) the data set indices of undecodable images the samples
    replaced (``skip_bad_images``), usually empty. ``M`` = most annotations in the batch, at least 1.
    """
    samples = list(samples)
    if not samples:
        raise ValueError("collate: empty list of samples")
    shapes = {s["image"].shape for s in samples}
    if len(shapes) != 1:
        raise ValueError(f"collate: images differ in shape {sorted(shapes)}; use a transform that "
                         f"resizes to a fixed target size")
    b = len(samples)
    m = max(1, max(len(s["labels"]) for s in samples))
    images = torch.from_numpy(np.stack([s["image"] for s in samples]))
    boxes = torch.zeros((b, m, 4), dtype=torch.float32)
    labels = torch.full((b, m), -1, dtype=torch.int64)
    for i, s in enumerate(samples):
        k = len(s["labels"])
        if k:
            boxes[i, :k] = torch.from_numpy(np.asarray(s["boxes"], dtype=np.float32).reshape(k, 4))
            labels[i, :k] = torch.from_numpy(np.asarray(s["labels"], dtype=np.int64).reshape(k))
    return {
        "images": images,
        "boxes": boxes,
        "labels": labels,
        "image_id": torch.tensor([int(s["image_id"]) for s in samples], dtype=torch.int64),
        "scale": torch.tensor([float(s.get("scale", 1.0)) for s in samples], dtype=torch.float32),
        "orig_size": torch.tensor([list(s["orig_size"]) for s in samples], dtype=torch.int64).reshape(b, 2),
        "bad_images": torch.tensor([j for s in samples for j in s.get("bad_images", ())], dtype=torch.int64),
    }


class EpochSampler(Sampler):
    """Yields ``(index, epoch)`` pairs. Order: a permutation drawn from ``numpy.random.default_rng([seed, epoch])`` when ``shuffle``,
    else ``0..n-1``; with ``shard=(rank, world)`` every ``world``-th of those from ``rank`` (no
    padding, no duplicates). ``skip`` drops the first ``skip`` indices (resume inside an epoch)."""

    def __init__(self, n: int, shuffle: bool, seed: int, shard=(0, 1), block: int = 1):
        self.n, self.shuffle, self.seed = int(n), bool(shuffle), int(seed)
        self.rank, self.world = int(shard[0]), int(shard[1])
        self.block = int(block)
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = int(epoch), int(skip)

    def _order(self):
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n).tolist()
        else:
            order = list(range(self.n))
        if self.block > 1:
            # Training under DDP: global batch g is order[g*B*W:(g+1)*B*W] (B = block, W = world), exactly the
            # batch one process with batch size B*W would see; rank r takes its r-th slice of B samples.
            span = self.block * self.world
            full = len(order) // span * span
            return [i for g in range(0, full, span) for i in order[g + self.rank * self.block:g + (self.rank + 1) * self.block]]
        return order[self.rank::self.world]

    def __iter__(self):
        for i in self._order()[self.skip:]:
            yield (int(i), self.epoch)

    def __len__(self):
        if self.block > 1:
            full = self.n // (self.block * self.world) * self.block
        else:
            full = len(range(self.rank, self.n, self.world))
        return max(0, full - self.skip)


class EpochDataLoader(DataLoader):
    """A ``DataLoader`` with ``set_epoch(epoch, skip_batches=0)``; its worker processes are stopped at exit
    (see :func:`_stop_workers_at_exit`)."""

    def _get_iterator(self):
        it = super()._get_iterator()
        if getattr(it, "_workers", None):
            _ITERATORS.add(it)
            _WORKERS.update(it._workers)
        return it

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        ds = self.dataset
        if hasattr(ds, "set_epoch"):
            ds.set_epoch(epoch)  # for direct indexing in this process; workers get the epoch per sample
        self.sampler.set_epoch(epoch, skip=int(skip_batches) * int(self.batch_size))


def _ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave Ctrl-C and SIGTERM to the main process. ``timeout``, SLURM and ``docker stop``
    signal the whole process group: a worker killed by it ended the run in PyTorch's "DataLoader worker is
    killed by signal" error before the main process could save its interrupted state. A worker still exits
    when the main process shuts the loader down, and on its own when the main process is gone (PyTorch's
    watchdog). What PyTorch and Python send at exit is SIGTERM too: :func:`_stop_workers_at_exit` takes over."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


_ITERATORS = weakref.WeakSet()  # worker-backed iterators of EpochDataLoaders
_WORKERS = weakref.WeakSet()  # their worker processes


def _stop_workers_at_exit() -> None:
    """Stop loader workers left at exit: those of a loader still referenced (a traceback keeps its frame) and
    any hung in a shutdown. Python's multiprocessing exit hook, next, sends them SIGTERM, which they ignore
    (:func:`_ignore_stop_signals`), and then waits for them: the process would never exit. A live loader is
    shut down the normal way first (PyTorch's shutdown: done event, join, SIGTERM, join; it also unregisters
    the worker pids, so the kill below is not reported as a worker failure), then SIGKILL ends what is left."""
    for it in list(_ITERATORS):
        it._shutdown_workers()
    for w in list(_WORKERS):
        if w.is_alive():
            w.kill()
            w.join(timeout=1)


# Both exits: the main process runs atexit hooks (this one is registered after torch.utils.data's exit-flag
# hook, so it runs before it, while PyTorch's shutdown still works: atexit is last in, first out), a
# multiprocessing child such as a --nproc rank runs only multiprocessing's exit, where this finalizer comes
# before children are joined. Whichever runs second finds nothing left to do.
atexit.register(_stop_workers_at_exit)
multiprocessing.util.Finalize(None, _stop_workers_at_exit, exitpriority=100)


def build_loader(dataset, batch_size: int, train: bool, workers: int, seed: int, distributed: bool = False,
                 drop_last=None, prefetch_factor: int = 2) -> EpochDataLoader:
    """A DataLoader over ``dataset`` (whose ``__getitem__`` takes ``(index, epoch)``, as
    ``CocoDetection`` does): shuffled per ``(seed, epoch)`` when ``train``; when ``distributed``,
    each global batch split into per-rank slices (train) or rank::world without padding (eval); ``workers`` worker processes (persistent when
    > 0), pinned memory when CUDA is available. ``drop_last`` defaults to ``train``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    drop_last = bool(train) if drop_last is None else bool(drop_last)
    shard, block = (0, 1), 1
    if distributed and train:
        # Each global batch is the one a single process with batch_size * world would draw, split into
        # per-rank slices: the same (seed, epoch) permutation, so results do not depend on the worker count.
        import torch.distributed as dist

        shard, block = (dist.get_rank(), dist.get_world_size()), int(batch_size)
    elif distributed:
        # Eval: plain rank::world sharding, NOT DistributedSampler, whose padding repeats images and
        # would add duplicate detections; ranks may differ by one image, so gather with all_gather_object.
        import torch.distributed as dist

        shard = (dist.get_rank(), dist.get_world_size())
    sampler = EpochSampler(len(dataset), shuffle=bool(train), seed=seed, shard=shard, block=block)
    workers = int(workers)
    kwargs = {}
    if workers > 0:
        kwargs.update(persistent_workers=True, prefetch_factor=prefetch_factor, worker_init_fn=_ignore_stop_signals)
    return EpochDataLoader(
        dataset, batch_size=int(batch_size), sampler=sampler, num_workers=workers, collate_fn=collate,
        pin_memory=torch.cuda.is_available(), drop_last=drop_last,
        generator=torch.Generator().manual_seed(int(seed)), **kwargs)


def _to_device(batch: dict, device, non_blocking: bool) -> dict:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor) and k in _DEVICE_KEYS:
            out[k] = v.to(device, non_blocking=non_blocking)
        else:
            out[k] = v
    return out


_DEVICE_KEYS = ("images", "boxes", "labels", "scale")


class DevicePrefetcher:
    """Iterate ``loader`` and hand out batches on ``device``.

    Each batch is the collate dict with ``images`` converted ON THE DEVICE to float32 NCHW,
    ``(x - mean) / std`` with 255-scaled ImageNet statistics (channels-last memory format when
    ``channels_last``); ``boxes``, ``labels`` and ``scale`` are on the device too, ``image_id``
    and ``orig_size`` stay on the host (they are bookkeeping for writing detections).

    Data time: ``batch["data_time"]`` (float seconds) is the wall time this iterator blocked
    before handing out that batch (waiting on the loader plus issuing the copy); the same value
    is in ``self.last_data_time`` and summed in ``self.total_data_time``. On CUDA the next batch
    is copied and normalized on a side stream while the caller works on the current one; the
    caller's stream waits on that copy before the batch is used (no host sync).
    """

    def __init__(self, loader, device, channels_last: bool = False, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.loader = loader
        self.device = torch.device(device)
        self.channels_last = bool(channels_last)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.inv_std = (1.0 / torch.tensor(std, dtype=torch.float32)).to(self.device).view(1, 3, 1, 1)
        self.cuda = self.device.type == "cuda"
        self.last_data_time = 0.0
        self.total_data_time = 0.0

    def __len__(self):
        return len(self.loader)

    def normalize(self, images_u8: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) on the device -> float32 (B, 3, H, W) normalized."""
        x = images_u8.permute(0, 3, 1, 2).float()  # keeps NHWC strides = channels-last
        x = x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        return x.sub_(self.mean).mul_(self.inv_std)

    def _prepare(self, batch):
        batch = _to_device(batch, self.device, non_blocking=self.cuda)
        batch["images"] = self.normalize(batch["images"])
        return batch

    def __iter__(self):
        it = iter(self.loader)
        if not self.cuda:
            while True:
                t0 = time.perf_counter()
                try:
                    batch = next(it)
                except StopIteration:
                    return
                batch = self._prepare(batch)
                self._record(batch, time.perf_counter() - t0)
                yield batch
            return
        stream = torch.cuda.Stream(device=self.device)

        def fetch():
            try:
                host = next(it)
            except StopIteration:
                return None
            with torch.cuda.stream(stream):
                return self._prepare(host)

        stream.wait_stream(torch.cuda.current_stream(self.device))
        t0 = time.perf_counter()
        nxt = fetch()
        while nxt is not None:
            cur = stream_wait(nxt, stream)
            # fetch the following batch before handing out this one: its copy overlaps the caller's work
            nxt = fetch()
            self._record(cur, time.perf_counter() - t0)
            yield cur
            t0 = time.perf_counter()

    def _record(self, batch, dt: float):
        batch["data_time"] = float(dt)
        self.last_data_time = float(dt)
        self.total_data_time += float(dt)


def stream_wait(batch: dict, stream) -> dict:
    """Make the current CUDA stream wait for ``stream`` and mark the batch's tensors as used by it."""
    cur = torch.cuda.current_stream(stream.device)
    cur.wait_stream(stream)
    for v in batch.values():
        if isinstance(v, torch.Tensor) and v.is_cuda:
            v.record_stream(cur)
    return batch
