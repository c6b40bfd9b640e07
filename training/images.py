"""``evaluate.py --images DIR_OR_GLOB``: the detector on a folder of images that has no annotation file.

Every image found (a folder is searched recursively; a glob may use ``**``) is read with its EXIF orientation
applied and converted to RGB (grayscale, RGBA and palette images included), resized by the evaluation
transform, run through the model and its post-processing in batches, and written to OUTPUT/detections.json
as COCO-style results with the file name and class name added::

    {"file_name": "sub/a.jpg", "image_id": 3, "category_id": 1, "category_name": "cat",
     "bbox": [x, y, w, h] (original pixels), "score": 0.87}

``--visualize N`` draws the first N images with their detections into OUTPUT/pictures/. A file that cannot be
decoded is skipped and counted; the count is printed.
"""
from __future__ import annotations

import glob
import json
import os
import time

import numpy as np
import torch

from .errors import UserError, from_flag
from .host import uses_cuda

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def find_images(spec: str) -> tuple[list[str], str]:
    """(sorted image paths, the folder file names are relative to) for a folder, a file, or a glob pattern."""
    if os.path.isdir(spec):
        root = spec
        paths = [os.path.join(d, f) for d, _, files in os.walk(spec) for f in files
                 if f.lower().endswith(IMAGE_SUFFIXES)]
    elif os.path.isfile(spec):  # taken as named, even where its name reads as a pattern ("img [1].jpg")
        paths, root = [spec], os.path.dirname(spec) or "."
    else:
        paths = [p for p in glob.glob(spec, recursive=True) if os.path.isfile(p)]
        root = os.path.dirname(spec.split("*")[0].split("?")[0].split("[")[0]) or "."
    if not paths:
        raise UserError("no image files found", spec, "--images",
                        f"pass a folder holding {', '.join(IMAGE_SUFFIXES[:4])} ... files, or a glob such as "
                        "'photos/**/*.jpg' (quoted)")
    return sorted(paths), root


def read_image(path: str) -> np.ndarray:
    """uint8 (H, W, 3) RGB, upright as the EXIF orientation says, converted as training reads its images
    (``datasets.coco.rgb_array``: alpha dropped, 16-bit gray scaled)."""
    from PIL import Image, ImageOps

    from datasets.coco import rgb_array

    with Image.open(path) as im:
        return np.ascontiguousarray(rgb_array(ImageOps.exif_transpose(im)))


class ImageFolder(torch.utils.data.Dataset):
    """Samples as the evaluation transform wants them (no boxes); a file that fails to decode yields
    ``{"bad": path, "error": text}`` instead, so one corrupt file does not stop the run."""

    def __init__(self, paths: list[str], transform):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        path = self.paths[index]
        try:
            image = read_image(path)
        except Exception as e:  # PIL raises OSError, UnidentifiedImageError, SyntaxError, ValueError, ...
            return {"bad": path, "error": f"{type(e).__name__}: {e}"}
        sample = {"image": image, "boxes": np.zeros((0, 4), np.float32), "labels": np.zeros((0,), np.int64),
                  "image_id": index, "orig_size": image.shape[:2], "scale": 1.0}
        return self.transform(sample, index=index)


def collate_skipping_bad(samples: list[dict]) -> dict:
    from datasets import collate

    good = [s for s in samples if "bad" not in s]
    batch = collate(good) if good else {}
    batch["bad"] = [(s["bad"], s["error"]) for s in samples if "bad" in s]
    return batch


def category_names(state: dict, label_to_cat_id: dict) -> dict:
    """Category id -> name: from the checkpoint's class names when it has them, else the id as text."""
    names = state.get("class_names") or []
    out = {}
    for label, cat in label_to_cat_id.items():
        out[int(cat)] = names[int(label)] if int(label) < len(names) else str(cat)
    return out


class _NoData:
    """Stands in for an annotated data set where ``model_from_checkpoint`` asks for one: the categories the
    checkpoint records, else 1..N."""

    def __init__(self, num_classes: int, recorded: dict | None = None):
        self.ann_file = None
        self.label_to_cat_id = ({int(k): int(v) for k, v in recorded.items()} if recorded
                                else {i: i + 1 for i in range(num_classes)})
        self.cat_ids = sorted(set(self.label_to_cat_id.values()))
        self.num_classes = num_classes


def picture_names(paths: list[str], root: str) -> list[str]:
    """One distinct ``.png`` name per image: its path under ``root`` with the folders joined by ``_`` and its
    own extension kept (``a/b.jpg`` -> ``a_b.jpg.png``), numbered where two would still collide."""
    names, used = [], set()
    for p in paths:
        stem = os.path.relpath(p, root).replace(os.sep, "_")
        name, n = f"{stem}.png", 1
        while name in used:
            n += 1
            name = f"{stem}-{n}.png"
        used.add(name)
        names.append(name)
    return names


