"""The handler's settings: the ``handler:`` section of an archive's model-config.yaml, validated once, the same way,
when the archive is built and when the worker loads it.

The section is flat. The request options marked ``archive`` in ``options.py`` set the defaults of their request
option under the same name (``conf: 0.4``); the tracker's parameters sit beside ``tracker`` under the library's
names (``lost_track_buffer: 60``); the other keys are below. Every value is checked with the same kinds as the
request options (``options.Number``, ``Flag``, ``Choice``), strictly typed: YAML's numbers and booleans.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from yolonas import VARIANTS

from .backends import BACKENDS
from .classes import default_names
from .decode import DecodeLimits
from .options import (
    ARCHIVE_OPTIONS,
    Choice,
    Flag,
    Number,
    OptionError,
    RequestOptions,
    archive_config,
    archive_defaults,
)
from .pipeline import COCO_PIPELINE, Pipeline
from .protocol.base import RequestLimits
from .steps import PipelineError
from .tracking import TRACKER_DEFAULTS, TrackerSettings

#  Where the tracker's parameters come from: the names of every kind's (TrackerSettings checks them per kind).
TRACKER_PARAMETERS = sorted({name for parameters in TRACKER_DEFAULTS.values() for name in parameters})
NO_TRACKER = "off"


class SettingsError(ValueError):
    """A setting of the wrong type or out of range; the message names the key, the value and what is allowed."""


@dataclass(frozen=True)
class Text:
    allowed: str = "text"

    def parse(self, name: str, value: Any, strict: bool = True) -> str:
        if not isinstance(value, str):
            raise OptionError(name, value, self.allowed)
        return value


@dataclass(frozen=True)
class Steps:
    """A preprocessing pipeline in super-gradients' notation (checked by ``Pipeline.from_spec``)."""

    allowed: str = "a list of processing steps"

    def parse(self, name: str, value: Any, strict: bool = True) -> list[Any]:
        try:
            return Pipeline.from_spec(value).to_spec()
        except PipelineError as exc:
            raise OptionError(name, value, f"{self.allowed} ({exc})") from None


#  The handler keys that are no request option, with what each takes.
HANDLER_KEYS: dict[str, Any] = {
    "variant": Choice(tuple(VARIANTS)),
    "num_classes": Number(int, 1),
    "backend": Choice(tuple(BACKENDS)),
    "pipeline": Steps(),
    "preprocessing_source": Text(),
    "pre_nms_top_k": Number(int, 1),
    "multi_label": Flag(),
    "torch_threads": Number(int, 0, 1024),
    "max_image_bytes": Number(int, 1),
    "max_image_pixels": Number(int, 1),
    "jpeg_draft": Flag(),
    "max_images_per_request": Number(int, 1, 1024),
    "max_request_bytes": Number(int, 1),
    "max_tiles": Number(int, 1, 10_000),
    "tracker": Choice((NO_TRACKER, *TRACKER_DEFAULTS)),
}
#  Every key of the handler: section.
KNOWN_KEYS = (*HANDLER_KEYS, *ARCHIVE_OPTIONS, *TRACKER_PARAMETERS)
#  TorchServe's own model settings at the top of model-config.yaml (those this project sets or documents).
MODEL_KEYS: dict[str, Any] = {
    "minWorkers": Number(int, 0, 64),
    "maxWorkers": Number(int, 1, 64),
    "batchSize": Number(int, 1, 256),
    # TorchServe 0.12 reads 0 in model-config.yaml as unset: 100 ms.
    "maxBatchDelay": Number(int, 1, 60_000),
    "responseTimeout": Number(int, 1, 86_400),
    "startupTimeout": Number(int, 1, 86_400),
    "jobQueueSize": Number(int, 1, 1_000_000),
    "deviceType": Choice(("cpu", "gpu")),
    "sequenceBatching": Flag(),
    "sequenceMaxIdleMSec": Number(int, 1),
    "maxNumSequence": Number(int, 1),
    "maxSequenceJobQueueSize": Number(int, 1),
}
WHY = {"maxBatchDelay": "TorchServe 0.12 reads 0 in model-config.yaml as unset: 100 ms"}


def _checked(section: dict[str, Any], kinds: dict[str, Any], where: str) -> dict[str, Any]:
    """Every key known and every value of its kind, or a SettingsError naming them all; the values as parsed."""
    unknown = sorted(key for key in section if key not in kinds)
    problems = [f"unknown keys {unknown}"] if unknown else []
    parsed = {}
    for key, value in section.items():
        if key not in kinds:
            continue
        try:
            parsed[key] = kinds[key].parse(key, value, strict=True)
        except OptionError as exc:
            problems.append(str(exc) + (f" ({WHY[key]})" if key in WHY else ""))
    if problems:
        raise SettingsError(f"{where}: " + "; ".join(problems) + f". Known keys: {', '.join(kinds)}")
    return parsed


