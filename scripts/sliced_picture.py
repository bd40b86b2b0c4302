"""Draw the plain-against-sliced picture of docs/slicing.md: a mosaic of the shapes model's validation images
annotated by a plain request and by a sliced one, side by side, each titled with the objects it found.

    python scripts/sliced_picture.py --shared ../shared --out assets/sliced.jpg

The shapes model (``reference/shapes``: YOLO-NAS S trained on synthetic shapes, its own 320 pipeline) is archived
as scripts/archive.py archives it and run in process through the chain a TorchServe worker runs. ``--columns`` x
``--rows`` of its 320x320 val images make the mosaic (6 x 5: 1920x1600, which a plain request scales to 320x267).
Both requests keep only boxes above ``--conf`` (0.5): at the default 0.25 the sliced picture also shows the weak,
large boxes of the whole-image pass (docs/slicing.md, "Recall").
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from yolonas_tools.build import archive
from yolonas_tools.cli import run_command
from yolonas_tools.measure.sliced import mosaic, plain_and_sliced_picture
from yolonas_tools.paths import REPO


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared", help="folder holding reference/")
    parser.add_argument("--columns", type=int, default=6)
    parser.add_argument("--rows", type=int, default=5)
    parser.add_argument("--slice", default="320", help="tile size of the sliced request (N or WxH)")
    parser.add_argument("--conf", type=float, default=0.5, help="both requests' threshold")
    parser.add_argument("--width", type=int, default=1600, help="width of the picture in pixels")
    parser.add_argument("--quality", type=int, default=80, help="JPEG quality")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "assets" / "sliced.jpg")
    args = parser.parse_args(argv)
    shapes = args.shared / "reference" / "shapes"
    if not (shapes / "checkpoint.pth").is_file():
        print(f"error: no shapes model under {shapes} (give --shared)", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    truth = mosaic(shapes / "val" / "data.yaml", args.columns, args.rows)
    with tempfile.TemporaryDirectory() as tmp:
        flags = ["--variant", "s", "--weights", str(shapes / "checkpoint.pth"), "--model-name", "shapes"]
        if run_command("archive", [*flags, "--export-path", tmp]) != 0:
            return 1
        detector = archive.open_archive(Path(tmp) / "shapes.mar", Path(tmp) / "shapes")
        picture = plain_and_sliced_picture(detector, truth, {"slice": args.slice, "conf": args.conf}, args.width)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    picture.save(args.out, format="JPEG", quality=args.quality, optimize=True)
    print(f"wrote {args.out} ({picture.width}x{picture.height}, {args.out.stat().st_size / 1000:.0f} kB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
