"""The training loop: ``train(args)`` = ``setup`` -> ``fit`` (``train_one_epoch`` -> ``train_step``), with
checkpoints that let ``--resume`` continue bit-identically, even from the middle of an epoch.
"""
from __future__ import annotations

import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

import datasets as D
from detector import checkpoint as ckpt
from detector.configs import get_config
from detector.ema import ModelEma
from detector.layers import convert_sync_batchnorm
from detector.pipeline import compute_loss

from . import distributed as dist
from .config import TrainConfig, ann_flag, train_data_paths, uses_builtin_data
from .errors import UserError, from_flag, naming
from .evaluation import autocast, evaluate_model, save_pictures, waymo_iou_by_class
from .models import build_model, freeze, load_backbone, to_memory_format, training_overrides
from .plots import plot_training
from .runlog import (JsonLog, benchmark_phases, console, make_output_folder, progress, report_benchmark, stats_table,
                     waymo_table)
from .host import tune_allocator
from .recipe import DataStats
from .budget import TimeBudget
from .schedule import build_optimizer, build_scheduler, load_optimizer_state, scheduled_epochs, seek_scheduler


class NonFiniteLoss(UserError):
    """Training stopped after ``--max-nonfinite-steps`` NaN/inf steps in a row: a one-line error, exit 2."""

    def __init__(self, what: str):
        super().__init__(what, field="loss", todo="lower --lr, raise --warmup-epochs, or check the data")


@dataclass
class Run:
    """Everything one worker's training run holds; the functions below read and advance it."""

    cfg: TrainConfig
    info: dist.DistInfo
    model: nn.Module  # the bare model (what is saved)
    net: nn.Module  # what the step calls: the model, or DDP around it
    ema: ModelEma | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    train_set: D.CocoDetection
    val_set: D.CocoDetection | None
    train_loader: D.EpochDataLoader
    val_loader: D.EpochDataLoader | None
    jlog: JsonLog
    t0: float
    steps_per_epoch: int  # batches in a whole epoch (a resumed epoch's loader is shorter by its skipped ones)
    start_epoch: int = 0
    step: int = 0
    best: float = -1.0
    skip_batches: int = 0  # batches of start_epoch already trained before an interruption
    nonfinite_total: int = 0
    bad_images: set = field(default_factory=set)  # indices of undecodable training images (--skip-bad-images)
    nonfinite_run: int = 0
    bench_times: list = field(default_factory=list)
    stats: dict | None = None
    bn_layers: list = field(default_factory=list)  # every BN module of the model, collected at set-up
    bn_buffers: list = field(default_factory=list)
    bn_before: list = field(default_factory=list)
    budget: TimeBudget | None = None  # --time-budget
    budget_fraction: float = 0.0  # the budget's fraction at the last check (budget_spent), agreed by all workers
    stopped_in_epoch: int | None = None  # batches of its last epoch a budget-stopped run trained (None: all)
    pictures: list = field(default_factory=list)  # (image id, detections) of the final evaluation
    bn_frozen: bool = False  # --freeze-bn-after reached: BN layers use their running statistics
    bn_frozen_saved: bool | None = None  # bn_frozen as the resumed checkpoint recorded it (None: fresh, or older)

    @property
    def out_of_time(self) -> bool:
        """The budget ended training at the last check; the current epoch is the last."""
        return self.budget is not None and self.budget_fraction >= 1.0

    @property
    def use_scaler(self) -> bool:
        return self.scaler.is_enabled()

    steps_this_run: int = 0

    @property
    def last_epoch(self) -> int:
        stop, end = self.cfg.stop_after, scheduled_epochs(self.cfg)
        return end if not stop else min(end, self.start_epoch + stop)

    def is_last(self, epoch: int) -> bool:
        return epoch + 1 == self.last_epoch or self.out_of_time

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model


# ---------------------------------------------------------------- entry point
def train(args) -> dict | None:
    """One worker's whole training run from the parsed flags. Returns the last evaluation stats on rank 0."""
    info = dist.init(args.device, args.local_rank)
    try:
        run = setup(args, info)
        return fit(run)
    finally:
        for flag in list(InterruptFlag.active):
            flag.restore()
        dist.cleanup()


