"""Detection heads (one per stride) and the decoding of their outputs into boxes and scores."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .blocks import ConvBNReLU
from .variants import YoloNASConfig


class SeqConvBNReLU(nn.Module):
    """super-gradients' heads keep Conv-BN-ReLU under a ``seq`` attribute; this keeps the key names."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__()
        self.seq = ConvBNReLU(in_channels, out_channels, kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.seq(x)


def head_width(channels: int, width_mult: float) -> int:
    """Scale a channel count and round it up to a multiple of 8, as super-gradients does."""
    return math.ceil(int(channels * width_mult) / 8) * 8


class DFLHead(nn.Module):
    """Stem, then a classification and a regression branch; regression predicts a distribution per box side."""

    PRIOR_PROB = 0.01

    def __init__(self, in_channels: int, inter_channels: int, num_classes: int, reg_max: int):
        super().__init__()
        self.stem = SeqConvBNReLU(in_channels, inter_channels, 1)
        self.cls_convs = nn.Sequential(SeqConvBNReLU(inter_channels, inter_channels, 3))
        self.reg_convs = nn.Sequential(SeqConvBNReLU(inter_channels, inter_channels, 3))
        self.cls_pred = nn.Conv2d(inter_channels, num_classes, 1)
        self.reg_pred = nn.Conv2d(inter_channels, 4 * (reg_max + 1), 1)
        nn.init.constant_(self.cls_pred.bias, -math.log((1 - self.PRIOR_PROB) / self.PRIOR_PROB))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.stem(x)
        return self.reg_pred(self.reg_convs(x)), self.cls_pred(self.cls_convs(x))


class Heads(nn.Module):
    """Runs the three heads and decodes: boxes [B, A, 4] xyxy in input pixels, scores [B, A, C] after sigmoid.

    Anchors go level by level (strides 8, 16, 32), row-major within a level, at cell centres. Decoding runs in
    float32 whatever the network's dtype, so reduced-precision backbones keep exact box arithmetic.
    """

    def __init__(self, cfg: YoloNASConfig, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.reg_max = cfg.reg_max
        self.strides = cfg.strides
        in_channels = cfg.neck_channels[1:]
        for i, (channels, inter) in enumerate(zip(in_channels, cfg.head_inter_channels)):
            head = DFLHead(channels, head_width(inter, cfg.head_width_mult), num_classes, cfg.reg_max)
            self.add_module(f"head{i + 1}", head)
        bins = torch.arange(cfg.reg_max + 1, dtype=torch.float32).reshape(1, 1, -1, 1)
        self.register_buffer("proj", bins, persistent=False)

    def forward(self, features: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        boxes, logits = [], []
        for i, (feature, stride) in enumerate(zip(features, self.strides)):
            reg, cls = getattr(self, f"head{i + 1}")(feature)
            b, _, h, w = reg.shape
            reg = reg.float().reshape(b, 4, self.reg_max + 1, h * w)
            distances = (reg.softmax(dim=2) * self.proj).sum(dim=2).transpose(1, 2)  # [B, HW, 4] as l, t, r, b
            points = anchor_points(h, w, reg.device)
            xy1 = points - distances[..., :2]
            xy2 = distances[..., 2:] + points
            boxes.append(torch.cat([xy1, xy2], dim=-1) * stride)
            logits.append(cls.float().reshape(b, self.num_classes, h * w))
        scores = torch.cat(logits, dim=2).transpose(1, 2).sigmoid()
        return torch.cat(boxes, dim=1), scores


def anchor_points(h: int, w: int, device: torch.device) -> Tensor:
    """Cell centres of an h x w grid in grid units, [h*w, 2] as (x, y), row-major."""
    ys = torch.arange(h, dtype=torch.float32, device=device) + 0.5
    xs = torch.arange(w, dtype=torch.float32, device=device) + 0.5
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y], dim=-1).reshape(-1, 2)
