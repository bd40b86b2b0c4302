"""Export YOLO-NAS to one self-contained ONNX file, checked against PyTorch in ONNX Runtime (scripts/export_onnx.py).

The graph itself is ``yolonas.export``'s (archives of the onnx and openvino backends convert from it too); here the
checkpoint is read, its settings resolved, and the written file run in ONNX Runtime beside PyTorch on the same input
before it replaces the target, so a file that disagrees is never left behind.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from yolonas import CheckpointError, read_checkpoint
from yolonas.checkpoint import model_from_state_dict
from yolonas.export import DetectorWithNMS, ExportNMS, export_onnx
from yolonas_serving.pipeline import Pipeline
from yolonas_serving.settings import settings_from_checkpoint

BOX_TOLERANCE_PX, SCORE_TOLERANCE = 0.1, 1e-3  # float32 re-association and fusion stay well inside these


class ExportError(ValueError):
    """A checkpoint of another variant, or an exported file that disagrees with PyTorch."""


def _unmatched(got: list[np.ndarray], expected: list[np.ndarray]) -> int:
    """NMS outputs: detections of one side without a same-class partner within tolerance on the other, per image
    and order-independently (equal scores may be ranked either way)."""
    missing = 0
    for image in range(len(got[0])):
        count_a, count_b = int(got[0][image, 0]), int(expected[0][image, 0])
        a = np.column_stack([got[1][image, :count_a], got[2][image, :count_a], got[3][image, :count_a]])
        b = np.column_stack([expected[1][image, :count_b], expected[2][image, :count_b], expected[3][image, :count_b]])
        for row in a:
            close = (np.abs(b[:, :4] - row[:4]).max(axis=1, initial=0) <= BOX_TOLERANCE_PX) & (
                np.abs(b[:, 4] - row[4]) <= SCORE_TOLERANCE) & (b[:, 5] == row[5])  # fmt: skip
            missing += not close.any()
        missing += max(0, count_b - count_a)
    return missing


def check_against_torch(path: Path, model: torch.nn.Module, shape: tuple[int, ...], nms: ExportNMS | None) -> str:
    """Run the file in ONNX Runtime and PyTorch on the same input; raise if they disagree, else describe it."""
    import onnxruntime as ort

    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": x.numpy()})
    with torch.no_grad():
        expected = [t.numpy() for t in (DetectorWithNMS(model, nms) if nms else model)(x)]
    if nms:
        missing = _unmatched(got, expected)
        if missing:
            raise ExportError(
                f"{missing} detection(s) differ between ONNX Runtime and PyTorch (float noise can "
                "flip an NMS decision at an IoU within a hair of the threshold: rare)"
            )
        return f"ONNX Runtime and PyTorch keep the same {int(got[0].sum())} detections on {list(shape)}"
    box_error = float(np.abs(got[0] - expected[0]).max())
    score_error = float(np.abs(got[1] - expected[1]).max())
    if box_error > BOX_TOLERANCE_PX or score_error > SCORE_TOLERANCE:
        raise ExportError(f"ONNX Runtime differs from PyTorch: boxes {box_error:.4f} px, scores {score_error:.2e}")
    return f"ONNX Runtime matches PyTorch on {list(shape)}: boxes within {box_error:.4f} px, scores {score_error:.1e}"


def export_checked(
    weights: Path,
    variant: str,
    out: Path,
    input_size: tuple[int, int] | None,
    dynamic_batch: bool,
    with_nms: bool,
    conf: float | None,
    iou: float | None,
    max_det: int,
    opset: int,
) -> list[str]:
    """Write ``out`` from the checkpoint ``weights`` (of ``variant``), checked; the lines that say what was done."""
    try:
        ckpt = read_checkpoint(weights, variant)
    except CheckpointError as exc:
        raise ExportError(str(exc)) from None
    settings, _ = settings_from_checkpoint(ckpt.num_classes, ckpt.variant, ckpt.processing_params, conf=conf, iou=iou)
    input_size = input_size or Pipeline.from_spec(settings.pipeline).input_size
    nms = ExportNMS(settings.options.conf, settings.options.iou, max_det) if with_nms else None
    model = model_from_state_dict(ckpt.state_dict, ckpt.variant, ckpt.num_classes, fuse=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        # Written beside the target first, so a failed check leaves no file behind.
        path = export_onnx(model, Path(tmp) / out.name, input_size, dynamic_batch, nms, opset)
        height, width = input_size or (480, 640)
        checked = check_against_torch(path, model, (2 if dynamic_batch else 1, 3, height, width), nms)
        path.replace(out)
    size = "dynamic H x W" if input_size is None else f"{input_size[0]}x{input_size[1]}"
    nms_text = f", NMS inside (conf {nms.conf}, IoU {nms.iou}, max {nms.max_det})" if nms else ""
    return [
        checked,
        f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB): YOLO-NAS {ckpt.variant.upper()}, "
        f"{ckpt.num_classes} classes, input {size}, batch {'dynamic' if dynamic_batch else 1}{nms_text}",
    ]
