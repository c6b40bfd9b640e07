#!/usr/bin/env python
"""Evaluate a checkpoint (ours, effdet's or NVIDIA's) on COCO-format data, or score a detections file.

Writes detections in COCO results format (image_id, category_id, bbox xywh in original pixels, score), prints
the 12 COCO stats and per-class AP as a table (with ``--waymo``, Waymo's per-class AP too), and appends them
as a JSON line to OUTPUT/eval.jsonl. Flags follow NVIDIA's ``validate.py`` (``validate.py`` runs this script).
"""
import functools
import json
import numbers
import os
import sys

from training.config import (ann_flag, check_flag_ranges, check_image_flags, eval_data_paths, eval_parser, fill_color,
                             infra_lines, size_pair)
from training.errors import UserError, from_flag, naming, run


def main(argv=None):
    """Bad input ends in one ``error: ...`` line and exit status 2 (``--debug``: the traceback)."""
    return run(_main, argv)


def _main(argv):
    parser = eval_parser()
    args = parser.parse_args(argv)
    check_flag_ranges(args)
    from training.host import check_kernel_backend, default_workers, uses_cuda

    use_cuda = uses_cuda(args.device)
    if not args.detections:  # scoring a detections file runs no kernel
        check_kernel_backend(args.kernel_backend, use_cuda)
    if args.workers is None:
        args.workers = default_workers(cuda=use_cuda)
    if args.batch_size < 1:
        raise UserError(f"-b/--batch-size must be >= 1, got {args.batch_size}", None, "--batch-size",
                        "pass a batch size of 1 or more")
    if args.compile and args.torchscript:
        raise UserError("--compile and --torchscript both choose how the network runs", None, "--compile",
                        "pass one of them")
    size = None if args.detections else size_pair(args.input_size, args.model)  # no model, no size
    if args.images:  # a folder of images without annotations: detections and pictures only
        from training.images import infer_images

        return infer_images(args, default_checkpoint(args), size)
    import torch

    import datasets as D
    from training.evaluation import run_inference, save_pictures, waymo_iou_by_class
    from training.models import model_from_checkpoint, resolve_amp, to_memory_format
    from detector.checkpoint import read
    from training.runlog import JsonLog, check_writable_file, console, make_output_folder, stats_table, waymo_table

    @functools.cache
    def checkpoint() -> tuple[str, dict]:
        """(path, contents) of the checkpoint to evaluate, read once (its recorded flags, then its weights)
        when first needed: bad data named by the flags is reported first."""
        path = default_checkpoint(args)
        with from_flag("--checkpoint"):
            return path, read(path)

    check_image_flags(args)
    if args.waymo or args.val_ann or args.data:
        ann, images = eval_data_paths(args)
    else:
        ann, images = recorded_data_paths(args, checkpoint)
    fill = fill_color(args.fill_color)
    torch.manual_seed(args.seed)
    for line in infra_lines(args, parser.parse_args([])):
        console.print(f"[yellow]{line}[/]")
    make_output_folder(args.output)
    with from_flag(ann_flag(args, "val")):
        gt = D.load_coco_json(ann)
    scored = not args.inference and "test" not in args.anno  # test sets carry no boxes: detections only
    if scored and not gt["annotations"]:  # found before inference, not after it
        raise UserError("the annotation file has no annotations: AP is undefined", ann, "annotations",
                        "pass an annotation file with boxes, or --inference to write detections only")
    out_json = args.results or os.path.join(args.output, "detections.json")
    if not args.detections:
        check_writable_file(out_json, "--results")
    iou_by_class = waymo_iou_by_class(gt["categories"]) if args.waymo or args.waymo_iou else None
    jlog = JsonLog(os.path.join(args.output, "eval.jsonl"), dllogger=args.dllogger_file)

    def report(stats, title):
        console.print(stats_table(stats, title))
        if args.waymo:
            console.print(waymo_table(stats, iou_by_class))

    if args.detections:
        with from_flag("--detections"):
            dets = D.load_detections(args.detections)
        with naming(args.detections):  # an entry the annotation file does not know
            stats = D.evaluate_detections(gt, dets, iou_by_class=iou_by_class)
        report(stats, f"{args.detections} on {len(gt['images'])} images")
        jlog.write(event="eval", detections=args.detections, **stats)
        return 0

    device = torch.device("cuda" if use_cuda else "cpu")
    if not use_cuda:
        from training.host import tune_allocator

        tune_allocator()
    amp, note = resolve_amp(args.amp, use_cuda)
    if note:
        console.print(f"[yellow]{note}[/]")
    with from_flag(ann_flag(args, "val")):
        dataset = D.CocoDetection(ann, images, skip_bad_images=args.skip_bad_images)
    path, state = checkpoint()
    trained = trained_for(state)
    model, message, dataset.label_to_cat_id = model_from_checkpoint(
        path, dataset, args.model, args.num_classes, size, use_ema=args.use_ema, backend=args.kernel_backend,
        device=device, redundant_bias=args.redundant_bias, state=state)
    del state
    checkpoint.cache_clear()  # the model has its weights: the file's optimizer state and copies can go
    console.print(f"loaded {message}")
    channels_last = args.memory_format == "nhwc"
    model = to_memory_format(model, channels_last)
    dataset.transform = D.EvalTransform(model.config.image_size, fill=fill, interpolation=args.interpolation)
    loader = D.build_loader(dataset, args.batch_size, train=False, workers=args.workers, seed=0)
    results, timing, pictures = run_inference(
        model, loader, device, amp=amp, soft_nms=args.use_soft_nms, channels_last=channels_last,
        backend=args.kernel_backend, keep_images=args.visualize, torchscript=args.torchscript, compile=args.compile)
    with open(out_json, "w") as f:
        json.dump(results, f)
    console.print(f"{len(results)} detections on {timing['images']} images -> {out_json} "
                  f"(evaluation {timing['img_per_s']:.1f} img/s: loading, model, post-processing, conversion"
                  f"{'; TorchScript' if args.torchscript else ''}{'; torch.compile' if args.compile else ''})")
    # --skip-bad-images: missing files left the index when it was built, undecodable ones were never scored
    missing, undecodable = dataset.stats["image_missing"], len(dataset) - timing["images"]
    skipped = missing + undecodable
    if skipped:
        console.print(f"[yellow]{skipped} of {len(dataset) + missing} images left out (--skip-bad-images): "
                      f"{missing} missing, {undecodable} undecodable; scored over the other {timing['images']}[/]")
    if args.visualize:
        pics = save_pictures(dataset, pictures, os.path.join(args.output, "pictures"), dataset.class_names)
        console.print(f"{len(pics)} pictures in {os.path.join(args.output, 'pictures')}")
    event = dict(event="eval", **trained, checkpoint=path, use_ema=args.use_ema, annotations=ann,
                 detections=out_json, skipped_images=skipped,
                 **{k: v for k, v in timing.items() if k != "image_ids"})
    if scored:
        stats = D.evaluate_detections(gt, results, iou_by_class=iou_by_class, image_ids=timing["image_ids"])
        console.print(f"ground truth: {ann}")
        report(stats, f"{os.path.basename(path)}{' (EMA)' if args.use_ema else ''} on {timing['images']} images")
        event.update(stats)
    jlog.write(**event)
    return 0


