"""Print a summary of YOLO-NAS S, M and L, like Ultralytics' ``model.info()``.

    python scripts/model_info.py [--variant s|m|l|all] [--num-classes 80] [--image-size 640 640] [--json]

Per variant: parameters as super-gradients counts them (the unused ``rbr_reparam`` placeholders included), parameters
after fusion (what serving runs), GMACs of one image at the given size (convolutions of the fused model) and the number
of anchors. Built on the meta device: no weights are needed and nothing is computed for real.
"""

from __future__ import annotations

import argparse
import json
import sys

import common  # noqa: F401  (puts handler/ on sys.path)
from yolonas import VARIANTS, summarize
from yolonas.summary import ModelSummary


def image_size(values: list[int]) -> tuple[int, int]:
    height, width = values
    if height <= 0 or width <= 0 or height % 32 or width % 32:
        raise argparse.ArgumentTypeError(f"image size {height}x{width}: both sides must be positive multiples of 32")
    return height, width


def format_table(summaries: list[ModelSummary]) -> str:
    height, width = summaries[0].image_size
    macs_header = f"GMACs@{height}x{width}"
    lines = [
        f"{'model':<12} {'classes':>7} {'params (sg)':>13} {'params (fused)':>15} {macs_header:>15} {'anchors':>8}"
    ]
    for s in summaries:
        lines.append(
            f"{s.name:<12} {s.num_classes:>7} {s.params:>13,} {s.fused_params:>15,} {s.gmacs:>15.2f} {s.anchors:>8}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=[*VARIANTS, "all"], default="all")
    parser.add_argument("--num-classes", type=int, default=80)
    parser.add_argument("--image-size", type=int, nargs=2, default=[640, 640], metavar=("H", "W"))
    parser.add_argument("--json", action="store_true", help="one JSON object per variant, in a list")
    args = parser.parse_args(argv)
    if args.num_classes < 1:
        parser.error("--num-classes must be at least 1")
    try:
        size = image_size(args.image_size)
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    variants = list(VARIANTS) if args.variant == "all" else [args.variant]
    summaries = [summarize(v, args.num_classes, size) for v in variants]
    if args.json:
        print(json.dumps([s.as_dict() for s in summaries], indent=2))
    else:
        print(format_table(summaries))
    return 0


if __name__ == "__main__":
    sys.exit(main())
