"""What each backend's archive stores, made from the checkpoint at archive time.

torch, torch-bf16, cuda-fp16: ``weights.pth`` (``{"net": state_dict}``); onnx: ``model.onnx`` (dynamic batch);
openvino, openvino-bf16: an fp32 OpenVINO IR ``model.xml`` + ``model.bin`` (converted from the ONNX export; the
precision is chosen when the worker compiles it); int8: the same IR quantized by NNCF on calibration images;
auto: ``weights.pth`` plus, when openvino is installed here, the fp32 IR as ``openvino.xml`` / ``openvino.bin``.
The network input is the archive pipeline's fixed size, or dynamic height and width for auto-padding pipelines.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from common import HANDLER_DIR  # noqa: F401  (puts the handler packages on sys.path)
from yolonas.checkpoint import Checkpoint, model_from_state_dict
from yolonas.export import export_onnx
from yolonas_serving.runtime import AUTO_OPENVINO_FILE, SERIALIZED_FILE, WEIGHTS_FILE, openvino_available


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
    """Write ``backend``'s files into ``folder``; returns (the serialized file, the files that go beside it)."""
    if backend == "int8" and not calibration:
        raise ValueError("backend int8 needs calibration images (--calibration-images DIR)")
    if backend in ("openvino", "openvino-bf16", "int8"):
        model = openvino_ir(ckpt, input_size)
        if backend == "int8":
            from quantize import quantize_int8

            model = quantize_int8(model, calibration)
        xml, binary = save_ir(model, folder / SERIALIZED_FILE[backend])
        return xml, [binary]
    if backend == "onnx":
        return export_onnx(fused_model(ckpt), folder / SERIALIZED_FILE[backend], input_size), []
    weights = folder / WEIGHTS_FILE
    torch.save({"net": ckpt.state_dict}, weights)
    if backend == "auto" and openvino_available():
        return weights, save_ir(openvino_ir(ckpt, input_size), folder / AUTO_OPENVINO_FILE)
    return weights, []