# ---------------------------------------------------------------- setup
def setup(args, info: dist.DistInfo) -> Run:
    """Data, config, model, optimizer and schedule; then the saved state when resuming."""
    t0 = time.perf_counter()
    if info.device.type == "cpu":
        tune_allocator()
    seed_everything(args.seed)  # identical initial weights on every rank; per-rank streams below
    train_set, val_set = load_data(args)
    stats = DataStats.of(train_set.coco.dataset)
    if stats.objects == 0:  # nothing to learn from: every image a negative
        raise UserError("the training set has no boxes (no annotation outside crowd regions)", train_set.ann_file,
                        "annotations", "pass the annotation file with the boxes")
    cfg = TrainConfig.from_args(args, num_train=len(train_set), cuda=info.device.type == "cuda", stats=stats,
                                builtin_data=uses_builtin_data(args))
    if info.is_main:
        console.print(f"recipe: {cfg.recipe} ({len(train_set)} training images); flags you gave take precedence")
        epochs = scheduled_epochs(cfg)
        length = f"{cfg.time_budget:g}-minute budget" if cfg.time_budget else f"{epochs} epochs"
        height, width = cfg.input_size or get_config(cfg.model).image_size
        batch = f"batch {cfg.batch_size}" + (f" per process x {info.world_size} processes" if info.world_size > 1 else "")
        stop = f" or {cfg.max_steps} step{'s' * (cfg.max_steps != 1)}, whichever ends first" if cfg.max_steps else ""
        console.print(f"in effect: input {height}x{width}, {batch}, --opt {cfg.opt} lr {cfg.lr:g}, {length}{stop}")
        if val_set is not None and not cfg.time_budget and not evaluation_due(cfg, epochs - 1, True):
            console.print(f"[yellow]--eval-after {cfg.eval_after}: the run's last epoch is {epochs - 1} "
                          "(counted from 0), so nothing is evaluated during training and no best.pth is written, as in "
                          "NVIDIA's train.py; score last.pth with evaluate.py afterwards[/]")
        console.print(f"data loader: {cfg.workers} worker process(es); {torch.get_num_threads()} compute threads")
        for note in cfg.notes:
            console.print(f"[yellow]{note}[/]")
    model = build_training_model(cfg, train_set, info)
    size = model.config.image_size
    train_set.transform = D.TrainTransform(size, seed=cfg.seed, scale_range=cfg.scale_range, fill=cfg.fill_color,
                                           interpolation=cfg.train_interpolation)
    if val_set is not None:
        val_set.transform = D.EvalTransform(size, fill=cfg.fill_color, interpolation=cfg.eval_interpolation)
    make_output_folder(cfg.output)
    resume_from = os.path.join(cfg.output, "last.pth") if cfg.resume == "auto" else cfg.resume
    if resume_from == os.path.join(cfg.output, "last.pth") and not os.path.exists(resume_from):
        if info.is_main:  # NVIDIA's scripts always pass --resume: the first run starts fresh
            console.print(f"--resume: no {resume_from} yet, starting fresh")
        resume_from = None
    log_path = os.path.join(cfg.output, "log.jsonl")
    if info.is_main and not resume_from and os.path.exists(log_path):  # a fresh run: its own log (appending
        n = 1                                                          # drew two runs as one curve)
        while os.path.exists(f"{log_path}.{n}"):
            n += 1
        os.replace(log_path, f"{log_path}.{n}")
        console.print(f"{log_path} of an earlier run kept as {log_path}.{n}")
    jlog = JsonLog(log_path if info.is_main else None,
                   dllogger=cfg.dllogger_file if info.is_main else None)
    jlog.write(event="start", step=0, epoch=0, args=cfg.to_dict(), config=model.config.to_dict(),
               world_size=info.world_size, device=str(info.device), train_images=len(train_set),
               val_images=len(val_set) if val_set else 0, data_stats=stats.to_dict(),
               data_fixes={"train": dict(train_set.stats), "val": dict(val_set.stats) if val_set else {}})
    load_initial_weights(cfg, model, info)
    model = to_memory_format(model, cfg.channels_last)
    if cfg.sync_bn and info.distributed:
        model = convert_sync_batchnorm(model)
    net = model
    if info.distributed:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    if cfg.compile:  # compiled on the first step (minutes on a small CPU: bench/RESULTS.md)
        net = torch.compile(net)
    ema = ModelEma(model, decay=cfg.model_ema_decay, warmup=cfg.ema_warmup,
                   backend=cfg.kernel_backend) if cfg.model_ema else None  # after DDP's broadcast
    seed_everything(cfg.seed + info.rank)
    train_loader = D.build_loader(train_set, cfg.batch_size, train=True, workers=cfg.workers, seed=cfg.seed,
                                  distributed=info.distributed)
    val_loader = (D.build_loader(val_set, cfg.batch_size * cfg.validation_batch_size_multiplier, train=False,
                                 workers=cfg.workers, seed=cfg.seed, distributed=info.distributed)
                  if val_set is not None else None)
    if len(train_loader) == 0:
        each = (f" for each of {info.world_size} processes ({cfg.batch_size * info.world_size} images)"
                if info.distributed else "")  # a global batch is --batch-size on every rank
        raise UserError(f"{len(train_set)} training images are fewer than one batch of {cfg.batch_size}{each}",
                        train_set.ann_file, "--batch-size", "pass a smaller --batch-size"
                        f"{', fewer --nproc' if info.distributed else ''} or more images")
    bn_batch = cfg.batch_size * (info.world_size if cfg.sync_bn else 1)  # what one BN layer normalizes over
    (h, w), level = model.config.image_size, model.config.max_level
    if bn_batch * (h >> level) * (w >> level) < 2:  # BN in training needs two values per channel (a traceback)
        raise UserError(f"batch {cfg.batch_size} at {h}x{w} px leaves BN one value per channel on the "
                        f"{h >> level}x{w >> level} P{level} map", None, "--batch-size",
                        "pass -b 2 or more (with --nproc, or --sync-bn), or a larger --input_size")
    optimizer = build_optimizer(cfg, model)
    use_scaler = bool(cfg.amp) and cfg.amp != "bf16" and info.device.type == "cuda"
    budget = TimeBudget(cfg.time_budget, t0) if cfg.time_budget else None
    run = Run(cfg=cfg, info=info, model=model, net=net, ema=ema, optimizer=optimizer,
              scheduler=build_scheduler(cfg, optimizer, len(train_loader)), budget=budget,
              scaler=torch.amp.GradScaler("cuda", enabled=use_scaler), train_set=train_set, val_set=val_set,
              train_loader=train_loader, val_loader=val_loader, jlog=jlog, t0=t0,
              start_epoch=cfg.start_epoch or 0, steps_per_epoch=len(train_loader))
    if resume_from:
        resume(run, resume_from)
    elif cfg.start_epoch:
        if cfg.start_epoch >= run.last_epoch:  # NVIDIA's loop would train nothing and report success
            raise UserError(f"--start-epoch {cfg.start_epoch} leaves nothing to train: the run's epochs are "
                            f"0..{run.last_epoch - 1}", None, "--start-epoch",
                            f"pass a start epoch below {run.last_epoch}, or more --epochs")
        run.step = cfg.start_epoch * run.steps_per_epoch
        seek_scheduler(run.scheduler, run.step)
    run.bn_layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    run.bn_buffers = [b for m in run.bn_layers for b in (m.running_mean, m.running_var, m.num_batches_tracked)]
    run.bn_before = [b.clone() for b in run.bn_buffers]  # BN statistics before the current step
    return run