@torch.no_grad()
def infer_images(args, checkpoint: str, size: tuple[int, int] | None) -> int:
    """What ``evaluate.py --images`` runs with ``checkpoint`` (evaluate.py's default one when no flag names
    one) at input ``size`` (``--input_size`` as checked by ``training.config.size_pair``; None: the
    checkpoint's); returns the exit status."""
    from datasets import DevicePrefetcher, EvalTransform, to_coco_results
    from detector import checkpoint as ckpt
    from detector.pipeline import predict

    from .config import fill_color
    from .evaluation import autocast, inference_network
    from .models import model_from_checkpoint, resolve_amp, to_memory_format
    from .plots import draw_detections
    from .runlog import console, make_output_folder, progress

    if args.detections or args.inference or args.data or args.val_ann or args.waymo:
        raise UserError("--images cannot be combined with annotated-data flags", args.images, "--images",
                        "drop --detections/--inference/--val-ann/--waymo/DATA, or drop --images to score a data set")
    paths, root = find_images(args.images)
    use_cuda = uses_cuda(args.device)
    device = torch.device("cuda" if use_cuda else "cpu")
    amp, note = resolve_amp(args.amp, use_cuda)
    if note:
        console.print(f"[yellow]{note}[/]")
    with from_flag("--checkpoint"):
        state = ckpt.read(checkpoint)
    recorded = state.get("config", {}).get("num_classes") if isinstance(state.get("config"), dict) else None
    stand_in = _NoData(args.num_classes or recorded or ckpt.head_classes(ckpt.extract_state_dict(state)[0]) or 90,
                       state.get("label_to_cat_id") if isinstance(state.get("label_to_cat_id"), dict) else None)
    model, message, label_to_cat_id = model_from_checkpoint(
        checkpoint, stand_in, args.model, args.num_classes, size, use_ema=args.use_ema, backend=args.kernel_backend,
        device=device, state=state)
    console.print(f"loaded {message}")
    names = category_names(state, label_to_cat_id)
    channels_last = args.memory_format == "nhwc"
    image_size, num_classes = model.config.image_size, model.config.num_classes
    model = inference_network(to_memory_format(model, channels_last), device, amp, args.torchscript, args.compile)
    dataset = ImageFolder(paths, EvalTransform(image_size, fill=fill_color(args.fill_color),
                                               interpolation=args.interpolation))
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=False,
                                         num_workers=args.workers, collate_fn=collate_skipping_bad)
    normalize = DevicePrefetcher(loader, device, channels_last=channels_last).normalize
    results, bad, pictures, n_images, t_model = [], [], [], 0, 0.0
    make_output_folder(args.output)
    with progress(True) as bar:
        task = bar.add_task("images", total=len(paths), info="")
        for batch in loader:
            bad += batch["bad"]
            if "images" not in batch:
                bar.update(task, advance=len(batch["bad"]))
                continue
            t0 = time.perf_counter()
            images = normalize(batch["images"].to(device))
            scale = batch["scale"].to(device)
            with autocast(device, amp):
                dets = predict(model, images, image_scale=scale,
                               clip_size=batch["orig_size"].to(device) * scale[:, None],
                               soft_nms=args.use_soft_nms, score_threshold=0.001, backend=args.kernel_backend)
            dets = dets.float().cpu()
            t_model += time.perf_counter() - t0
            n_images += dets.shape[0]
            found = to_coco_results(dets[:, :, :4], dets[:, :, 4], dets[:, :, 5].long(), batch["image_id"],
                                    torch.ones(dets.shape[0]), label_to_cat_id, orig_sizes=batch["orig_size"])
            for r in found:
                r["file_name"] = os.path.relpath(paths[r["image_id"]], root)
                r["category_name"] = names.get(r["category_id"], str(r["category_id"]))
            results += found
            for i in range(min(args.visualize - len(pictures), dets.shape[0])):
                pictures.append((int(batch["image_id"][i]), dets[i].numpy()))
            bar.update(task, advance=dets.shape[0] + len(batch["bad"]),
                       info=f"{n_images / max(t_model, 1e-9):.1f} img/s")
    if n_images == 0:  # every file failed to decode
        raise UserError(f"none of the {len(paths)} image file(s) could be decoded; first: {bad[0][1]}", bad[0][0],
                        "--images", "pass image files PIL can read (jpg, png, ...)")
    out_json = os.path.join(args.output, "detections.json")
    with open(out_json, "w") as f:
        json.dump(results, f)
    console.print(f"{len(results)} detections on {n_images} images -> {out_json} "
                  f"(inference {n_images / max(t_model, 1e-9):.1f} img/s, model + post-processing)")
    if bad:
        console.print(f"[yellow]{len(bad)} image file(s) could not be decoded and were skipped; first: "
                      f"{bad[0][0]} ({bad[0][1]})[/]")
    if pictures:
        folder = os.path.join(args.output, "pictures")
        os.makedirs(folder, exist_ok=True)
        label_names = [names.get(label_to_cat_id.get(c), str(c)) for c in range(num_classes)]
        files = picture_names(paths, root)
        for iid, d in pictures:
            draw_detections(read_image(paths[iid]), d, class_names=label_names).save(os.path.join(folder, files[iid]))
        console.print(f"{len(pictures)} pictures in {folder}")
    return 0
