"""Preprocessing as data.

A :class:`Pipeline` is a list of super-gradients' processing steps with their arguments, in super-gradients' own
notation (``{"DetectionCenterPadding": {"output_shape": [640, 640], "pad_value": 114}}`` or a bare name). It turns
an RGB uint8 image into the network's CHW float32 input and records the :class:`BoxTransform` that maps network
boxes back onto the original image. The COCO default is one such list; a Trainer checkpoint's
``processing_params`` is translated into another; archives store theirs in ``model-config.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import cv2
import numpy as np

STRIDE = 32
#  ``fixed`` keeps the pipeline's own fixed-size padding; the others replace it (:meth:`Pipeline.with_padding`).
PADDING_MODES = ("fixed", "center", "bottom-right", "minimal")


class PipelineError(ValueError):
    """A pipeline description we cannot run; raised when it is built (at archive time), not per request."""


@dataclass(frozen=True)
class BoxTransform:
    """Network coordinates = original * scale + pad, per axis."""

    original_size: tuple[int, int]  # (width, height)
    scale_x: float = 1.0
    scale_y: float = 1.0
    pad_x: float = 0.0
    pad_y: float = 0.0

    def rescaled(self, sx: float, sy: float) -> BoxTransform:
        return replace(
            self, scale_x=self.scale_x * sx, scale_y=self.scale_y * sy, pad_x=self.pad_x * sx, pad_y=self.pad_y * sy
        )

    def padded(self, left: int, top: int) -> BoxTransform:
        return replace(self, pad_x=self.pad_x + left, pad_y=self.pad_y + top)

    def to_original(self, boxes: np.ndarray) -> np.ndarray:
        """Map xyxy boxes [N, 4] from network input to original pixels (as super-gradients does: unshift, rescale)."""
        shift = np.array([self.pad_x, self.pad_y, self.pad_x, self.pad_y], dtype=np.float32)
        inverse = np.array([1 / self.scale_x, 1 / self.scale_y, 1 / self.scale_x, 1 / self.scale_y], dtype=np.float32)
        return (boxes.astype(np.float32) - shift) * inverse


def _shape(value: Any, step: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    try:
        height, width = (int(v) for v in value)
    except (TypeError, ValueError):
        raise PipelineError(f"{step}: output_shape must be [height, width]; got {value!r}") from None
    if height <= 0 or width <= 0:
        raise PipelineError(f"{step}: output_shape must be positive; got {value!r}")
    return height, width


def _pad_value(value: Any) -> float | tuple[float, ...]:
    if isinstance(value, (int, float)):
        return float(value)
    return tuple(float(v) for v in value)


def _pad(
    image: np.ndarray, top: int, bottom: int, left: int, right: int, value: float | tuple[float, ...]
) -> np.ndarray:
    if min(top, bottom, left, right) < 0:
        raise ValueError(f"image {image.shape[1]}x{image.shape[0]} is larger than the padded size")
    fill = value if isinstance(value, tuple) else (value,) * image.shape[2]
    return cv2.copyMakeBorder(image, top, bottom, left, right, cv2.BORDER_CONSTANT, value=fill)


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    # OpenCV's bilinear, exactly as super-gradients: Pillow antialiases and torch rounds differently.
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)


class Step:
    """One processing step. Subclasses are dataclasses named as in super-gradients."""

    name: ClassVar[str]

    def apply(self, image: np.ndarray, transform: BoxTransform) -> tuple[np.ndarray, BoxTransform]:
        raise NotImplementedError

    def spec(self) -> dict[str, Any] | str:
        return self.name


@dataclass(frozen=True)
class ReverseImageChannels(Step):
    name: ClassVar[str] = "ReverseImageChannels"

    def apply(self, image: np.ndarray, transform: BoxTransform) -> tuple[np.ndarray, BoxTransform]:
        return image[..., ::-1], transform


@dataclass(frozen=True)
class DetectionLongestMaxSizeRescale(Step):
    """Scale so the image fits ``output_shape`` keeping its aspect ratio (small images are scaled up)."""

    output_shape: tuple[int, int]
    name: ClassVar[str] = "DetectionLongestMaxSizeRescale"

    def apply(self, image: np.ndarray, transform: BoxTransform) -> tuple[np.ndarray, BoxTransform]:
        height, width = image.shape[:2]
        scale = min(self.output_shape[0] / height, self.output_shape[1] / width)
        if scale == 1.0:
            return image, transform
        image = _resize(image, max(1, round(height * scale)), max(1, round(width * scale)))
        return image, transform.rescaled(scale, scale)

    def spec(self) -> dict[str, Any]:
        return {self.name: {"output_shape": list(self.output_shape)}}


@dataclass(frozen=True)
class DetectionRescale(Step):
    """Resize to exactly ``output_shape`` (aspect ratio not kept)."""

    output_shape: tuple[int, int]
    name: ClassVar[str] = "DetectionRescale"

    def apply(self, image: np.ndarray, transform: BoxTransform) -> tuple[np.ndarray, BoxTransform]:
        height, width = image.shape[:2]
        out_h, out_w = self.output_shape
        return _resize(image, out_h, out_w), transform.rescaled(out_w / width, out_h / height)

    def spec(self) -> dict[str, Any]:
        return {self.name: {"output_shape": list(self.output_shape)}}


@dataclass(frozen=True)
class DetectionCenterPadding(Step):
    """Pad to ``output_shape`` around the image; the odd pixel goes bottom/right."""

    output_shape: tuple[int, int]
    pad_value: float | tuple[float, ...] = 114.0
    name: ClassVar[str] = "DetectionCenterPadding"

    def apply(self, image: np.ndarray, transform: BoxTransform) -> tuple[np.ndarray, BoxTransform]:
        pad_h = self.output_shape[0] - image.shape[0]
        pad_w = self.output_shape[1] - image.shape[1]
        top, left = pad_h // 2, pad_w // 2
        image = _pad(image, top, pad_h - top, left, pad_w - left, self.pad_value)
        return image, transform.padded(left, top)

    def spec(self) -> dict[str, Any]:
        return {self.name: {"output_shape": list(self.output_shape), "pad_value": _spec_value(self.pad_value)}}


@dataclass(frozen=True)
class DetectionBottomRightPadding(Step):
    """Pad to ``output_shape`` below and to the right; the image stays at the top-left corner."""

    output_shape: tuple[int, int]
    pad_value: float | tuple[float, ...] = 114.0
    name: ClassVar[str] = "DetectionBottomRightPadding"

    def apply(self, image: np.ndarray, transform: BoxTransform) -> tuple[np.ndarray, BoxTransform]:
        pad_h = self.output_shape[0] - image.shape[0]
        pad_w = self.output_shape[1] - image.shape[1]
        return _pad(image, 0, pad_h, 0, pad_w, self.pad_value), transform

    def spec(self) -> dict[str, Any]:
        return {self.name: {"output_shape": list(self.output_shape), "pad_value": _spec_value(self.pad_value)}}


@dataclass(frozen=True)
class DetectionAutoPadding(Step):
    """Pad below and to the right up to the next multiple of ``shape_multiple``."""

    shape_multiple: tuple[int, int] = (STRIDE, STRIDE)
    pad_value: float | tuple[float, ...] = 114.0
    name: ClassVar[str] = "DetectionAutoPadding"

    def padding(self, image: np.ndarray) -> tuple[int, int]:
        """Rows and columns that bring the image's sides up to multiples of ``shape_multiple``."""
        return -image.shape[0] % self.shape_multiple[0], -image.shape[1] % self.shape_multiple[1]

    def apply(self, image: np.ndarray, transform: BoxTransform) -> tuple[np.ndarray, BoxTransform]:
        pad_h, pad_w = self.padding(image)
        return _pad(image, 0, pad_h, 0, pad_w, self.pad_value), transform

    def spec(self) -> dict[str, Any]:
        return {self.name: {"shape_multiple": list(self.shape_multiple), "pad_value": _spec_value(self.pad_value)}}


