"""The processing steps a :class:`pipeline.Pipeline` is made of, named and parameterised as in super-gradients, and
the :class:`BoxTransform` they record on the way. Each turns an image (HWC, then CHW after ``ImagePermute``) into the
next, exactly as super-gradients does (OpenCV's bilinear resize, the same padding placement)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

import cv2
import numpy as np

STRIDE = 32


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


def build_step(entry: Any) -> Step:
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
