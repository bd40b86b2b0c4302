"""Synthetic images in the style of the shapes model's data: circles, squares, triangles and hollow rectangles in
random colours on a noisy two-colour gradient (yolonas_tools/data/synthetic.py), for calibrating INT8 archives.

    python scripts/synthetic_shapes.py OUT_DIR --count 64 --seed 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from yolonas_tools.data.synthetic import write_shapes_images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--size", type=int, default=320)
    args = parser.parse_args(argv)
    paths = write_shapes_images(args.out, args.count, args.seed, args.size)
    print(f"wrote {len(paths)} images to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
