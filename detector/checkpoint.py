"""Loading and saving weights: our checkpoints, effdet's state dicts and NVIDIA's training checkpoints.

Always ``torch.load(..., weights_only=True)``: a file whose pickle would run code is refused.

Accepted layouts (detected from the keys, converted where needed):
* ours: ``{"model": state_dict, "ema": {...}, "config": {...}, ...}`` written by ``train.py`` / ``save``;
* effdet: a plain state dict (its key layout is ours);
* NVIDIA EfficientDet-PyTorch: the training checkpoint ``{"epoch", "arch", "state_dict", "optimizer",
  "version", "state_dict_ema", "metric"}`` (``metric`` a numpy float64) whose state dicts carry the ``model.``
  prefix of its training bench and its ``anchors.boxes`` buffer (dropped: the anchors are rebuilt), and the
  plain state dict its ``checkpoint_processing.py`` writes (the EMA weights, prefix stripped). The backbone is
  ``input_conv`` + flat ``mbconv_blocks.{i}`` (SE as Linear layers) with BN eps 1e-3; trained with
  ``--fused-focal-loss`` the class head is padded to a multiple of 8 classes (the padding is dropped).

numpy scalars (NVIDIA's ``metric``) are let through ``weights_only=True`` by name: ``numpy._core`` (numpy 2)
and ``numpy.core`` (files pickled under numpy 1) ``multiarray.scalar`` and the numeric dtypes.

:func:`load_for_inference` builds the model a checkpoint needs (name, class count, size) and loads it.
"""
from __future__ import annotations

import os
import pickle
import re
import tempfile
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .backbone import EfficientNetFeatures
from .configs import get_config
from .model import EfficientDet

try:  # numpy >= 2
    from numpy._core.multiarray import scalar as _np_scalar
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import scalar as _np_scalar