def load_data(args):
    """(train set, val set or None) from the data flags."""
    paths = train_data_paths(args)
    if "train" not in paths:
        raise UserError("no training data", None, "--train-ann",
                        "give a data root, --train-ann, or nothing for the built-in synthetic set")
    with from_flag(ann_flag(args, "train")):
        train_set = D.CocoDetection(*paths["train"], skip_bad_images=args.skip_bad_images)
    with from_flag(ann_flag(args, "val")):
        val_set = D.CocoDetection(*paths["val"], skip_bad_images=args.skip_bad_images) if "val" in paths else None
    if val_set is not None and len(val_set) == 0:
        raise UserError("the validation set is empty", paths["val"][0], "images",
                        "pass a --val-ann with images, or leave validation out")
    if val_set is not None and not val_set.coco.dataset["annotations"]:  # found now, not after an epoch
        raise UserError("the validation set has no annotations: AP is undefined", paths["val"][0], "annotations",
                        "pass a --val-ann with boxes, or leave validation out")
    if val_set is not None and val_set.cat_ids != train_set.cat_ids:
        # the model's class i is the training file's i-th category: another list would score (and draw) the
        # detections under the wrong category ids
        only_train = sorted(set(train_set.cat_ids) - set(val_set.cat_ids))
        only_val = sorted(set(val_set.cat_ids) - set(train_set.cat_ids))
        raise UserError(f"the validation file's categories differ from the training file's (ids only in the "
                        f"training file: {only_train[:5]}, only in the validation file: {only_val[:5]})",
                        paths["val"][0], "categories",
                        "give both files the same 'categories' list (a category without boxes may stay listed)")
    return train_set, val_set


def build_training_model(cfg: TrainConfig, train_set, info: dist.DistInfo):
    num_classes = cfg.num_classes or train_set.num_classes
    if num_classes < train_set.num_classes:
        raise UserError(f"--num_classes {num_classes} is smaller than the {train_set.num_classes} categories",
                        train_set.ann_file, "--num_classes",
                        "drop --num_classes, or pass at least the category count (every class needs a logit)")
    return build_model(cfg.model, num_classes, cfg.input_size, cfg.kernel_backend, info.device,
                       **training_overrides(cfg))


