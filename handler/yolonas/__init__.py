"""YOLO-NAS S, M and L in plain PyTorch, state-dict compatible with super-gradients."""

from .checkpoint import Checkpoint, CheckpointError, load_model, read_checkpoint
from .fusion import fuse_model
from .model import YoloNAS, build_model
from .random_weights import random_model, save_random_checkpoint
from .summary import summarize
from .variants import VARIANTS, YoloNASConfig, get_config

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "VARIANTS",
    "YoloNAS",
    "YoloNASConfig",
    "build_model",
    "fuse_model",
    "get_config",
    "load_model",
    "random_model",
    "read_checkpoint",
    "save_random_checkpoint",
    "summarize",
]
