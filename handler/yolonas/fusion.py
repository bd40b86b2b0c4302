"""Fusion for serving: fold QARepVGG branches and every BatchNorm into the preceding convolution.

The fused model computes the same function with about half the convolutions and no BatchNorm; it can no longer
be trained or saved back into super-gradients' layout. Each block knows how to fuse itself (``fuse()``).
"""

from __future__ import annotations

import torch
from torch import nn

from .blocks import ConvBNReLU, QARepVGGBlock


@torch.no_grad()
def fuse_model(model: nn.Module) -> nn.Module:
    """Fuse ``model`` in place (eval mode) and return it. Idempotent."""
    model.eval()
    for module in list(model.modules()):
        if isinstance(module, (QARepVGGBlock, ConvBNReLU)):
            module.fuse()
    return model
