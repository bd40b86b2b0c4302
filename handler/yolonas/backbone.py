"""Backbone: a QARepVGG stem, four downsample+CSP stages and an SPP context module."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .blocks import ConvBNReLU, CSPLayer, QARepVGGBlock, qarepvgg
from .variants import YoloNASConfig


class Stem(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = QARepVGGBlock(in_channels, out_channels, stride=2, residual=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Stage(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, hidden_channels: int, concat: bool):
        super().__init__()
        self.downsample = QARepVGGBlock(in_channels, out_channels, stride=2, residual=False)
        self.blocks = CSPLayer(out_channels, out_channels, num_blocks, hidden_channels, qarepvgg, concat)

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.downsample(x))


class SPP(nn.Module):
    """Spatial pyramid pooling: 1x1 halve, max-pools of several sizes, concat, 1x1."""

    def __init__(self, in_channels: int, out_channels: int, kernels: tuple[int, ...]):
        super().__init__()
        hidden = in_channels // 2
        self.cv1 = ConvBNReLU(in_channels, hidden)
        self.cv2 = ConvBNReLU(hidden * (len(kernels) + 1), out_channels)
        self.m = nn.ModuleList(nn.MaxPool2d(k, stride=1, padding=k // 2) for k in kernels)

    def forward(self, x: Tensor) -> Tensor:
        x = self.cv1(x)
        return self.cv2(torch.cat([x] + [pool(x) for pool in self.m], dim=1))


class Backbone(nn.Module):
    """Returns the features of stages 1-3 and of the context module (strides 4, 8, 16, 32)."""

    def __init__(self, cfg: YoloNASConfig, in_channels: int = 3):
        super().__init__()
        self.stem = Stem(in_channels, cfg.stem_channels)
        channels = cfg.stem_channels
        for i in range(4):
            stage = Stage(
                channels,
                cfg.stage_channels[i],
                cfg.stage_blocks[i],
                cfg.stage_hidden_channels[i],
                cfg.stage_concat_intermediates[i],
            )
            self.add_module(f"stage{i + 1}", stage)
            channels = cfg.stage_channels[i]
        self.context_module = SPP(channels, channels, cfg.spp_kernels)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        x = self.stem(x)
        c2 = self.stage1(x)
        c3 = self.stage2(c2)
        c4 = self.stage3(c3)
        c5 = self.context_module(self.stage4(c4))
        return c2, c3, c4, c5
