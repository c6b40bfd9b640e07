"""EfficientDet model, anchors, box coding, target assignment, loss, post-processing, EMA, checkpoints."""
from .anchors import anchors_for
from .configs import ModelConfig, get_config, model_names
from .model import EfficientDet, create_model

__all__ = ["EfficientDet", "ModelConfig", "anchors_for", "create_model", "get_config", "model_names"]