@dataclass(frozen=True)
class DetectionCenterAutoPadding(DetectionAutoPadding):
    """Ours, not super-gradients': the same sizes, the padding around the image (the odd pixel bottom/right). With a
    rescale before it, a 16:9 picture becomes a 640x384 input instead of 640x640, and the network skips the work on
    padding (``--padding minimal``)."""

    name: ClassVar[str] = "DetectionCenterAutoPadding"

    def apply(self, image: np.ndarray, transform: BoxTransform) -> tuple[np.ndarray, BoxTransform]:
        pad_h, pad_w = self.padding(image)
        top, left = pad_h // 2, pad_w // 2
        image = _pad(image, top, pad_h - top, left, pad_w - left, self.pad_value)
        return image, transform.padded(left, top)


@dataclass(frozen=True)
class StandardizeImage(Step):
    max_value: float = 255.0
    name: ClassVar[str] = "StandardizeImage"

    def apply(self, image: np.ndarray, transform: BoxTransform) -> tuple[np.ndarray, BoxTransform]:
        # float32 arithmetic is 3-4x faster than numpy's float64 default and, for uint8 input and a max_value that
        # float32 holds exactly (255 and other usual ones), gives the very same values (tests check every byte).
        return image.astype(np.float32) / np.float32(self.max_value), transform

    def spec(self) -> dict[str, Any]:
        return {self.name: {"max_value": self.max_value}}


