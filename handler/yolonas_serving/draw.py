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


def line_width(size: tuple[int, int]) -> int:
    """Box outline in pixels: 1 up to 400 px on the longest side, then 1 per 400 px (10 on a 4000x3000 photo)."""
    return max(1, round(max(size) / 400))


def label_font_size(size: tuple[int, int]) -> int:
    """Label text height in pixels: 1/60 of the longest side, at least 11 (67 on a 4000x3000 photo), so labels
    stay readable when the picture is shown scaled to a screen."""
    return max(11, round(max(size) / 60))


def draw_detections(image: np.ndarray, detections: Detections, names: list[str]) -> Image.Image:
    """RGB uint8 array -> PIL image with each detection's box and ``name score`` label (``#id name score`` for a
    tracked detection), both scaled to the image."""
    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=label_font_size(canvas.size))
    width = line_width(canvas.size)
    pad = max(1, width // 2)
    tracks = detections.track_ids if detections.track_ids is not None else [-1] * len(detections)
    for box, score, class_id, track_id in zip(detections.boxes, detections.scores, detections.class_ids, tracks):
        colour = class_colour(int(class_id))
        x1, y1, x2, y2 = (float(v) for v in box)
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=width)
        label = f"{f'#{track_id} ' if track_id >= 0 else ''}{names[class_id]} {score:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font, anchor="ls")
        height = bottom - top + 2 * pad
        # Above the box when there is room, else inside its top edge.
        label_top = y1 - height if y1 - height >= 0 else y1
        draw.rectangle([x1, label_top, x1 + right - left + 2 * pad, label_top + height], fill=colour)
        draw.text((x1 + pad, label_top + pad - top), label, fill=(0, 0, 0), font=font, anchor="ls")
    return canvas


def encode_jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
