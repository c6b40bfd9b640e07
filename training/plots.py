"""Pictures of a training run: the curves of its JSON-lines log, and detections drawn on images.

* :func:`plot_training` reads ``log.jsonl`` (the events ``training.runlog.JsonLog`` writes: ``"train"``
  events carry ``step``, ``loss``, ``cls_loss``, ``box_loss``, ``lr``; ``"eval"`` events carry ``step``,
  ``epoch``, ``AP``, ``AP50``, ...) and draws three panels with matplotlib: the loss parts per step, the
  learning rate per step, and validation AP / AP50 per evaluation. A field missing from some events, a
  truncated last line (a killed run) or a log without evaluations leaves gaps, never an error.
* :func:`draw_detections` draws predictions (coloured per class) and ground truth (white, dashed) with a
  filled tag ``class score`` (``GT class`` for ground truth) readable on any background.

    python -m training.plots runs/exp1/log.jsonl            # writes runs/exp1/curves.png
"""
from __future__ import annotations

import argparse
import json
import math
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128)]
GT_COLOUR = (255, 255, 255)
LOSS_FIELDS = (("loss", "total"), ("cls_loss", "class (focal)"), ("box_loss", "box (Huber)"))
AP_FIELDS = (("AP", "AP @[.5:.95]"), ("AP50", "AP @.5"))


# ------------------------------------------------------------------------------------------ curves
def read_log(path: str) -> list[dict]:
    """The events of a JSON-lines log; lines that are blank, cut short or not objects are skipped."""
    with open(path) as f:
        return parse_events(f)


def parse_events(lines) -> list[dict]:
    """The JSON objects among ``lines``; blank, cut-short or non-object lines are skipped."""
    events = []
    for line in lines:
        try:
            e = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(e, dict):
            events.append(e)
    return events


def _series(events: list[dict], kind: str, field: str) -> tuple[list[float], list[float]]:
    """(steps, values) of ``field`` over the ``kind`` events that have a finite step and value."""
    xs, ys = [], []
    for e in events:
        if e.get("event") != kind:
            continue
        x, y = e.get("step"), e.get(field)
        if isinstance(x, (int, float)) and isinstance(y, (int, float)) and math.isfinite(x) and math.isfinite(y):
            xs.append(float(x))
            ys.append(float(y))
    return xs, ys


def _panel(ax, lines, title: str, ylabel: str, log_y: bool = False, marker=None) -> None:
    drawn = False
    for (xs, ys), label in lines:
        if xs:
            ax.plot(xs, ys, label=label, marker=marker, linewidth=1.5)
            drawn = True
    ax.set_title(title)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if drawn:
        ax.legend(loc="best", fontsize="small")
        if log_y and all(min(ys) > 0 for (xs, ys), _ in lines if ys):
            ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no data in the log", ha="center", va="center", transform=ax.transAxes, color="gray")


