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
from pathlib import Path

from yolonas import VARIANTS
from yolonas_tools.build.export import ExportError, export_checked


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=list(VARIANTS), required=True)
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
    input_size = tuple(args.input_size) if args.input_size else None
    try:
        lines = export_checked(args.weights, args.variant, args.out, input_size, args.dynamic_batch, args.nms,
                               args.conf, args.iou, args.max_det, args.opset)  # fmt: skip
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
