"""Every setting of a training run: the flags (NVIDIA's names), the two recipes, and ``TrainConfig``.

``train_parser()`` parses the command line; ``TrainConfig.from_args(args, num_train)`` turns the parsed flags
into one frozen dataclass, once, after the training set is known (the recipe depends on its size). Nothing
else reads the argparse namespace.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass

# ---------------------------------------------------------------- recipes (data, not code)
# Flags left unset take one of these. NVIDIA's COCO recipe is its train.py defaults.
COCO_RECIPE = dict(opt="momentum", lr=0.01, batch_size=32, epochs=300, warmup_epochs=1.0, weight_decay=4e-5,
                   model_ema=False, model_ema_decay=0.9998, ema_warmup=False, scale_range=(0.1, 2.0),
                   input_size=None, bn_momentum=None, eval_interval=1, pictures=0, memory_format="nchw")
# Small data from scratch on a CPU: AdamW converges far faster than SGD there; a gentler scale jitter and a
# reduced input size give many more useful steps per minute; a short EMA with warm-up and fast BN statistics
# make the averaged model usable after a few hundred steps.
SMALL_RECIPE = dict(opt="adamw", lr=2e-3, batch_size=16, epochs=30, warmup_epochs=0.5, weight_decay=1e-2,
                    model_ema=True, model_ema_decay=0.995, ema_warmup=True, scale_range=(0.6, 1.4),
                    input_size=(128, 128), bn_momentum=0.1, eval_interval=5, pictures=4, memory_format="nhwc")
# the small-data recipe applies below this many training images, when training starts from scratch
SMALL_DATA_IMAGES = 5000


def size_pair(size) -> tuple[int, int] | None:
    """``--input_size H [W]`` -> (H, W)."""
    if size is None:
        return None
    size = list(size)
    return (size[0], size[0]) if len(size) == 1 else (size[0], size[1])


# ---------------------------------------------------------------- flags
def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train.py", description="Train EfficientDet. Flags follow NVIDIA's EfficientDet-PyTorch train.py.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    add_script_flags(p)
    return p


def eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evaluate.py", description="Evaluate a checkpoint (ours, effdet's or NVIDIA's) on COCO-format data, or score a detections file.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    add_script_flags(p, images=True)
    return p


def add_script_flags(p: argparse.ArgumentParser, images: bool = False) -> None:
    """Flags of issue 11: ``--debug`` for both scripts; ``--images`` (inference on a folder) for evaluate.py."""
    p.add_argument("--debug", action="store_true",
                   help="show the traceback of a bad-input error (also: environment variable EFFDET_DEBUG=1)")
    if images:
        p.add_argument("--images", default=None, metavar="DIR_OR_GLOB",
                       help="run the model on every image in a folder (recursively) or matching a glob, no "
                            "annotations needed: OUTPUT/detections.json with file names, --visualize N pictures")


# ---------------------------------------------------------------- the run's settings
@dataclass(frozen=True)
class TrainConfig:
    """All settings of one training run; recipe values already filled in."""

    # data
    data: str | None = None
    train_ann: str | None = None
    train_images: str | None = None
    val_ann: str | None = None
    val_images: str | None = None
    waymo: bool = False
    waymo_train_annotation: str | None = None
    waymo_val_annotation: str | None = None
    waymo_train: str | None = None
    waymo_val: str | None = None
    skip_bad_images: bool = False
    workers: int = 2
    # model
    model: str = "efficientdet_d0"
    num_classes: int | None = None
    input_size: tuple[int, int] | None = None
    redundant_bias: bool | None = None
    pretrained_backbone_path: str | None = None
    initial_checkpoint: str | None = None
    remove_weights: list[str] | None = None
    freeze_layers: list[str] | None = None
    drop_path: float | None = None
    bn_momentum: float | None = None
    memory_format: str = "nchw"
    kernel_backend: str = "auto"
    # optimization
    batch_size: int = 32
    validation_batch_size_multiplier: int = 1
    opt: str = "momentum"
    opt_eps: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 4e-5
    clip_grad: float = 10.0
    lr: float = 0.01
    sched: str = "cosine"
    warmup_lr: float = 1e-4
    warmup_epochs: float = 1.0
    min_lr: float = 1e-5
    decay_epochs: int = 30
    decay_rate: float = 0.1
    epochs: int = 300
    start_epoch: int | None = None
    smoothing: float = 0.0
    model_ema: bool = False
    model_ema_decay: float = 0.9998
    ema_warmup: bool = False
    scale_range: tuple[float, float] = (0.1, 2.0)
    amp: str | None = None
    max_nonfinite_steps: int = 5
    # run
    seed: int = 42
    device: str = "auto"
    nproc: int = 1
    sync_bn: bool = False
    output: str = "output"
    resume: str | None = None
    no_resume_opt: bool = False
    log_interval: int = 10
    eval_after: int = 0
    eval_interval: int = 1
    save_checkpoint_interval: int = 10
    benchmark: bool = False
    benchmark_steps: int = 20
    stop_after: int | None = None
    pictures: int = 0
    debug: bool = False
    # which recipe filled the unset flags
    recipe: str = "NVIDIA COCO recipe"

    @classmethod
    def from_args(cls, args: argparse.Namespace, num_train: int) -> "TrainConfig":
        """The flags, with the recipe's value for every flag left unset (``None``)."""
        values = dict(vars(args))
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:  # a flag without a field would be silently ignored
            raise TypeError(f"TrainConfig has no field for the flags {sorted(unknown)}")
        values["input_size"] = size_pair(values["input_size"])
        from_scratch = not (values["initial_checkpoint"] or values["pretrained_backbone_path"])
        small = num_train < SMALL_DATA_IMAGES and from_scratch
        recipe = SMALL_RECIPE if small else COCO_RECIPE
        for k, v in recipe.items():
            if values.get(k) is None:
                values[k] = v
        values["recipe"] = "small-data recipe (training/config.py SMALL_RECIPE)" if small else "NVIDIA COCO recipe"
        if values["log_interval"] < 1:
            from .errors import UserError

            raise UserError(f"--log-interval must be >= 1, got {values['log_interval']}", None, "--log-interval",
                            "pass --log-interval 1 or more")
        return cls(**values)

    @property
    def channels_last(self) -> bool:
        return self.memory_format == "nhwc"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- where the data is
