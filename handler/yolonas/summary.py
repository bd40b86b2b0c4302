"""Model summary: parameter counts (super-gradients' way and fused), GMACs and anchors, like ``model.info()``."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from .fusion import fuse_model
from .model import COCO_NUM_CLASSES, YoloNAS, build_model


@dataclass(frozen=True)
class ModelSummary:
    name: str
    num_classes: int
    image_size: tuple[int, int]
    params: int  # as super-gradients counts them: every parameter, the unused rbr_reparam placeholders included
    fused_params: int
    gmacs: float  # multiply-accumulates of convolutions, fused model, one image
    anchors: int

    def as_dict(self) -> dict:
        return asdict(self)


def count_macs(model: nn.Module, height: int, width: int) -> int:
    """Multiply-accumulates of every (transposed) convolution for one image, from shapes alone (meta tensors)."""
    total = 0

    def conv_hook(module: nn.Conv2d, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        kernel = module.weight.shape[2] * module.weight.shape[3]
        if isinstance(module, nn.ConvTranspose2d):
            total += inputs[0][0].numel() * module.out_channels * kernel // module.groups
        else:
            total += output[0].numel() * (module.in_channels // module.groups) * kernel

    hooks = [
        m.register_forward_hook(conv_hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))
    ]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, height, width, device="meta"))
    finally:
        for hook in hooks:
            hook.remove()
    return total


def anchor_count(model: YoloNAS, height: int, width: int) -> int:
    return sum((height // s) * (width // s) for s in model.cfg.strides)


def summarize(
    variant: str, num_classes: int = COCO_NUM_CLASSES, image_size: tuple[int, int] = (640, 640)
) -> ModelSummary:
    with torch.device("meta"):
        model = build_model(variant, num_classes).eval()
    params = sum(p.numel() for p in model.parameters())
    fuse_model(model)
    height, width = image_size
    return ModelSummary(
        name=model.cfg.name,
        num_classes=num_classes,
        image_size=image_size,
        params=params,
        fused_params=sum(p.numel() for p in model.parameters()),
        gmacs=count_macs(model, height, width) / 1e9,
        anchors=anchor_count(model, height, width),
    )
