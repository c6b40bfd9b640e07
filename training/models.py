"""The one place a model is built: from the training flags, or from a checkpoint (for evaluation)."""
from __future__ import annotations

import torch

from detector import checkpoint as ckpt
from detector.configs import get_config
from detector.model import EfficientDet

from .errors import UserError, naming


def build_model(name: str, num_classes: int, image_size=None, backend: str = "auto", device="cpu",
                **overrides) -> EfficientDet:
    """``name``'s config with ``num_classes``, ``image_size`` (default: the config's) and any other config
    field overridden; its kernel backend set; moved to ``device``."""
    size = image_size or get_config(name).image_size
    model = EfficientDet(get_config(name, num_classes=num_classes, image_size=size, **overrides))
    model.set_backend(backend)
    return model.to(device)


def training_overrides(cfg) -> dict:
    """Config fields the training flags override (only those the user or the recipe set)."""
    out = {}
    if cfg.redundant_bias is not None:
        out["redundant_bias"] = cfg.redundant_bias
    if cfg.smoothing:
        out["label_smoothing"] = cfg.smoothing
    if cfg.drop_path is not None:
        out["drop_path_rate"] = cfg.drop_path
    if cfg.bn_momentum:
        out["bn_momentum"] = cfg.bn_momentum
    return out


def load_backbone(model: EfficientDet, path: str) -> None:
    """Backbone weights (ours, timm's or NVIDIA's names) into ``model.backbone``; every key must fit."""
    sd, layout = ckpt.extract_state_dict(ckpt.read(path))
    sd = {k if k.startswith("backbone.") else f"backbone.{k}": v for k, v in sd.items()}
    if ckpt.is_nvidia(sd):
        sd = ckpt._nvidia_backbone(sd, model.backbone)
        layout += ", NVIDIA names converted"
    sd = {k.removeprefix("backbone."): v for k, v in sd.items()}
    own = model.backbone.state_dict()
    usable = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
    if len(usable) < len(own):
        missing = sorted(set(own) - set(usable))
        raise ckpt.CheckpointError(f"{path} ({layout}): backbone weights missing or mis-shaped for "
                                   f"{len(missing)} keys, e.g. {missing[:5]}")
    model.backbone.load_state_dict(usable)


def freeze(model: EfficientDet, prefixes) -> None:
    """``--freeze-layers``: no gradient for parameters whose name starts with one of ``prefixes``."""
    for prefix in prefixes or []:
        hits = [p for n, p in model.named_parameters() if n.startswith(prefix)]
        if not hits:
            raise UserError(f"--freeze-layers {prefix!r} matches no parameter", None, "--freeze-layers",
                            "pass a prefix of the parameter names, e.g. backbone or fpn")
        for p in hits:
            p.requires_grad_(False)


def model_from_checkpoint(path: str, dataset, model_name=None, num_classes=None, image_size=None,
                          use_ema: bool = False, backend: str = "auto", device="cpu"):
    """(model, message, class index -> category id) for evaluating ``path`` on ``dataset``.

    Ours record their config, which is rebuilt exactly (BN eps included); effdet's and NVIDIA's need
    ``model_name``; their class count comes from the class head.
    """
    state = ckpt.read(path)
    cfg = state.get("config") if isinstance(state.get("config"), dict) else None
    name = model_name or (cfg or {}).get("name")
    if name is None:
        raise UserError("checkpoint does not record its model", path, "--model",
                        "pass --model (e.g. tf_efficientdet_d0)")
    sd, _ = ckpt.extract_state_dict(state)
    num_classes = num_classes or (cfg or {}).get("num_classes") or infer_num_classes(sd, dataset)
    size = image_size or (cfg or {}).get("image_size")
    overrides = {k: v for k, v in (cfg or {}).items() if k not in ("name", "num_classes", "image_size", "extra")}
    model = build_model(name, num_classes, size, backend, "cpu", **overrides)
    with naming(path):
        message = ckpt.load(model, state, use_ema=use_ema)
    return model.to(device), message, class_to_category(state, num_classes, dataset)


def infer_num_classes(sd: dict, dataset) -> int:
    """Class count of a checkpoint that does not record it (effdet's, NVIDIA's): from its class head."""
    head = ckpt.head_classes(sd)
    if head is None:
        return dataset.num_classes
    if ckpt.is_nvidia(sd):  # NVIDIA pads to a multiple of 8: the real count is the data's, if it fits
        for c in (max(dataset.cat_ids), dataset.num_classes):
            if ckpt.nvidia_padded(c) == head:
                return c
        raise UserError(f"the NVIDIA checkpoint's class head has {head} (padded) classes", None, "--num_classes",
                        "pass --num_classes (the checkpoint's class count before padding)")
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
    raise UserError(f"the checkpoint predicts {num_classes} classes, the data has {dataset.num_classes} categories "
                    f"with ids up to {max(dataset.cat_ids)}", dataset.ann_file, "categories",
                    "evaluate on data with the checkpoint's categories, or pass --num_classes")


def to_memory_format(model, channels_last: bool):
    return model.to(memory_format=torch.channels_last) if channels_last else model