def load_initial_weights(cfg: TrainConfig, model, info: dist.DistInfo) -> None:
    """``--pretrained-backbone-path``, ``--pretrained``, ``--initial-checkpoint`` (minus ``--remove-weights``),
    ``--freeze-layers``."""
    if cfg.pretrained_backbone_path:
        with from_flag("--pretrained-backbone-path", "check the path of the backbone weights (ours, timm's or "
                       "NVIDIA's jocbackbone_statedict_B0.pth), or leave the flag out to train from scratch"):
            load_backbone(model, cfg.pretrained_backbone_path)
    if cfg.pretrained:  # effdet's published COCO weights of --model; another class count: a fresh class head
        from detector.pretrained import load_pretrained

        msg = load_pretrained(model, cfg.model, progress=info.is_main)
        if info.is_main:
            console.print(f"pretrained weights: {msg}")
    if cfg.initial_checkpoint:
        with from_flag("--initial-checkpoint"):  # the file itself; what fits the model is load's to say
            state = ckpt.read(cfg.initial_checkpoint)
        with from_flag("--remove-weights" if cfg.remove_weights else None):
            msg = ckpt.load(model, state, reset_class_head=cfg.remove_weights == [],  # [] = no names
                            remove=cfg.remove_weights or None, where=cfg.initial_checkpoint)
        if info.is_main:
            console.print(f"initial checkpoint: {msg}")
    freeze(model, cfg.freeze_layers)


# ---------------------------------------------------------------- the epochs
def fit(run: Run) -> dict | None:
    interrupt = InterruptFlag()
    for epoch in range(run.start_epoch, run.last_epoch):
        if epoch == run.start_epoch and budget_spent(run):  # a resumed run whose budget was already spent
            if run.info.is_main:
                console.print(f"[yellow]time budget: the runs this one resumes trained {run.budget.spent / 60:.2f} "
                              f"min, all that --time-budget {run.cfg.time_budget:g} leaves for training: nothing "
                              "more is trained (pass a larger --time-budget to train on)[/]")
            break
        if not train_one_epoch(run, epoch, interrupt):
            report_bad_images(run)
            return None  # interrupted or --max-steps; the state is saved
        if run.cfg.benchmark:
            return report_benchmark(run.bench_times, run.cfg, run.jlog, run.info)
        distribute_bn(run)
        if not run.out_of_time:
            budget_spent(run)  # the budget ran out at the epoch's last step: this epoch is the last
        improved = maybe_evaluate(run, epoch)
        save_state(run, epoch, run.stopped_in_epoch, improved)
        dist.barrier()
        if run.out_of_time:
            break
    interrupt.restore()
    finish(run)
    return run.stats


def budget_spent(run: Run) -> bool:
    """--time-budget: True once training must stop for the final evaluation to end in time (agreed by all
    workers, so every rank leaves the epoch at the same step)."""
    if run.budget is None:
        return False
    run.budget_fraction = run_fraction(run)
    return run.budget_fraction >= 1.0


def run_fraction(run: Run) -> float:
    """How far training has come: steps over the scheduled steps (the same on every worker), or with
    --time-budget the budget's fraction (its largest over the workers, so that all of them agree)."""
    if run.budget is None:
        return run.step / max(1, scheduled_epochs(run.cfg) * run.steps_per_epoch)
    f = run.budget.fraction()
    if run.info.distributed:
        f = float(dist.all_reduce_max(torch.tensor([f], device=run.info.device)))
    return f


# Under --time-budget, BN is not frozen before this step. The budget's fraction is estimated from the speed so
# far, and a slow start (a loaded machine, a slow first epoch, a long set-up) made 20% of it come at step 4:
# the run then trained on with the running statistics of 4 steps and ended at AP50 0.01. In 300-step runs of
# the built-in set (seed 42) the freeze at step 60 scored AP50 0.60, at step 40 0.21, at step 20 0.010, at step
# 4 0.009 (README, "Training").
BN_FREEZE_MIN_STEPS = 60


