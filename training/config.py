"""Every setting of a training run: the flags (NVIDIA's names), the two recipes, and ``TrainConfig``.

``train_parser()`` parses the command line; ``TrainConfig.from_args(args, num_train, cuda)`` turns the parsed
flags into one frozen dataclass, once, after the training set and the device are known (the recipe depends on
the set's size, GPU-only flags on the device). Before that, only the data flags (``train_data_paths``) and the
device flags are read from the namespace; after it, only ``TrainConfig``.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from dataclasses import dataclass

# ---------------------------------------------------------------- recipes (data, not code)
# Flags left unset take one of these. NVIDIA's COCO recipe is its train.py defaults.
COCO_RECIPE = dict(opt="momentum", lr=0.01, batch_size=32, epochs=300, warmup_epochs=5.0, weight_decay=4e-5,
                   model_ema=False, model_ema_decay=0.9998, ema_warmup=False, scale_range=(0.1, 2.0),
                   input_size=None, bn_momentum=None, eval_interval=1, pictures=0, memory_format="nchw",
                   freeze_bn_after=None, opt_eps=1e-3, log_interval=50)
# Small data from scratch on a CPU: AdamW converges far faster than SGD there; a gentler scale jitter and a
# reduced input size give many more useful steps per minute; a short EMA with warm-up and fast BN statistics
# make the averaged model usable after a few hundred steps; from 20% of the run on, BN normalizes with its
# running statistics, as evaluation does, and the EMA restarts there. AdamW's epsilon is PyTorch's 1e-8:
# NVIDIA's 1e-3 sits above the gradient RMS of about a third of D0's weights early in a run from scratch and
# shortens their steps. The longer steps need the early freeze: without it, evaluation-mode BN blows up on a few
# images (README, "Training", says why; bench/RESULTS.md, "The default run", has the measurements). Input
# size, batch size, learning rate and epochs are fitted to the training set (``training/recipe.py``); the
# values here are the built-in set's. A log line every 10 steps (NVIDIA's 50): the built-in set's epochs
# are 37 steps.
SMALL_RECIPE = dict(opt="adamw", lr=2e-3, batch_size=16, epochs=30, warmup_epochs=0.5, weight_decay=1e-2,
                    model_ema=True, model_ema_decay=0.995, ema_warmup=True, scale_range=(0.6, 1.4),
                    input_size=(128, 128), bn_momentum=0.1, eval_interval=5, pictures=4, memory_format="nhwc",
                    freeze_bn_after=0.2, opt_eps=1e-8, log_interval=10)
# ``python train.py`` with no data flag (the built-in set) and no --epochs: a run of this many minutes of
# wall time, evaluation included (training stops in time for the final evaluation; see --time-budget)
DEMO_TIME_BUDGET = 4.5
# the small-data recipe applies below this many training images, when training starts from scratch
SMALL_DATA_IMAGES = 5000


def size_pair(size, model: str | None = None) -> tuple[int, int] | None:
    """``--input_size H [W]`` -> (H, W), or a one-line error naming the flag for a size ``model`` does not take
    (without a model, e.g. evaluating a checkpoint that records it: one no EfficientDet takes)."""
    if size is None:
        return None
    from detector.configs import ConfigError, get_config

    from .errors import UserError

    given = "--input_size " + " ".join(str(v) for v in size)
    if len(size) not in (1, 2):
        raise UserError(f"{given}: takes H or H W, got {len(size)} numbers", None, "--input_size",
                        "pass one size (square) or two (height width)")
    pair = (size[0], size[-1])
    try:
        get_config(model or "efficientdet_d0", image_size=pair)  # D0-D7 take multiples of 128, D7x of 256
    except ConfigError as e:
        if e.field != "image_size":  # an unknown --model: that flag's error
            raise
        step = 2 ** get_config(model or "efficientdet_d0").max_level
        raise UserError(f"{given} is not a positive multiple of {step} (2**max_level of {model or 'EfficientDet'})",
                        None, "--input_size", e.todo) from None
    return pair


# ---------------------------------------------------------------- flags
# How each of NVIDIA's flags is honoured here, per script; the README's compatibility table is generated
# from these notes and the parsers' defaults (``python -m training.config --markdown-flags``).
SAME = "as NVIDIA's"
NOTES: dict[str, dict[str, str]] = {"train.py": {}, "validate.py": {}}


# Flags whose value is optional here but that NVIDIA's scripts use as plain switches (``--amp``, ``--resume``):
# an existing folder after one is NVIDIA's positional data root, not its value (a checkpoint is a file, and
# --amp takes fp16 / bf16), unless a data flag already names the data.
OPTIONAL_VALUE = ("--amp", "--resume")
_DATA_FLAGS = ("--train-ann", "--val-ann", "--waymo")


class _Parser(argparse.ArgumentParser):
    def __init__(self, script: str, **kw):
        super().__init__(allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter, **kw)
        self.script = script

    def parse_known_args(self, args=None, namespace=None):
        words = list(sys.argv[1:] if args is None else args)
        if not any(w.split("=")[0] in _DATA_FLAGS for w in words):
            for i, word in enumerate(words[:-1]):
                if word in OPTIONAL_VALUE and word in self._option_string_actions and os.path.isdir(words[i + 1]):
                    words[i] = f"{word}={self._option_string_actions[word].const}"  # the switch alone
        if "--config" in self._option_string_actions:
            self._config_defaults(words)
        return super().parse_known_args(words, namespace)

    def _config_defaults(self, words: list[str]) -> None:
        """``-c/--config FILE`` as NVIDIA's train.py: a first pass parses only it, and the YAML file's keys (flag
        names as stored: ``batch_size: 64``) become this parser's defaults, so flags on the command line win.
        Unlike NVIDIA's, an unknown key or a value the flag cannot take is a one-line error naming the file."""
        first = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
        first.add_argument("-c", "--config", default="")
        first.error = self.error
        path = first.parse_known_args(words)[0].config
        if not path:
            return
        from .errors import UserError

        try:
            import yaml
        except ImportError:
            raise UserError("--config needs PyYAML, which is not installed", path, "--config",
                            "pip install pyyaml (listed in requirements.txt)") from None
        try:
            with open(path) as f:
                cfg = yaml.safe_load(f)
        except OSError as e:
            raise UserError(f"cannot read the config file ({e.strerror})", path, "--config",
                            "pass an existing YAML file") from None
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            raise UserError(f"not valid YAML{f' (line {where.line + 1})' if where else ''}: "
                            f"{getattr(e, 'problem', None) or e}", path, "--config",
                            "write one `name: value` per line, e.g. batch_size: 64") from None
        if not isinstance(cfg, dict):
            raise UserError(f"holds {'nothing' if cfg is None else 'a ' + type(cfg).__name__}, not a mapping of "
                            "flag names to values", path, "--config",
                            "write one `name: value` per line, e.g. batch_size: 64")
        self.set_defaults(**{str(k): self._config_value(path, str(k), v) for k, v in cfg.items()})

    def _config_value(self, path: str, key: str, value):
        """A ``--config`` file's value for the flag stored as ``key``, as the flag would parse it."""
        from .errors import UserError

        actions = [a for a in self._actions if a.dest == key and a.dest not in ("help", "config")]
        if not actions:
            import difflib

            close = difflib.get_close_matches(key.replace("-", "_"), [a.dest for a in self._actions], 1)
            raise UserError(f"unknown key {key!r}", path, "--config",
                            (f"did you mean {close[0]}? " if close else "") + "keys are flag names as stored, "
                            "with _ for -, e.g. batch_size (see --help)")
        a = actions[0]
        flag = a.option_strings[-1] if a.option_strings else a.dest

        def bad(why: str):
            raise UserError(f"{key}: {value!r} {why}", path, "--config", f"see {flag} in --help")

        if value is None:  # null: unset, where the flag has an unset state
            if a.default is None:
                return None
            bad(f"is null; the flag needs a value (its default: {a.default!r})")
        if a.nargs == 0:  # a switch (store_true / store_false)
            if not isinstance(value, bool):
                bad("is not true or false")
            return value
        if a.nargs == "?" and a.const is not None and isinstance(value, bool):  # NVIDIA's switches --amp, --resume
            return a.const if value else None
        many = a.nargs in ("+", "*")
        if isinstance(value, list) and not many:
            bad("is a list; the flag takes one value")
        if many and value == [] and a.default is None:  # NVIDIA's args.yaml writes its default [] (= unset)
            return None
        kind = {int: "an integer", float: "a number"}.get(a.type, "a string")
        out = []
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, bool) or not isinstance(item, (str, int, float)):
                bad(f"is not {kind}")
            try:
                item = a.type(str(item)) if a.type else str(item)
            except (TypeError, ValueError):
                bad(f"is not {kind}")
            if a.choices is not None and item not in a.choices:
                bad(f"is not one of {', '.join(map(repr, a.choices))}")
            if a.dest in FLAG_RANGES and not FLAG_RANGES[a.dest][0](item):
                bad(f"is out of range: it must be {FLAG_RANGES[a.dest][1]}")
            out.append(item)
        return out if many else out[0]

    def error(self, message: str):
        """A flag argparse cannot read (an unknown flag, a value outside its choices, not a number): one
        line, as for every other bad input, instead of argparse's whole usage first; exit status 2."""
        named = re.match(r"argument ([^:]+): |unrecognized arguments: (\S+)", message)
        flag = (named.group(1) or named.group(2)).split("/")[-1] if named else "-"
        sys.stderr.write(f"error: {message} (-, {flag}): see python {self.prog} --help\n")
        sys.exit(2)

    def nvidia(self, group, *names, note: str = SAME, **kw):
        """One of NVIDIA's flags; ``note`` says how it is honoured here (shown in --help and the README)."""
        action = group.add_argument(*names, **kw)
        if note != SAME:
            action.help = f"{action.help + '. ' if action.help else ''}NVIDIA compatibility: {note}"
        NOTES[self.script][names[0] if names[0].startswith("--") or len(names) == 1 else names[1]] = note
        return action


