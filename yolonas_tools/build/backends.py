"""What each backend's archive stores (its row's ``files`` in ``yolonas_serving.backends.BACKENDS``), made from the
checkpoint at archive time, by the row's family: torch writes ``weights.pth`` (``{"net": state_dict}``); onnx the
ONNX export (dynamic batch); openvino an fp32 IR converted from the ONNX export (the precision is chosen when the
worker compiles it), quantized by NNCF where the row needs calibration (int8); auto the weights plus, when openvino
is installed here, the fp32 IR. The network input is the archive pipeline's fixed size, or dynamic height and width
for auto-padding pipelines.

INT8 (post-training quantization with NNCF): calibration images go through the archive's own decoding and
preprocessing, so the statistics describe exactly what the served network sees. The box-decoding tail (the ops of
``Heads.forward`` itself: softmax over the distance bins, expectation, anchor arithmetic, sigmoid) is left out of
quantization and stays in float, so boxes keep their arithmetic; the convolutions that feed it, ``reg_pred`` and
``cls_pred`` included, run in INT8.

nncf is needed only here (the ``int8`` extra): serving an INT8 archive needs OpenVINO alone.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from yolonas.checkpoint import Checkpoint, model_from_state_dict
from yolonas.export import export_onnx
from yolonas_serving.backends import BACKENDS, WEIGHTS_FILE, openvino_available
from yolonas_serving.decode import decode_image
from yolonas_serving.pipeline import Pipeline
from yolonas_tools.data.images import IMAGE_SUFFIXES, is_image

#  ONNX node names follow the module tree: "/heads/Softmax" is decoding, "/heads/head1/reg_pred/Conv" a head conv.
DECODING_TAIL = r"^/heads/[^/]+$"
MAX_CALIBRATION_IMAGES = 300  # NNCF's default subset size


def openvino_ir(ckpt: Checkpoint, input_size: tuple[int, int] | None):
    """The fused network as an OpenVINO model (via ONNX, whose node names the INT8 ignored scope relies on)."""
    import openvino as ov

    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_onnx(fused_model(ckpt), Path(tmp) / "model.onnx", input_size)
        return ov.convert_model(onnx_path)


def fused_model(ckpt: Checkpoint) -> torch.nn.Module:
    return model_from_state_dict(ckpt.state_dict, ckpt.variant, ckpt.num_classes, fuse=True)


def save_ir(model, path: Path) -> list[Path]:
    import openvino as ov

    ov.save_model(model, path, compress_to_fp16=False)  # fp32 weights: the worker picks the precision
    return [path, path.with_suffix(".bin")]


def write_backend_files(
    backend: str,
    ckpt: Checkpoint,
    input_size: tuple[int, int] | None,
    folder: Path,
    calibration: list[np.ndarray] | None = None,
) -> tuple[Path, list[Path]]:
    """Write ``backend``'s files (its row's ``files``) into ``folder``; returns (the serialized file, the files that
    go beside it)."""
    row = BACKENDS[backend]
    if row.needs_calibration and not calibration:
        raise ValueError(f"backend {backend} needs calibration images (--calibration-images DIR)")
    if row.family == "openvino":
        model = openvino_ir(ckpt, input_size)
        if row.needs_calibration:
            model = quantize_int8(model, calibration)
        xml, binary = save_ir(model, folder / row.serialized_file)
        return xml, [binary]
    if row.family == "onnx":
        return export_onnx(fused_model(ckpt), folder / row.serialized_file, input_size), []
    weights = folder / WEIGHTS_FILE
    torch.save({"net": ckpt.state_dict}, weights)
    if row.family == "auto" and openvino_available():
        return weights, save_ir(openvino_ir(ckpt, input_size), folder / row.files[1])
    return weights, []


def calibration_batches(
    images_dir: str | Path, pipeline: Pipeline, limit: int = MAX_CALIBRATION_IMAGES
) -> list[np.ndarray]:
    """The first ``limit`` images of ``images_dir`` (sorted by name), preprocessed: one [1, 3, H, W] batch each."""
    paths = sorted(p for p in Path(images_dir).iterdir() if is_image(p))[:limit]
    if not paths:
        raise ValueError(f"{images_dir}: no calibration images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return [pipeline(decode_image(p.read_bytes()).pixels)[0][None] for p in paths]


def quantize_int8(model: Any, batches: list[np.ndarray], left_in_float: str = DECODING_TAIL) -> Any:
    """An INT8 copy of the OpenVINO ``model``, calibrated on ``batches`` (symmetric, per-channel weights); the ops
    whose names match the pattern ``left_in_float`` (the box decoding) stay in float."""
    import nncf

    nncf.set_log_level(logging.WARNING)  # not one line per op left in float
    return nncf.quantize(
        model,
        nncf.Dataset(batches),
        preset=nncf.QuantizationPreset.PERFORMANCE,
        subset_size=len(batches),
        ignored_scope=nncf.IgnoredScope(patterns=[left_in_float]),
    )
