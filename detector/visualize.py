"""Pictures of detections: predicted boxes (coloured per class, with scores) and ground truth (white)."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128)]


def draw_detections(image: np.ndarray, detections, gt_boxes=None, class_names=None, min_score: float = 0.3):
    """``image`` uint8 HWC; ``detections`` rows ``[x1, y1, x2, y2, score, class]`` in its pixels."""
    im = Image.fromarray(np.ascontiguousarray(image)).convert("RGB")
    d = ImageDraw.Draw(im)
    for b in (gt_boxes if gt_boxes is not None else []):
        d.rectangle([float(v) for v in b[:4]], outline=(255, 255, 255), width=1)
    for x1, y1, x2, y2, s, c in np.asarray(detections, dtype=np.float64).reshape(-1, 6):
        if c < 0 or s < min_score:
            continue
        colour = PALETTE[int(c) % len(PALETTE)]
        d.rectangle([x1, y1, x2, y2], outline=colour, width=2)
        name = class_names[int(c)] if class_names and int(c) < len(class_names) else str(int(c))
        d.text((x1 + 2, y1 + 1), f"{name} {s:.2f}", fill=colour)
    return im


def plot_curve(xs, series: dict, path: str, title: str = "", size=(640, 400)) -> None:
    """A small line chart with pillow only (no matplotlib at run time): one line per named series."""
    w, h = size
    im = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(im)
    left, right, top, bottom = 60, w - 20, 30, h - 40
    d.rectangle([left, top, right, bottom], outline="black")
    ys = [v for vals in series.values() for v in vals if np.isfinite(v)]
    if not xs or not ys:
        d.text((left + 10, top + 10), "no data", fill="black")
        im.save(path)
        return
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
    px = lambda x: left + (x - x0) / (x1 - x0) * (right - left)  # noqa: E731
    py = lambda y: bottom - (y - y0) / (y1 - y0) * (bottom - top)  # noqa: E731
    for i, (name, vals) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        pts = [(px(x), py(y)) for x, y in zip(xs, vals) if np.isfinite(y)]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        d.text((left + 10 + 120 * i, bottom + 20), name, fill=colour)
    d.text((left, 8), title, fill="black")
    d.text((4, top), f"{y1:.3g}", fill="black")
    d.text((4, bottom - 10), f"{y0:.3g}", fill="black")
    d.text((left, bottom + 4), f"{x0:g}", fill="black")
    d.text((right - 40, bottom + 4), f"{x1:g}", fill="black")
    im.save(path)
