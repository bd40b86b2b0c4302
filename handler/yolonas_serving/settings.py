"""The handler's settings: the ``handler:`` section of an archive's model-config.yaml, validated once at load."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from yolonas import VARIANTS

from .classes import default_names
from .decode import DecodeLimits
from .envelope import MAX_DET_LIMIT, RequestLimits
from .pipeline import COCO_PIPELINE, Pipeline
from .postprocess import NMSOptions
from .runtime import BACKENDS

#  Backends that already trade super-gradients' exact answers for speed (reduced precision, or the fastest path the
#  host has) also default to minimal padding, which skips the network's work on the square input's padding; the
#  exact ones (torch, onnx, openvino: fp32) keep the checkpoint's fixed input (README, "Minimal padding").
MINIMAL_PADDING_BACKENDS = ("auto", "torch-bf16", "cuda-fp16", "openvino-bf16", "int8")

#  super-gradients' predict() defaults for COCO models.
DEFAULT_NMS = NMSOptions(conf=0.25, iou=0.7, pre_nms_top_k=1024, max_det=300, multi_label=True)


class SettingsError(ValueError):
    """A setting of the wrong type or out of range; the message names the key, the value and what is allowed."""


@dataclass(frozen=True)
class Rule:
    """What one setting accepts: a type (float also takes integers; bool and int never stand in for each other),
    optionally a closed range or a set of choices, and why where the range surprises."""

    kind: type
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()
    why: str = ""

    def allowed(self) -> str:
        if self.choices:
            return "one of " + ", ".join(self.choices)
        text = {bool: "true or false", int: "an integer", float: "a number", str: "text", list: "a list"}[self.kind]
        if self.low is not None and self.high is not None:
            return f"{text} from {self.low:g} to {self.high:g}"
        if self.low is not None:
            return f"{text} >= {self.low:g}"
        return text

    def accepts(self, value: Any) -> bool:
        if self.kind is float:
            typed = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        elif self.kind is int:
            typed = isinstance(value, int) and not isinstance(value, bool)
        else:
            typed = isinstance(value, self.kind)
        if not typed:
            return False
        if self.choices:
            return value in self.choices
        return (self.low is None or value >= self.low) and (self.high is None or value <= self.high)


#  The handler: section of model-config.yaml.
HANDLER_RULES: dict[str, Rule] = {
    "variant": Rule(str, choices=tuple(VARIANTS)),
    "num_classes": Rule(int, 1),
    "backend": Rule(str, choices=tuple(BACKENDS)),
    "pipeline": Rule(list),
    "preprocessing_source": Rule(str),
    "conf": Rule(float, 0, 1),
    "iou": Rule(float, 0.01, 1),
    "pre_nms_top_k": Rule(int, 1),
    "max_det": Rule(int, 1, MAX_DET_LIMIT),
    "multi_label": Rule(bool),
    "class_agnostic": Rule(bool),
    "torch_threads": Rule(int, 0, 1024),
    "max_image_bytes": Rule(int, 1),
    "max_image_pixels": Rule(int, 1),
    "jpeg_draft": Rule(bool),
    "max_images_per_request": Rule(int, 1, 1024),
    "max_request_bytes": Rule(int, 1),
}
#  TorchServe's own model settings at the top of model-config.yaml (those this project sets or documents).
MODEL_RULES: dict[str, Rule] = {
    "minWorkers": Rule(int, 0, 64),
    "maxWorkers": Rule(int, 1, 64),
    "batchSize": Rule(int, 1, 256),
    "maxBatchDelay": Rule(int, 1, 60_000, why="TorchServe 0.12 reads 0 in model-config.yaml as unset: 100 ms"),
    "responseTimeout": Rule(int, 1, 86_400),
    "startupTimeout": Rule(int, 1, 86_400),
    "jobQueueSize": Rule(int, 1, 1_000_000),
    "deviceType": Rule(str, choices=("cpu", "gpu")),
    "sequenceBatching": Rule(bool),
    "sequenceMaxIdleMSec": Rule(int, 1),
    "maxNumSequence": Rule(int, 1),
}


def check_section(section: dict[str, Any], rules: dict[str, Rule], where: str) -> None:
    """Every key known and every value of the right type and range, or a SettingsError naming them all."""
    unknown = sorted(key for key in section if key not in rules)
    problems = [f"unknown keys {unknown}"] if unknown else []
    for key, value in section.items():
        rule = rules.get(key)
        if rule is None or rule.accepts(value):
            continue
        if rule.choices and isinstance(value, str):
            problems.append(f"unknown {key} {value!r}; allowed: {rule.allowed()}")
        else:
            why = f" ({rule.why})" if rule.why else ""
            problems.append(f"{key}: got {value!r} ({type(value).__name__}), allowed: {rule.allowed()}{why}")
    if problems:
        raise SettingsError(f"{where}: " + "; ".join(problems) + f". Known keys: {', '.join(rules)}")


def check_model_config(config: dict[str, Any]) -> None:
    """A whole model-config.yaml: TorchServe's keys and the handler: section, checked as the worker checks them."""
    check_section({k: v for k, v in config.items() if k != "handler"}, MODEL_RULES, "model-config.yaml")
    if config.get("minWorkers", 0) > config.get("maxWorkers", 64):
        raise SettingsError(f"minWorkers {config['minWorkers']} is above maxWorkers {config['maxWorkers']}")
    HandlerSettings.from_config(config.get("handler"))


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
    class_agnostic: bool = DEFAULT_NMS.class_agnostic  # the default of the per-request option "agnostic"
    torch_threads: int = 0  # 0: the host's cores divided by the model's maxWorkers, at least 1
    max_image_bytes: int = DecodeLimits.max_bytes
    max_image_pixels: int = DecodeLimits.max_pixels
    jpeg_draft: bool = True  # decode large JPEGs at 1/2..1/8 scale when the pipeline shrinks them below that anyway
    max_images_per_request: int = RequestLimits.max_images
    max_request_bytes: int = RequestLimits.max_bytes

    def __post_init__(self) -> None:
        check_section(asdict(self), HANDLER_RULES, "model-config.yaml handler section")

    @classmethod
    def from_config(cls, section: dict[str, Any] | None) -> HandlerSettings:
        section = dict(section or {})
        check_section(section, HANDLER_RULES, "model-config.yaml handler section")
        settings = cls(**section)
        Pipeline.from_spec(settings.pipeline)  # fail at load, not on the first request
        return settings

    def as_config(self) -> dict[str, Any]:
        return asdict(self)

    def nms_options(self) -> NMSOptions:
        return NMSOptions(
            self.conf, self.iou, self.pre_nms_top_k, self.max_det, self.multi_label, class_agnostic=self.class_agnostic
        )

    def decode_limits(self) -> DecodeLimits:
        return DecodeLimits(max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels)

    def request_limits(self) -> RequestLimits:
        return RequestLimits(max_images=self.max_images_per_request, max_bytes=self.max_request_bytes)

    def threads(self, max_workers: int) -> int:
        if self.torch_threads > 0:
            return self.torch_threads
        return max(1, available_cores() // max(1, max_workers))


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one), which workers share."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


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
    names, conf, iou) when present, else super-gradients' COCO defaults; explicit arguments override both. Without
    ``padding``, a backend of MINIMAL_PADDING_BACKENDS gets minimal padding where the pipeline pads to a fixed
    size."""
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
    if padding is None and backend in MINIMAL_PADDING_BACKENDS and pipeline.has_fixed_padding:
        pipeline = pipeline.with_padding("minimal")
        source += f", minimal padding (the default for backend {backend})"
    elif padding:
        pipeline = pipeline.with_padding(padding)  # "fixed" keeps the padding, and is refused where there is none
        if padding != "fixed":
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
