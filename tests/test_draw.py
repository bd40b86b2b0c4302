"""Annotated pictures: outlines and labels grow with the image, so a 4000x3000 photo's labels stay readable."""

from __future__ import annotations

import numpy as np

from yolonas_serving.draw import class_colour, draw_detections, label_font_size, line_width
from yolonas_serving.postprocess import Detections


def drawn_label_height(width: int, height: int) -> int:
    """Draw one detection on a white image and measure the label's filled background above the box."""
    image = np.full((height, width, 3), 255, np.uint8)
    box = [0.2 * width, 0.3 * height, 0.6 * width, 0.8 * height]
    detections = Detections(np.array([box], np.float32), np.array([0.87], np.float32), np.array([0]))
    drawn = np.asarray(draw_detections(image, detections, ["person"])).astype(int)
    column = drawn[: round(box[1]), round(box[0]) + 1]
    rows = np.flatnonzero(np.abs(column - class_colour(0)).sum(axis=1) < 30)
    return int(rows[-1] - rows[0] + 1) if len(rows) else 0


def test_label_height_grows_with_the_image():
    heights = [drawn_label_height(w, h) for w, h in ((640, 480), (1920, 1080), (4000, 3000))]
    assert heights[0] < heights[1] < heights[2]
    assert heights[0] >= 11  # the smallest labels keep a legible size
    assert heights[2] >= 0.015 * 4000  # 60 px and more: readable on a 4000x3000 photo shown on a screen


def test_line_width_and_font_size_scale_with_the_longest_side():
    assert (line_width((640, 480)), line_width((4000, 3000))) == (2, 10)
    assert (label_font_size((320, 240)), label_font_size((4000, 3000))) == (11, 67)
