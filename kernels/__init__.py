"""The five hot-path ops of EfficientDet, each a Triton kernel beside the PyTorch reference that
defines it. Each public function takes ``backend="auto" | "triton" | "torch"``; see
``kernels/_dispatch.py`` for how the choice is made and ``docs/design.md`` (kernel contracts) for the
contracts.

This package imports only torch and triton: never ``detector`` or ``datasets``.
"""
from ._dispatch import BACKENDS, ENV_VAR, interpreter_enabled, resolve, triton_available
from .bifpn_fusion import bifpn_fusion
from .decode import decode_boxes, decode_topk
from .ema import ema_update
from .focal_loss import focal_loss
from .nms import batched_nms, batched_nms_mask

__all__ = [
    "BACKENDS", "ENV_VAR", "resolve", "triton_available", "interpreter_enabled",
    "focal_loss", "batched_nms", "batched_nms_mask", "decode_boxes", "decode_topk", "bifpn_fusion", "ema_update",
]
