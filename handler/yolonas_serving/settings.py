"""The handler's settings: the ``handler:`` section of an archive's model-config.yaml, validated once at load."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

from .classes import default_names
from .decode import DecodeLimits
from .pipeline import COCO_PIPELINE, Pipeline
from .postprocess import NMSOptions
from .runtime import BACKENDS

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
    jpeg_draft: bool = True  # decode large JPEGs at 1/2..1/8 scale when the pipeline shrinks them below that anyway

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; known: {', '.join(BACKENDS)}")

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


def settings_from_checkpoint(
    num_classes: int,
    variant: str,
    processing_params: dict[str, Any] | None,
    input_size: tuple[int, int] | None = None,
    padding: str | None = None,
    names: list[str] | None = None,
    conf: float | None = None,
    iou: float | None = None,
    backend: str = "torch",
) -> tuple[HandlerSettings, list[str]]:
    """Settings and class names for a checkpoint: its ``processing_params`` (a Trainer checkpoint's pipeline, class
    names, conf, iou) when present, else super-gradients' COCO defaults; explicit arguments override both."""
    params = processing_params or {}
    if "image_processor" in params:
        pipeline = Pipeline.from_processing_params(params)
        source = "checkpoint processing_params"
    else:
        pipeline = COCO_PIPELINE
        source = "super-gradients COCO defaults (the checkpoint has no processing_params)"
    if input_size:
        pipeline = pipeline.with_input_size(*input_size)
        source += f", input size overridden to {input_size[0]}x{input_size[1]}"
    if padding:
        pipeline = pipeline.with_padding(padding)
        source += f", padding overridden to {padding}"
    if names is None:
        names = [str(n) for n in params["class_names"]] if params.get("class_names") else default_names(num_classes)
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for a model with {num_classes} classes")
    settings = HandlerSettings(
        variant=variant,
        num_classes=num_classes,
        backend=backend,
        pipeline=pipeline.to_spec(),
        preprocessing_source=source,
        conf=conf if conf is not None else float(params.get("conf", DEFAULT_NMS.conf)),
        iou=iou if iou is not None else float(params.get("iou", DEFAULT_NMS.iou)),
    )
    return settings, names
