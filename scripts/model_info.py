"""Print a summary of YOLO-NAS S, M and L, like Ultralytics' ``model.info()``.

    python scripts/model_info.py [--variant s|m|l|all] [--num-classes 80] [--image-size 640 640] [--json]
    python scripts/model_info.py --variant s --time 10     # also: what fusion saves, measured

Per variant: parameters as super-gradients counts them (the unused ``rbr_reparam`` placeholders included), parameters
after fusion (what serving runs), GMACs of one image at the given size (convolutions of the fused model) and the number
of anchors. Built on the meta device: no weights are needed and nothing is computed for real.

``--time N`` also measures one forward pass at batch 1 (eager fp32, channels_last, seeded random weights, torch's
default threads) of the model as super-gradients trains it and of the fused one, N rounds taking turns after a
warm-up, and prints the medians and their ratio.
"""

from __future__ import annotations

import argparse
import sys

from yolonas import VARIANTS
from yolonas_tools.build.model_info import ImageSizeError, image_size, report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=[*VARIANTS, "all"], default="all")
    parser.add_argument("--num-classes", type=int, default=80)
    parser.add_argument("--image-size", type=int, nargs=2, default=[640, 640], metavar=("H", "W"))
    parser.add_argument("--json", action="store_true", help="one JSON object per variant, in a list")
    parser.add_argument("--time", type=int, default=0, metavar="N", help="also time unfused vs fused, N rounds")
    args = parser.parse_args(argv)
    if args.num_classes < 1:
        parser.error("--num-classes must be at least 1")
    try:
        size = image_size(args.image_size)
    except ImageSizeError as exc:
        parser.error(str(exc))
    variants = list(VARIANTS) if args.variant == "all" else [args.variant]
    print(report(variants, args.num_classes, size, args.time, args.json))
    return 0


if __name__ == "__main__":
    sys.exit(main())
