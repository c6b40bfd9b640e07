"""Evaluation-speed benchmark: our NMS against torchvision's, and evaluation against the model alone.

    python bench/evaluation.py [--device cpu|cuda] [--backend auto|torch|triton] [--threads N]
                               [--candidates 5000] [--nms-classes 90,1] [--iou 0.5]
                               [--model efficientdet_d0] [--size 128] [--batch 8] [--workers 0]
                               [--ann FILE --images DIR] [--checkpoint FILE] [--max-images N]
                               [--warmup N] [--iters N] [--no-nms] [--no-eval] [--quick]
                               [--results-dir bench/results]

Two parts, each timed *interleaved* (one call of each side in turn, ``--iters`` rounds after ``--warmup``) so
that load from other processes on a shared machine hits both sides alike:

* ``nms``  - ``kernels.batched_nms`` (``--backend``; on the CPU the plain-PyTorch reference) against
  ``torchvision.ops.batched_nms`` on the same ``--candidates`` boxes, for each ``--nms-classes`` entry:
  clustered boxes (60 clusters of jittered boxes in a 512 px image, like a detector's candidates), uniform
  random scores, random classes. The two kept lists are compared (they must be equal: the boxes are in
  general position, no tied scores).
* ``eval`` - ``training.evaluation.run_inference`` over a COCO-format set (default: the built-in synthetic
  validation split, ``datasets.ensure_synthetic()``) at ``--size``, batch ``--batch``: img/s from its wall
  time (data loading, the final copy and the COCO conversion included), beside ``detector.predict`` alone
  (model + post-processing, BN folded as ``run_inference`` does) on the same batches, loaded and normalized
  beforehand, and their ratio (predict img/s / eval img/s). Random weights unless ``--checkpoint``.

Prints a rich table and appends one JSON line per row to ``<results-dir>/eval-<device-slug>.jsonl`` with the
machine, commit and date. ``--quick``: tiny shapes for the tests (no warm-up, 2 NMS rounds and 1 evaluation
round, 300 candidates, ``--max-images 4``).
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

if str(Path(__file__).resolve().parent.parent) not in sys.path:  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.harness import append_jsonl, device_name, device_slug, git_commit, triton_version  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto",
                   help="kernel backend (auto: Triton on CUDA, the reference on the CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--candidates", type=int, default=None, help="NMS candidate boxes (default 5000)")
    p.add_argument("--nms-classes", default="90,1", help="comma-separated class counts for the NMS part")
    p.add_argument("--iou", type=float, default=0.5)
    p.add_argument("--model", default="efficientdet_d0")
    p.add_argument("--size", type=int, default=128, help="model input size of the evaluation part")
    p.add_argument("--batch", type=int, default=8, help="evaluation batch size")
    p.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    p.add_argument("--ann", default=None, help="COCO annotation file (default: the synthetic val split)")
    p.add_argument("--images", default=None, help="image folder of --ann")
    p.add_argument("--checkpoint", default=None, help="weights to evaluate (default: random weights)")
    p.add_argument("--max-images", type=int, default=None, help="evaluate only the first N images")
    p.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 1; --quick 0)")
    p.add_argument("--iters", type=int, default=None, help="timed rounds (default 5 for NMS, 3 for eval; --quick 2, 1)")
    p.add_argument("--no-nms", action="store_true")
    p.add_argument("--no-eval", action="store_true")
    p.add_argument("--quick", action="store_true", help="tiny shapes for the tests")
    p.add_argument("--results-dir", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    try:
        args.nms_class_counts = [int(c) for c in args.nms_classes.split(",") if c.strip()]
    except ValueError:
        p.error(f"--nms-classes must be comma-separated integers, got {args.nms_classes!r}")
    if any(c < 1 for c in args.nms_class_counts):
        p.error("--nms-classes: every class count must be >= 1")
    if (args.ann is None) != (args.images is None):
        p.error("--ann and --images go together")
    if args.size % 128:
        p.error(f"--size must be a multiple of 128 (the model's coarsest stride), got {args.size}")
    quick = args.quick
    args.candidates = args.candidates or (300 if quick else 5000)
    args.warmup = (0 if quick else 1) if args.warmup is None else args.warmup
    args.nms_iters = args.iters or (2 if quick else 5)
    args.eval_iters = args.iters or (1 if quick else 3)
    if quick and args.max_images is None:
        args.max_images = 4
    return args


# --------------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------------


def interleaved(fns: dict, device: torch.device, warmup: int, iters: int) -> dict[str, list[float]]:
    """``fns``: name -> callable returning the number of images it processed (or None). Returns name -> list of
    (seconds, images) per timed round; every side runs once per round, in turn."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out = {name: [] for name in fns}
    for rnd in range(warmup + max(1, iters)):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            n = fn()
            sync()
            if rnd >= warmup:
                out[name].append((time.perf_counter() - t0, n))
    return out


