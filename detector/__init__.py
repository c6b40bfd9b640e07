"""EfficientDet model, anchors, box coding, target assignment, loss, post-processing, EMA, checkpoints."""
from .anchors import anchors_for
from .configs import ModelConfig, get_config, model_names
from .model import EfficientDet, create_model
from .pipeline import compute_loss, predict

__all__ = ["EfficientDet", "ModelConfig", "anchors_for", "compute_loss", "create_model", "predict", "get_config", "model_names"]
