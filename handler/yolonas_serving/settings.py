"""The handler's settings: the ``handler:`` section of an archive's model-config.yaml, validated once at load."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

from .decode import DecodeLimits
from .pipeline import COCO_PIPELINE, Pipeline
from .postprocess import NMSOptions

#  super-gradients' predict() defaults for COCO models.
DEFAULT_NMS = NMSOptions(conf=0.25, iou=0.7, pre_nms_top_k=1024, max_det=300, multi_label=True)


@dataclass(frozen=True)
class HandlerSettings:
    variant: str = "s"
    num_classes: int = 80
    backend: str = "torch"
    pipeline: list[Any] = field(default_factory=COCO_PIPELINE.to_spec)
    preprocessing_source: str = "super-gradients COCO defaults"
    conf: float = DEFAULT_NMS.conf
    iou: float = DEFAULT_NMS.iou
    pre_nms_top_k: int = DEFAULT_NMS.pre_nms_top_k
    max_det: int = DEFAULT_NMS.max_det
    multi_label: bool = DEFAULT_NMS.multi_label
    torch_threads: int = 0  # 0: the host's cores divided by the model's maxWorkers, at least 1
    max_image_bytes: int = DecodeLimits.max_bytes
    max_image_pixels: int = DecodeLimits.max_pixels

    @classmethod
    def from_config(cls, section: dict[str, Any] | None) -> HandlerSettings:
        section = dict(section or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(section) - known)
        if unknown:
            raise ValueError(f"model-config.yaml handler section: unknown keys {unknown}; known: {sorted(known)}")
        settings = cls(**section)
        Pipeline.from_spec(settings.pipeline)  # fail at load, not on the first request
        return settings

    def as_config(self) -> dict[str, Any]:
        return asdict(self)

    def nms_options(self) -> NMSOptions:
        return NMSOptions(self.conf, self.iou, self.pre_nms_top_k, self.max_det, self.multi_label)

    def decode_limits(self) -> DecodeLimits:
        return DecodeLimits(max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels)

    def threads(self, max_workers: int) -> int:
        if self.torch_threads > 0:
            return self.torch_threads
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(1, cores // max(1, max_workers))
