#!/usr/bin/env python
"""Evaluate a checkpoint (ours, effdet's or NVIDIA's) on COCO-format data, or score a detections file.

Writes detections in COCO results format (image_id, category_id, bbox xywh in original pixels, score), prints
the 12 COCO stats and per-class AP as a table, and appends them as a JSON line to OUTPUT/eval.jsonl.
"""
import argparse
import json
import os
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("data", nargs="?", default=None, help="COCO-2017 root; default: the built-in synthetic set")
    p.add_argument("--checkpoint", default=None, help="default: output/best.pth, else output/last.pth")
    p.add_argument("--model", default=None, help="needed for effdet/NVIDIA checkpoints (ours record it)")
    p.add_argument("--num_classes", type=int, default=None)
    p.add_argument("--val-ann", default=None)
    p.add_argument("--val-images", default=None)
    p.add_argument("--waymo", action="store_true")
    p.add_argument("--waymo-val-annotation", default=None)
    p.add_argument("--waymo-val", default=None)
    p.add_argument("--waymo-iou", action="store_true",
                   help="also per-class AP at a per-class IoU (0.7 for vehicle classes, 0.5 for the others)")
    p.add_argument("--detections", default=None, help="score this COCO results file; no model is run")
    p.add_argument("--inference", action="store_true", help="write detections only, do not score")
    p.add_argument("-b", "--batch-size", type=int, default=8)
    p.add_argument("--input_size", type=int, nargs="+", default=None)
    p.add_argument("--use-ema", action="store_true", help="use the EMA weights of the checkpoint")
    p.add_argument("--amp", nargs="?", const="fp16", default=None, choices=["fp16", "bf16"])
    p.add_argument("--use-soft-nms", action="store_true", default=None)
    p.add_argument("--memory-format", choices=["nchw", "nhwc"], default="nchw")
    p.add_argument("--kernel-backend", choices=["auto", "triton", "torch"], default="auto")
    p.add_argument("--visualize", type=int, default=0, help="write N images with predicted and true boxes")
    p.add_argument("--output", default="output")
    p.add_argument("--device", default="auto")
    p.add_argument("-j", "--workers", type=int, default=2)
    p.add_argument("--skip-bad-images", action="store_true")
    args = p.parse_args(argv)
    if args.input_size is not None:
        args.input_size = args.input_size * 2 if len(args.input_size) == 1 else args.input_size[:2]
    return args


