"""Training and evaluation loops behind ``train.py`` and ``evaluate.py``.

The scripts only parse flags; everything here takes an ``argparse.Namespace`` with the flag values.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from contextlib import nullcontext

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from torch import nn

import datasets as D

from . import checkpoint as ckpt
from . import distributed as dist
from .configs import get_config
from .ema import ModelEma
from .model import EfficientDet
from .pipeline import compute_loss, predict
from .fuse import fuse_for_inference
from .layers import convert_sync_batchnorm
from .visualize import draw_detections, plot_curve

log = logging.getLogger("detector")
console = Console()


# ---------------------------------------------------------------- data
def data_paths(args) -> dict:
    """(ann_file, image_dir) for train and val from the flags; the built-in synthetic set when none given."""
    if getattr(args, "waymo", False):
        for flag in ("waymo_train_annotation", "waymo_train", "waymo_val_annotation", "waymo_val"):
            if not getattr(args, flag):
                raise ValueError(f"--waymo needs --{flag.replace('_', '-')} (a path relative to the data root)")
        root = args.data or "."
        return {"train": (os.path.join(root, args.waymo_train_annotation), os.path.join(root, args.waymo_train)),
                "val": (os.path.join(root, args.waymo_val_annotation), os.path.join(root, args.waymo_val))}
    if args.train_ann or args.val_ann:
        out = {}
        if args.train_ann:
            out["train"] = (args.train_ann, args.train_images or os.path.dirname(args.train_ann))
        if args.val_ann:
            out["val"] = (args.val_ann, args.val_images or os.path.dirname(args.val_ann))
        return out
    if args.data:
        return {s: D.coco2017_paths(args.data, s) for s in ("train", "val")}
    syn = D.ensure_synthetic()
    return {"train": (syn["train"]["ann_file"], syn["train"]["image_dir"]),
            "val": (syn["val"]["ann_file"], syn["val"]["image_dir"])}


# ---------------------------------------------------------------- model
def build_model(args, num_classes: int, device) -> EfficientDet:
    overrides = {}
    if getattr(args, "redundant_bias", None) is not None:
        overrides["redundant_bias"] = args.redundant_bias
    if getattr(args, "smoothing", None):
        overrides["label_smoothing"] = args.smoothing
    if getattr(args, "drop_path", None) is not None:
        overrides["drop_path_rate"] = args.drop_path
    if getattr(args, "bn_momentum", None):
        overrides["bn_momentum"] = args.bn_momentum
    size = args.input_size or get_config(args.model).image_size
    model = EfficientDet(get_config(args.model, num_classes=num_classes, image_size=size, **overrides))
    model.set_backend(args.kernel_backend)
    return model.to(device)


def _load_backbone(model: EfficientDet, path: str) -> None:
    sd, layout = ckpt.extract_state_dict(ckpt.read(path))
    sd = {k if k.startswith("backbone.") else f"backbone.{k}": v for k, v in sd.items()}
    if ckpt.is_nvidia(sd):
        sd = ckpt._nvidia_backbone(sd, model.backbone)
        layout += ", NVIDIA names converted"
    sd = {k.removeprefix("backbone."): v for k, v in sd.items()}
    own = model.backbone.state_dict()
    usable = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
    if len(usable) < len(own):
        missing = sorted(set(own) - set(usable))
        raise ckpt.CheckpointError(f"{path} ({layout}): backbone weights missing or mis-shaped for "
                                   f"{len(missing)} keys, e.g. {missing[:5]}")
    model.backbone.load_state_dict(usable)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay only on conv / linear weights (ndim > 1), not on biases, BN or fusion weights."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(args, model) -> torch.optim.Optimizer:
    groups = param_groups(model, args.weight_decay)
    opt = args.opt.lower()
    if opt in ("momentum", "sgd", "nesterov"):
        return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, nesterov=opt in ("nesterov", "sgd"))
    if opt == "adam":
        return torch.optim.Adam(groups, lr=args.lr, eps=args.opt_eps)
    if opt == "adamw":
        return torch.optim.AdamW(groups, lr=args.lr, eps=args.opt_eps)
    raise ValueError(f"--opt {args.opt!r}: choose momentum, sgd, nesterov, adam or adamw")


def lr_lambda(args, steps_per_epoch: int):
    """Per-step LR factor: linear warm-up from warmup_lr, then cosine to min_lr (or step decay)."""
    warm = int(args.warmup_epochs * steps_per_epoch)
    total = max(1, args.epochs * steps_per_epoch)
    base = args.lr

    def f(step: int) -> float:
        if step < warm:
            return (args.warmup_lr + (base - args.warmup_lr) * step / warm) / base
        if args.sched == "step":
            return args.decay_rate ** ((step // steps_per_epoch) // max(1, args.decay_epochs))
        t = min(1.0, (step - warm) / max(1, total - warm))
        return (args.min_lr + 0.5 * (base - args.min_lr) * (1 + math.cos(math.pi * t))) / base

    return f


def rng_state() -> dict:
    version, internal, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()[1].tolist(),
             "numpy_pos": int(np.random.get_state()[2]),
             "python": {"version": version, "internal": list(internal), "gauss": gauss}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(v) for v in py["internal"]), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------- logging
class JsonLog:
    def __init__(self, path: str | None):
        self.path = path
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(self, **event) -> None:
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(event, default=float) + "\n")


def stats_table(stats: dict, title: str) -> Table:
    t = Table(title=title)
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k in D.STAT_NAMES:
        if k in stats:
            t.add_row(k, f"{stats[k]:.4f}")
    for name, ap in stats.get("per_class", {}).items():
        t.add_row(f"AP {name}", f"{ap:.4f}")
    for name, ap in stats.get("per_class_iou", {}).items():
        t.add_row(f"AP@class-IoU {name}", f"{ap:.4f}")
    return t


# ---------------------------------------------------------------- evaluation
def autocast(device: torch.device, amp: str | None):
    if not amp:
        return nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" or device.type == "cpu" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def run_inference(model, loader, device, amp=None, soft_nms=None, channels_last=False, score_threshold=0.001,
                  backend="auto", progress=True, keep_images=0):
    """Detections of every image in ``loader`` as COCO results (original pixels), plus timing.

    ``timing["image_ids"]`` lists the images really processed: with ``--skip-bad-images`` a corrupt image is
    replaced by a neighbour, whose repeated detections are dropped here, and the corrupt one is not scored.
    """
    model = fuse_for_inference(model)  # an eval-mode copy with BN folded into the convs
    dataset = loader.dataset
    results, pictures, n_images, t_model, done = [], [], 0, 0.0, set()
    prefetch = D.DevicePrefetcher(loader, device, channels_last=channels_last)
    bar = _progress(progress)
    with bar:
        task = bar.add_task("eval", total=len(loader), info="")
        for batch in prefetch:
            t0 = time.perf_counter()
            with autocast(device, amp):
                dets = predict(model, batch["images"], image_scale=batch["scale"],
                               clip_size=batch["orig_size"].to(device) * batch["scale"][:, None],
                               soft_nms=soft_nms, score_threshold=score_threshold, backend=backend)
            dets = dets.float().cpu()
            t_model += time.perf_counter() - t0
            n_images += dets.shape[0]
            ids = batch["image_id"].tolist()
            fresh = torch.tensor([i not in done and not done.add(i) for i in ids], dtype=torch.bool)
            results += D.to_coco_results(dets[fresh, :, :4], dets[fresh, :, 4], dets[fresh, :, 5].long(),
                                         batch["image_id"][fresh], torch.ones(int(fresh.sum())),
                                         dataset.label_to_cat_id, orig_sizes=batch["orig_size"][fresh])
            if len(pictures) < keep_images:
                for i in range(min(keep_images - len(pictures), dets.shape[0])):
                    pictures.append((int(batch["image_id"][i]), dets[i].numpy()))
            bar.update(task, advance=1, info=f"{n_images / max(t_model, 1e-9):.1f} img/s")
    return results, {"images": n_images, "seconds": t_model, "img_per_s": n_images / max(t_model, 1e-9),
                     "image_ids": sorted(done)}, pictures


def evaluate_model(model, loader, info: dist.DistInfo, args, iou_by_class=None, keep_images=0):
    """Inference on every worker's shard, gathered on all ranks, scored once."""
    results, timing, pictures = run_inference(
        model, loader, info.device, amp=args.amp, soft_nms=getattr(args, "use_soft_nms", None),
        channels_last=args.memory_format == "nhwc", backend=args.kernel_backend, progress=info.is_main,
        keep_images=keep_images)
    gathered = dist.all_gather_objects(results)
    image_ids = sorted({i for part in dist.all_gather_objects(timing["image_ids"]) for i in part})
    seen, merged = set(), []
    for part in gathered:  # a distributed sampler may repeat a few images to even out the shards
        for r in part:
            key = (r["image_id"], r["category_id"], tuple(round(v, 3) for v in r["bbox"]), round(r["score"], 6))
            if key not in seen:
                seen.add(key)
                merged.append(r)
    stats = D.evaluate_detections(loader.dataset.coco.dataset, merged, iou_by_class=iou_by_class, image_ids=image_ids)
    return stats, merged, timing, pictures


