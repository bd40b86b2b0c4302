"""Download official pretrained YOLO-NAS weights (COCO, 80 classes) into weights/ and check them.

    python scripts/get_weights.py --variant s [--source super-gradients|ultralytics] [--out weights/]

Tries the chosen source first, then the other; a file is kept only once it loads as the requested variant with 80
classes (yolonas_tools/build/weights.py). The weights are under Deci's own licence (non-commercial use): read it before
using them.

Exit codes: 0 weights in place; 1 a file arrived but is not the requested model; 2 no source could be reached.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from yolonas import VARIANTS
from yolonas_tools.build.weights import SOURCES, WeightsUnavailable, obtain
from yolonas_tools.paths import WEIGHTS_DIR

EXIT_INVALID, EXIT_UNREACHABLE = 1, 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=list(VARIANTS), required=True)
    parser.add_argument("--source", choices=list(SOURCES), default="super-gradients", help="the one to try first")
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    args = parser.parse_args(argv)
    try:
        obtain(args.variant, args.out, args.source)
    except WeightsUnavailable as exc:
        print(exc, file=sys.stderr)
        if not exc.invalid:
            print("offline? put the file in place by hand, or use scripts/make_random_weights.py", file=sys.stderr)
        return EXIT_INVALID if exc.invalid else EXIT_UNREACHABLE
    return 0


if __name__ == "__main__":
    sys.exit(main())
