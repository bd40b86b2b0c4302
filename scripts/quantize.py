"""INT8 post-training quantization of an OpenVINO model with NNCF, at archive time.

Calibration images go through the archive's own decoding and preprocessing, so the statistics describe exactly
what the served network sees. The box-decoding tail (the ops of ``Heads.forward`` itself: softmax over the
distance bins, expectation, anchor arithmetic, sigmoid) is left out of quantization and stays in float, so boxes
keep their arithmetic; the convolutions that feed it, ``reg_pred`` and ``cls_pred`` included, run in INT8.

nncf is needed only here (``pip install nncf``): serving an INT8 archive needs OpenVINO alone.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from common import HANDLER_DIR  # noqa: F401  (puts the handler packages on sys.path)
from yolonas_serving.decode import decode_image
from yolonas_serving.pipeline import Pipeline

#  ONNX node names follow the module tree: "/heads/Softmax" is decoding, "/heads/head1/reg_pred/Conv" a head conv.
DECODING_TAIL = r"^/heads/[^/]+$"
MAX_CALIBRATION_IMAGES = 300  # NNCF's default subset size
IMAGE_SUFFIXES = frozenset({".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp"})


def calibration_batches(
    images_dir: str | Path, pipeline: Pipeline, limit: int = MAX_CALIBRATION_IMAGES
) -> list[np.ndarray]:
    """The first ``limit`` images of ``images_dir`` (sorted by name), preprocessed: one [1, 3, H, W] batch each."""
    paths = sorted(p for p in Path(images_dir).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not paths:
        raise ValueError(f"{images_dir}: no calibration images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return [pipeline(decode_image(p.read_bytes()).pixels)[0][None] for p in paths]


def quantize_int8(model: Any, batches: list[np.ndarray]) -> Any:
    """An INT8 copy of the OpenVINO ``model``, calibrated on ``batches`` (symmetric, per-channel weights)."""
    import nncf

    nncf.set_log_level(logging.WARNING)  # not one line per op left in float
    return nncf.quantize(
        model,
        nncf.Dataset(batches),
        preset=nncf.QuantizationPreset.PERFORMANCE,
        subset_size=len(batches),
        ignored_scope=nncf.IgnoredScope(patterns=[DECODING_TAIL]),
    )
