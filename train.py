#!/usr/bin/env python
"""Train EfficientDet. Flags follow NVIDIA's EfficientDet-PyTorch ``train.py``.

With no data flags it trains on the built-in synthetic data set (generated on first use), so
``python train.py`` shows the whole loop on any machine. Flags left unset take NVIDIA's COCO recipe, or,
for a training set under 5,000 images, the small-data recipe (see ``detector/engine.py``: SMALL_RECIPE).
"""
import argparse
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("data", nargs="?", default=None, help="COCO-2017 root (annotations/, train2017/, val2017/)")
    d.add_argument("--train-ann", default=None, help="COCO-format annotation file for training")
    d.add_argument("--train-images", default=None, help="image folder for --train-ann")
    d.add_argument("--val-ann", default=None, help="COCO-format annotation file for validation")
    d.add_argument("--val-images", default=None, help="image folder for --val-ann")
    d.add_argument("--waymo", action="store_true", help="Waymo converted to COCO format (paths relative to data)")
    d.add_argument("--waymo-train-annotation", default=None)
    d.add_argument("--waymo-val-annotation", default=None)
    d.add_argument("--waymo-train", default=None)
    d.add_argument("--waymo-val", default=None)
    d.add_argument("--skip-bad-images", action="store_true", help="skip and count missing or corrupt images")
    d.add_argument("-j", "--workers", type=int, default=2, help="data loader worker processes")
    m = p.add_argument_group("model")
    m.add_argument("--model", default="efficientdet_d0")
    m.add_argument("--num_classes", type=int, default=None, help="default: the data set's category count")
    m.add_argument("--input_size", type=int, nargs="+", default=None, help="image size (H [W]); default per recipe")
    m.add_argument("--redundant-bias", dest="redundant_bias", action="store_true", default=None)
    m.add_argument("--no-redundant-bias", dest="redundant_bias", action="store_false")
    m.add_argument("--pretrained-backbone-path", default=None)
    m.add_argument("--initial-checkpoint", default=None, help="ours, effdet's or NVIDIA's checkpoint")
    m.add_argument("--remove-weights", nargs="*", default=None, help="re-initialize the class head")
    m.add_argument("--freeze-layers", nargs="*", default=None, help="parameter name prefixes to freeze")
    m.add_argument("--drop-path", type=float, default=None, help="backbone stochastic-depth rate (default: config)")
    m.add_argument("--memory-format", choices=["nchw", "nhwc"], default=None, help="default: per recipe")
    m.add_argument("--fused-focal-loss", dest="kernel_backend", action="store_const", const="triton",
                   default="auto", help="force the Triton kernels (default: auto = Triton on CUDA)")
    m.add_argument("--kernel-backend", dest="kernel_backend", choices=["auto", "triton", "torch"])
    o = p.add_argument_group("optimization (unset = recipe default)")
    o.add_argument("-b", "--batch-size", type=int, default=None)
    o.add_argument("-vb", "--validation-batch-size-multiplier", type=int, default=1)
    o.add_argument("--opt", default=None, help="momentum (default), sgd/nesterov, adam, adamw")
    o.add_argument("--opt-eps", type=float, default=1e-3)
    o.add_argument("--momentum", type=float, default=0.9)
    o.add_argument("--weight-decay", type=float, default=None)
    o.add_argument("--clip-grad", type=float, default=10.0)
    o.add_argument("--lr", type=float, default=None)
    o.add_argument("--sched", choices=["cosine", "step"], default="cosine")
    o.add_argument("--warmup-lr", type=float, default=1e-4)
    o.add_argument("--warmup-epochs", type=float, default=None)
    o.add_argument("--min-lr", type=float, default=1e-5)
    o.add_argument("--decay-epochs", type=int, default=30)
    o.add_argument("--decay-rate", "--dr", type=float, default=0.1)
    o.add_argument("--epochs", type=int, default=None)
    o.add_argument("--start-epoch", type=int, default=None)
    o.add_argument("--smoothing", type=float, default=0.0, help="label smoothing of the focal loss")
    o.add_argument("--model-ema", action="store_true", default=None)
    o.add_argument("--no-model-ema", dest="model_ema", action="store_false")
    o.add_argument("--model-ema-decay", type=float, default=None)
    o.add_argument("--amp", nargs="?", const="fp16", default=None, choices=["fp16", "bf16"],
                   help="mixed precision: fp16 with a GradScaler (default) or bf16")
    o.add_argument("--max-nonfinite-steps", type=int, default=5, help="stop after this many NaN losses in a row")
    r = p.add_argument_group("run")
    r.add_argument("--seed", type=int, default=42)
    r.add_argument("--device", default="auto", help="auto, cpu or cuda")
    r.add_argument("--nproc", type=int, default=1, help="start this many worker processes (NCCL/gloo)")
    r.add_argument("--sync-bn", action="store_true")
    r.add_argument("--output", default="output", help="folder for checkpoints, log.jsonl, pictures")
    r.add_argument("--resume", nargs="?", const="auto", default=None, help="checkpoint (default: OUTPUT/last.pth)")
    r.add_argument("--no-resume-opt", action="store_true")
    r.add_argument("--log-interval", type=int, default=10)
    r.add_argument("--eval-after", type=int, default=0, help="evaluate only after this many epochs")
    r.add_argument("--eval-interval", type=int, default=None, help="epochs between evaluations")
    r.add_argument("--save-checkpoint-interval", type=int, default=10)
    r.add_argument("--benchmark", action="store_true", help="measure training img/s and exit")
    r.add_argument("--benchmark-steps", type=int, default=20)
    r.add_argument("--stop-after", type=int, default=None, help="stop after N epochs of this run (as if interrupted)")
    r.add_argument("--pictures", type=int, default=None, help="detection pictures written at the end")
    args = p.parse_args(argv)
    if args.input_size is not None:
        args.input_size = args.input_size * 2 if len(args.input_size) == 1 else args.input_size[:2]
    args.scale_range = None
    args.ema_warmup = None
    args.bn_momentum = None
    return args


def main(argv=None):
    args = parse_args(argv)
    args._t0 = time.perf_counter()
    from detector import distributed, engine

    if args.nproc > 1:
        distributed.spawn(args.nproc, engine.train, args)
    else:
        engine.train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