def trained_for(state: dict) -> dict:
    """The training epoch and step the checkpoint ``state`` records (ours both, NVIDIA's the epoch), for the
    eval event; none recorded (effdet's, published weights): neither."""
    return {k: int(state[k]) for k in ("epoch", "step")
            if isinstance(state.get(k), numbers.Integral) and not isinstance(state[k], bool)}


def recorded_data_paths(args, checkpoint) -> tuple[str, str]:
    """No data flag: the val set the checkpoint's training run evaluated on (ours record their flags), else the
    built-in set (a checkpoint trained on it, effdet's, NVIDIA's, ``--pretrained``). A detections file has no
    record of its data: it needs ``--val-ann`` or DATA (scored against the built-in set, another set's
    detections would get a wrong AP without a word). ``checkpoint()``: (path, contents) of the checkpoint."""
    from types import SimpleNamespace

    from training.config import synthetic_paths, train_data_paths, train_parser, uses_builtin_data

    if args.detections:
        raise UserError("no ground truth to score the detections file against", args.detections, "--val-ann",
                        "pass --val-ann FILE (or DATA)")
    if args.pretrained and not args.checkpoint:
        return synthetic_paths("val")
    path, state = checkpoint()
    recorded = state.get("args")
    if not isinstance(recorded, dict):  # effdet's, NVIDIA's
        return synthetic_paths("val")
    flags = SimpleNamespace(**{**vars(train_parser().parse_args([])), **recorded})  # older files lack newer flags
    if uses_builtin_data(flags):
        return synthetic_paths("val")
    if flags.waymo:  # scored as training scored it: Waymo's per-class IoU
        args.waymo_iou = True
    paths = train_data_paths(flags).get("val")
    if paths is None:
        raise UserError("the checkpoint's run had no validation set to evaluate on", path, "--val-ann",
                        "pass DATA or --val-ann / --val-images")
    from training.runlog import console

    console.print(f"data: the validation set the checkpoint's run used, {paths[0]} (DATA or --val-ann for other data)")
    return paths


def default_checkpoint(args) -> str:
    """``--checkpoint``, else with ``--pretrained`` the published weights of ``--model`` (fetched once into the
    torch hub cache), else OUTPUT/best.pth, else OUTPUT/last.pth."""
    if args.pretrained and not args.checkpoint:
        from detector.pretrained import fetch

        if not args.model:
            raise UserError("--pretrained needs the model name", None, "--model",
                            "pass --model (e.g. tf_efficientdet_d0)")
        return fetch(args.model)
    path = args.checkpoint or next((os.path.join(args.output, f) for f in ("best.pth", "last.pth")
                                    if os.path.exists(os.path.join(args.output, f))), None)
    if path is None:
        raise UserError("no checkpoint to evaluate", args.output, "--checkpoint",
                        "train first (python train.py) or pass --checkpoint FILE")
    return path


if __name__ == "__main__":
    sys.exit(main())
