"""alignsearch models: encoders for images and texts into one joint space, alignment scores, training."""

from .config import BackboneConfig, HeadConfig, ModelConfig
from .factory import create_model, load_model, model_fingerprint, save_model
from .model import AlignModel, EncoderOutput

__all__ = [
    "AlignModel", "BackboneConfig", "EncoderOutput", "HeadConfig", "ModelConfig",
    "create_model", "load_model", "model_fingerprint", "save_model",
]