def save_pictures(dataset, pictures, folder: str, class_names=None) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    index = {iid: i for i, iid in enumerate(dataset.image_ids)}
    paths = []
    for iid, dets in pictures:
        sample = dataset.load(index[iid])
        im = draw_detections(sample["image"], dets, gt_boxes=sample["boxes"], class_names=class_names)
        path = os.path.join(folder, f"detections_{iid}.png")
        im.save(path)
        paths.append(path)
    return paths


def _progress(enabled: bool) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console,
                    disable=not enabled, transient=False)


# ---------------------------------------------------------------- training
class NonFiniteLoss(RuntimeError):
    pass


def train(args) -> dict | None:
    """One worker's whole training run. Returns the last evaluation stats on rank 0."""
    info = dist.init(args.device)
    try:
        return _train(args, info)
    finally:
        for flag in list(_InterruptFlag.active):
            flag.restore()
        dist.cleanup()


def _train(args, info: dist.DistInfo):
    if args.log_interval < 1:
        raise ValueError(f"--log-interval must be >= 1, got {args.log_interval}")
    seed_everything(args.seed)  # identical initial weights on every rank; per-rank streams below
    paths = data_paths(args)
    if "train" not in paths:
        raise ValueError("no training data: give --data, --train-ann, or nothing for the built-in synthetic set")
    train_set = D.CocoDetection(*paths["train"], skip_bad_images=args.skip_bad_images)
    val_set = D.CocoDetection(*paths["val"], skip_bad_images=args.skip_bad_images) if "val" in paths else None
    if val_set is not None and len(val_set) == 0:
        raise ValueError(f"{paths['val'][0]}: the validation set is empty")
    recipe = apply_small_data_recipe(args, len(train_set))
    if info.is_main:
        console.print(f"recipe: {recipe} ({len(train_set)} training images); flags you gave take precedence")
    num_classes = args.num_classes or train_set.num_classes
    if num_classes < train_set.num_classes:
        raise ValueError(f"--num_classes {num_classes} is smaller than the {train_set.num_classes} categories of "
                         f"{paths['train'][0]}; every class index must have a logit")
    model = build_model(args, num_classes, info.device)
    size = model.config.image_size
    train_set.transform = D.TrainTransform(size, seed=args.seed, scale_range=tuple(args.scale_range))
    if val_set is not None:
        val_set.transform = D.EvalTransform(size)
    out = args.output
    os.makedirs(out, exist_ok=True)
    jlog = JsonLog(os.path.join(out, "log.jsonl") if info.is_main else None)
    if info.is_main:
        jlog.write(event="start", step=0, epoch=0, args=vars(args), config=model.config.to_dict(),
                   world_size=info.world_size, device=str(info.device), train_images=len(train_set),
                   val_images=len(val_set) if val_set else 0, data_stats=dict(train_set.stats))

    if args.pretrained_backbone_path:
        _load_backbone(model, args.pretrained_backbone_path)
    if args.initial_checkpoint:
        msg = ckpt.load(model, args.initial_checkpoint, reset_class_head=args.remove_weights is not None,
                        remove=args.remove_weights or None)
        console.print(f"initial checkpoint: {msg}") if info.is_main else None
    for prefix in args.freeze_layers or []:
        hits = [p for n, p in model.named_parameters() if n.startswith(prefix)]
        if not hits:
            raise ValueError(f"--freeze-layers {prefix!r} matches no parameter")
        for p in hits:
            p.requires_grad_(False)
    if args.memory_format == "nhwc":
        model = model.to(memory_format=torch.channels_last)
    if args.sync_bn and info.distributed:
        model = convert_sync_batchnorm(model)
    net = model
    if info.distributed:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    ema = ModelEma(model, decay=args.model_ema_decay, warmup=args.ema_warmup,
                   backend=args.kernel_backend) if args.model_ema else None  # after DDP's broadcast
    seed_everything(args.seed + info.rank)
    train_loader = D.build_loader(train_set, args.batch_size, train=True, workers=args.workers, seed=args.seed,
                                  distributed=info.distributed)
    val_loader = (D.build_loader(val_set, args.batch_size * args.validation_batch_size_multiplier, train=False,
                                 workers=args.workers, seed=args.seed, distributed=info.distributed)
                  if val_set is not None else None)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_set)} training images are fewer than one batch of {args.batch_size}")
    optimizer = build_optimizer(args, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args, steps_per_epoch))
    use_scaler = bool(args.amp) and args.amp != "bf16" and info.device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)

    start_epoch, step, best, skip_batches = args.start_epoch or 0, 0, -1.0, 0
    if args.resume:
        path = os.path.join(out, "last.pth") if args.resume == "auto" else args.resume
        state = ckpt.read(path)
        ckpt.load(model, state)
        if ema is not None and state.get("ema"):
            ema.load_state_dict(state["ema"])
        if not args.no_resume_opt:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
        start_epoch, step, best = state["epoch"] + 1, state["step"], state.get("best", -1.0)
        if state.get("batch_in_epoch"):  # interrupted inside an epoch: finish that epoch first
            start_epoch, skip_batches = state["epoch"], state["batch_in_epoch"]
        if args.no_resume_opt:
            _seek_scheduler(scheduler, step)
        rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
        if len(rngs) != info.world_size:
            console.print(f"[yellow]{path} was written by {len(rngs)} worker(s), this run has {info.world_size}: "
                          "random streams restart from the seed, so the run is not bit-identical[/]")
        else:
            set_rng_state(rngs[info.rank])
        console.print(f"resumed from {path} at epoch {start_epoch}") if info.is_main else None

    if args.start_epoch and not args.resume:
        step = args.start_epoch * steps_per_epoch
        _seek_scheduler(scheduler, step)
    history, stats, nonfinite_total, nonfinite_run = [], None, 0, 0
    bn_buffers = [b for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                  for b in (m.running_mean, m.running_var, m.num_batches_tracked)]
    bn_before = [b.clone() for b in bn_buffers]  # BN statistics before the current step (one foreach copy)
    world = info.world_size
    normalizer_fn = dist.all_reduce_sum if info.distributed else None
    last_epoch = args.epochs if not args.stop_after else min(args.epochs, start_epoch + args.stop_after)
    bench_times = []
    interrupt = _InterruptFlag()

    def save_state(epoch: int, batch_in_epoch: int | None, improved: bool) -> None:
        """Everything a run needs to continue exactly (collective: every rank calls it)."""
        rngs = dist.all_gather_objects(rng_state())
        if not info.is_main:
            return
        state = {"model": model.state_dict(), "ema": ema.state_dict() if ema else None,
                 "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "scaler": scaler.state_dict(), "epoch": epoch, "batch_in_epoch": batch_in_epoch, "step": step,
                 "best": best, "rng": rngs if info.distributed else rngs[0],
                 "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
                 "config": model.config.to_dict(), "class_names": train_set.class_names,
                 "label_to_cat_id": train_set.label_to_cat_id}
        ckpt.save(state, os.path.join(out, "last.pth"))
        if improved:
            ckpt.save(state, os.path.join(out, "best.pth"))
        if batch_in_epoch is None and args.save_checkpoint_interval and (epoch + 1) % args.save_checkpoint_interval == 0:
            ckpt.save(state, os.path.join(out, f"checkpoint_{epoch:03d}.pth"))

    for epoch in range(start_epoch, last_epoch):
        net.train()
        skip = skip_batches if epoch == start_epoch else 0
        train_loader.set_epoch(epoch, skip_batches=skip)
        prefetch = D.DevicePrefetcher(train_loader, info.device, channels_last=args.memory_format == "nhwc")
        bar = _progress(info.is_main)
        t_epoch, seen = time.perf_counter(), 0
        with bar:
            task = bar.add_task(f"epoch {epoch}", total=steps_per_epoch, completed=skip, info="")
            for i, batch in enumerate(prefetch, start=skip):
                t0 = time.perf_counter()
                torch._foreach_copy_(bn_before, bn_buffers)
                with autocast(info.device, args.amp):
                    res = compute_loss(net, batch["images"], batch["boxes"], batch["labels"],
                                       normalizer_fn=normalizer_fn, backend=args.kernel_backend)
                loss = res["loss"]
                parts = dist.all_reduce_sum(torch.stack([loss.detach(), res["cls_loss"].detach(),
                                                         res["box_loss"].detach(),
                                                         loss.new_tensor(float(interrupt.raised))]).float())
                total_loss = parts[0]
                finite = bool(torch.isfinite(total_loss))
                if finite:
                    scaler.scale(loss * world).backward()  # DDP averages gradients; the loss is already global
                    scaler.unscale_(optimizer)
                    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad or float("inf"))
                    # with a GradScaler, inf/NaN gradients are its business (it skips and lowers the scale)
                    finite = use_scaler or bool(dist.all_reduce_sum(torch.isfinite(norm).float()) == world)
                if not finite:
                    nonfinite_total, nonfinite_run = nonfinite_total + 1, nonfinite_run + 1
                    optimizer.zero_grad(set_to_none=True)
                    with torch.no_grad():  # the forward of a bad step must not leave NaN in BN statistics
                        torch._foreach_copy_(bn_buffers, bn_before)
                    jlog.write(event="nonfinite_loss", step=step, epoch=epoch, skipped_total=nonfinite_total)
                    if nonfinite_run >= args.max_nonfinite_steps:
                        raise NonFiniteLoss(
                            f"the loss or its gradient was NaN/inf in {nonfinite_run} steps in a row (epoch {epoch}, "
                            f"step {step}); stopping. Lower --lr, raise --warmup-epochs, or check the data.")
                    continue
                nonfinite_run = 0
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                if ema is not None:
                    ema.update(model)
                step += 1
                seen += batch["images"].shape[0] * world
                dt = time.perf_counter() - t0
                if args.benchmark:
                    if info.device.type == "cuda":
                        torch.cuda.synchronize(info.device)
                    bench_times.append((time.perf_counter(), batch["images"].shape[0] * world))
                if info.is_main and (step % args.log_interval == 0 or i == steps_per_epoch - 1):
                    lr = optimizer.param_groups[0]["lr"]
                    ips = seen / (time.perf_counter() - t_epoch)
                    event = dict(event="train", step=step, epoch=epoch, loss=parts[0].item(),
                                 cls_loss=parts[1].item(), box_loss=parts[2].item(),
                                 lr=lr, img_per_s=ips, data_time=batch["data_time"], step_time=dt)
                    jlog.write(**event)
                    history.append(event)
                    bar.update(task, info=f"loss {event['loss']:.4f} lr {lr:.2e} {ips:.1f} img/s")
                bar.update(task, advance=1)
                if args.benchmark and len(bench_times) >= args.benchmark_steps:
                    break
                if parts[3] > 0:  # Ctrl-C or SIGTERM on any rank: save after this step, on every rank
                    save_state(epoch, i + 1, False)
                    if info.is_main:
                        console.print(f"[yellow]interrupted at epoch {epoch}, batch {i + 1}/{steps_per_epoch}; "
                                      f"state saved to {os.path.join(out, 'last.pth')}: continue with --resume[/]")
                        jlog.write(event="interrupted", step=step, epoch=epoch, batch_in_epoch=i + 1)
                    interrupt.restore()
                    return None
        if args.benchmark:
            return _report_benchmark(bench_times, args, jlog, info)
        eval_now = val_loader is not None and epoch + 1 >= args.eval_after and (
            (epoch + 1) % args.eval_interval == 0 or epoch + 1 == last_epoch)
        if eval_now:
            eval_model = ema.module if ema is not None else model
            stats, _, timing, _ = evaluate_model(eval_model, val_loader, info, args)
            if info.is_main:
                console.print(stats_table(stats, f"epoch {epoch} ({'EMA' if ema else 'model'}) on "
                                                 f"{len(val_set)} val images"))
                jlog.write(event="eval", step=step, epoch=epoch, **{k: v for k, v in stats.items()},
                           eval_img_per_s=timing["img_per_s"], minutes=(time.perf_counter() - args._t0) / 60)
        improved = eval_now and stats is not None and stats["AP"] > best
        best = stats["AP"] if improved else best
        save_state(epoch, None, improved)
        dist.barrier()
    interrupt.restore()
    if nonfinite_total and info.is_main:
        console.print(f"[yellow]{nonfinite_total} steps with a NaN/inf loss were skipped[/]")
    if info.is_main and history:
        plot_curve([e["step"] for e in history], {"loss": [e["loss"] for e in history],
                                                  "cls": [e["cls_loss"] for e in history],
                                                  "50*box": [50 * e["box_loss"] for e in history]},
                   os.path.join(out, "loss_curve.png"), title="training loss")
    if info.is_main and val_loader is not None and args.pictures and stats is not None:
        eval_model = ema.module if ema is not None else model
        pic_loader = D.build_loader(val_set, args.batch_size, False, 0, args.seed)
        _, _, pics = run_inference(eval_model, pic_loader, info.device, amp=args.amp, backend=args.kernel_backend,
                                   progress=False, keep_images=args.pictures)
        save_pictures(val_set, pics, os.path.join(out, "pictures"), train_set.class_names)
    return stats


