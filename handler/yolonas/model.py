"""The YOLO-NAS detector: backbone, neck and heads assembled from a variant config."""

from __future__ import annotations

from torch import Tensor, nn

from .backbone import Backbone
from .head import Heads
from .neck import PANNeck
from .variants import YoloNASConfig, get_config

COCO_NUM_CLASSES = 80


class YoloNAS(nn.Module):
    """``forward(x)`` with x [B, 3, H, W] in [0, 1] (H, W multiples of 32) returns ``(boxes, scores)``:
    boxes [B, A, 4] xyxy in input pixels (not clipped), scores [B, A, C] after sigmoid."""

    def __init__(self, cfg: YoloNASConfig, num_classes: int = COCO_NUM_CLASSES):
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes
        self.backbone = Backbone(cfg)
        self.neck = PANNeck(cfg)
        self.heads = Heads(cfg, num_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.heads(self.neck(self.backbone(x)))


def build_model(variant: str, num_classes: int = COCO_NUM_CLASSES) -> YoloNAS:
    """An untrained model of ``variant`` (s, m or l) with super-gradients' initialisation of the class bias."""
    return YoloNAS(get_config(variant), num_classes)