def plot_training(log_path: str, out_path: str | None = None, title: str | None = None) -> str:
    """Draw the curves of ``log_path`` into ``out_path`` (default: ``curves.png`` beside the log)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    events = read_log(log_path)
    out_path = out_path or os.path.join(os.path.dirname(os.path.abspath(log_path)), "curves.png")
    fig = Figure(figsize=(15, 4.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_lr, ax_ap = fig.subplots(1, 3)
    _panel(ax_loss, [(_series(events, "train", f), name) for f, name in LOSS_FIELDS], "training loss", "loss",
           log_y=True)
    _panel(ax_lr, [(_series(events, "train", "lr"), "learning rate")], "learning rate", "learning rate")
    _panel(ax_ap, [(_series(events, "eval", f), name) for f, name in AP_FIELDS], "validation (COCO)",
           "average precision", marker="o")
    fig.suptitle(title or os.path.basename(os.path.dirname(os.path.abspath(log_path))) or "training")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.savefig(out_path)
    return out_path


# ------------------------------------------------------------------------------------------ detections
def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def _tag(draw: ImageDraw.ImageDraw, x: float, y: float, text: str, fill, font, bounds, below=False) -> None:
    """``text`` on a filled box just above (``below``: just under) the point (x, y), kept inside the image."""
    l, t, r, b = draw.textbbox((0, 0), text, font=font)
    w, h = r - l + 6, b - t + 4
    x = min(max(0.0, x), max(0.0, bounds[0] - w))
    if below:
        y = y if y + h <= bounds[1] else y - h
    else:
        y = y - h if y - h >= 0 else y  # above the box, else inside it
    y = min(max(0.0, y), max(0.0, bounds[1] - h))
    draw.rectangle([x, y, x + w, y + h], fill=fill)
    luminance = 0.299 * fill[0] + 0.587 * fill[1] + 0.114 * fill[2]
    draw.text((x + 3 - l, y + 2 - t), text, fill=(0, 0, 0) if luminance > 140 else (255, 255, 255), font=font)


def _dashed_rect(draw, box, colour, width: int, dash: int = 6) -> None:
    x1, y1, x2, y2 = box
    for (ax, ay, bx, by) in ((x1, y1, x2, y1), (x2, y1, x2, y2), (x2, y2, x1, y2), (x1, y2, x1, y1)):
        n = max(1, int(math.hypot(bx - ax, by - ay) // dash))
        for i in range(0, n, 2):
            t0, t1 = i / n, min(1.0, (i + 1) / n)
            draw.line([ax + (bx - ax) * t0, ay + (by - ay) * t0, ax + (bx - ax) * t1, ay + (by - ay) * t1],
                      fill=colour, width=width)


def _name(c: int, class_names) -> str:
    return class_names[c] if class_names is not None and 0 <= c < len(class_names) else str(c)


def draw_detections(image, detections, gt_boxes=None, gt_labels=None, class_names=None,
                    min_score: float = 0.3) -> Image.Image:
    """``image`` uint8 HWC array (or PIL image); ``detections`` rows ``[x1, y1, x2, y2, score, class]`` in its
    pixels (class -1 = empty row); ``gt_boxes (M, 4)`` xyxy and ``gt_labels (M,)`` (negative = padding or
    crowd, drawn without a name). Returns an RGB PIL image."""
    im = image.convert("RGB") if isinstance(image, Image.Image) else \
        Image.fromarray(np.ascontiguousarray(image)).convert("RGB")
    draw = ImageDraw.Draw(im)
    W, H = im.size
    font = _font(max(11, min(W, H) // 40))
    width = max(2, min(W, H) // 250)
    gt = np.asarray(gt_boxes if gt_boxes is not None else np.zeros((0, 4)), dtype=np.float64).reshape(-1, 4)
    labels = np.asarray(gt_labels if gt_labels is not None else -np.ones(len(gt)), dtype=np.int64).reshape(-1)
    for box, c in zip(gt, labels):
        _dashed_rect(draw, box.tolist(), GT_COLOUR, width)
        text = f"GT {_name(int(c), class_names)}" if c >= 0 else "GT"
        _tag(draw, box[0], box[3], text, GT_COLOUR, font, (W, H), below=True)
    dets = np.asarray(detections if detections is not None else np.zeros((0, 6)), dtype=np.float64).reshape(-1, 6)
    for x1, y1, x2, y2, s, c in dets[np.argsort(dets[:, 4], kind="stable")]:  # best drawn last, on top
        if c < 0 or not s >= min_score:
            continue
        colour = PALETTE[int(c) % len(PALETTE)]
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=width)
        _tag(draw, x1, y1, f"{_name(int(c), class_names)} {s:.2f}", colour, font, (W, H))
    return im


def check_plot_path(path: str) -> None:
    """``--output`` names a file whose suffix is a format matplotlib writes (without one it would append
    ``.png`` and write another file than the one named); its folder is made."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .errors import UserError
    from .runlog import check_writable_file

    formats = sorted(FigureCanvasAgg(Figure()).get_supported_filetypes())
    suffix = os.path.splitext(path)[1].lower().lstrip(".")
    if suffix not in formats and not os.path.isdir(path):  # (a folder: said as such below)
        raise UserError(f"{'no' if not suffix else f'the {suffix!r}'} file format: it is one of {', '.join(formats)}",
                        path, "--output", "pass a file name ending in .png (or .pdf, .svg)")
    check_writable_file(path, "--output")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.plots", description="Draw the curves of a training log.")
    p.add_argument("log", help="log.jsonl of a run")
    p.add_argument("--output", default=None, help="PNG to write (default: curves.png beside the log)")
    p.add_argument("--debug", action="store_true", help="a traceback instead of the one-line error")
    args = p.parse_args(argv)
    from .errors import UserError, run

    def draw(_):
        if not os.path.isfile(args.log):
            raise UserError("no such log file" if not os.path.exists(args.log) else "a folder, not a log file",
                            args.log, "log", "pass a run's OUTPUT/log.jsonl")
        try:
            events = read_log(args.log)
        except UnicodeDecodeError:
            events = [{}]
        if events and not any("event" in e for e in events):  # (an empty log, of a run just begun: "no data")
            raise UserError("not a run's log: no line has an event", args.log, "event",
                            "pass a run's OUTPUT/log.jsonl")
        if args.output is not None:
            check_plot_path(args.output)
        print(plot_training(args.log, args.output))
        return 0

    return run(draw, argv)


if __name__ == "__main__":
    raise SystemExit(main())
