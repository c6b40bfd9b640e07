"""What a run tells the user: the console, a JSON-lines log, result tables and progress bars."""
from __future__ import annotations

import datetime
import json
import os
import time

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from .errors import UserError

console = Console()


def make_output_folder(path: str) -> None:
    """``os.makedirs(path, exist_ok=True)``, with a one-line error naming ``--output`` when it cannot be made."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:  # a file in the way, no permission, a read-only or virtual file system
        raise UserError(f"cannot create the output folder: {e.strerror or e}", path, "--output",
                        "pass a folder you can write to") from None


def check_writable_file(path: str, flag: str) -> None:
    """Before long work that ends in writing ``path``: its folder is made, and a folder where the file belongs, or
    a file where its folder belongs, is a one-line error naming ``flag``."""
    if os.path.isdir(path):
        raise UserError("a folder is where the file belongs", path, flag, "pass a file name")
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the file's folder: {e.strerror or e}", path, flag,
                        "pass a path you can write to") from None


class JsonLog:
    """One JSON object per line, appended; a no-op without a path (ranks other than 0).

    ``dllogger``: a second file that gets each event as NVIDIA's dllogger writes it (``DLLL {...}`` lines with
    timestamp, elapsed time, type, step and the numeric data), for tools that read NVIDIA's logs.
    """

    def __init__(self, path: str | None, dllogger: str | None = None):
        self.path, self.dllogger, self.t0 = path, dllogger, time.time()
        for p in (path, dllogger):
            if p:
                os.makedirs(os.path.dirname(os.path.abspath(p)), exist_ok=True)

    def write(self, **event) -> None:
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(event, default=float) + "\n")
        if self.dllogger:
            now = time.time()
            if event.get("event") == "start":
                step = "PARAMETER"
            elif "step" not in event:  # no training step (evaluating a detections file, effdet's weights): ()
                step = [event["epoch"]] if "epoch" in event else []  # as NVIDIA's validate.py logs
            else:  # (epoch, step) as NVIDIA's; a run-level event without an epoch (end, bn_frozen): (step,)
                step = [event["epoch"], event["step"]] if "epoch" in event else [event["step"]]
            data = {k: v for k, v in event.items() if isinstance(v, (int, float, str)) and k not in ("epoch", "step")}
            line = {"timestamp": now, "datetime": datetime.datetime.fromtimestamp(now).isoformat(),
                    "elapsedtime": now - self.t0, "type": "LOG", "step": step, "data": data}
            with open(self.dllogger, "a") as f:
                f.write("DLLL " + json.dumps(line, default=float) + "\n")


def stats_table(stats: dict, title: str) -> Table:
    """The 12 COCO numbers, per-class AP and, when computed, per-class AP at per-class IoU thresholds."""
    from datasets import STAT_NAMES

    t = Table(title=title)
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k in STAT_NAMES:
        if k in stats:
            t.add_row(k, f"{stats[k]:.4f}")
    for name, ap in stats.get("per_class", {}).items():
        t.add_row(f"AP {name}", f"{ap:.4f}")
    for name, ap in stats.get("per_class_iou", {}).items():
        t.add_row(f"AP@class-IoU {name}", f"{ap:.4f}")
    if "mAP_iou_by_class" in stats:
        t.add_row("AP@class-IoU mean", f"{stats['mAP_iou_by_class']:.4f}")
    return t


def waymo_table(stats: dict, iou_by_class: dict) -> Table:
    """Waymo's numbers as NVIDIA's README reports them: the mean, then each class's AP at its IoU."""
    t = Table(title="Waymo: per-class AP at the class's IoU (vehicle 0.7, pedestrian / cyclist 0.5)")
    t.add_column("category")
    t.add_column("AP", justify="right")
    t.add_row("mean (L2_ALL_NS mAP)", f"{stats['mAP_iou_by_class']:.4f}")
    for name, ap in stats["per_class_iou"].items():
        t.add_row(f"{name} @ IoU {iou_by_class[name]}", f"{ap:.4f}")
    return t


def progress(enabled: bool) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console,
                    disable=not enabled, transient=False)


def benchmark_phases(cfg) -> int:
    """--benchmark measures the training step as a run starts, with batch-statistics BN; a recipe that
    freezes BN (``cfg.freezes_bn``) spends most of its run in a cheaper step, which a second measurement of
    as many steps covers."""
    return 2 if cfg.freezes_bn else 1


def report_benchmark(times: list, cfg, jlog: JsonLog, info) -> dict:
    """``times``: (wall clock after the step, images) per step; img/s over the steps after warm-up, data
    loading included, as NVIDIA's ``--benchmark`` measures it. With two phases (``benchmark_phases``), the
    second --benchmark-steps steps are measured alone, as ``train_img_per_s_bn_frozen``."""
    first = times[:cfg.benchmark_steps]
    if len(first) < 3:  # every rank has the same steps: one says it, the others end without a figure
        if not info.is_main:
            return {}
        raise UserError(f"--benchmark needs at least 3 steps, got {len(first)}", None, "--max-steps",
                        "--max-steps or the end of the first epoch came first: raise --max-steps, or use more "
                        "training images or a smaller batch")
    where = f"{cfg.model}, batch {cfg.batch_size} x {info.world_size}, {info.device}"
    result = {}
    phases = [("train_img_per_s", "measured_steps", "BN with batch statistics", first)]
    if benchmark_phases(cfg) == 2:
        phases.append(("train_img_per_s_bn_frozen", "measured_steps_bn_frozen", "BN frozen",
                       times[cfg.benchmark_steps:]))
    for key, count_key, bn, steps in phases:
        if len(steps) < 3:  # only the BN-frozen phase can get here short: the first one was checked above
            if info.is_main:
                console.print(f"training throughput, {bn}: not measured ({len(steps)} steps, it needs 3: "
                              "--max-steps or the end of the first epoch came first)")
            continue
        warm = max(1, len(steps) // 5)
        dt = steps[-1][0] - steps[warm - 1][0]
        result[key] = sum(b for _, b in steps[warm:]) / max(dt, 1e-9)
        result[count_key] = len(steps) - warm
        if info.is_main:
            console.print(f"training throughput, {bn}: {result[key]:.2f} img/s over {len(steps) - warm} steps "
                          f"after {warm} warm-up steps ({where})")
    if info.is_main:
        jlog.write(event="benchmark", step=len(times), epoch=0, **result)
    return result
