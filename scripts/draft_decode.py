"""What decoding large JPEGs at reduced size (the handler's ``jpeg_draft``) saves, and what it changes.

    python scripts/draft_decode.py [--shared ../shared] [--scale 9] [--repeats 15]

1. Time: synthetic-shapes JPEGs (quality 90) of 4000x3000, 1920x1080 and 1280x720 through decoding and the COCO
   pipeline (longest side to 636, centre padding to 640), with and without draft decoding, in turn; medians. The
   network inputs are compared: mean and largest absolute difference in grey levels between draft and full decoding,
   next to the difference that choosing another resize filter makes (OpenCV's area averaging to the drafted size
   before the pipeline's bilinear resize, on the full-resolution decode).
2. Detections: the trained shapes model (``reference/shapes``, longest side to 320) on its 50 val images enlarged
   ``--scale`` times (Lanczos, JPEG quality 90, labels unchanged as they are relative): mAP50-95 with and without
   draft decoding, and how their detections agree (``evaluation.agreement``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from yolonas_tools.measure.jpeg_draft import report
from yolonas_tools.paths import REPO


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared", help="folder holding reference/")
    parser.add_argument("--scale", type=int, default=9, help="enlargement of the shapes val images (320 px)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    for line in report(args.shared, args.scale, args.repeats, args.threads):
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