def freeze_bn_if_due(run: Run) -> None:
    """--freeze-bn-after F: from fraction F of the run on, every BN layer normalizes with its running
    statistics, as in evaluation, and stops updating them; re-applied before each step, since ``net.train()``
    undoes it. The EMA, if any, restarts from the current weights at that step: weights trained under batch
    statistics are not averaged into the model that is evaluated with running ones. Why the small-data recipe
    does both: README, "Training". Under --benchmark the freeze comes after the first --benchmark-steps
    instead, so that a second measurement covers the frozen step (``benchmark_phases``). With
    --time-budget it reads the fraction that ``budget_spent`` has just agreed on before the same step, so a
    distributed run makes one all-reduce per step, not two."""
    f = run.cfg.freeze_bn_after
    if not run.cfg.freezes_bn:
        return
    if run.cfg.benchmark:
        due = len(run.bench_times) >= run.cfg.benchmark_steps
    elif run.budget is not None:  # an estimate from the speed so far: a slow start makes it run ahead
        due = run.budget_fraction >= f and run.step >= BN_FREEZE_MIN_STEPS
    else:
        due = run_fraction(run) >= f
    if not run.bn_frozen and due:
        run.bn_frozen = True
        # resumed from a checkpoint that does not record the freeze: the run it continues may have frozen already
        resumed = run.bn_frozen_saved is None and run.steps_this_run == 0 and run.step > 0
        restart = run.ema is not None and not resumed
        if restart:
            run.ema.restart(run.model)
        if run.info.is_main:
            when = ("--benchmark: the next steps measure the frozen step" if run.cfg.benchmark else
                    f"{f:g} of the run, --freeze-bn-after{', the resumed run is past it' if resumed else ''}")
            console.print(f"BN statistics frozen at step {run.step} ({when}): BN layers normalize with their "
                          "running statistics from here on, as in evaluation"
                          f"{'; the EMA restarts from the current weights' if restart else ''}")
            run.jlog.write(event="bn_frozen", step=run.step, fraction=None if run.cfg.benchmark else f,
                           resumed=resumed, ema_restarted=restart)
    if run.bn_frozen:
        for m in run.bn_layers:
            m.eval()


def stop_for_budget(run: Run, epoch: int, i: int, steps_done: int, img_per_s: float) -> bool:
    """Before batch ``i``: True (and said) once the budget is spent. After the epoch's first, slow steps the
    evaluation's reserve is guessed from the training speed."""
    if steps_done > 5:
        run.budget.guess_reserve(len(run.val_set) if run.val_set else 0, img_per_s)
    if not budget_spent(run):
        return False
    if run.info.is_main:
        console.print(f"time budget: training stops at epoch {epoch}, before batch {i + 1}/"
                      f"{run.steps_per_epoch}, to leave time for the final evaluation")
    return True


def train_one_epoch(run: Run, epoch: int, interrupt: "InterruptFlag") -> bool:
    """Train ``epoch`` (from the batch where an interrupted run stopped); False when interrupted."""
    cfg, info = run.cfg, run.info
    run.net.train()
    skip = run.skip_batches if epoch == run.start_epoch else 0
    run.train_loader.set_epoch(epoch, skip_batches=skip)
    prefetch = D.DevicePrefetcher(run.train_loader, info.device, channels_last=cfg.channels_last)
    t_epoch, seen = time.perf_counter(), 0
    if run.budget is not None:
        run.budget.start()
    with progress(info.is_main) as bar:
        task = bar.add_task(f"epoch {epoch}", total=run.steps_per_epoch, completed=skip, info="")
        for i, batch in enumerate(prefetch, start=skip):
            if run.budget is not None and stop_for_budget(run, epoch, i, steps_done=i - skip,
                                                          img_per_s=seen / max(time.perf_counter() - t_epoch, 1e-9)):
                run.stopped_in_epoch = i if i > 0 else None  # saved: a resume finishes this epoch first
                break  # checked before the step, so none starts once the budget is spent
            freeze_bn_if_due(run)
            t0 = time.perf_counter()
            run.bad_images.update(batch["bad_images"].tolist())  # stays on the host: no device sync
            parts = train_step(run, batch, epoch, interrupt)
            if parts is None:
                continue  # a skipped non-finite step
            seen += batch["images"].shape[0] * info.world_size
            if cfg.benchmark:
                if info.device.type == "cuda":
                    torch.cuda.synchronize(info.device)
                run.bench_times.append((time.perf_counter(), batch["images"].shape[0] * info.world_size))
            if info.is_main and (run.step % cfg.log_interval == 0 or i == run.steps_per_epoch - 1):
                event = log_step(run, epoch, parts, batch, ips=seen / (time.perf_counter() - t_epoch),
                                 step_time=time.perf_counter() - t0)
                bar.update(task, info=f"loss {event['loss']:.4f} lr {event['lr']:.2e} {event['img_per_s']:.1f} img/s")
            bar.update(task, advance=1)
            # --max-steps on the run's very last step: the run ends as scheduled (evaluated), not as interrupted
            step_limit = (cfg.max_steps is not None and run.steps_this_run >= cfg.max_steps
                          and not (epoch == run.last_epoch - 1 and i == run.steps_per_epoch - 1))
            if cfg.benchmark and (len(run.bench_times) >= benchmark_phases(cfg) * cfg.benchmark_steps or step_limit):
                break
            if parts[3] > 0 or step_limit:  # Ctrl-C / SIGTERM on any rank, or --max-steps: save and stop
                save_state(run, epoch, i + 1, False)
                if info.is_main:
                    why = f"--max-steps {cfg.max_steps} reached" if step_limit else "interrupted"
                    console.print(f"[yellow]{why} at epoch {epoch}, batch {i + 1}/{run.steps_per_epoch}; "
                                  f"state saved to {os.path.join(cfg.output, 'last.pth')}: continue with --resume[/]")
                    run.jlog.write(event="interrupted", step=run.step, epoch=epoch, batch_in_epoch=i + 1)
                interrupt.restore()
                return False
    return True


