"""Loading and saving weights: our checkpoints, effdet's state dicts and NVIDIA's training checkpoints.

Always ``torch.load(..., weights_only=True)``: a file whose pickle would run code is refused.

Accepted layouts (detected from the keys, converted where needed):
* ours: ``{"model": state_dict, "ema": {...}, "config": {...}, ...}`` written by ``train.py`` / ``save``;
* effdet: a plain state dict (its key layout is ours);
* NVIDIA EfficientDet-PyTorch: ``{"state_dict": ..., "state_dict_ema": ...}`` with ``model.`` / ``module.``
  prefixes, the backbone as ``input_conv`` + flat ``mbconv_blocks.{i}`` (SE as Linear layers), backbone BN
  eps 1e-3, and class heads padded to a multiple of 8 classes (the padding is dropped).
"""
from __future__ import annotations

import os
import pickle
import re
import tempfile
import zipfile

import torch
from torch import nn

from .backbone import EfficientNetFeatures
from .model import EfficientDet


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used. ``str(e)`` is the full message; ``what``, ``file``, ``field`` and
    ``todo`` (what the user can do), when given, make the one-line report of the scripts."""

    def __init__(self, message: str, what=None, file=None, field=None, todo=None):
        super().__init__(message)
        self.what, self.file, self.field = what or message.splitlines()[0], file, field
        self.todo = todo or "check the file, or pass another --checkpoint / --initial-checkpoint"


def read(path: str) -> dict:
    """``torch.load`` with ``weights_only=True`` and errors that name the file."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist", "checkpoint file not found", path, "path",
                              "check the path (ours are OUTPUT/last.pth and OUTPUT/best.pth)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # PyTorch's text advises weights_only=False: never relay that
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        culprit = found.group(1) if found else "a Python object"
        raise CheckpointError(
            f"checkpoint {path!r} was refused: it holds objects whose unpickling could run code ({culprit}; only "
            "tensors, numbers, strings and containers are allowed)",
            "checkpoint refused: loading it would run code", path, culprit,
            "do not load this file; use a checkpoint written by train.py, effdet or NVIDIA's scripts, or "
            "re-save the weights as a plain state dict where the file was made") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        detail = str(e) if "weights_only" not in str(e) else type(e).__name__
        raise CheckpointError(f"checkpoint {path!r} is truncated or not a PyTorch file: {detail}",
                              "checkpoint is truncated or not a PyTorch file", path, type(e).__name__,
                              "copy the file again (a download or copy was cut short), or pass another "
                              "checkpoint; train.py's last.pth of the previous save is never half-written") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path!r} holds a {type(obj).__name__}, not a dict of tensors",
                              f"checkpoint holds a {type(obj).__name__}, not a dict of tensors", path, "top level",
                              "pass a checkpoint of train.py, effdet or NVIDIA's scripts")
    return obj


def save(obj: dict, path: str) -> None:
    """Write atomically: a temporary file in the same folder, flushed to disk (fsync), then renamed over
    ``path`` (and the folder fsynced), so ``path`` is always either the previous complete file or the new one,
    whatever point the write is interrupted at (an error, Ctrl-C, SIGKILL, a power cut)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pth")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_folder(folder)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _fsync_folder(folder: str) -> None:
    """Make a rename in ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def extract_state_dict(obj: dict, use_ema: bool = False) -> tuple[dict, str]:
    """The model's state dict inside a checkpoint, and which layout it came from."""
    if "model" in obj and isinstance(obj["model"], dict):
        if use_ema and isinstance(obj.get("ema"), dict):
            return obj["ema"]["module"], "ours (EMA)"
        return obj["model"], "ours"
    for key in (("state_dict_ema", "state_dict") if use_ema else ("state_dict", "state_dict_ema")):
        if isinstance(obj.get(key), dict):
            return _strip_prefixes(obj[key]), f"NVIDIA/timm-style {key!r}"
    if all(isinstance(v, torch.Tensor) for v in obj.values()):
        return _strip_prefixes(obj), "plain state dict"
    raise CheckpointError(f"no state dict found; top-level keys: {sorted(obj)[:10]}", "no state dict found in the "
                          "checkpoint", None, f"top-level keys {sorted(obj)[:5]}",
                          "pass a checkpoint of train.py, effdet or NVIDIA's scripts")


