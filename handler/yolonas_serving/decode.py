"""Image bytes -> RGB uint8 array (H, W, 3), with limits against oversized input and decompression bombs."""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import RequestError

#  Pillow format names we accept; MPO is the multi-picture JPEG that phone cameras write.
SUPPORTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP", "DIB", "TIFF", "GIF"})
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


@dataclass(frozen=True)
class DecodeLimits:
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000  # 40 MP: larger than any phone photo, far below a decompression bomb
    min_side: int = 1


def _to_rgb(image: Image.Image) -> np.ndarray:
    if image.mode in SIXTEEN_BIT_MODES:
        # Pillow's convert() clips 16-bit values at 255; scale the full range to 8 bits instead.
        wide = np.asarray(image, dtype=np.float64)
        gray = np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode == "F":
        gray = np.clip(np.rint(np.asarray(image)), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    # RGBA drops its alpha, as super-gradients' loader does (the models were validated that way).
    return np.asarray(image.convert("RGB") if image.mode != "RGB" else image)


def _apply_orientation(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # malformed EXIF: the pixels are fine, keep them as stored
        return image


def open_image(data: bytes | bytearray | memoryview, limits: DecodeLimits = DecodeLimits()) -> Image.Image:
    """Open and check an encoded image without decoding its pixels yet."""
    if len(data) == 0:
        raise RequestError("empty image: the request carried no bytes")
    if len(data) > limits.max_bytes:
        raise RequestError(f"image is {len(data)} bytes; the limit is {limits.max_bytes}", status=413)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise RequestError("not an image: the bytes are none of JPEG, PNG, WebP, BMP, TIFF or GIF") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise RequestError(f"image refused as a decompression bomb: {exc}", status=413) from None
    except Exception as exc:  # Pillow raises many types for malformed headers
        raise RequestError(f"unreadable image header: {exc}") from None
    if image.format not in SUPPORTED_FORMATS:
        raise RequestError(f"unsupported image format {image.format}; send JPEG, PNG, WebP, BMP, TIFF or GIF")
    width, height = image.size
    if width < limits.min_side or height < limits.min_side:
        raise RequestError(f"image is {width}x{height}; each side must be at least {limits.min_side} pixel")
    if width * height > limits.max_pixels:
        raise RequestError(
            f"image is {width}x{height} = {width * height} pixels; the limit is {limits.max_pixels}", status=413
        )
    return image


@dataclass(frozen=True)
class DecodedImage:
    pixels: np.ndarray  # RGB uint8 (H, W, 3), EXIF orientation applied
    original_size: tuple[int, int]  # (width, height) of the full-resolution, oriented image


def decode_image(
    data: bytes | bytearray | memoryview,
    limits: DecodeLimits = DecodeLimits(),
    min_longest_side: int | None = None,
) -> DecodedImage:
    """Decode the first frame to RGB uint8 with EXIF orientation applied.

    ``min_longest_side`` lets a large JPEG decode at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, an area average)
    as long as its longest side stays at least that long: when the pipeline then shrinks the longest side to exactly
    that, decoding the full resolution only to throw it away costs time and changes nothing the network sees beyond
    resampling noise (the difference is that of choosing another resize filter).
    """
    image = open_image(data, limits)
    full_size = image.size
    try:
        if min_longest_side is not None and image.format in ("JPEG", "MPO"):
            # draft() keeps both sides at least the requested ones: ask for the image's own shape at that length.
            ratio = min_longest_side / max(full_size)
            image.draft("RGB", (math.ceil(full_size[0] * ratio), math.ceil(full_size[1] * ratio)))
        image.load()
        stored_size = image.size
        oriented = _apply_orientation(image)
        pixels = _to_rgb(oriented)
    except RequestError:
        raise
    except Exception as exc:  # truncated or corrupt pixel data
        raise RequestError(f"corrupt image data ({image.format}): {exc}") from None
    swapped = oriented.size != stored_size  # EXIF orientations 5-8 transpose the image
    original = (full_size[1], full_size[0]) if swapped else full_size
    return DecodedImage(np.ascontiguousarray(pixels), original)