def train_step(run: Run, batch: dict, epoch: int, interrupt: "InterruptFlag"):
    """One optimizer step. Returns the summed (loss, cls_loss, box_loss, interrupted) over the workers, or
    None when the loss or its gradient was not finite (the step is skipped and leaves no trace)."""
    world = run.info.world_size
    torch._foreach_copy_(run.bn_before, run.bn_buffers)
    with autocast(run.info.device, run.cfg.amp):
        res = compute_loss(run.net, batch["images"], batch["boxes"], batch["labels"],
                           normalizer_fn=dist.all_reduce_sum if run.info.distributed else None,
                           backend=run.cfg.kernel_backend)
    loss = res["loss"]
    parts = dist.all_reduce_sum(torch.stack([loss.detach(), res["cls_loss"].detach(), res["box_loss"].detach(),
                                             loss.new_tensor(float(interrupt.raised))]).float())
    finite = bool(torch.isfinite(parts[0]))
    if finite:
        run.scaler.scale(loss * world).backward()  # DDP averages gradients; the loss is already global
        run.scaler.unscale_(run.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.clip_grad or float("inf"))
        # with a GradScaler, inf/NaN gradients are its business (it skips and lowers the scale)
        finite = run.use_scaler or bool(dist.all_reduce_sum(torch.isfinite(norm).float()) == world)
    if not finite:
        skip_nonfinite_step(run, epoch)
        return None
    run.nonfinite_run = 0
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    if run.ema is not None:
        run.ema.update(run.model)
    run.step += 1
    run.steps_this_run += 1
    return parts


def skip_nonfinite_step(run: Run, epoch: int) -> None:
    """Drop the gradients and restore the BN statistics of a NaN/inf step; stop after too many in a row."""
    run.nonfinite_total += 1
    run.nonfinite_run += 1
    run.optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():  # the forward of a bad step must not leave NaN in BN statistics
        torch._foreach_copy_(run.bn_buffers, run.bn_before)
    run.jlog.write(event="nonfinite_loss", step=run.step, epoch=epoch, skipped_total=run.nonfinite_total)
    if run.nonfinite_run >= run.cfg.max_nonfinite_steps:
        raise NonFiniteLoss(
            f"the loss or its gradient was NaN/inf in {run.nonfinite_run} steps in a row (epoch {epoch}, "
            f"step {run.step}); stopping")


def log_step(run: Run, epoch: int, parts, batch, ips: float, step_time: float) -> dict:
    event = dict(event="train", step=run.step, epoch=epoch, loss=parts[0].item(), cls_loss=parts[1].item(),
                 box_loss=parts[2].item(), lr=run.optimizer.param_groups[0]["lr"], img_per_s=ips,
                 data_time=batch["data_time"], step_time=step_time)
    run.jlog.write(**event)
    return event


def evaluation_due(cfg, epoch: int, is_last: bool) -> bool:
    """After 0-based ``epoch``: from ``--eval-after`` on (NVIDIA's rule, ``epoch >= eval_after``: see
    ``tests/fixtures/nvidia/rules.json``), every ``--eval-interval`` epochs and after the last one."""
    return epoch >= cfg.eval_after and (bool(cfg.eval_interval and (epoch + 1) % cfg.eval_interval == 0) or is_last)


def maybe_evaluate(run: Run, epoch: int) -> bool:
    """Evaluate (the EMA model when there is one) when the schedule says so; True when AP improved."""
    cfg = run.cfg
    if run.val_loader is None or not evaluation_due(cfg, epoch, run.is_last(epoch)):
        return False
    iou_by_class = waymo_iou_by_class(run.val_set.coco.dataset["categories"]) if cfg.waymo else None
    t_eval = time.perf_counter()
    stats, _, timing, pictures = evaluate_model(
        run.eval_model, run.val_loader, run.info, amp=cfg.amp, channels_last=cfg.channels_last,
        backend=cfg.kernel_backend, iou_by_class=iou_by_class, keep_images=cfg.pictures if run.is_last(epoch) else 0)
    run.pictures = pictures
    run.stats = stats
    if run.budget is not None:
        run.budget.evaluated(time.perf_counter() - t_eval)
    if run.info.is_main:
        console.print(stats_table(stats, f"epoch {epoch} ({'EMA' if run.ema else 'model'}) on "
                                         f"{len(run.val_set)} val images"))
        if cfg.waymo:
            console.print(waymo_table(stats, iou_by_class))
        run.jlog.write(event="eval", step=run.step, epoch=epoch, **stats, eval_img_per_s=timing["img_per_s"],
                       minutes=(time.perf_counter() - run.t0) / 60)
    improved = stats["AP"] > run.best
    run.best = max(run.best, stats["AP"])
    return improved


