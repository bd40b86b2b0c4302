"""Per-variant configuration: S, M and L differ only in these numbers."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class YoloNASConfig:
    name: str
    stage_hidden_channels: tuple[int, int, int, int]
    stage_concat_intermediates: tuple[bool, bool, bool, bool]
    neck_blocks: tuple[int, int, int, int]
    neck_hidden_channels: tuple[int, int, int, int]
    head_width_mult: float
    stem_channels: int = 48
    stage_channels: tuple[int, int, int, int] = (96, 192, 384, 768)
    stage_blocks: tuple[int, int, int, int] = (2, 3, 5, 2)
    spp_kernels: tuple[int, int, int] = (5, 9, 13)
    neck_channels: tuple[int, int, int, int] = (192, 96, 192, 384)
    head_inter_channels: tuple[int, int, int] = (128, 256, 512)
    strides: tuple[int, int, int] = (8, 16, 32)
    reg_max: int = 16


VARIANTS: dict[str, YoloNASConfig] = {
    "s": YoloNASConfig(
        name="yolo_nas_s",
        stage_hidden_channels=(32, 64, 96, 192),
        stage_concat_intermediates=(False, False, False, False),
        neck_blocks=(2, 2, 2, 2),
        neck_hidden_channels=(64, 48, 64, 64),
        head_width_mult=0.5,
    ),
    "m": YoloNASConfig(
        name="yolo_nas_m",
        stage_hidden_channels=(64, 128, 256, 384),
        stage_concat_intermediates=(True, True, True, False),
        neck_blocks=(2, 3, 2, 3),
        neck_hidden_channels=(192, 64, 192, 256),
        head_width_mult=0.75,
    ),
    "l": YoloNASConfig(
        name="yolo_nas_l",
        stage_hidden_channels=(96, 128, 256, 512),
        stage_concat_intermediates=(True, True, True, True),
        neck_blocks=(4, 4, 4, 4),
        neck_hidden_channels=(128, 128, 128, 256),
        head_width_mult=1.0,
    ),
}


def get_config(variant: str) -> YoloNASConfig:
    """Config for ``s``, ``m``, ``l`` (or ``yolo_nas_s`` etc.)."""
    key = variant.lower().removeprefix("yolo_nas_")
    if key not in VARIANTS:
        raise ValueError(f"unknown YOLO-NAS variant {variant!r}; expected one of s, m, l")
    return VARIANTS[key]