def _strip_prefixes(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        while k.startswith(("module.", "model.")):
            k = k.split(".", 1)[1]
        out[k] = v
    return out


def _nvidia_backbone(sd: dict, backbone: EfficientNetFeatures) -> dict:
    """Rename NVIDIA's ``backbone.input_conv`` / ``backbone.mbconv_blocks.{i}`` keys to ours."""
    flat = []  # flat block index -> (stage, block, is_depthwise_separable)
    for s, stage in enumerate(backbone.blocks):
        for b, blk in enumerate(stage):
            flat.append((s, b, not hasattr(blk, "conv_pwl")))
    names_ir = {"expand_conv.0": "conv_pw", "expand_conv.1": "bn1", "depthwise_conv.0": "conv_dw",
                "depthwise_conv.1": "bn2", "squeeze_and_excitation.squeeze": "se.conv_reduce",
                "squeeze_and_excitation.expand": "se.conv_expand", "project_conv.0": "conv_pwl",
                "project_conv.1": "bn3"}
    names_ds = {"depthwise_conv.0": "conv_dw", "depthwise_conv.1": "bn1", "squeeze_and_excitation.squeeze":
                "se.conv_reduce", "squeeze_and_excitation.expand": "se.conv_expand", "project_conv.0": "conv_pw",
                "project_conv.1": "bn2"}
    out = {}
    for k, v in sd.items():
        m = re.match(r"backbone\.mbconv_blocks\.(\d+)\.(.+)\.(\w+)$", k)
        if k.startswith("backbone.input_conv."):
            part, leaf = k.split(".")[2], k.split(".")[-1]
            k = f"backbone.{'conv_stem' if part == '0' else 'bn1'}.{leaf}"
        elif m:
            i, inner, leaf = int(m.group(1)), m.group(2), m.group(3)
            if i >= len(flat):
                raise CheckpointError(f"NVIDIA checkpoint has block {i}, the model only {len(flat)} blocks")
            s, b, ds = flat[i]
            table = names_ds if ds else names_ir
            if inner not in table:
                raise CheckpointError(f"unknown NVIDIA backbone key {k!r}")
            if inner.startswith("squeeze_and_excitation") and leaf == "weight" and v.dim() == 2:
                v = v[:, :, None, None]
            k = f"backbone.blocks.{s}.{b}.{table[inner]}.{leaf}"
        elif k.startswith(("backbone.features_conv", "backbone.fc.")):
            continue  # classifier parts of a full EfficientNet
        out[k] = v
    return out


def head_classes(sd: dict, num_anchors: int = 9) -> int | None:
    """Number of classes the class head of a state dict predicts (padding included)."""
    b = sd.get("class_net.predict.conv_pw.bias")
    return None if b is None else b.shape[0] // num_anchors


def is_nvidia(sd: dict) -> bool:
    return any(k.startswith(("backbone.mbconv_blocks.", "backbone.input_conv.")) for k in sd)


def nvidia_padded(num_classes: int) -> int:
    return (num_classes + 7) // 8 * 8


def _unpad_class_head(sd: dict, model: EfficientDet) -> dict:
    """NVIDIA pads the class count to a multiple of 8: keep the first C classes of every anchor."""
    a, c = model.config.num_anchors, model.config.num_classes
    for leaf in ("weight", "bias"):
        k = f"class_net.predict.conv_pw.{leaf}"
        if k in sd and sd[k].shape[0] == a * nvidia_padded(c) != a * c:
            padded = sd[k].shape[0] // a
            sd[k] = sd[k].reshape(a, padded, *sd[k].shape[1:])[:, :c].reshape(a * c, *sd[k].shape[1:])
    return sd


def load(model: EfficientDet, source, use_ema: bool = False, reset_class_head: bool = False,
         remove: list[str] | None = None) -> str:
    """Load ``source`` (a path or an already read dict) into ``model`` and return a description.

    ``reset_class_head=True`` (``--remove-weights``, or a class-count change) keeps the class head freshly
    initialized on purpose. Any other difference raises :class:`CheckpointError` listing the missing,
    unexpected and wrongly shaped keys.
    """
    obj = read(source) if isinstance(source, (str, os.PathLike)) else source
    where = source if isinstance(source, (str, os.PathLike)) else "checkpoint"
    sd, layout = extract_state_dict(obj, use_ema)
    if use_ema and "EMA" not in layout and "ema" not in layout:
        raise CheckpointError(f"{where} holds no EMA weights ({layout}); drop --use-ema to load the model weights",
                              f"checkpoint holds no EMA weights ({layout})", where, "ema",
                              "drop --use-ema to load the model weights")
    if is_nvidia(sd):
        sd = _unpad_class_head(_nvidia_backbone(sd, model.backbone), model)
        layout += ", NVIDIA backbone names and class padding converted"
        for m in model.backbone.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eps = 1e-3  # NVIDIA's backbone BN epsilon
        model.config.backbone_bn_eps = 1e-3
    own = model.state_dict()
    head_keys = {k for k in own if k.startswith("class_net.predict.")}
    if remove:  # --remove-weights PREFIX ...: those layers keep their fresh initialization
        removed = {k for k in own if k.startswith(tuple(remove))}
        if not removed:
            raise CheckpointError(f"--remove-weights {remove} matches no parameter of {model.config.name}")
        head_keys |= removed
        reset_class_head = True
    if reset_class_head:
        sd = {k: v for k, v in sd.items() if k not in head_keys}
    missing = sorted(set(own) - set(sd) - (head_keys if reset_class_head else set()))
    unexpected = sorted(set(sd) - set(own))
    shape = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                   for k in set(sd) & set(own) if sd[k].shape != own[k].shape)
    if missing or unexpected or shape:
        hint = ""
        only_head = not missing and not unexpected and all(s.split(":")[0] in head_keys for s in shape)
        if only_head and not reset_class_head:
            hint = ("\nThe class head has another number of classes: pass --remove-weights (or "
                    "reset_class_head=True) to re-initialize it on purpose.")
        raise CheckpointError(
            f"{where} ({layout}) does not fit {model.config.name} with {model.config.num_classes} classes:\n"
            f"  missing ({len(missing)}): {_short(missing)}\n  unexpected ({len(unexpected)}): {_short(unexpected)}\n"
            f"  wrong shape ({len(shape)}): {_short(shape)}{hint}",
            f"checkpoint ({layout}) does not fit {model.config.name} with {model.config.num_classes} classes: "
            f"{len(missing)} missing, {len(unexpected)} unexpected, {len(shape)} wrongly shaped keys",
            where if isinstance(where, str) else str(where), (shape + missing + unexpected)[0].split(":")[0],
            "pass the class count it was trained with (--num_classes), or --remove-weights to re-initialize the "
            "class head on purpose" if only_head else
            "pass the --model it was trained as (ours record it; effdet's and NVIDIA's need --model)")
    model.load_state_dict(sd, strict=not reset_class_head)
    return f"{where}: {layout}" + (" (class head re-initialized)" if reset_class_head else "")


def _short(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "") if items else "none"
