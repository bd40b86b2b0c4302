"""Annotated pictures: boxes and labels drawn onto the original image, one colour per class."""

from __future__ import annotations

import colorsys
import io

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .postprocess import Detections


def class_colour(class_id: int) -> tuple[int, int, int]:
    """Well-separated hues by golden-ratio stepping; stable per class id."""
    hue = (class_id * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_detections(image: np.ndarray, detections: Detections, names: list[str]) -> Image.Image:
    """RGB uint8 array -> PIL image with each detection's box and ``name score`` label."""
    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    width = max(1, round(max(canvas.size) / 400))
    for box, score, class_id in zip(detections.boxes, detections.scores, detections.class_ids):
        colour = class_colour(int(class_id))
        x1, y1, x2, y2 = (float(v) for v in box)
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=width)
        label = f"{names[class_id]} {score:.2f}"
        left, top, right, bottom = draw.textbbox((x1, y1), label, font=font)
        offset = bottom - top + 2
        draw.rectangle([left, top - offset, right + 2, bottom - offset], fill=colour)
        draw.text((x1 + 1, y1 - offset), label, fill=(0, 0, 0), font=font)
    return canvas


def encode_jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