def distribute_bn(run: Run) -> None:
    """``--dist-bn``: after each epoch, give every worker rank 0's BN statistics (broadcast) or their mean."""
    if run.info.distributed and run.cfg.dist_bn:
        for model in (run.model, run.ema.module if run.ema else None):
            if model is not None:
                dist.distribute_bn(model, reduce=run.cfg.dist_bn == "reduce")


def report_bad_images(run: Run) -> list[str]:
    """The training images every rank's loader found undecodable (``--skip-bad-images``), said once by rank 0:
    their files (a collective: every rank calls it)."""
    bad = sorted(set().union(*dist.all_gather_objects(sorted(run.bad_images))))
    if bad and run.info.is_main:
        console.print(f"[yellow]{len(bad)} of {len(run.train_set)} training images could not be decoded and were "
                      f"replaced by the next good one (--skip-bad-images); first: {run.train_set.image_path(bad[0])}[/]")
    return [run.train_set.image_path(j) for j in bad]


def finish(run: Run) -> None:
    """Training curves (loss parts, learning rate, validation AP of the whole log, resumed runs included) and
    detection pictures (rank 0)."""
    bad = report_bad_images(run)
    if not run.info.is_main:
        return
    if run.nonfinite_total:
        console.print(f"[yellow]{run.nonfinite_total} steps with a NaN/inf loss were skipped[/]")
    out = run.cfg.output
    if os.path.isfile(os.path.join(out, "log.jsonl")):
        plot_training(os.path.join(out, "log.jsonl"), os.path.join(out, "curves.png"))
    if run.pictures:  # kept by the final evaluation (rank 0's shard)
        save_pictures(run.val_set, run.pictures, os.path.join(out, "pictures"), run.train_set.class_names)
    minutes = (time.perf_counter() - run.t0) / 60
    run.jlog.write(event="end", step=run.step, minutes=minutes, time_budget=run.cfg.time_budget,
                   undecodable_train_images=bad)
    budget = f" (time budget {run.cfg.time_budget:g} min)" if run.cfg.time_budget else ""
    steps = f"{run.steps_this_run} step{'s' * (run.steps_this_run != 1)}"
    steps += "" if run.steps_this_run == run.step else f" (step {run.step})"
    console.print(f"finished in {minutes:.2f} min{budget}: {steps}; outputs in {out}/")


# ---------------------------------------------------------------- checkpoints and resume
def save_state(run: Run, epoch: int, batch_in_epoch: int | None, improved: bool) -> None:
    """Everything a run needs to continue exactly (collective: every rank calls it)."""
    rngs = dist.all_gather_objects(rng_state())
    if not run.info.is_main:
        return
    state = {"model": run.model.state_dict(), "ema": run.ema.state_dict() if run.ema else None,
             "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
             "scaler": run.scaler.state_dict(), "epoch": epoch, "batch_in_epoch": batch_in_epoch, "step": run.step,
             "best": run.best, "rng": rngs if run.info.distributed else rngs[0], "args": run.cfg.to_dict(),
             "budget_fraction": run.budget.fraction() if run.budget is not None else None,
             "budget_train_seconds": run.budget.train_seconds() if run.budget is not None else None,
             "bn_frozen": run.bn_frozen,
             "config": run.model.config.to_dict(), "class_names": run.train_set.class_names,
             "label_to_cat_id": run.train_set.label_to_cat_id}
    out, every = run.cfg.output, run.cfg.save_checkpoint_interval
    ckpt.save(state, os.path.join(out, "last.pth"))
    if improved:
        ckpt.save(state, os.path.join(out, "best.pth"))
    if batch_in_epoch is None and every and (epoch + 1) % every == 0:
        ckpt.save(state, os.path.join(out, f"checkpoint_{epoch:03d}.pth"))