# --------------------------------------------------------------------------------------------------
# (a) NMS
# --------------------------------------------------------------------------------------------------


def nms_candidates(n: int, num_classes: int, device, seed: int = 0, size: float = 512.0):
    """Clustered candidate boxes like a detector's: 60 objects, each with jittered copies; random scores."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.rand(60, 2, generator=g) * size
    wh = torch.rand(60, 2, generator=g) * 100 + 10
    obj = torch.randint(0, 60, (n,), generator=g)
    ctr = centers[obj] + torch.randn(n, 2, generator=g) * 0.1 * wh[obj]
    half = wh[obj] * (1 + 0.2 * torch.randn(n, 2, generator=g)).clamp(min=0.3) / 2
    boxes = torch.cat([ctr - half, ctr + half], 1)
    scores = torch.rand(n, generator=g)
    classes = torch.randint(0, num_classes, (n,), generator=g)
    return boxes.to(device), scores.to(device), classes.to(device)


def nms_rows(args, device) -> list[dict]:
    import torchvision

    import kernels

    rows = []
    for c in args.nms_class_counts:
        boxes, scores, classes = nms_candidates(args.candidates, c, device)
        fns = {"ours": lambda: kernels.batched_nms(boxes, scores, classes, args.iou, backend=args.backend),
               "torchvision": lambda: torchvision.ops.batched_nms(boxes, scores, classes, args.iou)}
        same = torch.equal(fns["ours"]().cpu(), fns["torchvision"]().cpu())
        times = interleaved(fns, device, args.warmup, args.nms_iters)
        med = {k: statistics.median(t for t, _ in v) * 1e3 for k, v in times.items()}
        rows.append({"part": "nms", "case": f"{args.candidates} x {c} classes", "candidates": args.candidates,
                     "classes": c, "ours_ms": med["ours"], "reference_ms": med["torchvision"],
                     "reference": "torchvision.ops.batched_nms", "ratio": med["ours"] / med["torchvision"],
                     "same_result": same})
    return rows


# --------------------------------------------------------------------------------------------------
# (b) evaluation vs predict alone
# --------------------------------------------------------------------------------------------------


def eval_dataset(args):
    import datasets as D

    if args.ann is None:
        syn = D.ensure_synthetic()
        ann, images = syn["val"]["ann_file"], syn["val"]["image_dir"]
    else:
        ann, images = args.ann, args.images
    dataset = D.CocoDetection(ann, images)
    dataset.transform = D.EvalTransform(args.size)
    if args.max_images is not None:
        dataset = Subset(dataset, args.max_images)
    return dataset, ann


class Subset(torch.utils.data.Dataset):
    """The first ``n`` images of a CocoDetection, with the attributes run_inference reads."""

    def __init__(self, base, n: int):
        self.base, self.n = base, max(1, min(int(n), len(base)))
        self.label_to_cat_id = base.label_to_cat_id

    def __len__(self):
        return self.n

    def __getitem__(self, key):  # an index, or (index, epoch) from build_loader's sampler
        return self.base[key]


def eval_rows(args, device) -> list[dict]:
    import datasets as D
    from detector.fuse import fuse_for_inference
    from detector.model import create_model
    from detector.pipeline import predict
    from training.evaluation import run_inference

    dataset, ann = eval_dataset(args)
    base = getattr(dataset, "base", dataset)
    if args.checkpoint:
        from training.models import model_from_checkpoint

        model, _, base.label_to_cat_id = model_from_checkpoint(args.checkpoint, base, args.model, None,
                                                               (args.size, args.size), backend=args.backend,
                                                               device=device)
        dataset.label_to_cat_id = base.label_to_cat_id
    else:
        torch.manual_seed(0)
        model = create_model(args.model, num_classes=len(base.cat_ids), image_size=args.size,
                             backend=args.backend).to(device)
    model.eval()
    loader = D.build_loader(dataset, args.batch, train=False, workers=args.workers, seed=0)
    fused = fuse_for_inference(model)
    # the same batches, loaded and normalized beforehand: predict alone does the evaluation's model and
    # post-processing work (the candidates, hence the NMS cost, depend on the images) without the rest
    batches = [(b["images"], b["scale"], b["orig_size"].to(device) * b["scale"][:, None])
               for b in D.DevicePrefetcher(loader, device)]

    def evaluation():
        _, timing, _ = run_inference(model, loader, device, backend=args.backend, show_progress=False)
        return timing["images"]

    @torch.no_grad()
    def predict_alone():
        for images, scale, clip in batches:
            predict(fused, images, image_scale=scale, clip_size=clip, score_threshold=0.001, backend=args.backend)
        return sum(len(b[0]) for b in batches)

    times = interleaved({"evaluation": evaluation, "predict": predict_alone}, device, args.warmup, args.eval_iters)
    ips = {k: statistics.median(n / t for t, n in v) for k, v in times.items()}
    return [{"part": "eval", "case": f"{args.model} {args.size} px batch {args.batch}", "model": args.model,
             "size": args.size, "batch": args.batch, "images": times["evaluation"][0][1], "annotations": ann,
             "checkpoint": args.checkpoint, "eval_img_per_s": ips["evaluation"], "predict_img_per_s": ips["predict"],
             "ratio": ips["predict"] / ips["evaluation"]}]


# --------------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------------


def print_table(rows: list[dict], meta: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{meta['device']} | {meta['cpu_threads']} threads | torch {meta['torch']} | "
                    f"git {meta['git_commit'][:12]} | backend {meta['backend']} | {meta['date']}")
    for col in ("part", "case", "ours", "reference", "ratio", "note"):
        t.add_column(col)
    for r in rows:
        if r["part"] == "nms":
            t.add_row("nms", r["case"], f"{r['ours_ms']:.2f} ms", f"{r['reference_ms']:.2f} ms (torchvision)",
                      f"{r['ratio']:.2f}x time", "same kept boxes" if r["same_result"] else "KEPT BOXES DIFFER")
        else:
            t.add_row("eval", r["case"], f"{r['eval_img_per_s']:.2f} img/s (evaluation)",
                      f"{r['predict_img_per_s']:.2f} img/s (predict alone)", f"{r['ratio']:.2f}x",
                      f"{r['images']} images")
    Console().print(t)


def write_results(rows: list[dict], meta: dict, results_dir) -> Path:
    return append_jsonl(rows, meta, results_dir, f"eval-{meta['device_slug']}")


def run(args) -> list[dict]:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: CUDA is not available here (-, --device): pass --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = {"bench": "evaluation", "device": device_name(device), "device_type": device.type,
            "device_slug": device_slug(device), "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
            "triton": triton_version(), "git_commit": git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "backend": args.backend, "iou": args.iou, "warmup": args.warmup, "quick": bool(args.quick)}
    rows = []
    if not args.no_nms:
        rows += nms_rows(args, device)
    if not args.no_eval:
        rows += eval_rows(args, device)
    print_table(rows, meta)
    path = write_results(rows, meta, args.results_dir)
    print(f"results appended to {path}")
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":  # as evaluate.py runs (both sides of each comparison share the process)
        from training.host import tune_allocator

        tune_allocator()
    rows = run(args)
    return 1 if any(r["part"] == "nms" and not r["same_result"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