def main(argv=None):
    args = parse_args(argv)
    import torch

    import datasets as D
    from detector import checkpoint as ckpt
    from detector import engine
    from detector.configs import get_config
    from detector.model import EfficientDet

    if args.waymo:
        for flag in ("waymo_val_annotation", "waymo_val"):
            if not getattr(args, flag):
                raise SystemExit(f"--waymo needs --{flag.replace('_', '-')} (a path relative to the data root)")
        ann = os.path.join(args.data or ".", args.waymo_val_annotation)
        images = os.path.join(args.data or ".", args.waymo_val)
    elif args.val_ann:
        ann, images = args.val_ann, args.val_images or os.path.dirname(args.val_ann)
    elif args.data:
        ann, images = D.coco2017_paths(args.data, "val")
    else:
        syn = D.ensure_synthetic()
        ann, images = syn["val"]["ann_file"], syn["val"]["image_dir"]
    os.makedirs(args.output, exist_ok=True)
    gt = D.load_coco_json(ann)
    iou_by_class = None
    if args.waymo_iou:
        vehicle = {"vehicle", "car", "truck", "bus"}
        iou_by_class = {c["name"]: 0.7 if c["name"].lower() in vehicle else 0.5 for c in gt["categories"]}
    jlog = engine.JsonLog(os.path.join(args.output, "eval.jsonl"))

    if args.detections:
        dets = D.load_detections(args.detections)
        stats = D.evaluate_detections(gt, dets, iou_by_class=iou_by_class)
        engine.console.print(engine.stats_table(stats, f"{args.detections} on {len(gt['images'])} images"))
        jlog.write(event="eval", step=0, epoch=0, detections=args.detections, **stats)
        return 0

    use_cuda = torch.cuda.is_available() if args.device == "auto" else args.device.startswith("cuda")
    device = torch.device("cuda" if use_cuda else "cpu")
    dataset = D.CocoDetection(ann, images, skip_bad_images=args.skip_bad_images)
    path = args.checkpoint or next((os.path.join(args.output, f) for f in ("best.pth", "last.pth")
                                    if os.path.exists(os.path.join(args.output, f))), None)
    if path is None:
        raise SystemExit("no --checkpoint given and no output/best.pth or output/last.pth; train first "
                         "(python train.py) or pass --checkpoint")
    state = ckpt.read(path)
    cfg = state.get("config") if isinstance(state.get("config"), dict) else None
    name = args.model or (cfg or {}).get("name")
    if name is None:
        raise SystemExit(f"{path} does not record its model: pass --model (e.g. tf_efficientdet_d0)")
    sd, _ = ckpt.extract_state_dict(state)
    num_classes = args.num_classes or (cfg or {}).get("num_classes") or infer_num_classes(sd, dataset)
    size = args.input_size or (cfg or {}).get("image_size") or get_config(name).image_size
    # rebuild exactly what was trained: every recorded config field (BN eps included), size from the flag
    overrides = {k: v for k, v in (cfg or {}).items() if k not in ("name", "num_classes", "image_size", "extra")}
    model = EfficientDet(get_config(name, num_classes=num_classes, image_size=size, **overrides))
    model.set_backend(args.kernel_backend)
    engine.console.print(f"loaded {ckpt.load(model, state, use_ema=args.use_ema)}")
    model = model.to(device)
    if args.memory_format == "nhwc":
        model = model.to(memory_format=torch.channels_last)
    dataset.transform = D.EvalTransform(model.config.image_size)
    dataset.label_to_cat_id = class_to_category(state, num_classes, dataset)
    loader = D.build_loader(dataset, args.batch_size, train=False, workers=args.workers, seed=0)
    results, timing, pictures = engine.run_inference(
        model, loader, device, amp=args.amp, soft_nms=args.use_soft_nms,
        channels_last=args.memory_format == "nhwc", backend=args.kernel_backend, keep_images=args.visualize)
    out_json = os.path.join(args.output, "detections.json")
    with open(out_json, "w") as f:
        json.dump(results, f)
    engine.console.print(f"{len(results)} detections on {timing['images']} images -> {out_json} "
                         f"(inference {timing['img_per_s']:.1f} img/s, model + post-processing)")
    if args.visualize:
        paths = engine.save_pictures(dataset, pictures, os.path.join(args.output, "pictures"), dataset.class_names)
        engine.console.print(f"{len(paths)} pictures in {os.path.join(args.output, 'pictures')}")
    event = dict(event="eval", step=0, epoch=0, checkpoint=path, detections=out_json,
                 **{k: v for k, v in timing.items() if k != "image_ids"})
    if not args.inference:
        stats = D.evaluate_detections(gt, results, iou_by_class=iou_by_class, image_ids=timing["image_ids"])
        engine.console.print(engine.stats_table(stats, f"{os.path.basename(path)} on {len(dataset)} images"))
        event.update(stats)
    jlog.write(**event)
    return 0


def infer_num_classes(sd: dict, dataset) -> int:
    """Class count of a checkpoint that does not record it (effdet's, NVIDIA's): from its class head."""
    from detector import checkpoint as ckpt

    head = ckpt.head_classes(sd)
    if head is None:
        return dataset.num_classes
    if ckpt.is_nvidia(sd):  # NVIDIA pads to a multiple of 8: the real count is the data's, if it fits
        for c in (max(dataset.cat_ids), dataset.num_classes):
            if ckpt.nvidia_padded(c) == head:
                return c
        raise SystemExit(f"the NVIDIA checkpoint's class head has {head} (padded) classes; pass --num_classes")
    return head


def class_to_category(state: dict, num_classes: int, dataset) -> dict:
    """Class index -> category id. Ours record it; for others: contiguous over the data's categories when
    the counts agree, else the TF/effdet COCO convention (class i is category id i + 1)."""
    if "label_to_cat_id" in state:
        return {int(k): v for k, v in state["label_to_cat_id"].items()}
    if num_classes == dataset.num_classes:
        return dict(dataset.label_to_cat_id)
    if num_classes >= max(dataset.cat_ids):
        known = set(dataset.cat_ids)
        return {i: i + 1 for i in range(num_classes) if i + 1 in known}
    raise SystemExit(f"the checkpoint predicts {num_classes} classes, the data has {dataset.num_classes} categories "
                     f"with ids up to {max(dataset.cat_ids)}: no mapping between them is known")


if __name__ == "__main__":
    sys.exit(main())
