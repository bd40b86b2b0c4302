"""Export YOLO-NAS to one self-contained ONNX file, checked and compared with PyTorch in ONNX Runtime.

    python scripts/export_onnx.py --variant s --weights W.pth --out yolo_nas_s.onnx
    python scripts/export_onnx.py --variant s --weights W.pth --dynamic-batch --nms --out s_nms.onnx

Input ``images`` [B, 3, H, W] float32 RGB in [0, 1], preprocessed as the checkpoint's pipeline does (the COCO
default: longest side to 636, centre padding to 640 with 114, /255). H x W is ``--input-size``, else the
pipeline's, else dynamic (auto-padding pipelines). Outputs ``boxes`` [B, A, 4] xyxy in input pixels and
``scores`` [B, A, C]; with ``--nms`` the "batch" layout instead (``num_predictions`` [B, 1], ``boxes`` [B, K, 4],
``scores`` [B, K], ``classes`` [B, K], padded with 0 / class -1; K = ``--max-det``) after ONNX NonMaxSuppression
(class-aware, scores above ``--conf``, IoU ``--iou``; defaults from the checkpoint's processing_params or
super-gradients' 0.25 / 0.7). The batch is 1 unless ``--dynamic-batch``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from common import HANDLER_DIR  # noqa: F401  (puts the handler packages on sys.path)
from yolonas import read_checkpoint
from yolonas.checkpoint import model_from_state_dict
from yolonas.export import DetectorWithNMS, ExportNMS, export_onnx
from yolonas_serving.pipeline import Pipeline
from yolonas_serving.settings import settings_from_checkpoint

BOX_TOLERANCE_PX, SCORE_TOLERANCE = 0.1, 1e-3  # float32 re-association and fusion stay well inside these


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
            raise SystemExit(
                f"error: {missing} detection(s) differ between ONNX Runtime and PyTorch (float noise can "
                "flip an NMS decision at an IoU within a hair of the threshold: rare)"
            )
        return f"ONNX Runtime and PyTorch keep the same {int(got[0].sum())} detections on {list(shape)}"
    box_error = float(np.abs(got[0] - expected[0]).max())
    score_error = float(np.abs(got[1] - expected[1]).max())
    if box_error > BOX_TOLERANCE_PX or score_error > SCORE_TOLERANCE:
        raise SystemExit(
            f"error: ONNX Runtime differs from PyTorch: boxes {box_error:.4f} px, scores {score_error:.2e}"
        )
    return f"ONNX Runtime matches PyTorch on {list(shape)}: boxes within {box_error:.4f} px, scores {score_error:.1e}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=["s", "m", "l"], required=True)
    parser.add_argument("--weights", type=Path, required=True, help="a super-gradients or Ultralytics checkpoint")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"), help="multiples of 32")
    parser.add_argument("--dynamic-batch", action="store_true")
    parser.add_argument("--nms", action="store_true", help="embed NMS: outputs in the padded batch layout")
    parser.add_argument("--conf", type=float)
    parser.add_argument("--iou", type=float)
    parser.add_argument("--max-det", type=int, default=300)
    parser.add_argument("--opset", type=int, default=17)
    args = parser.parse_args(argv)
    if args.input_size and any(v <= 0 or v % 32 for v in args.input_size):
        parser.error("--input-size: height and width must be positive multiples of 32")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ckpt = read_checkpoint(args.weights)
    if ckpt.variant != args.variant:
        raise SystemExit(f"{args.weights} holds YOLO-NAS {ckpt.variant.upper()} weights, not {args.variant.upper()}")
    settings, _ = settings_from_checkpoint(ckpt.num_classes, ckpt.variant, ckpt.processing_params,
                                           conf=args.conf, iou=args.iou)  # fmt: skip
    input_size = tuple(args.input_size) if args.input_size else Pipeline.from_spec(settings.pipeline).input_size
    nms = ExportNMS(settings.conf, settings.iou, args.max_det) if args.nms else None
    model = model_from_state_dict(ckpt.state_dict, ckpt.variant, ckpt.num_classes, fuse=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.out.parent) as tmp:
        # Written beside the target first, so a failed check leaves no file behind.
        path = export_onnx(model, Path(tmp) / args.out.name, input_size, args.dynamic_batch, nms, args.opset)
        height, width = input_size or (480, 640)
        print(check_against_torch(path, model, (2 if args.dynamic_batch else 1, 3, height, width), nms))
        path.replace(args.out)
    size = "dynamic H x W" if input_size is None else f"{input_size[0]}x{input_size[1]}"
    nms_text = f", NMS inside (conf {nms.conf}, IoU {nms.iou}, max {nms.max_det})" if nms else ""
    print(
        f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB): YOLO-NAS {ckpt.variant.upper()}, "
        f"{ckpt.num_classes} classes, input {size}, batch {'dynamic' if args.dynamic_batch else 1}{nms_text}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