def split_paths(split: str, data: str | None, ann: str | None = None, images: str | None = None,
                waymo: bool = False, waymo_ann: str | None = None, waymo_images: str | None = None):
    """(annotation file, image folder) of ``split`` ("train" or "val"), or None when no flag names it.

    The one place that knows the layouts: ``--waymo`` (``--waymo-{split}-annotation`` and ``--waymo-{split}``,
    relative to the data root unless absolute, as NVIDIA's scripts pass them), ``--{split}-ann`` with an
    optional image folder, or a COCO-2017 root.
    """
    import datasets as D

    if waymo:
        for flag, value in ((f"--waymo-{split}-annotation", waymo_ann), (f"--waymo-{split}", waymo_images)):
            if not value:
                from .errors import UserError

                raise UserError("--waymo needs " + flag, None, flag, f"pass {flag} PATH (relative to the data root)")
        root = data or "."
        return os.path.join(root, waymo_ann), os.path.join(root, waymo_images)
    if ann:
        return ann, images or os.path.dirname(ann)
    if data:
        return D.coco2017_paths(data, split)
    return None


def synthetic_paths(split: str):
    """The built-in synthetic set (generated on first use): what runs when no data flag is given."""
    import datasets as D

    syn = D.ensure_synthetic()[split]
    return syn["ann_file"], syn["image_dir"]


def train_data_paths(flags) -> dict:
    """{"train": (ann, images), "val": (ann, images)} from the parsed flags; "val" is absent when only
    ``--train-ann`` is given, and with no data flag at all both are the built-in synthetic set."""
    if not (flags.waymo or flags.train_ann or flags.val_ann or flags.data):
        return {s: synthetic_paths(s) for s in ("train", "val")}
    data = None if (flags.train_ann or flags.val_ann) and not flags.waymo else flags.data
    found = {"train": split_paths("train", data, flags.train_ann, flags.train_images, flags.waymo,
                                  flags.waymo_train_annotation, flags.waymo_train),
             "val": split_paths("val", data, flags.val_ann, flags.val_images, flags.waymo,
                                flags.waymo_val_annotation, flags.waymo_val)}
    return {k: v for k, v in found.items() if v is not None}