# --interpolation / --train-interpolation names (= datasets.transforms.INTERPOLATIONS, kept here so that building
# a parser imports no torch; a test keeps them equal) and how they compare with NVIDIA's data/transforms.py
INTERPOLATIONS = ("", "random", "bilinear", "bicubic", "nearest", "lanczos", "hamming")
INTERPOLATION_NOTE = ("'' and random resize bilinear, bicubic / lanczos / hamming as named, as NVIDIA's; nearest is "
                      "the nearest filter here (NVIDIA's: bilinear, its _pil_interp has no nearest case); another "
                      "name is an error here (NVIDIA's: bilinear)")

INFRA = {  # flags that only concern NVIDIA's infrastructure: dest -> what it does here (said once at start)
    "dllogger_file": "--dllogger-file: the JSON log's events are also written there in dllogger's format",
    "pin_mem": "--no-pin-mem / --pin-mem: host memory is pinned whenever CUDA is present; the flag changes nothing",
    "no_prefetcher": "--no-prefetcher: the device prefetcher (normalization on the device) always runs",
    "dist_group_size": "--dist-group-size: sync-BN always spans all workers here (NVIDIA's code never uses it)",
    "eval_metric": "--eval-metric: best.pth always follows COCO AP (NVIDIA's 'map'); other metrics are ignored",
    "num_gpu": "--num-gpu: evaluation runs on one device (NVIDIA's validate.py is single-GPU too)",
    "log_freq": "--log-freq: the progress bar updates after every batch",
}


def _infra(dest: str) -> str:
    return INFRA[dest].split(": ", 1)[1]