@dataclass(frozen=True)
class NormalizeImage(Step):
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: ClassVar[str] = "NormalizeImage"

    def apply(self, image: np.ndarray, transform: BoxTransform) -> tuple[np.ndarray, BoxTransform]:
        mean = np.asarray(self.mean, dtype=np.float32).reshape(1, 1, -1)
        std = np.asarray(self.std, dtype=np.float32).reshape(1, 1, -1)
        return ((image - mean) / std).astype(np.float32), transform

    def spec(self) -> dict[str, Any]:
        return {self.name: {"mean": list(self.mean), "std": list(self.std)}}


@dataclass(frozen=True)
class ImagePermute(Step):
    permutation: tuple[int, int, int] = (2, 0, 1)
    name: ClassVar[str] = "ImagePermute"

    def apply(self, image: np.ndarray, transform: BoxTransform) -> tuple[np.ndarray, BoxTransform]:
        return image.transpose(self.permutation), transform

    def spec(self) -> dict[str, Any]:
        return {self.name: {"permutation": list(self.permutation)}}


def _spec_value(value: float | tuple[float, ...]) -> float | list[float]:
    return list(value) if isinstance(value, tuple) else value


STEPS: dict[str, type[Step]] = {
    cls.name: cls
    for cls in (
        ReverseImageChannels,
        DetectionLongestMaxSizeRescale,
        DetectionRescale,
        DetectionCenterPadding,
        DetectionBottomRightPadding,
        DetectionAutoPadding,
        DetectionCenterAutoPadding,
        StandardizeImage,
        NormalizeImage,
        ImagePermute,
    )
}
RESCALE_STEPS = (DetectionLongestMaxSizeRescale, DetectionRescale)
FIXED_PADDING_STEPS = (DetectionCenterPadding, DetectionBottomRightPadding)
#  --padding minimal: each fixed padding becomes the automatic one that puts the image in the same place.
MINIMAL_PADDING = {
    DetectionCenterPadding: DetectionCenterAutoPadding,
    DetectionBottomRightPadding: DetectionAutoPadding,
}


def _build_step(entry: Any) -> Step:
    if isinstance(entry, str):
        name, args = entry, {}
    elif isinstance(entry, dict) and len(entry) == 1:
        name, args = next(iter(entry.items()))
        args = dict(args or {})
    else:
        raise PipelineError(f"a processing step must be a name or {{name: {{arguments}}}}; got {entry!r}")
    if name not in STEPS:
        supported = ", ".join(STEPS)
        raise PipelineError(f"unknown preprocessing step {name!r}; supported: {supported}")
    try:
        if "output_shape" in args:
            args["output_shape"] = _shape(args["output_shape"], name)
        if "shape_multiple" in args:
            args["shape_multiple"] = _shape(args["shape_multiple"], name)
        if "pad_value" in args:
            args["pad_value"] = _pad_value(args["pad_value"])
        for key in ("mean", "std", "permutation"):
            if key in args:
                args[key] = tuple(args[key])
        if "max_value" in args:
            args["max_value"] = float(args["max_value"])
        return STEPS[name](**args)
    except TypeError as exc:
        raise PipelineError(f"{name}: bad arguments {args!r} ({exc})") from None


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
        return cls(tuple(_build_step(entry) for entry in spec))

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