class _InterruptFlag:
    """Turns the first Ctrl-C / SIGTERM (e.g. a SLURM pre-emption) into a flag checked after each step, so the
    run saves a resumable checkpoint instead of dying mid-step; a second one interrupts at once."""

    active: list = []

    def __init__(self):
        import signal
        import threading

        self.raised, self._old = False, {}
        _InterruptFlag.active.append(self)
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.raised:
            self.restore()
            raise KeyboardInterrupt
        self.raised = True

    def restore(self) -> None:
        import signal

        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}
        if self in _InterruptFlag.active:
            _InterruptFlag.active.remove(self)


def _seek_scheduler(scheduler, step: int) -> None:
    """Put a fresh per-step LambdaLR at ``step`` (a restart without its saved state)."""
    scheduler.last_epoch = step
    lrs = [base * f(step) for base, f in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


def _report_benchmark(times, args, jlog, info):
    """``times``: (wall clock after the step, images) per step; img/s over the steps after warm-up, data
    loading included, as NVIDIA's ``--benchmark`` measures it."""
    if len(times) < 3:
        raise ValueError(f"--benchmark needs at least 3 steps, got {len(times)} (raise --benchmark-steps)")
    warm = max(1, len(times) // 5)
    dt = times[-1][0] - times[warm - 1][0]
    n = sum(b for _, b in times[warm:])
    ips = n / max(dt, 1e-9)
    if info.is_main:
        console.print(f"training throughput: {ips:.2f} img/s over {len(times) - warm} steps after {warm} warm-up "
                      f"steps ({args.model}, batch {args.batch_size} x {info.world_size}, {info.device})")
        jlog.write(event="benchmark", step=len(times), epoch=0, train_img_per_s=ips, measured_steps=len(times) - warm)
    return {"train_img_per_s": ips}


SMALL_DATA_IMAGES = 5000


def apply_small_data_recipe(args, num_train: int) -> str:
    """Defaults for flags the user did not set: NVIDIA's COCO recipe, or a small-data recipe that learns
    from scratch in minutes when the training set has fewer than ``SMALL_DATA_IMAGES`` images and training
    starts from scratch (fine-tuning from a checkpoint keeps NVIDIA's recipe and the model's image size)."""
    from_scratch = not (args.initial_checkpoint or args.pretrained_backbone_path)
    small = num_train < SMALL_DATA_IMAGES and from_scratch
    args.small_data_recipe = small
    recipe = SMALL_RECIPE if small else COCO_RECIPE
    for k, v in recipe.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    return "small-data recipe (detector/engine.py SMALL_RECIPE)" if small else "NVIDIA COCO recipe"


COCO_RECIPE = dict(opt="momentum", lr=0.01, batch_size=32, epochs=300, warmup_epochs=1.0, weight_decay=4e-5,
                   model_ema=False, model_ema_decay=0.9998, ema_warmup=False, scale_range=[0.1, 2.0],
                   input_size=None, bn_momentum=None, eval_interval=1, pictures=0, memory_format="nchw")
# Small data from scratch on a CPU: AdamW converges far faster than SGD there; a gentler scale jitter and a
# reduced input size give many more useful steps per minute; a short EMA with warm-up and fast BN statistics
# make the averaged model usable after a few hundred steps.
SMALL_RECIPE = dict(opt="adamw", lr=2e-3, batch_size=16, epochs=30, warmup_epochs=0.5, weight_decay=1e-2,
                    model_ema=True, model_ema_decay=0.995, ema_warmup=True, scale_range=[0.6, 1.4],
                    input_size=[128, 128], bn_momentum=0.1, eval_interval=5, pictures=4, memory_format="nhwc")