def train_parser() -> argparse.ArgumentParser:
    p = _Parser("train.py", prog="train.py", description=(
        "Train EfficientDet. Flags follow NVIDIA's EfficientDet-PyTorch train.py (every one of its flags is "
        "accepted; see the README's compatibility table). Optimization flags left unset take a recipe: "
        "NVIDIA's COCO recipe, or the small-data recipe for < 5,000 training images from scratch."))
    d = p.add_argument_group("data")
    p.nvidia(d, "data", nargs="?", default=None, help="COCO-2017 root (annotations/, train2017/, val2017/)",
             note="optional here: without it, --train-ann/--val-ann or the built-in synthetic set")
    d.add_argument("--train-ann", default=None, help="COCO-format annotation file for training")
    d.add_argument("--train-images", default=None, help="image folder for --train-ann")
    d.add_argument("--val-ann", default=None, help="COCO-format annotation file for validation")
    d.add_argument("--val-images", default=None, help="image folder for --val-ann")
    p.nvidia(d, "--waymo", action="store_true", help="Waymo converted to COCO format; reports Waymo's per-class AP",
             note="also reports Waymo's per-class AP (vehicle IoU 0.7, pedestrian/cyclist 0.5) and their mean")
    p.nvidia(d, "--waymo-train-annotation", default=None, help="annotation file (absolute, or relative to data)")
    p.nvidia(d, "--waymo-val-annotation", default=None, help="annotation file (absolute, or relative to data)")
    p.nvidia(d, "--waymo-train", default=None, help="image folder relative to data")
    p.nvidia(d, "--waymo-val", default=None, help="image folder relative to data")
    d.add_argument("--skip-bad-images", action="store_true", help="skip and count missing or corrupt images")
    p.nvidia(d, "-j", "--workers", "--worker", type=int, default=None,
             help="data loader worker processes (default: fitted to the CPU cores, see training/host.py)",
             note="default: one per CPU core beyond the first, at most 4 (NVIDIA: 4), none for a CPU run on 2 "
                  "cores, so a small machine never runs more processes than cores; --worker (as NVIDIA's scripts "
                  "spell it) works too")
    p.nvidia(d, "--interpolation", default="", choices=INTERPOLATIONS,
             help="resize filter of evaluation images ('' = bilinear, the model's)", note=INTERPOLATION_NOTE)
    p.nvidia(d, "--train-interpolation", default="bilinear", choices=INTERPOLATIONS,
             help="resize filter of training images (random = bilinear, as in NVIDIA's loader)",
             note="default bilinear (NVIDIA: random, which NVIDIA's loader also resizes bilinear: the same "
                  "filter); " + INTERPOLATION_NOTE)
    p.nvidia(d, "--fill-color", default="mean", help="padding colour: 'mean' (ImageNet mean) or an integer 0-255",
             note="default mean (NVIDIA's train.py: 0; its validate.py: mean): padding is ~0 after normalization")
    p.nvidia(d, "--mixup", type=float, default=0.0, help="mixup alpha",
             note="accepted, no effect: NVIDIA's detection loader implements no mixup either")
    p.nvidia(d, "--mixup-off-epoch", type=int, default=0, help="epoch after which mixup stops",
             note="accepted, no effect (see --mixup)")
    p.nvidia(d, "--no-pin-mem", dest="pin_mem", action="store_false", help="do not pin host memory",
             note=_infra("pin_mem"))
    p.nvidia(d, "--no-prefetcher", action="store_true", help="disable the device prefetcher",
             note=_infra("no_prefetcher"))
    m = p.add_argument_group("model")
    p.nvidia(m, "--model", default="efficientdet_d0", help="model name (efficientdet_d0..d7x, tf_efficientdet_*)",
             note="default efficientdet_d0 (NVIDIA's train.py: tf_efficientdet_d1; every NVIDIA script passes d0)")
    p.nvidia(m, "--num_classes", type=int, default=None, help="default: the data set's category count")
    p.nvidia(m, "--input_size", type=int, nargs="+", default=None,
             help="image size (H [W]); default per recipe (the model's for NVIDIA's recipe)")
    bias = m.add_mutually_exclusive_group()  # as NVIDIA's add_bool_arg: not both
    p.nvidia(bias, "--redundant-bias", dest="redundant_bias", action="store_true", default=None,
             help="override the model config's redundant bias")
    p.nvidia(bias, "--no-redundant-bias", dest="redundant_bias", action="store_false", default=None,
             help="override the model config's redundant bias")
    p.nvidia(m, "--pretrained", action="store_true", help="start from published COCO weights",
             note="effdet's published COCO weights of --model, downloaded once into the torch hub cache "
                  "(offline: an error names the URL and the path to place the file at); --initial-checkpoint wins")
    p.nvidia(m, "--pretrained-backbone-path", default=None, help="backbone weights (ours, timm's or NVIDIA's)")
    p.nvidia(m, "--initial-checkpoint", default=None, help="ours, effdet's or NVIDIA's checkpoint")
    p.nvidia(m, "--remove-weights", nargs="*", default=None,
             help="parameters whose names contain one of these are left freshly initialized when loading "
                  "--initial-checkpoint",
             note="given with no names, the class head is re-initialized (NVIDIA: nothing removed); with names, "
                  "only the parameters that contain one, as NVIDIA's")
    p.nvidia(m, "--freeze-layers", nargs="*", default=None, help="parameter name prefixes to freeze")
    p.nvidia(m, "--drop", type=float, default=0.0, help="dropout rate",
             note="accepted, no effect: EfficientDet has no dropout layer (NVIDIA's train.py ignores it too); "
                  "stochastic depth is --drop-path")
    m.add_argument("--drop-path", type=float, default=None, help="backbone stochastic-depth rate (default: config)")
    p.nvidia(m, "--memory-format", choices=["nchw", "nhwc"], default=None, help="memory layout; default per recipe",
             note="default per recipe: nchw for NVIDIA's, nhwc (faster on CPUs) for the small-data one")
    p.nvidia(m, "--fused-focal-loss", action="store_true",
             help="the Triton kernels, as --kernel-backend triton, when CUDA is present",
             note="the Triton kernels (loss, NMS, BiFPN fusion, EMA); without CUDA it says so and runs PyTorch")
    m.add_argument("--kernel-backend", default="auto", choices=["auto", "triton", "torch"],
                   help="auto = Triton on CUDA; triton without CUDA needs TRITON_INTERPRET=1 (slow)")
    o = p.add_argument_group("optimization (unset = recipe default)")
    p.nvidia(o, "-b", "--batch-size", type=int, default=None, help="batch size per worker (NVIDIA's recipe: 32)",
             note="unset = recipe (NVIDIA's: 32)")
    p.nvidia(o, "-vb", "--validation-batch-size-multiplier", type=int, default=1,
             help="evaluation batch = batch size x this")
    p.nvidia(o, "--opt", default=None, help="momentum, sgd/nesterov, adam, adamw, or NVIDIA's fused* / lamb / "
             "novograd (mapped to the closest PyTorch optimizer, said at start); unset = recipe",
             note="unset = recipe (NVIDIA's: momentum); fused*/lamb/novograd run as the closest torch.optim "
                  "optimizer (said once at start)")
    p.nvidia(o, "--opt-eps", type=float, default=None, help="optimizer epsilon (not SGD); unset = recipe "
             "(NVIDIA's: 1e-3)", note="unset = recipe (NVIDIA's: 1e-3)")
    p.nvidia(o, "--momentum", type=float, default=0.9, help="SGD momentum")
    p.nvidia(o, "--weight-decay", type=float, default=None, help="unset = recipe (NVIDIA's: 4e-5)",
             note="unset = recipe (NVIDIA's: 4e-5)")
    p.nvidia(o, "--clip-grad", type=float, default=10.0, help="clip the gradient norm (0: off)")
    p.nvidia(o, "--lr", type=float, default=None, help="unset = recipe (NVIDIA's: 0.01)",
             note="unset = recipe (NVIDIA's: 0.01); the LR moves every step here (NVIDIA: every epoch)")
    p.nvidia(o, "--sched", choices=["cosine", "step"], default="cosine", help="LR schedule",
             note="default cosine, as NVIDIA's code (its --help says \"step\"); also step (decay by --decay-rate "
                  "every --decay-epochs)")
    p.nvidia(o, "--lr-noise", type=float, nargs="+", default=None, metavar="PCT",
             help="epoch fractions: LR noise on from the first (to the second); e.g. 0.4 0.9")
    p.nvidia(o, "--lr-noise-pct", type=float, default=0.67, help="noise limit: |noise| < this fraction")
    p.nvidia(o, "--lr-noise-std", type=float, default=1.0, help="noise standard deviation",
             note="scales the noise (NVIDIA's code ignores it; both draw N(0, 1) at the default 1.0)")
    p.nvidia(o, "--lr-cycle-mul", type=float, default=1.0, help="length of each further cosine cycle x this")
    p.nvidia(o, "--lr-cycle-limit", type=int, default=1, help="number of cosine cycles")
    p.nvidia(o, "--warmup-lr", type=float, default=1e-4, help="learning rate at the start of the warm-up")
    p.nvidia(o, "--warmup-epochs", type=float, default=None, help="unset = recipe (NVIDIA's: 5)",
             note="unset = recipe (NVIDIA's: 5); fractions allowed")
    p.nvidia(o, "--min-lr", type=float, default=1e-5, help="learning rate at the end of the cosine")
    p.nvidia(o, "--decay-epochs", type=float, default=30, help="--sched step: epochs between decays")
    p.nvidia(o, "--decay-rate", "--dr", type=float, default=0.1,
             help="--sched step: decay per step; cosine: peak LR factor per further cycle")
    p.nvidia(o, "--epochs", type=int, default=None, help="epochs of the first LR cycle; unset = recipe (NVIDIA's: 300)",
             note="unset = recipe (NVIDIA's: 300)")
    p.nvidia(o, "--start-epoch", type=int, default=None, help="start at this epoch (the LR schedule too)")
    p.nvidia(o, "--cooldown-epochs", type=int, default=0, help="epochs at --min-lr after the LR cycles",
             note="default 0 (NVIDIA: 10, so its --epochs 300 trains 310): here --epochs N trains N epochs")
    p.nvidia(o, "--patience-epochs", type=int, default=10, help="patience of a plateau LR schedule",
             note="accepted, no effect: there is no plateau schedule (NVIDIA's code has none either)")
    p.nvidia(o, "--smoothing", type=float, default=0.0, help="label smoothing of the focal loss")
    p.nvidia(o, "--model-ema", action="store_true", default=None, help="keep an EMA of the weights; unset = recipe",
             note="unset = recipe (NVIDIA's: off); --no-model-ema turns it off")
    o.add_argument("--no-model-ema", dest="model_ema", action="store_false")
    p.nvidia(o, "--model-ema-decay", type=float, default=None, help="unset = recipe (NVIDIA's: 0.9998)",
             note="unset = recipe (NVIDIA's: 0.9998)")
    p.nvidia(o, "--amp", nargs="?", const="fp16", default=None, choices=["fp16", "bf16"],
             help="mixed precision: fp16 with a GradScaler (default) or bf16",
             note="also --amp bf16; fp16 without CUDA says so and trains in fp32")
    o.add_argument("--freeze-bn-after", type=float, default=None, metavar="FRACTION",
                   help="from this fraction of the run on (of its scheduled steps, or of the training time "
                        "--time-budget leaves), BN layers normalize with their running statistics, as in "
                        "evaluation (with --compile: one recompile then), and the EMA, if any, restarts from "
                        "the current weights; 1: never (default: 0.2 in the "
                        "small-data recipe, never in NVIDIA's)")
    o.add_argument("--max-nonfinite-steps", type=int, default=5, help="stop after this many NaN losses in a row")
    o.add_argument("--time-budget", type=float, default=None, metavar="MINUTES",
                   help="wall minutes for the whole run (set-up, training, evaluations, the final evaluation): "
                        "training stops in time for the final "
                        "evaluation; --epochs still caps it. Default: %s minutes for the built-in data set "
                        "when --epochs is not given, else none (0: none)" % DEMO_TIME_BUDGET)
    o.add_argument("--compile", action="store_true",
                   help="torch.compile the model (inductor); on a 2-core CPU the compiled step was slower than eager: "
                        "see bench/RESULTS.md")
    r = p.add_argument_group("run")
    p.nvidia(r, "--seed", type=int, default=42, help="random seed (weights, data order, augmentation)")
    r.add_argument("--device", default="auto", help="auto, cpu or cuda")
    r.add_argument("--nproc", type=int, default=1, help="start this many worker processes (NCCL/gloo)")
    p.nvidia(r, "--local_rank", "--local-rank", type=int, default=0,
             help="this worker's GPU (set by torch.distributed.launch / bind_launch; LOCAL_RANK wins)")
    p.nvidia(r, "--sync-bn", action="store_true", help="synchronized BatchNorm across workers")
    p.nvidia(r, "--dist-bn", default="", choices=["", "broadcast", "reduce"],
             help="after each epoch: copy rank 0's BN statistics to all workers, or average them")
    p.nvidia(r, "--dist-group-size", type=int, default=0, help="group size for sync-BN",
             note=_infra("dist_group_size"))
    p.nvidia(r, "--output", default="output", help="folder for checkpoints, log.jsonl, pictures",
             note="default output (NVIDIA: '', which it reads as ./output, writing into output/train/); "
                  "last.pth / best.pth inside")
    p.nvidia(r, "--resume", nargs="?", const="auto", default=None,
             help="continue from a checkpoint (default: OUTPUT/last.pth; when that does not exist: start fresh)",
             note="also --resume PATH; with no checkpoint yet it starts fresh, as NVIDIA's does")
    p.nvidia(r, "--no-resume-opt", action="store_true", help="do not restore the optimizer state")
    p.nvidia(r, "--log-interval", type=int, default=None, help="steps between log lines (and each epoch's last)",
             note="unset = recipe (NVIDIA's: 50; the small-data recipe's: 10, as its epochs can be a few dozen "
                  "steps, e.g. 37 on the built-in set)")
    p.nvidia(r, "--eval-after", type=int, default=0,
             help="evaluate after epoch N (0-based) and later: --eval-after 200 first evaluates after the 201st epoch",
             note="NVIDIA's rule with --model-ema (`epoch >= eval_after`); NVIDIA without EMA ignores it")
    r.add_argument("--eval-interval", type=int, default=None,
                   help="epochs between evaluations; 0: only the final one (default per recipe; with "
                        "--time-budget: 0, so the budget goes to training)")
    p.nvidia(r, "--eval-metric", default="map", help="metric that picks best.pth",
             note=_infra("eval_metric"))
    p.nvidia(r, "--save-checkpoint-interval", type=int, default=10, help="epochs between kept checkpoints")
    p.nvidia(r, "--benchmark", action="store_true", help="measure training img/s and exit",
             note="as NVIDIA's; where the recipe freezes BN (--freeze-bn-after), a second measurement of as many "
                  "steps covers the frozen step")
    p.nvidia(r, "--benchmark-steps", type=int, default=20, help="steps measured by --benchmark",
             note="default 20, at least 3 (NVIDIA: 0, which measures one step)")
    p.nvidia(r, "--dllogger-file", default=None, help="also write the log in dllogger's JSON format here",
             note="default none (NVIDIA: log.json); " + _infra("dllogger_file"))
    r.add_argument("--stop-after", type=int, default=None, help="stop after N epochs of this run (as if interrupted)")
    r.add_argument("--max-steps", type=int, default=None,
                   help="stop after N optimizer steps of this run, saving a checkpoint --resume continues from")
    r.add_argument("--pictures", type=int, default=None, help="detection pictures written at the end")
    p.nvidia(r, "-c", "--config", default="", metavar="FILE",
             help="YAML file whose keys (flag names as stored, e.g. batch_size: 64) set the defaults; flags on "
                  "the command line win",
             note="as NVIDIA's, but an unknown key or a value its flag cannot take is a one-line error here "
                  "(NVIDIA's sets any key silently); its args.yaml reads as NVIDIA's: true/false for --amp and "
                  "--resume, [] for --remove-weights = unset")
    add_script_flags(p)
    return p


