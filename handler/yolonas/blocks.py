"""Building blocks shared by the backbone and the neck.

Module and attribute names follow super-gradients so that its state dicts load with ``strict=True``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

BN_EPS = 1e-3
BN_MOMENTUM = 0.03


def batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


def fold_batch_norm(weight: Tensor, bias: Tensor, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Weight and bias of one convolution that computes ``bn(conv(x))`` for a conv with ``weight`` and ``bias``."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias - bn.running_mean * scale
    return weight * scale.reshape(-1, 1, 1, 1), bias * scale + shift


class ConvBNReLU(nn.Module):
    """Conv (no bias) -> BatchNorm -> ReLU, with 'same' padding for odd kernels."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False)
        self.bn: nn.Module = batch_norm(out_channels)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))

    @torch.no_grad()
    def fuse(self) -> None:
        """Fold the BatchNorm into the convolution (eval mode only). Idempotent."""
        if not isinstance(self.bn, nn.BatchNorm2d):
            return
        conv = self.conv
        weight, bias = fold_batch_norm(conv.weight, torch.zeros_like(self.bn.bias), self.bn)
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
        self.conv = fused
        self.bn = nn.Identity()


class QARepVGGBlock(nn.Module):
    """QARepVGG block (arXiv 2212.01593): 3x3 conv+BN, 1x1 conv with bias and an identity, summed, then BN and ReLU.

    ``fuse()`` rewrites the branches and the post-BN into ``rbr_reparam``, a single 3x3 conv with bias. The state dict
    carries ``rbr_reparam`` even unfused, as super-gradients' does.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, residual: bool = True):
        super().__init__()
        if residual and (in_channels != out_channels or stride != 1):
            raise ValueError("an identity branch needs equal channels and stride 1")
        self.residual = residual
        self.branch_3x3 = nn.Sequential()
        self.branch_3x3.add_module("conv", nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False))
        self.branch_3x3.add_module("bn", batch_norm(out_channels))
        self.branch_1x1 = nn.Conv2d(in_channels, out_channels, 1, stride, 0, bias=True)
        self.post_bn = batch_norm(out_channels)
        self.rbr_reparam = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=True)
        self.nonlinearity = nn.ReLU(inplace=True)
        self.fused = False

    def forward(self, x: Tensor) -> Tensor:
        if self.fused:
            return self.nonlinearity(self.rbr_reparam(x))
        out = self.branch_3x3(x) + self.branch_1x1(x)
        if self.residual:
            out = out + x
        return self.nonlinearity(self.post_bn(out))

    @torch.no_grad()
    def fuse(self) -> None:
        """Rewrite both branches, the identity and the post-BN into ``rbr_reparam`` (eval mode only). Idempotent."""
        if self.fused:
            return
        bn3 = self.branch_3x3.bn
        weight, bias = fold_batch_norm(self.branch_3x3.conv.weight, torch.zeros_like(bn3.bias), bn3)
        weight = weight + nn.functional.pad(self.branch_1x1.weight, [1, 1, 1, 1])
        bias = bias + self.branch_1x1.bias
        if self.residual:
            channels = torch.arange(weight.shape[0], device=weight.device)
            identity = torch.zeros_like(weight)
            identity[channels, channels, 1, 1] = 1.0
            weight = weight + identity
        weight, bias = fold_batch_norm(weight, bias, self.post_bn)
        self.rbr_reparam.weight.copy_(weight)
        self.rbr_reparam.bias.copy_(bias)
        del self.branch_3x3, self.branch_1x1, self.post_bn
        self.fused = True


class Bottleneck(nn.Module):
    """Two blocks and a residual connection scaled by a learnable ``alpha``."""

    def __init__(self, channels: int, block: Callable[[int, int], nn.Module]):
        super().__init__()
        self.cv1 = block(channels, channels)
        self.cv2 = block(channels, channels)
        self.alpha = nn.Parameter(torch.ones(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.alpha * x + self.cv2(self.cv1(x))


class CSPLayer(nn.Module):
    """Cross-stage-partial layer: two 1x1 paths, bottlenecks on one, concat, 1x1 out.

    With ``concat_intermediates`` every bottleneck's output joins the concat (YOLO-NAS M and L).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_bottlenecks: int,
        hidden_channels: int,
        block: Callable[[int, int], nn.Module],
        concat_intermediates: bool = False,
    ):
        super().__init__()
        self.concat_intermediates = concat_intermediates
        self.conv1 = ConvBNReLU(in_channels, hidden_channels)
        self.conv2 = ConvBNReLU(in_channels, hidden_channels)
        concat_parts = 2 + (num_bottlenecks if concat_intermediates else 0)
        self.conv3 = ConvBNReLU(hidden_channels * concat_parts, out_channels)
        self.bottlenecks = nn.Sequential(*(Bottleneck(hidden_channels, block) for _ in range(num_bottlenecks)))

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv1(x)
        if self.concat_intermediates:
            parts = [y]
            for bottleneck in self.bottlenecks:
                parts.append(bottleneck(parts[-1]))
        else:
            parts = [self.bottlenecks(y)]
        parts.append(self.conv2(x))
        return self.conv3(torch.cat(parts, dim=1))


def qarepvgg(in_channels: int, out_channels: int) -> QARepVGGBlock:
    """The residual QARepVGG block used inside bottlenecks."""
    return QARepVGGBlock(in_channels, out_channels)


def conv3x3(in_channels: int, out_channels: int) -> ConvBNReLU:
    """The plain 3x3 Conv-BN-ReLU used inside the neck's down stages."""
    return ConvBNReLU(in_channels, out_channels, kernel_size=3)
