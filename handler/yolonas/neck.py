"""PAN neck: two up stages that also take a higher-resolution skip, then two down stages."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .blocks import ConvBNReLU, CSPLayer, conv3x3, qarepvgg
from .variants import YoloNASConfig


class UpStage(nn.Module):
    """Upsample ``x`` by 2 and fuse it with a same-resolution skip and a downsampled higher-resolution skip."""

    def __init__(
        self, in_channels: int, skip_channels: int, skip2_channels: int, out_channels: int, num_blocks: int, hidden: int
    ):
        super().__init__()
        self.reduce_skip1 = ConvBNReLU(skip_channels, out_channels)
        self.reduce_skip2 = ConvBNReLU(skip2_channels, out_channels)
        self.conv = ConvBNReLU(in_channels, out_channels)
        self.upsample = nn.ConvTranspose2d(out_channels, out_channels, kernel_size=2, stride=2)
        self.downsample = ConvBNReLU(out_channels, out_channels, kernel_size=3, stride=2)
        self.reduce_after_concat = ConvBNReLU(3 * out_channels, out_channels)
        self.blocks = CSPLayer(out_channels, out_channels, num_blocks, hidden, qarepvgg)

    def forward(self, x: Tensor, skip1: Tensor, skip2: Tensor) -> tuple[Tensor, Tensor]:
        skip1 = self.reduce_skip1(skip1)
        skip2 = self.downsample(self.reduce_skip2(skip2))
        x_inter = self.conv(x)
        x = torch.cat([self.upsample(x_inter), skip1, skip2], dim=1)
        return x_inter, self.blocks(self.reduce_after_concat(x))


class DownStage(nn.Module):
    """A stride-2 3x3 conv, concat with the matching up stage's lateral output, CSP of plain convs."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, num_blocks: int, hidden: int):
        super().__init__()
        self.conv = ConvBNReLU(in_channels, out_channels // 2, kernel_size=3, stride=2)
        self.blocks = CSPLayer(out_channels // 2 + skip_channels, out_channels, num_blocks, hidden, conv3x3)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.blocks(torch.cat([self.conv(x), skip], dim=1))


class PANNeck(nn.Module):
    def __init__(self, cfg: YoloNASConfig):
        super().__init__()
        c2, c3, c4, c5 = cfg.stage_channels
        n1, n2, n3, n4 = cfg.neck_channels
        blocks, hidden = cfg.neck_blocks, cfg.neck_hidden_channels
        self.neck1 = UpStage(c5, c4, c3, n1, blocks[0], hidden[0])
        self.neck2 = UpStage(n1, c3, c2, n2, blocks[1], hidden[1])
        self.neck3 = DownStage(n2, n2, n3, blocks[2], hidden[2])
        self.neck4 = DownStage(n3, n1, n4, blocks[3], hidden[3])

    def forward(self, features: tuple[Tensor, Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        c2, c3, c4, c5 = features
        n1_inter, x = self.neck1(c5, c4, c3)
        n2_inter, p3 = self.neck2(x, c3, c2)
        p4 = self.neck3(p3, n2_inter)
        p5 = self.neck4(p4, n1_inter)
        return p3, p4, p5
