"""Inference over a loader and COCO scoring: used by training-time evaluation and by ``evaluate.py``."""
from __future__ import annotations

import os
import re
import time
from contextlib import nullcontext

import torch

import datasets as D
from detector.fuse import fuse_for_inference
from detector.pipeline import predict

from . import distributed as dist
from .plots import draw_detections
from .runlog import progress

# Waymo's per-class IoU thresholds (as NVIDIA's README reports them): vehicles 0.7, everything else 0.5
WAYMO_VEHICLE_CLASSES = ("vehicle", "car", "truck", "bus")


def waymo_iou_by_class(categories: list[dict]) -> dict:
    """Class name -> IoU threshold for Waymo's per-class AP: 0.7 for vehicle classes (``vehicle``,
    ``TYPE_VEHICLE``, ``car``, ...), 0.5 for the others."""
    def is_vehicle(name: str) -> bool:
        return bool(set(re.split(r"[^a-z0-9]+", name.lower())) & set(WAYMO_VEHICLE_CLASSES))

    return {c["name"]: 0.7 if is_vehicle(c["name"]) else 0.5 for c in categories}


def autocast(device: torch.device, amp: str | None):
    if not amp:
        return nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" or device.type == "cpu" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def inference_network(model, device, amp=None, torchscript=False, compile=False):
    """The network as evaluation runs it: an eval-mode copy with BN folded into the convs, then traced
    (``torchscript``) or compiled (``compile``); post-processing stays ``predict``'s."""
    model = fuse_for_inference(model)
    if torchscript:  # one trace (any batch size) of the fused network
        from detector.export import TracedNetwork

        with autocast(device, amp):  # traced in the precision it runs in
            model = TracedNetwork(model, fuse=False)
    elif compile:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True  # weights are constants: inductor folds and fuses around the convs
        model = torch.compile(model)
    return model


@torch.no_grad()
def run_inference(model, loader, device, amp=None, soft_nms=None, channels_last=False, score_threshold=0.001,
                  backend="auto", show_progress=True, keep_images=0, torchscript=False, compile=False):
    """Detections of every image in ``loader`` as COCO results (original pixels), plus timing.

    No host round trip per batch: each batch's detections stay on the device, all of them are moved to the
    host once at the end and converted to COCO results in one call. ``timing["seconds"]`` is the wall time of
    the whole pass (data loading, the final copy and the conversion included; ``timing["data_seconds"]`` is
    the part spent waiting for batches), ``timing["images"]`` the distinct images, ``timing["img_per_s"]`` =
    images run through the network / seconds; the progress bar shows
    the same wall-clock rate (on a GPU it runs ahead of the device until the final copy).

    ``compile``: run the BN-folded network through ``torch.compile`` (inductor with frozen weights); the first
    batch pays the compilation (minutes on a small CPU), so it helps only long evaluations.

    ``timing["image_ids"]`` lists the images really processed: with ``--skip-bad-images`` a corrupt image is
    replaced by a neighbour, whose repeated detections are dropped here, and the corrupt one is not scored.
    """
    model = inference_network(model, device, amp, torchscript, compile)
    dataset = loader.dataset
    all_dets, all_ids, all_sizes, n_images = [], [], [], 0
    prefetch = D.DevicePrefetcher(loader, device, channels_last=channels_last)
    bar = progress(show_progress)
    t0 = time.perf_counter()
    with bar:
        task = bar.add_task("eval", total=len(loader), info="")
        for batch in prefetch:
            orig_size = batch["orig_size"]  # host tensor (the prefetcher leaves it there)
            with autocast(device, amp):
                dets = predict(model, batch["images"], image_scale=batch["scale"],
                               clip_size=orig_size.to(device, non_blocking=True) * batch["scale"][:, None],
                               soft_nms=soft_nms, score_threshold=score_threshold, backend=backend)
            all_dets.append(dets.float())  # stays on the device
            all_ids.append(batch["image_id"])
            all_sizes.append(orig_size)
            n_images += len(batch["image_id"])
            bar.update(task, advance=1, info=f"{n_images / max(time.perf_counter() - t0, 1e-9):.1f} img/s")
        if all_dets:
            dets = torch.cat(all_dets).cpu()  # the one device -> host copy
            ids, sizes = torch.cat(all_ids), torch.cat(all_sizes)
        else:
            dets, ids, sizes = torch.zeros(0, 1, 6), torch.zeros(0, dtype=torch.int64), torch.zeros(0, 2)
        done, fresh = set(), []
        for i in ids.tolist():  # the first copy of each image id (a replaced corrupt image repeats one)
            fresh.append(i not in done)
            done.add(i)
        fresh = torch.tensor(fresh, dtype=torch.bool)
        results = D.to_coco_results(dets[fresh, :, :4], dets[fresh, :, 4], dets[fresh, :, 5].long(), ids[fresh],
                                    torch.ones(int(fresh.sum())), dataset.label_to_cat_id, orig_sizes=sizes[fresh])
        pictures = [(int(ids[i]), dets[i].numpy()) for i in range(min(keep_images, dets.shape[0]))]
    seconds = time.perf_counter() - t0
    return results, {"images": len(done), "seconds": seconds, "img_per_s": n_images / max(seconds, 1e-9),
                     "data_seconds": prefetch.total_data_time, "image_ids": sorted(done)}, pictures


def evaluate_model(model, loader, info: dist.DistInfo, amp=None, soft_nms=None, channels_last=False,
                   backend="auto", iou_by_class=None, keep_images=0):
    """Inference on every worker's shard, gathered on all ranks, scored once."""
    results, timing, pictures = run_inference(
        model, loader, info.device, amp=amp, soft_nms=soft_nms, channels_last=channels_last, backend=backend,
        show_progress=info.is_main, keep_images=keep_images)
    gathered = dist.all_gather_objects(results)
    ids_per_rank = dist.all_gather_objects(timing["image_ids"])
    image_ids = sorted({i for part in ids_per_rank for i in part})
    claimed, merged = set(), []
    # an image run on several ranks (the distributed sampler repeats a few to even out the shards; a corrupt
    # image's replacement may be another rank's image) is scored with the first rank's detections, all of
    # them; within a rank run_inference already kept one copy per image
    for part, ids in zip(gathered, ids_per_rank):
        merged += [r for r in part if r["image_id"] not in claimed]
        claimed.update(ids)
    stats = D.evaluate_detections(loader.dataset.coco.dataset, merged, iou_by_class=iou_by_class, image_ids=image_ids)
    return stats, merged, timing, pictures


def save_pictures(dataset, pictures, folder: str, class_names=None) -> list[str]:
    """Each picture: the image with predicted boxes (coloured, ``class score``) and the ground truth (white,
    dashed, ``GT class``), drawn by :func:`training.plots.draw_detections`."""
    os.makedirs(folder, exist_ok=True)
    index = {iid: i for i, iid in enumerate(dataset.image_ids)}
    paths = []
    for iid, dets in pictures:
        sample = dataset.load(index[iid])
        im = draw_detections(sample["image"], dets, gt_boxes=sample["boxes"], gt_labels=sample["labels"],
                             class_names=class_names)
        path = os.path.join(folder, f"detections_{iid}.png")
        im.save(path)
        paths.append(path)
    return paths
