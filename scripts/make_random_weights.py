"""Write a YOLO-NAS checkpoint with seeded random weights, in super-gradients' official layout ``{"net": state_dict}``.

    python scripts/make_random_weights.py --variant s --out weights/yolo_nas_s_random.pth [--num-classes 80] [--seed 0]

For tests and offline demos: the weights yield a realistic spread of scores, but the detections mean nothing. The same
seed gives the same tensors. The file loads anywhere an official checkpoint does (``strict=True``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from yolonas import VARIANTS, save_random_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=list(VARIANTS), required=True)
    parser.add_argument("--num-classes", type=int, default=80)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.num_classes < 1:
        parser.error("--num-classes must be at least 1")
    path = save_random_checkpoint(args.out, args.variant, args.num_classes, args.seed)
    print(f"wrote {path}: YOLO-NAS {args.variant.upper()}, {args.num_classes} classes, seed {args.seed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