def eval_parser() -> argparse.ArgumentParser:
    script = "validate.py" if os.path.basename(sys.argv[0]) == "validate.py" else "evaluate.py"
    p = _Parser("validate.py", prog=script, description=(
        "Evaluate a checkpoint (ours, effdet's or NVIDIA's) on COCO-format data, or score a detections file. "
        "Flags follow NVIDIA's validate.py (validate.py here is the same script)."))
    p.nvidia(p, "data", nargs="?", default=None,
             help="COCO-2017 root; default: the val set the checkpoint's run used (ours record it), else the "
                  "built-in synthetic set",
             note="optional here: without it, --val-ann, the checkpoint's recorded val set or the built-in set")
    p.nvidia(p, "--anno", default="val2017", help="annotation set of the COCO root: val2017, train2017 or "
             "test-dev2017 (test sets have no boxes: detections are written, not scored)")
    p.nvidia(p, "--checkpoint", default=None, help="weights to evaluate",
             note="default OUTPUT/best.pth, else OUTPUT/last.pth, the run just trained (NVIDIA: '', which loads "
                  "no weights unless --pretrained)")
    p.nvidia(p, "--model", "-m", default=None, help="needed for effdet/NVIDIA checkpoints (ours record it)",
             note="default: the model the checkpoint records (NVIDIA: tf_efficientdet_d1)")
    bias = p.add_mutually_exclusive_group()  # as NVIDIA's add_bool_arg: not both
    p.nvidia(bias, "--redundant-bias", dest="redundant_bias", action="store_true", default=None,
             help="override the model config's redundant bias")
    p.nvidia(bias, "--no-redundant-bias", dest="redundant_bias", action="store_false", default=None,
             help="override the model config's redundant bias")
    p.nvidia(p, "--num_classes", type=int, default=None,
             help="class count of an effdet/NVIDIA checkpoint; default: read from its class head (ours record it)")
    p.add_argument("--val-ann", default=None)
    p.add_argument("--val-images", default=None)
    p.nvidia(p, "--waymo", action="store_true", help="Waymo data: report Waymo's per-class AP and their mean",
             note="reports Waymo's per-class AP (vehicle IoU 0.7, pedestrian/cyclist 0.5) and their mean")
    p.nvidia(p, "--waymo-val-annotation", default=None, help="annotation file (absolute, or relative to data)")
    p.nvidia(p, "--waymo-val", default=None, help="image folder relative to data")
    p.add_argument("--waymo-iou", action="store_true",
                   help="per-class AP at a per-class IoU (0.7 for vehicle classes, 0.5 for the others) "
                        "on any data; implied by --waymo")
    p.add_argument("--detections", default=None,
                   help="score this COCO results file against --val-ann (or DATA); no model is run")
    p.nvidia(p, "--inference", action="store_true", help="write detections only, do not score")
    p.nvidia(p, "--results", default=None, help="detections file (COCO results format)",
             note="default OUTPUT/detections.json (NVIDIA: ./results.json)")
    p.nvidia(p, "-b", "--batch-size", type=int, default=8, note="default 8 (NVIDIA: 128; its scripts pass 8)")
    p.nvidia(p, "--input_size", type=int, nargs="+", default=None,
             help="image size (H [W]); default: what the checkpoint records, else the model's own")
    p.nvidia(p, "--use-ema", action="store_true", help="use the EMA weights of the checkpoint")
    p.nvidia(p, "--amp", nargs="?", const="fp16", default=None, choices=["fp16", "bf16"],
             note="also --amp bf16; fp16 without CUDA says so and runs fp32")
    p.nvidia(p, "--torchscript", action="store_true", help="run the model as a TorchScript trace (same detections)")
    p.nvidia(p, "--use-soft-nms", action="store_true", default=None, help="Gaussian soft-NMS instead of hard NMS")
    p.nvidia(p, "--interpolation", default="bilinear", choices=INTERPOLATIONS, help="image resize filter",
             note=INTERPOLATION_NOTE)
    p.nvidia(p, "--fill-color", default="mean", help="padding colour: 'mean' (ImageNet mean) or an integer 0-255")
    p.nvidia(p, "--memory-format", choices=["nchw", "nhwc"], default="nchw", help="memory layout of the network")
    p.add_argument("--kernel-backend", choices=["auto", "triton", "torch"], default="auto")
    p.add_argument("--visualize", type=int, default=0, help="write N images with predicted and true boxes")
    p.add_argument("--output", default="output")
    p.add_argument("--device", default="auto")
    p.nvidia(p, "-j", "--workers", type=int, default=None,
             note="default: one per CPU core beyond the first, at most 4 (NVIDIA: 4), none for a CPU run on 2 cores")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the BN-folded model (inductor; compiling takes minutes on a small CPU, "
                        "so it pays only for large evaluations: see bench/RESULTS.md)")
    p.add_argument("--skip-bad-images", action="store_true")
    p.nvidia(p, "--seed", type=int, default=42, help="random seed")
    p.nvidia(p, "--log-freq", type=int, default=10, help="batches between progress lines", note=_infra("log_freq"))
    p.nvidia(p, "--pretrained", action="store_true", help="evaluate the published COCO weights of --model",
             note="without --checkpoint: effdet's published COCO weights of --model (downloaded once, as "
                  "train.py's); with --checkpoint: implied, as in NVIDIA's")
    p.nvidia(p, "--num-gpu", type=int, default=1, note=_infra("num_gpu"))
    p.nvidia(p, "--no-prefetcher", action="store_true", note=_infra("no_prefetcher"))
    p.nvidia(p, "--pin-mem", action="store_true", help="pin host memory", note=_infra("pin_mem"))
    p.nvidia(p, "--dllogger-file", default=None, help="also write the result in dllogger's JSON format here",
             note="default none (NVIDIA: log.json); " + _infra("dllogger_file"))
    p.nvidia(p, "--local_rank", "--local-rank", type=int, default=0,
             note="accepted (bind_launch passes it); evaluation runs on one device")
    add_script_flags(p, images=True)
    return p


