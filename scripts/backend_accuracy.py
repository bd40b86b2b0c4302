"""What reduced precision costs: each backend's detections against fp32 torch, and its mAP on the shapes model.

    python scripts/backend_accuracy.py [--backends torch-bf16,openvino,openvino-bf16,int8] [--shared ../shared]

For every backend an archive is built (``scripts/archive.py``) and opened in process exactly as a worker opens it:
- agreement on the reference checkpoint's images (``reference/yolo_nas_s``, seeded random weights, COCO pipeline)
  and on the shapes model's 50 val images, at the archives' default threshold: detections matched to fp32 torch's
  greedily by class at IoU >= 0.5; ``matched`` = matches / max(count fp32, count backend), the mean IoU of the
  matches and the largest score difference between matched detections;
- mAP50-95 of the shapes model (``reference/shapes``) on its val images with ``scripts/val.py``'s evaluation
  (pycocotools, conf 0.001), against fp32 torch's in the same run.
INT8 archives are calibrated on synthetic shapes images (``synthetic_shapes.py``, not the val images).
Prints a table and one JSON line per row.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from yolonas_tools.build.archive import ArchiveError
from yolonas_tools.measure.precision import DEFAULT_BACKENDS, compare_backends, format_table
from yolonas_tools.paths import REPO


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default=",".join(DEFAULT_BACKENDS), help="comma-separated")
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared", help="folder holding reference/")
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = []
    try:
        for row in compare_backends(args.backends.split(","), args.shared, args.threads):
            print(json.dumps(row), flush=True)
            rows.append(row)
    except ArchiveError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