# What a pickled numpy scalar references: the scalar constructor (under its numpy 1 and numpy 2 names),
# ``numpy.dtype`` and the dtype class it builds. Nothing here runs code beyond making a number.
_NUMPY_SAFE = [_np_scalar, (_np_scalar, "numpy.core.multiarray.scalar"),
               (_np_scalar, "numpy._core.multiarray.scalar"), np.dtype,
               *(type(np.dtype(t)) for t in ("float64", "float32", "float16", "int64", "int32", "bool"))]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used. ``str(e)`` is the full message; ``what``, ``file``, ``field`` and
    ``todo`` (what the user can do), when given, make the one-line report of the scripts."""

    def __init__(self, message: str, what=None, file=None, field=None, todo=None):
        super().__init__(message)
        self.what, self.file, self.field = what or message.splitlines()[0], file, field
        self.todo = todo or "check the file, or pass another --checkpoint / --initial-checkpoint"


def error_line(e: Exception) -> str:
    """``error: <what> (<file>, <field>): <todo>``, the scripts' form, for a checkpoint or config error (the
    command lines of ``detector/``, which cannot use ``training.errors``)."""
    what = getattr(e, "what", None) or str(e).splitlines()[0]
    todo = getattr(e, "todo", None) or "see --help"
    return f"error: {what} ({getattr(e, 'file', None) or '-'}, {getattr(e, 'field', None) or '-'}): {todo}"


def read(path: str) -> dict:
    """``torch.load`` with ``weights_only=True`` and errors that name the file."""
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r} is a folder", "checkpoint is a folder, not a file", path, None,
                              "pass the file inside it (ours are OUTPUT/last.pth and OUTPUT/best.pth)")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist", "checkpoint file not found", path, None,
                              "check the path (ours are OUTPUT/last.pth and OUTPUT/best.pth)")
    try:
        with torch.serialization.safe_globals(_NUMPY_SAFE):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # PyTorch's text advises weights_only=False: never relay that
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found is None:  # not a pickle at all (a text or image file): "Unsupported operand N"
            operand = re.search(r"Unsupported operand \d+", str(e))
            raise _not_pytorch(path, operand.group(0) if operand else "not a pickle", "UnpicklingError") from None
        culprit = found.group(1)
        detail = f"GLOBAL {culprit}"
        raise CheckpointError(
            f"checkpoint {path!r} was refused: it holds objects whose unpickling could run code ({detail}; only "
            "tensors, numbers, strings, containers and numpy scalars are allowed)",
            "checkpoint refused: loading it would run code", path, culprit,
            "do not load this file; use a checkpoint written by train.py, effdet or NVIDIA's scripts, or "
            "re-save the weights as a plain state dict where the file was made") from None
    except MemoryError:
        raise
    except Exception as e:  # truncated, or not a PyTorch file (a text file ends in KeyError, a zip in BadZipFile)
        detail = type(e).__name__ + (f": {_first_line(e)}" if "weights_only" not in str(e) else "")
        raise _not_pytorch(path, detail, type(e).__name__) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path!r} holds a {type(obj).__name__}, not a dict of tensors",
                              f"checkpoint holds a {type(obj).__name__}, not a dict of tensors", path, "top level",
                              "pass a checkpoint of train.py, effdet or NVIDIA's scripts")
    return obj


def _not_pytorch(path: str, detail: str, kind: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {path!r} is truncated or not a PyTorch file: {detail}",
                           f"checkpoint is truncated or not a PyTorch file ({kind})", path, None,
                           "copy the file again (a download or copy was cut short), or pass another "
                           "checkpoint; train.py's last.pth of the previous save is never half-written")


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0][:300] if lines else type(e).__name__


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
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        sd = _strip_prefixes(obj)
        if is_nvidia(sd):  # NVIDIA's checkpoint_processing.py writes the EMA weights this way
            return sd, "plain state dict (NVIDIA's processed file: the EMA weights)"
        return sd, "plain state dict"
    raise CheckpointError(f"no state dict found; top-level keys: {sorted(obj)[:10]}", "no state dict found in the "
                          "checkpoint", None, f"top-level keys {sorted(obj)[:5]}",
                          "pass a checkpoint of train.py, effdet or NVIDIA's scripts")


def _strip_prefixes(sd: dict) -> dict:
    """Drop ``module.`` (DDP) / ``model.`` (NVIDIA's and timm's training bench) prefixes, and the bench's
    ``anchors.*`` buffers (NVIDIA's ``anchors.boxes``): anchors are rebuilt from the config."""
    out = {}
    for k, v in sd.items():
        while k.startswith(("module.", "model.")):
            k = k.split(".", 1)[1]
        if k.startswith("anchors."):
            continue
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
    """Number of classes the class head of a state dict predicts (padding included); ``None``: no head."""
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
         remove: list[str] | None = None, where: str | None = None, for_training: bool = True) -> str:
    """Load ``source`` (a path or an already read dict) into ``model`` and return a description.

    ``reset_class_head=True`` (``--remove-weights``, or a class-count change) keeps the class head freshly
    initialized on purpose. Any other difference raises :class:`CheckpointError` listing the missing,
    unexpected and wrongly shaped keys; ``for_training=False`` (evaluation, export) leaves re-initializing
    the class head out of its advice.
    """
    obj = read(source) if isinstance(source, (str, os.PathLike)) else source
    where = where or (str(source) if isinstance(source, (str, os.PathLike)) else "checkpoint")
    sd, layout = extract_state_dict(obj, use_ema)
    if use_ema and "EMA" not in layout and "ema" not in layout:  # NVIDIA's processed file says "EMA"
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
    drop, fresh = (set(head_keys), ["the class head"]) if reset_class_head else (set(), [])
    if remove:  # --remove-weights NAME ...: those layers (only those) keep their fresh initialization
        removed = removed_keys(own, remove)
        if not removed:
            raise CheckpointError(f"--remove-weights {remove} matches no parameter of {model.config.name}",
                                  f"--remove-weights {remove} matches no parameter of {model.config.name}", where,
                                  None, "pass layer names of the model, e.g. class_net box_net")
        drop |= removed
        fresh += [p for p in remove if removed_keys(own, [p])]  # the names that matched a layer
    sd = {k: v for k, v in sd.items() if k not in drop}
    missing = sorted(set(own) - set(sd) - drop)
    unexpected = sorted(set(sd) - set(own))
    shape = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                   for k in set(sd) & set(own) if sd[k].shape != own[k].shape)
    if missing or unexpected or shape:
        hint = ""
        only_head = not missing and not unexpected and all(s.split(":")[0] in head_keys for s in shape)
        if only_head and not reset_class_head and for_training:
            hint = ("\nThe class head has another number of classes: pass --remove-weights with no names, or add "
                    "class_net to its names (or reset_class_head=True), to re-initialize it on purpose.")
        reset = (", or --remove-weights with no names (or add class_net to its names) to re-initialize the class "
                 "head on purpose") if for_training else ""
        raise CheckpointError(
            f"{where} ({layout}) does not fit {model.config.name} with {model.config.num_classes} classes:\n"
            f"  missing ({len(missing)}): {_short(missing)}\n  unexpected ({len(unexpected)}): {_short(unexpected)}\n"
            f"  wrong shape ({len(shape)}): {_short(shape)}{hint}",
            f"checkpoint ({layout}) does not fit {model.config.name} with {model.config.num_classes} classes: "
            f"{len(missing)} missing, {len(unexpected)} unexpected, {len(shape)} wrongly shaped keys",
            where if isinstance(where, str) else str(where), (shape + missing + unexpected)[0].split(":")[0],
            f"pass the class count it was trained with (--num_classes){reset}" if only_head else
            "pass the --model it was trained as (ours record it; effdet's and NVIDIA's need --model)")
    model.load_state_dict(sd, strict=not drop)
    return f"{where}: {layout}" + (f" ({', '.join(fresh)} re-initialized)" if fresh else "")