def infra_lines(args: argparse.Namespace, defaults: argparse.Namespace) -> list[str]:
    """One line for each NVIDIA-infrastructure flag given with a non-default value."""
    return [line for dest, line in INFRA.items()
            if dest in vars(args) and getattr(args, dest) != getattr(defaults, dest)]


def fill_color(value: str) -> tuple[int, int, int]:
    """``--fill-color``: "mean" (ImageNet mean pixel) or an integer 0-255 for all three channels."""
    from datasets.transforms import IMAGENET_MEAN_PIXEL

    if value == "mean":
        return IMAGENET_MEAN_PIXEL
    try:
        v = int(value)
    except ValueError:
        v = -1
    if not 0 <= v <= 255:
        from .errors import UserError

        raise UserError(f"--fill-color {value!r} is not a colour", None, "--fill-color",
                        "give 'mean' or an integer 0-255")
    return v, v, v


def add_script_flags(p: argparse.ArgumentParser, images: bool = False) -> None:
    """Flags of ours alone: ``--debug`` for both scripts; ``--images`` (inference on a folder) for evaluate.py."""
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
    workers: int | None = None
    interpolation: str = ""
    train_interpolation: str = "bilinear"
    fill_color: tuple[int, int, int] = (124, 116, 104)
    mixup: float = 0.0
    mixup_off_epoch: int = 0
    pin_mem: bool = True
    no_prefetcher: bool = False
    # model
    model: str = "efficientdet_d0"
    num_classes: int | None = None
    input_size: tuple[int, int] | None = None
    redundant_bias: bool | None = None
    pretrained: bool = False
    pretrained_backbone_path: str | None = None
    initial_checkpoint: str | None = None
    remove_weights: list[str] | None = None
    freeze_layers: list[str] | None = None
    drop: float = 0.0
    drop_path: float | None = None
    bn_momentum: float | None = None
    memory_format: str = "nchw"
    fused_focal_loss: bool = False
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
    lr_noise: tuple[float, ...] | None = None
    lr_noise_pct: float = 0.67
    lr_noise_std: float = 1.0
    lr_cycle_mul: float = 1.0
    lr_cycle_limit: int = 1
    warmup_lr: float = 1e-4
    warmup_epochs: float = 5.0
    min_lr: float = 1e-5
    decay_epochs: float = 30
    decay_rate: float = 0.1
    epochs: int = 300
    start_epoch: int | None = None
    cooldown_epochs: int = 0
    patience_epochs: int = 10
    smoothing: float = 0.0
    model_ema: bool = False
    model_ema_decay: float = 0.9998
    ema_warmup: bool = False
    scale_range: tuple[float, float] = (0.1, 2.0)
    amp: str | None = None
    max_nonfinite_steps: int = 5
    time_budget: float | None = None
    freeze_bn_after: float | None = None
    compile: bool = False
    # run
    config: str = ""
    seed: int = 42
    device: str = "auto"
    nproc: int = 1
    local_rank: int = 0
    sync_bn: bool = False
    dist_bn: str = ""
    dist_group_size: int = 0
    output: str = "output"
    resume: str | None = None
    no_resume_opt: bool = False
    log_interval: int = 50
    eval_after: int = 0
    eval_interval: int = 1
    eval_metric: str = "map"
    save_checkpoint_interval: int = 10
    benchmark: bool = False
    benchmark_steps: int = 20
    dllogger_file: str | None = None
    stop_after: int | None = None
    max_steps: int | None = None
    pictures: int = 0
    debug: bool = False
    # which recipe filled the unset flags, and what the run says at start about NVIDIA's flags
    recipe: str = "NVIDIA COCO recipe"
    notes: tuple[str, ...] = ()

    @classmethod
    def from_args(cls, args: argparse.Namespace, num_train: int, cuda: bool, stats=None,
                  builtin_data: bool = False) -> "TrainConfig":
        """The flags, with the recipe's value for every flag left unset (``None``), and GPU-only flags turned
        into what runs without one (``cuda=False``), each change said in ``notes``.

        ``stats`` (``training.recipe.DataStats`` of the training set) fits the small-data recipe to the data;
        ``builtin_data`` (no data flag given) gives a run without ``--epochs`` the demo's time budget."""
        values = dict(vars(args))
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:  # a flag without a field would be silently ignored
            raise TypeError(f"TrainConfig has no field for the flags {sorted(unknown)}")
        if values["pretrained"] and values["initial_checkpoint"]:
            notes = [f"--pretrained: --initial-checkpoint {values['initial_checkpoint']} is loaded instead"]
            values["pretrained"] = False
        else:
            notes = []
        notes += infra_lines(args, train_parser().parse_args([]))
        values["output"] = values["output"] or "output"  # '' (NVIDIA's default, in its args.yaml): ./output
        values["input_size"] = size_pair(values["input_size"], values["model"])
        values["fill_color"] = fill_color(values["fill_color"])
        values["lr_noise"] = tuple(values["lr_noise"]) if values["lr_noise"] else None
        if values["fused_focal_loss"] and cuda:
            values["kernel_backend"] = "triton"
        elif values["fused_focal_loss"]:
            notes.append("--fused-focal-loss: no CUDA device, so the PyTorch reference computes the loss")
        from .models import resolve_amp

        values["amp"], note = resolve_amp(values["amp"], cuda)
        notes += [note] if note else []
        for flag, dest, idle in (("--mixup", "mixup", 0.0), ("--drop", "drop", 0.0)):
            if values[dest] != idle:
                notes.append(f"{flag} {values[dest]}: no effect (NVIDIA's train.py does not use it either)")
        from_scratch = not (values["initial_checkpoint"] or values["pretrained_backbone_path"] or values["pretrained"])
        small = num_train < SMALL_DATA_IMAGES and from_scratch
        recipe = dict(SMALL_RECIPE if small else COCO_RECIPE)
        values["recipe"] = "small-data recipe (training/config.py SMALL_RECIPE)" if small else "NVIDIA COCO recipe"
        if small and stats is not None:
            from .recipe import describe, fit_small_recipe

            fitted = fit_small_recipe(stats)
            recipe.update(fitted)
            values["recipe"] += ", fitted to the data (training/recipe.py): " + describe(stats, fitted)
        if values["time_budget"] is None and builtin_data and values["epochs"] is None:
            values["time_budget"] = DEMO_TIME_BUDGET
            notes.append(f"built-in data set: a {DEMO_TIME_BUDGET:g}-minute run (--time-budget; --epochs N "
                         "trains N epochs instead)")
        if values["time_budget"] is not None and values["time_budget"] < 0:
            from .errors import UserError

            raise UserError(f"--time-budget must be >= 0 minutes, got {values['time_budget']:g}", None,
                            "--time-budget", "pass the run's wall minutes, or 0 for no budget")
        values["time_budget"] = values["time_budget"] or None  # 0 = no budget
        if values["time_budget"] and values["eval_interval"] is None:
            values["eval_interval"] = 0  # only the final evaluation: the budget goes to training
        batch_given, lr_given = values["batch_size"] is not None, values["lr"] is not None
        for k, v in recipe.items():
            if values.get(k) is None:
                values[k] = v
        if small and stats is not None and batch_given and not lr_given and values["batch_size"] >= 1:
            from .recipe import lr_for_batch

            values["lr"] = lr_for_batch(values["batch_size"])  # the recipe's rule, for the batch you gave
            notes.append(f"-b {values['batch_size']}: the recipe's learning rate for that batch, {values['lr']:g} "
                         "(2e-3 x sqrt(batch / 16); --lr sets another)")
        from .host import default_workers

        if values["workers"] is None:
            values["workers"] = default_workers(cuda=cuda)
        from .errors import UserError

        if values["log_interval"] < 1:
            raise UserError(f"--log-interval must be >= 1, got {values['log_interval']}", None, "--log-interval",
                            "pass --log-interval 1 or more")
        if values["freeze_bn_after"] is not None and not 0 < values["freeze_bn_after"] <= 1:
            raise UserError(f"--freeze-bn-after must be in (0, 1], got {values['freeze_bn_after']:g}", None,
                            "--freeze-bn-after", "pass a fraction of the run, or 1 for never")
        if values["benchmark"] and values["benchmark_steps"] < 3:  # warm-up + at least 2 timed steps
            raise UserError(f"--benchmark-steps must be >= 3, got {values['benchmark_steps']}", None,
                            "--benchmark-steps", "pass --benchmark-steps 3 or more (default 20)")
        for flag, dest in (("-b/--batch-size", "batch_size"), ("-vb/--validation-batch-size-multiplier",
                                                                 "validation_batch_size_multiplier"),
                           ("--epochs", "epochs"), ("--max-steps", "max_steps")):
            if values[dest] is not None and values[dest] < 1:
                raise UserError(f"{flag} must be >= 1, got {values[dest]}", None, flag.split("/")[-1],
                                f"pass {flag.split('/')[-1]} 1 or more")
        ranges = (("--num_classes", "num_classes", 1, None, "1 or more"),
                  ("--model-ema-decay", "model_ema_decay", 0.0, 1.0, "in [0, 1]"),
                  ("--momentum", "momentum", 0.0, 1.0, "in [0, 1]"),
                  ("--warmup-epochs", "warmup_epochs", 0.0, None, "0 or more"),
                  ("--start-epoch", "start_epoch", 0, None, "0 or more"))
        for flag, dest, lo, hi, say in ranges:
            v = values[dest]
            if v is not None and not (v >= lo and (hi is None or v <= hi)):
                raise UserError(f"{flag} must be {say}, got {v:g}", None, flag, f"pass {flag} {say}")
        noise = values["lr_noise"]
        if noise and (min(noise) < 0 or (len(noise) > 1 and noise[0] > noise[1])):
            raise UserError(f"--lr-noise takes the start [and end] of the noisy part as fractions of the epochs, "
                            f"start <= end, got {' '.join(f'{v:g}' for v in noise)}", None, "--lr-noise",
                            "e.g. --lr-noise 0.4 0.9")
        if not values["lr"] > 0:  # the schedule is a multiple of --lr
            raise UserError(f"--lr must be > 0, got {values['lr']}", None, "--lr",
                            "pass a positive learning rate (freeze layers with --freeze-layers instead)")
        from .schedule import optimizer_note

        note = optimizer_note(values["opt"])
        notes += [note] if note else []
        return cls(**values, notes=tuple(notes))

    @property
    def freezes_bn(self) -> bool:
        """--freeze-bn-after takes effect within the run (the small-data recipe's 0.2; never with 1 or unset)."""
        return self.freeze_bn_after is not None and self.freeze_bn_after < 1

    @property
    def channels_last(self) -> bool:
        return self.memory_format == "nhwc"

    @property
    def eval_interpolation(self) -> str:
        return self.interpolation or "bilinear"  # '' = the model's, bilinear for every EfficientDet

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Flags whose valid range does not depend on the recipe or the data: dest -> (test, what it asks). Out of range
# they would not fail loudly: --clip-grad -1 flips the gradient's sign, --smoothing 2 trains positives toward 0.
FLAG_RANGES = {
    "nproc": (lambda v: v >= 1, "1 or more"),
    "workers": (lambda v: v >= 0, "0 or more (0: load in the main process)"),
    "seed": (lambda v: 0 <= v < 2**32, "in [0, 2**32)"),
    "clip_grad": (lambda v: v >= 0, "0 or more (0: no clipping)"),
    "weight_decay": (lambda v: v >= 0, "0 or more"),
    "smoothing": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "drop_path": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "decay_rate": (lambda v: v >= 0, "0 or more"),
}