def _parse_section(section: dict[str, Any]) -> tuple[dict[str, Any], RequestOptions, tuple[tuple[str, Any], ...]]:
    """A handler: section checked: its own keys, the request options' defaults and the tracker's parameters."""
    where = "model-config.yaml handler section"
    keys = _checked({k: v for k, v in section.items() if k in HANDLER_KEYS or k not in KNOWN_KEYS}, HANDLER_KEYS, where)
    try:
        options = archive_defaults({k: v for k, v in section.items() if k in ARCHIVE_OPTIONS})
        parameters = tuple(sorted((k, v) for k, v in section.items() if k in TRACKER_PARAMETERS))
        tracker = keys.get("tracker", NO_TRACKER)
        if parameters and tracker == NO_TRACKER:
            raise ValueError(f"tracker parameters {[k for k, _ in parameters]} need a tracker (tracker: bytetrack)")
        if tracker != NO_TRACKER:
            TrackerSettings(tracker, parameters)
    except (OptionError, ValueError) as exc:
        raise SettingsError(f"{where}: {exc}") from None
    return keys, options, parameters


def check_model_config(config: dict[str, Any]) -> None:
    """A whole model-config.yaml: TorchServe's keys and the handler: section, checked as the worker checks them."""
    _checked({k: v for k, v in config.items() if k != "handler"}, MODEL_KEYS, "model-config.yaml")
    if config.get("minWorkers", 0) > config.get("maxWorkers", 64):
        raise SettingsError(f"minWorkers {config['minWorkers']} is above maxWorkers {config['maxWorkers']}")
    settings = HandlerSettings.from_config(config.get("handler"))
    if settings.tracker != NO_TRACKER and not config.get("sequenceBatching"):
        raise SettingsError(f"tracker {settings.tracker} needs sequenceBatching: true (a tracker per sequence)")
    sequences, batch = config.get("maxNumSequence", 1), config.get("batchSize", 1)
    if config.get("sequenceBatching") and sequences > batch:
        # A worker polls its sequences on batchSize + 1 threads, and an idle sequence holds one for
        # sequenceMaxIdleMSec: the first frame of a sequence beyond batchSize waits seconds (seen: 7 s).
        raise SettingsError(f"maxNumSequence {sequences} is above batchSize {batch}: TorchServe 0.12 would hold the "
                            "frames of the sequences beyond batchSize for seconds; raise batchSize to match")  # fmt: skip


@dataclass(frozen=True)
class HandlerSettings:
    variant: str = "s"
    num_classes: int = 80
    backend: str = "torch"
    pipeline: list[Any] = field(default_factory=COCO_PIPELINE.to_spec)
    preprocessing_source: str = "super-gradients COCO defaults"
    pre_nms_top_k: int = 1024  # super-gradients' predict() defaults, as the request options' defaults are
    multi_label: bool = True
    torch_threads: int = 0  # 0: the host's cores divided by the model's maxWorkers, at least 1
    max_image_bytes: int = DecodeLimits.max_bytes
    max_image_pixels: int = DecodeLimits.max_pixels
    jpeg_draft: bool = True  # decode large JPEGs at 1/2..1/8 scale when the pipeline shrinks them below that anyway
    max_images_per_request: int = RequestLimits.max_images
    max_request_bytes: int = RequestLimits.max_bytes
    max_tiles: int = 256  # tiles of one sliced image (a 4000x3000 photo in 640 tiles has 48)
    tracker: str = NO_TRACKER
    options: RequestOptions = RequestOptions()  # the request options' defaults
    tracker_parameters: tuple[tuple[str, Any], ...] = ()  # those set; the others keep the library's defaults

    def __post_init__(self) -> None:
        _parse_section(self.as_config())

    @classmethod
    def from_config(cls, section: dict[str, Any] | None) -> HandlerSettings:
        keys, options, parameters = _parse_section(dict(section or {}))
        return cls(**keys, options=options, tracker_parameters=parameters)

    def as_config(self) -> dict[str, Any]:
        """The flat handler: section."""
        keys = {name: getattr(self, name) for name in HANDLER_KEYS}
        return {**keys, **archive_config(self.options), **dict(self.tracker_parameters)}

    def tracker_settings(self) -> TrackerSettings | None:
        return None if self.tracker == NO_TRACKER else TrackerSettings(self.tracker, self.tracker_parameters)

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
    ``padding``, a backend whose row has ``minimal_padding`` gets minimal padding where the pipeline pads to a fixed
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
    if padding is None and BACKENDS[backend].minimal_padding and pipeline.has_fixed_padding:
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
    defaults = RequestOptions()
    options = RequestOptions(
        conf=conf if conf is not None else float(params.get("conf", defaults.conf)),
        iou=iou if iou is not None else float(params.get("iou", defaults.iou)),
    )
    settings = HandlerSettings(variant=variant, num_classes=num_classes, backend=backend, pipeline=pipeline.to_spec(),
                               preprocessing_source=source, options=options)  # fmt: skip
    return settings, names
