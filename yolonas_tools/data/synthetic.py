"""Synthetic images in the style of the shapes model's data: circles, squares, triangles and hollow rectangles in
random colours on a noisy two-colour gradient. They calibrate INT8 archives of that model (and of the test models)
without touching its validation images.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

SHAPES = ("circle", "square", "triangle", "ring_rect")


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    start, end = rng.uniform(0, 255, (2, 3))
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:size, 0:size] / size
    t = (xs * np.cos(angle) + ys * np.sin(angle) + 1.5) / 3  # in [0, 1] for any angle
    return start + (end - start) * t[..., None]


def _draw(rng: np.random.Generator, image: np.ndarray, shape: str) -> None:
    size = image.shape[0]
    side = int(rng.uniform(0.07, 0.32) * size)
    x, y = (int(v) for v in rng.uniform(0, size - side, 2))
    colour = tuple(float(c) for c in rng.uniform(0, 255, 3))
    if shape == "circle":
        cv2.circle(image, (x + side // 2, y + side // 2), side // 2, colour, -1, cv2.LINE_AA)
    elif shape == "square":
        cv2.rectangle(image, (x, y), (x + side, y + side), colour, -1)
    elif shape == "triangle":
        points = np.array([[x + side // 2, y], [x, y + side * 3 // 4], [x + side, y + side * 3 // 4]], dtype=np.int32)
        cv2.fillPoly(image, [points], colour, cv2.LINE_AA)
    else:
        height = int(side * rng.uniform(0.5, 0.9))
        thickness = max(3, side // 10)
        cv2.rectangle(image, (x, y), (x + side, y + height), colour, thickness)


def shapes_image(rng: np.random.Generator, size: int = 320) -> np.ndarray:
    """One RGB uint8 image with one to six shapes."""
    image = _background(rng, size)
    for shape in rng.choice(SHAPES, size=int(rng.integers(1, 7))):
        _draw(rng, image, str(shape))
    image += rng.normal(0, 4, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_shapes_images(folder: str | Path, count: int, seed: int = 0, size: int = 320) -> list[Path]:
    """``count`` PNG images named shape_0000.png, ... in ``folder``; the same seed gives the same images."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"shape_{i:04d}.png"
        cv2.imwrite(str(path), cv2.cvtColor(shapes_image(rng, size), cv2.COLOR_RGB2BGR))
        paths.append(path)
    return paths