def check_flag_ranges(args) -> None:
    """``FLAG_RANGES``, ``--decay-epochs`` > 0 with ``--sched step`` (0 sets the learning rate to 0), and a known
    ``--model``, checked
    once before any work (and before ``--nproc`` starts workers, so the error is said once). A ``-c/--config``
    file's values were checked as it was read, naming the file."""
    from .errors import UserError

    checks = [(dest, ok, say) for dest, (ok, say) in FLAG_RANGES.items()]
    checks.append(("decay_epochs", lambda v: v > 0 or getattr(args, "sched", "step") != "step",
                   "more than 0 with --sched step"))
    for dest, ok, say in checks:
        v = getattr(args, dest, None)
        if v is not None and not ok(v):
            flag = "--" + dest.replace("_", "-")
            raise UserError(f"{flag} must be {say}, got {v:g}", None, flag, f"pass {flag} {say.split(' (')[0]}")
    model = getattr(args, "model", None)
    if model and not getattr(args, "detections", None):  # an unknown name, before the data is read (a
        # detections file is scored without a model, so its --model is not checked)
        from detector.configs import ConfigError, get_config

        try:
            get_config(model)
        except ConfigError as e:
            raise UserError(e.what, None, "--model", e.todo) from None


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


def coco_anno_paths(data: str, anno: str):
    """validate.py's ``--anno``: ``annotations/instances_{anno}.json`` with images in ``{anno}/``, or for a test
    set (no boxes) ``annotations/image_info_{anno}.json`` with images in ``test2017/``."""
    if "test" in anno:
        return os.path.join(data, "annotations", f"image_info_{anno}.json"), os.path.join(data, "test2017")
    return os.path.join(data, "annotations", f"instances_{anno}.json"), os.path.join(data, anno)


