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
                          use_ema: bool = False, backend: str = "auto", device="cpu", redundant_bias=None,
                          state: dict | None = None):
    """(model, message, class index -> category id) for evaluating ``path`` (``state``: its contents, when
    already read) on ``dataset``.

    :func:`detector.checkpoint.load_for_inference` builds and loads it: ours record their config, rebuilt
    exactly (BN eps included); effdet's and NVIDIA's (training file or processed ``Effdet_B0.pth``) need
    ``model_name``, and their class count comes from the class head and the data's category ids (NVIDIA's
    padding to a multiple of 8 undone).
    """
    overrides = {} if redundant_bias is None else {"redundant_bias": redundant_bias}
    with naming(path):
        loaded = ckpt.load_for_inference(path if state is None else state, model_name=model_name,
                                         num_classes=num_classes, category_ids=dataset.cat_ids,
                                         image_size=image_size, use_ema=use_ema, backend=backend, where=str(path),
                                         **overrides)
        mapping = class_to_category(loaded.state, loaded.model.config.num_classes, dataset)
    return loaded.model.to(device), loaded.description, mapping


def class_to_category(state: dict, num_classes: int, dataset) -> dict:
    """Class index -> category id. Ours record it; for others: contiguous over the data's categories when
    the counts agree, else the TF/effdet COCO convention (class i is category id i + 1)."""
    if "label_to_cat_id" in state:
        return _recorded_categories({int(k): v for k, v in state["label_to_cat_id"].items()}, dataset,
                                    state.get("class_names"))
    if num_classes == dataset.num_classes:
        return dict(dataset.label_to_cat_id)
    if num_classes >= max(dataset.cat_ids):
        known = set(dataset.cat_ids)
        return {i: i + 1 for i in range(num_classes) if i + 1 in known}
    raise UserError(f"the checkpoint predicts {num_classes} classes, the data has {dataset.num_classes} categories "
                    f"with ids up to {max(dataset.cat_ids)}", dataset.ann_file, "categories",
                    "evaluate on data with the checkpoint's categories, or pass --num_classes")


def _recorded_categories(mapping: dict, dataset, names=None) -> dict:
    """The checkpoint's class -> category id, less the categories the data does not have (their detections
    are left out, and the run says so); a one-line error, before any inference, when none is left, or when a
    category id names another class in the data than in the checkpoint (``names``: its class names by index;
    compared ignoring case), which would score one class's detections as another's."""
    known = set(dataset.cat_ids)
    kept = {k: v for k, v in mapping.items() if v in known}
    if not kept:
        raise UserError(f"none of the checkpoint's category ids {sorted(set(mapping.values()))} is in the data "
                        f"(ids {sorted(known)})", dataset.ann_file, "categories",
                        "evaluate on data annotated with the checkpoint's categories")
    if names and getattr(dataset, "class_names", None):  # (--images has no data set to name them)
        data_name = dict(zip(dataset.cat_ids, dataset.class_names))
        clash = [(v, names[k], data_name[v]) for k, v in sorted(kept.items())
                 if k < len(names) and str(names[k]).casefold() != str(data_name[v]).casefold()]
        if clash:
            said = ", ".join(f"id {v}: {a!r} in the checkpoint, {b!r} in the data" for v, a, b in clash[:3])
            raise UserError(f"the data's categories are not the checkpoint's ({said}"
                            f"{f', and {len(clash) - 3} more' if len(clash) > 3 else ''})", dataset.ann_file,
                            "categories", "evaluate on data annotated with the checkpoint's category ids and names")
    if len(kept) < len(mapping):
        from .runlog import console

        gone = sorted(v for v in mapping.values() if v not in known)
        console.print(f"[yellow]the data has no category {gone}, which the checkpoint predicts: those "
                      "detections are left out[/]")
    return kept


def resolve_amp(amp: str | None, cuda: bool) -> tuple[str | None, str | None]:
    """(the precision that runs, the line that says why it differs from ``--amp``): fp16 needs CUDA."""
    if amp == "fp16" and not cuda:
        return None, "--amp: fp16 mixed precision needs a CUDA GPU; running in fp32 (--amp bf16 runs on CPUs)"
    return amp, None


def to_memory_format(model, channels_last: bool):
    return model.to(memory_format=torch.channels_last) if channels_last else model