def removed_keys(keys, remove: list[str]) -> set:
    """The state-dict keys ``--remove-weights NAME ...`` leaves freshly initialized: those containing any of
    the names, as NVIDIA's ``load_checkpoint(remove_params=...)`` drops them (``tests/fixtures/nvidia/rules.json``)."""
    return {k for k in keys if any(name in k for name in remove)}


def _short(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "") if items else "none"


def infer_num_classes(sd: dict, category_ids=None, num_anchors: int = 9) -> int:
    """Class count of a checkpoint that does not record it (effdet's, NVIDIA's), read from its class head.

    NVIDIA pads the head to a multiple of 8 classes when trained with ``--fused-focal-loss`` (COCO: 90 -> 96)
    and not otherwise (90, or 3 for Waymo). Given the data's category ids, an NVIDIA head is taken as is when
    it equals the data's class count or its largest id, else as the padding of one of them, else as is when
    it covers the largest id (class i = category id i + 1, the TF/effdet convention).
    """
    head = head_classes(sd, num_anchors)
    if head is None:
        raise CheckpointError("the checkpoint has no class head (class_net.predict.conv_pw.bias); pass --num_classes")
    ids = sorted(set(category_ids or ()))
    if not ids or not is_nvidia(sd):
        return head
    candidates = (len(ids), ids[-1])
    if head in candidates:
        return head
    for c in candidates:
        if nvidia_padded(c) == head:
            return c
    if head >= ids[-1]:
        return head
    raise CheckpointError(f"the class head predicts {head} classes, the data has {len(ids)} categories with ids up "
                          f"to {ids[-1]}; pass --num_classes")


@dataclass
class Loaded:
    model: EfficientDet
    state: dict  # the file's top-level dict as stored (epoch, metric, label_to_cat_id, ...)
    description: str


def load_for_inference(source, model_name: str | None = None, num_classes: int | None = None, category_ids=None,
                       image_size=None, use_ema: bool = False, backend: str = "auto", where: str | None = None,
                       **config) -> Loaded:
    """Build the model a checkpoint needs and load it: ours, effdet's, NVIDIA's training or processed file.

    ``model_name`` / ``num_classes`` / ``image_size`` override what the checkpoint records (ours record all
    three; effdet's and NVIDIA's need ``model_name``, and their class count comes from the class head and
    ``category_ids``, the data's category ids, see :func:`infer_num_classes`). Every other recorded config
    field (BN eps, ...) is kept, so the network is rebuilt exactly as trained; ``config`` (e.g.
    ``redundant_bias=False``) overrides config fields on top. ``where`` names an already read ``source`` in
    messages (its path).
    """
    where = where or (str(source) if isinstance(source, (str, os.PathLike)) else "checkpoint")
    state = read(source) if isinstance(source, (str, os.PathLike)) else source
    cfg = state.get("config") if isinstance(state.get("config"), dict) else {}
    name = model_name or cfg.get("name")
    if name is None:
        raise CheckpointError(f"{where} does not record its model: pass --model (e.g. efficientdet_d0)",
                              "checkpoint does not record its model", where, "--model",
                              "pass --model (e.g. tf_efficientdet_d0)")
    if cfg.get("name") and model_name and cfg["name"] != model_name:
        raise CheckpointError(f"{where} holds {cfg['name']}; --model {model_name} does not fit it",
                              f"checkpoint holds {cfg['name']}, not {model_name}", where, "--model",
                              f"drop --model (the checkpoint records it) or pass --model {cfg['name']}")
    if num_classes is None:
        num_classes = cfg.get("num_classes") or infer_num_classes(extract_state_dict(state, use_ema)[0], category_ids)
    size = image_size or cfg.get("image_size") or get_config(name).image_size
    overrides = {k: v for k, v in cfg.items() if k not in ("name", "num_classes", "image_size", "extra")}
    overrides.update(config)
    model = EfficientDet(get_config(name, num_classes=num_classes, image_size=size, **overrides)).set_backend(backend)
    desc = load(model, state, use_ema=use_ema, where=where, for_training=False)
    if "metric" in state and isinstance(state["metric"], (float, int, np.floating)):
        desc += f"; epoch {state.get('epoch')}, metric {float(state['metric']):.4f}"
    return Loaded(model.eval(), state, desc)