def eval_data_paths(flags):
    """(annotation file, image folder) that evaluate.py reads."""
    if flags.waymo or flags.val_ann:
        return split_paths("val", flags.data, flags.val_ann, flags.val_images, flags.waymo,
                           flags.waymo_val_annotation, flags.waymo_val)
    if flags.data:
        return coco_anno_paths(flags.data, flags.anno)
    return synthetic_paths("val")


def ann_flag(flags, split: str) -> str | None:
    """The flag that named ``split``'s annotation file, for error lines (``training.errors.from_flag``):
    ``--waymo-{split}-annotation``, ``--{split}-ann``, ``data`` (the positional data root), or None for the
    built-in set."""
    if getattr(flags, "waymo", False):
        return f"--waymo-{split}-annotation"
    if getattr(flags, f"{split}_ann", None):
        return f"--{split}-ann"
    return "data" if getattr(flags, "data", None) else None


def synthetic_paths(split: str):
    """The built-in synthetic set (generated on first use): what runs when no data flag is given."""
    import datasets as D

    syn = D.ensure_synthetic()[split]
    return syn["ann_file"], syn["image_dir"]


def check_image_flags(flags) -> None:
    """``--train-images`` / ``--val-images`` name the folder of an annotation file: alone they are an error (they
    would otherwise be ignored, and the built-in set, or no validation, used in their place). Checked on the
    command line of train.py and evaluate.py only: a checkpoint's recorded flags from before the check read
    as they did then."""
    if flags.waymo:
        return
    for split in ("train", "val"):
        if getattr(flags, f"{split}_images", None) and not getattr(flags, f"{split}_ann", None):
            from .errors import UserError

            raise UserError(f"--{split}-images without --{split}-ann", getattr(flags, f"{split}_images"),
                            f"--{split}-images", f"pass --{split}-ann FILE with it (the images' annotations)")