def resume(run: Run, path: str) -> None:
    """Model, EMA, optimizer, schedule, scaler, position and random streams from ``path``."""
    with from_flag("--resume"):
        state = ckpt.read(path)
    missing = [k for k in ("model", "epoch", "step", "rng") + (() if run.cfg.no_resume_opt else
                                                             ("optimizer", "scheduler")) if k not in state]
    if missing:  # weights only (ours, effdet's) or another project's training state (NVIDIA's, timm's)
        raise UserError(f"not a training checkpoint of this train.py (no {', '.join(map(repr, missing))})", path,
                        "--resume", "start from its weights with --initial-checkpoint instead")
    saved_opt = state["args"].get("opt") if isinstance(state.get("args"), dict) else None
    if not run.cfg.no_resume_opt and saved_opt not in (None, run.cfg.opt):
        raise UserError(f"the run was trained with --opt {saved_opt}, this one asks for --opt {run.cfg.opt}", path,
                        "--opt", f"pass --opt {saved_opt}, or --no-resume-opt to start a fresh optimizer")
    with naming(path):
        ckpt.load(run.model, state)
    if run.ema is not None and state.get("ema"):
        run.ema.load_state_dict(state["ema"])
    elif run.ema is not None:  # EMA turned on at this resume: it starts from the resumed weights, not the
        run.ema.restart(run.model)  # initial ones it was built from
    saved_args = state["args"] if isinstance(state.get("args"), dict) else {}
    kept = [f"{flag} {saved_args[key]:g}" for flag, key in (("--lr", "lr"), ("--weight-decay", "weight_decay"))
            if isinstance(saved_args.get(key), (int, float)) and saved_args[key] != getattr(run.cfg, key)]
    if kept and not run.cfg.no_resume_opt and run.info.is_main:  # the optimizer's state holds both
        console.print(f"[yellow]--resume: the resumed optimizer keeps the run's {', '.join(kept)} (this run's values "
                      "do not apply; --no-resume-opt starts a fresh optimizer with them)[/]")
    if not run.cfg.no_resume_opt:
        try:
            load_optimizer_state(run.optimizer, state["optimizer"])
        except (ValueError, KeyError) as e:  # parameter groups of another model or optimizer setting
            raise UserError(f"its optimizer state does not fit this run ({e})", path, "optimizer",
                            "pass --no-resume-opt to keep the weights and start a fresh optimizer") from None
        run.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            run.scaler.load_state_dict(state["scaler"])
    run.start_epoch, run.step, run.best = state["epoch"] + 1, state["step"], state.get("best", -1.0)
    if run.budget is not None and state.get("budget_train_seconds") is not None:  # the budget continues
        run.budget.spent = float(state["budget_train_seconds"])
    elif run.budget is not None and state.get("budget_fraction") is not None:  # saved before the seconds were
        run.budget.spent = min(1.0, state["budget_fraction"]) * run.budget.seconds  # (about: set-up not known)
    if state.get("bn_frozen") is not None and not run.cfg.benchmark:  # recorded since the EMA restarts at
        run.bn_frozen = run.bn_frozen_saved = bool(state["bn_frozen"])  # the freeze; --benchmark starts unfrozen
    if state.get("batch_in_epoch"):  # interrupted inside an epoch: finish that epoch first
        run.start_epoch, run.skip_batches = state["epoch"], state["batch_in_epoch"]
    if run.cfg.no_resume_opt:
        seek_scheduler(run.scheduler, run.step)
    rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
    if len(rngs) != run.info.world_size:
        console.print(f"[yellow]{path} was written by {len(rngs)} worker(s), this run has {run.info.world_size}: "
                      "random streams restart from the seed, so the run is not bit-identical[/]")
    else:
        set_rng_state(rngs[run.info.rank])
    if run.info.is_main:
        where = f"epoch {run.start_epoch}" + (f", batch {run.skip_batches + 1}" if run.skip_batches else "")
        console.print(f"resumed from {path} at {where} (step {run.step})"
                      + ("; that run is complete: nothing left to train" if run.start_epoch >= run.last_epoch else ""))
        saved = state.get("args", {}).get("batch_size") if isinstance(state.get("args"), dict) else None
        if saved is not None and saved != run.cfg.batch_size:
            console.print(f"[yellow]{path} was trained with batch {saved}, this run uses {run.cfg.batch_size}: the "
                          "schedule continues at its step, and a half-done epoch skips its first batches of the "
                          "new size[/]")
        run.jlog.write(event="resumed", step=run.step, epoch=run.start_epoch, checkpoint=path,
                       batch_in_epoch=run.skip_batches)


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


class InterruptFlag:
    """Turns the first Ctrl-C / SIGTERM (e.g. a SLURM pre-emption) into a flag checked after each step, so the
    run saves a resumable checkpoint instead of dying mid-step; a second one interrupts at once."""

    active: list = []

    def __init__(self):
        self.raised, self._old = False, {}
        InterruptFlag.active.append(self)
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.raised:
            self.restore()
            raise KeyboardInterrupt
        self.raised = True

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}
        if self in InterruptFlag.active:
            InterruptFlag.active.remove(self)
