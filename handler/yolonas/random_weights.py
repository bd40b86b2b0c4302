"""Seeded random weights in super-gradients' checkpoint layout, for tests and offline demos.

Plain initialisation leaves every activation near zero after a dozen BatchNorms with unit statistics, and every
score at the 0.01 prior: nothing would exercise NMS. So the BatchNorm statistics are re-estimated on a few random
images (as after training) and the class logits are spread, which yields a realistic mix of confident and
unconfident boxes. The detections mean nothing.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .model import COCO_NUM_CLASSES, YoloNAS, build_model

CALIBRATION_SIZE = 256
LOGIT_MEAN, LOGIT_STD = -4.5, 1.0


@torch.no_grad()
def random_model(variant: str, num_classes: int = COCO_NUM_CLASSES, seed: int = 0) -> YoloNAS:
    """An unfused eval-mode model with seeded random weights (same seed, same weights)."""
    generator = torch.Generator().manual_seed(seed)
    model = build_model(variant, num_classes)
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            fan_in = module.weight[0].numel()
            module.weight.normal_(0.0, (2.0 / fan_in) ** 0.5, generator=generator)
            if module.bias is not None:
                module.bias.normal_(0.0, 0.1, generator=generator)
        elif isinstance(module, nn.BatchNorm2d):
            module.weight.uniform_(0.2, 0.6, generator=generator)
            module.bias.normal_(0.0, 0.1, generator=generator)
            module.momentum = None  # cumulative average over the calibration batches
            module.reset_running_stats()
    images = _calibration_images(generator)
    model.train()
    for batch in images.split(2):
        model(batch)
    model.eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = 0.03
            # Channels nearly silent on the calibration images would amplify any other input by up to 1/sqrt(eps).
            module.running_var.clamp_(min=float(module.running_var.mean()))
    _spread_class_logits(model, images)
    return model.eval()


def _calibration_images(generator: torch.Generator, count: int = 4) -> torch.Tensor:
    """Smooth random colour fields plus noise: closer to photographs than white noise is."""
    coarse = torch.rand(count, 3, 8, 8, generator=generator)
    smooth = nn.functional.interpolate(coarse, size=(CALIBRATION_SIZE, CALIBRATION_SIZE), mode="bilinear")
    noise = 0.1 * torch.randn(count, 3, CALIBRATION_SIZE, CALIBRATION_SIZE, generator=generator)
    return (smooth + noise).clamp(0, 1)


def _spread_class_logits(model: YoloNAS, images: torch.Tensor) -> None:
    """Rescale each head's class logits to mean LOGIT_MEAN, std LOGIT_STD on the calibration images."""
    heads = [getattr(model.heads, f"head{i}") for i in range(1, 4)]
    logits: list[torch.Tensor] = []
    hooks = [h.cls_pred.register_forward_hook(lambda m, i, out: logits.append(out)) for h in heads]
    model(images)
    for hook in hooks:
        hook.remove()
    for head, out in zip(heads, logits):
        scale = LOGIT_STD / out.std()
        head.cls_pred.weight.mul_(scale)
        head.cls_pred.bias.copy_((head.cls_pred.bias - out.mean()) * scale + LOGIT_MEAN)


def save_random_checkpoint(path: str | Path, variant: str, num_classes: int = COCO_NUM_CLASSES, seed: int = 0) -> Path:
    """Write ``{"net": state_dict}`` (the official layout) with seeded random weights to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"net": random_model(variant, num_classes, seed).state_dict()}, path)
    return path