def uses_builtin_data(flags) -> bool:
    """True when no data flag is given: train.py runs on the built-in synthetic set."""
    return not (flags.waymo or flags.train_ann or flags.val_ann or flags.data)


def train_data_paths(flags) -> dict:
    """{"train": (ann, images), "val": (ann, images)} from the parsed flags; "val" is absent when only
    ``--train-ann`` is given, and with no data flag at all both are the built-in synthetic set."""
    if uses_builtin_data(flags):
        return {s: synthetic_paths(s) for s in ("train", "val")}
    if flags.data and (flags.train_ann or flags.val_ann) and not flags.waymo:
        from .errors import UserError

        raise UserError("both DATA and --train-ann / --val-ann name the data", flags.data, "data",
                        "pass DATA (a COCO-2017 root) or the annotation flags, not both")
    data = None if (flags.train_ann or flags.val_ann) and not flags.waymo else flags.data
    found = {"train": split_paths("train", data, flags.train_ann, flags.train_images, flags.waymo,
                                  flags.waymo_train_annotation, flags.waymo_train),
             "val": split_paths("val", data, flags.val_ann, flags.val_images, flags.waymo,
                                flags.waymo_val_annotation, flags.waymo_val)}
    return {k: v for k, v in found.items() if v is not None}


# ---------------------------------------------------------------- the README's compatibility table
def markdown_flags() -> str:
    """NVIDIA's flags, per script: the default here and how each is honoured (the README's table)."""
    rows = ["| script | NVIDIA flag | default here | here |", "|---|---|---|---|"]
    for script, parser in (("train.py", train_parser()), ("validate.py", eval_parser())):
        actions = {name: a for a in parser._actions for name in (a.option_strings or [a.dest])}
        for flag, note in NOTES[script].items():
            a = actions[flag]
            names = " / ".join(f"`{n}`" for n in (a.option_strings or [flag]))
            default = "—" if a.default in (None, "", argparse.SUPPRESS) or a.nargs == 0 else f"`{a.default}`"
            rows.append(f"| {script} | {names} | {default} | {note.replace('|', '/')} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    cli = argparse.ArgumentParser(description="Print the README's NVIDIA compatibility table.")
    cli.add_argument("--markdown-flags", action="store_true", help="the table of NVIDIA's flags, as Markdown")
    if cli.parse_args().markdown_flags:
        print(markdown_flags(), end="")
    else:
        cli.print_help()
