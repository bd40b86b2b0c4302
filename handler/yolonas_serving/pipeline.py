"""Preprocessing as data.

A :class:`Pipeline` is a list of super-gradients' processing steps with their arguments, in super-gradients' own
notation (``{"DetectionCenterPadding": {"output_shape": [640, 640], "pad_value": 114}}`` or a bare name). It turns
an RGB uint8 image into the network's CHW float32 input and records the :class:`BoxTransform` that maps network
boxes back onto the original image. The COCO default is one such list; a Trainer checkpoint's
``processing_params`` is translated into another; archives store theirs in ``model-config.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .steps import (
    FIXED_PADDING_STEPS,
    MINIMAL_PADDING,
    RESCALE_STEPS,
    STRIDE,
    BoxTransform,
    DetectionAutoPadding,
    DetectionBottomRightPadding,
    DetectionCenterPadding,
    DetectionLongestMaxSizeRescale,
    DetectionRescale,
    ImagePermute,
    PipelineError,
    ReverseImageChannels,
    Step,
    build_step,
)

#  ``fixed`` keeps the pipeline's own fixed-size padding; the others replace it (:meth:`Pipeline.with_padding`).
PADDING_MODES = ("fixed", "center", "bottom-right", "minimal")


@dataclass(frozen=True)
class Pipeline:
    steps: tuple[Step, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        permutes = [s for s in self.steps if isinstance(s, ImagePermute)]
        if [p.permutation for p in permutes] != [(2, 0, 1)]:
            raise PipelineError("the pipeline must end HWC -> CHW with exactly one ImagePermute (2, 0, 1)")
        fixed = self.input_size
        if fixed is not None and (fixed[0] % STRIDE or fixed[1] % STRIDE):
            raise PipelineError(
                f"the network input {fixed[1]}x{fixed[0]} must have sides that are multiples of {STRIDE}"
            )
        if fixed is None and not any(isinstance(s, DetectionAutoPadding) for s in self.steps):
            raise PipelineError(
                "the pipeline must pad to a fixed size or add DetectionAutoPadding or DetectionCenterAutoPadding "
                "(multiples of 32)"
            )
        for i, step in enumerate(self.steps):
            if isinstance(step, FIXED_PADDING_STEPS):
                before = [s for s in self.steps[:i] if isinstance(s, RESCALE_STEPS)]
                if not before or any(
                    b.output_shape[0] > step.output_shape[0] or b.output_shape[1] > step.output_shape[1] for b in before
                ):
                    raise PipelineError(
                        f"{step.name} to {step.output_shape} needs a rescale to at most that size before it"
                    )

    @classmethod
    def from_spec(cls, spec: list[Any]) -> Pipeline:
        """From super-gradients' notation: a list of names or ``{name: {arguments}}``."""
        if not isinstance(spec, (list, tuple)) or not spec:
            raise PipelineError(f"a pipeline is a non-empty list of processing steps; got {spec!r}")
        return cls(tuple(build_step(entry) for entry in spec))

    @classmethod
    def from_processing_params(cls, params: dict[str, Any]) -> Pipeline:
        """From a Trainer checkpoint's ``processing_params["image_processor"]``."""
        processor = params.get("image_processor")
        if isinstance(processor, dict) and "ComposeProcessing" in processor:
            return cls.from_spec((processor["ComposeProcessing"] or {}).get("processings", []))
        if isinstance(processor, list):
            return cls.from_spec(processor)
        raise PipelineError(f"processing_params has no ComposeProcessing image_processor; found {processor!r}")

    def to_spec(self) -> list[Any]:
        return [step.spec() for step in self.steps]

    @property
    def input_size(self) -> tuple[int, int] | None:
        """(height, width) of every network input, or None when it follows the image (auto padding)."""
        size = None
        for step in self.steps:
            if isinstance(step, FIXED_PADDING_STEPS) or isinstance(step, DetectionRescale):
                size = step.output_shape
            elif isinstance(step, DetectionAutoPadding):  # either placement
                size = None
        return size

    @property
    def reverses_channels(self) -> bool:
        return sum(isinstance(s, ReverseImageChannels) for s in self.steps) % 2 == 1

    def with_input_size(self, height: int, width: int) -> Pipeline:
        """The same pipeline for another network input size; rescales keep their margin below the padding."""
        target = self.input_size
        if target is None:
            raise PipelineError("this pipeline pads automatically; it has no fixed input size to change")
        margin_h, margin_w = 0, 0
        rescales = [s for s in self.steps if isinstance(s, DetectionLongestMaxSizeRescale)]
        if rescales:
            margin_h = target[0] - rescales[-1].output_shape[0]
            margin_w = target[1] - rescales[-1].output_shape[1]
        steps = []
        for step in self.steps:
            if isinstance(step, DetectionLongestMaxSizeRescale):
                step = replace(step, output_shape=(height - margin_h, width - margin_w))
            elif isinstance(step, (DetectionRescale,) + FIXED_PADDING_STEPS):
                step = replace(step, output_shape=(height, width))
            steps.append(step)
        return Pipeline(tuple(steps))

    @property
    def has_fixed_padding(self) -> bool:
        return any(isinstance(s, FIXED_PADDING_STEPS) for s in self.steps)

    def with_padding(self, mode: str) -> Pipeline:
        """Keep the fixed padding (``fixed``), swap it for ``center`` or ``bottom-right`` padding, or for
        ``minimal`` padding: the image stays where the fixed padding puts it, padded only up to the next multiple of
        32 (the input follows the image's aspect ratio)."""
        if mode not in PADDING_MODES:
            raise PipelineError(f"padding must be one of {list(PADDING_MODES)}; got {mode!r}")
        if not self.has_fixed_padding:
            raise PipelineError("this pipeline has no fixed-size padding to change")
        if mode == "fixed":
            return self

        def swapped(step: Step) -> Step:
            if not isinstance(step, FIXED_PADDING_STEPS):
                return step
            if mode == "minimal":
                return MINIMAL_PADDING[type(step)](pad_value=step.pad_value)
            fixed = {"center": DetectionCenterPadding, "bottom-right": DetectionBottomRightPadding}[mode]
            return fixed(step.output_shape, step.pad_value)

        return Pipeline(tuple(swapped(s) for s in self.steps))

    @property
    def shrinks_to(self) -> int | None:
        """The longest side the first geometric step scales every image to, when it leads (draft decoding)."""
        for step in self.steps:
            if isinstance(step, RESCALE_STEPS):
                return max(step.output_shape)
            if not isinstance(step, ReverseImageChannels):
                return None
        return None

    def __call__(
        self, image: np.ndarray, original_size: tuple[int, int] | None = None
    ) -> tuple[np.ndarray, BoxTransform]:
        """RGB uint8 (H, W, 3) -> network input (3, h, w) float32 and the transform back to original pixels.

        ``original_size`` (width, height) is the full-resolution size when ``image`` was decoded at reduced size.
        """
        height, width = image.shape[:2]
        original_size = original_size or (width, height)
        transform = BoxTransform(original_size).rescaled(width / original_size[0], height / original_size[1])
        for step in self.steps:
            image, transform = step.apply(image, transform)
        return np.ascontiguousarray(image, dtype=np.float32), transform


COCO_PIPELINE = Pipeline.from_spec(
    [
        {"DetectionLongestMaxSizeRescale": {"output_shape": [636, 636]}},
        {"DetectionCenterPadding": {"output_shape": [640, 640], "pad_value": 114}},
        {"StandardizeImage": {"max_value": 255.0}},
        {"ImagePermute": {"permutation": [2, 0, 1]}},
    ]
)
