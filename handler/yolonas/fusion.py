"""Fusion for serving: fold QARepVGG branches and every BatchNorm into the preceding convolution.

The fused model computes the same function with about half the convolutions and no BatchNorm; it can no longer
be trained or saved back into super-gradients' layout.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .blocks import ConvBNReLU, QARepVGGBlock


def _bn_scale_shift(bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


def _fold_bn(weight: Tensor, bias: Tensor, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    scale, shift = _bn_scale_shift(bn)
    return weight * scale.reshape(-1, 1, 1, 1), bias * scale + shift


def _fuse_qarepvgg(block: QARepVGGBlock) -> None:
    conv3 = block.branch_3x3.conv
    weight, bias = _fold_bn(conv3.weight, torch.zeros_like(block.branch_3x3.bn.bias), block.branch_3x3.bn)
    weight = weight + nn.functional.pad(block.branch_1x1.weight, [1, 1, 1, 1])
    bias = bias + block.branch_1x1.bias
    if block.residual:
        identity = torch.zeros_like(weight)
        channels = torch.arange(weight.shape[0], device=weight.device)
        identity[channels, channels, 1, 1] = 1.0
        weight = weight + identity
    weight, bias = _fold_bn(weight, bias, block.post_bn)
    block.rbr_reparam.weight.copy_(weight)
    block.rbr_reparam.bias.copy_(bias)
    del block.branch_3x3, block.branch_1x1, block.post_bn
    block.fused = True


def _fuse_conv_bn(module: ConvBNReLU) -> None:
    conv = module.conv
    weight, bias = _fold_bn(conv.weight, torch.zeros_like(module.bn.bias), module.bn)
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    fused.weight.copy_(weight)
    fused.bias.copy_(bias)
    module.conv = fused
    module.bn = nn.Identity()


@torch.no_grad()
def fuse_model(model: nn.Module) -> nn.Module:
    """Fuse ``model`` in place (eval mode) and return it. Idempotent."""
    model.eval()
    for module in model.modules():
        if isinstance(module, QARepVGGBlock) and not module.fused:
            _fuse_qarepvgg(module)
        elif isinstance(module, ConvBNReLU) and isinstance(module.bn, nn.BatchNorm2d):
            _fuse_conv_bn(module)
    return model
