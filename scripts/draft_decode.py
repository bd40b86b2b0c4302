"""What decoding large JPEGs at reduced size (the handler's ``jpeg_draft``) saves, and what it changes.

    python scripts/draft_decode.py [--shared ../shared] [--scale 9] [--repeats 15]

1. Time: synthetic-shapes JPEGs (quality 90) of 4000x3000, 1920x1080 and 1280x720 through decoding and the COCO
   pipeline (longest side to 636, centre padding to 640), with and without draft decoding, in turn; medians. The
   network inputs are compared: mean and largest absolute difference in grey levels between draft and full decoding,
   next to the difference that choosing another resize filter makes (OpenCV's area averaging to the drafted size
   before the pipeline's bilinear resize, on the full-resolution decode).
2. Detections: the trained shapes model (``reference/shapes``, longest side to 320) on its 50 val images enlarged
   ``--scale`` times (Lanczos, JPEG quality 90, labels unchanged as they are relative): mAP50-95 with and without
   draft decoding, and how their detections agree (``backend_accuracy.agreement``).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from backend_accuracy import agreement
from datasets import load_dataset
from PIL import Image
from synthetic_shapes import shapes_image
from val import EvalOptions, detections_from_response, evaluate, local_detector, local_responses

from common import REPO
from yolonas_serving.decode import decode_image
from yolonas_serving.draw import encode_jpeg
from yolonas_serving.pipeline import COCO_PIPELINE
from yolonas_serving.postprocess import Detections

SIZES = ((4000, 3000), (1920, 1080), (1280, 720))


def network_input(data: bytes, draft: bool) -> np.ndarray:
    decoded = decode_image(data, min_longest_side=COCO_PIPELINE.shrinks_to if draft else None)
    return COCO_PIPELINE(decoded.pixels, decoded.original_size)[0]


def area_filtered_input(data: bytes) -> np.ndarray:
    """The full decode area-averaged to the drafted size first: a different, equally valid resize filter."""
    full = decode_image(data)
    height, width = decode_image(data, min_longest_side=COCO_PIPELINE.shrinks_to).pixels.shape[:2]
    reduced = cv2.resize(full.pixels, (width, height), interpolation=cv2.INTER_AREA)
    return COCO_PIPELINE(reduced, full.original_size)[0]


def grey_levels(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    difference = np.abs(a - b) * 255
    return float(difference.mean()), float(difference.max())


def time_sizes(repeats: int) -> None:
    rng = np.random.default_rng(0)
    print(f"{'JPEG':>10} {'full ms':>8} {'draft ms':>8} {'saved':>6} | {'draft vs full':>13} {'max':>5} | "
          f"{'area vs full':>12} {'max':>5}")  # fmt: skip
    for width, height in SIZES:
        data = encode_jpeg(Image.fromarray(shapes_image(rng, size=width)[:height]), quality=90)
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(repeats + 1):  # the first round warms up
            for draft in (False, True):
                start = time.perf_counter()
                network_input(data, draft)
                times[draft].append((time.perf_counter() - start) * 1000)
        full_ms, draft_ms = (statistics.median(times[d][1:]) for d in (False, True))
        full = network_input(data, False)
        drafted, drafted_max = grey_levels(network_input(data, True), full)
        area, area_max = grey_levels(area_filtered_input(data), full)
        print(f"{width}x{height:<5} {full_ms:>8.1f} {draft_ms:>8.1f} {full_ms / draft_ms:>5.1f}x | {drafted:>13.2f} "
              f"{drafted_max:>5.0f} | {area:>12.2f} {area_max:>5.0f}", flush=True)  # fmt: skip


def enlarged_dataset(data_yaml: Path, scale: int, folder: Path) -> Path:
    """A copy of a YOLO-format dataset with every image enlarged ``scale`` times and saved as JPEG."""
    source = load_dataset(data_yaml)
    (folder / "images").mkdir(parents=True)
    shutil.copytree(data_yaml.parent / "labels" / "val", folder / "labels")
    for entry in source.images:
        with Image.open(entry.path) as image:
            big = image.convert("RGB").resize((image.width * scale, image.height * scale), Image.Resampling.LANCZOS)
            big.save(folder / "images" / f"{entry.path.stem}.jpg", quality=90)
    names = "".join(f"  {i}: {name}\n" for i, name in enumerate(source.names))
    (folder / "data.yaml").write_text(f"path: .\nval: images\nnames:\n{names}")
    return folder / "data.yaml"


def above(found: Detections, conf: float) -> Detections:
    keep = found.scores >= conf
    return Detections(found.boxes[keep], found.scores[keep], found.class_ids[keep])


def detection_effect(shapes: Path, scale: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        dataset = load_dataset(enlarged_dataset(shapes / "val" / "data.yaml", scale, Path(tmp)))
        detector = local_detector(shapes / "checkpoint.pth", "shapes")
        found, maps = {}, {}
        for draft in (False, True):
            responses = local_responses(dataclasses.replace(detector, jpeg_draft=draft), dataset.images,
                                        EvalOptions(), batch_size=4)  # fmt: skip
            found[draft] = {e.id: detections_from_response(r) for e, r in zip(dataset.images, responses)}
            maps[draft] = evaluate(dataset, found[draft]).map50_95
        size = dataset.images[0]
        print(f"\nshapes val enlarged to {size.width}x{size.height}: mAP50-95 full decode {maps[False]:.4f}, "
              f"draft {maps[True]:.4f} (difference {maps[True] - maps[False]:+.4f})")  # fmt: skip
        ids = [e.id for e in dataset.images]
        # Only detections the archive would return (conf 0.25) are compared, not val's conf 0.001 long tail.
        kept = {d: [above(found[d][i], 0.25) for i in ids] for d in (False, True)}
        match = agreement(kept[False], kept[True])
        print(f"detections at conf 0.25: {match['detections_fp32']} full, {match['detections']} draft; matched "
              f"{match['matched']:.3f}, mean IoU {match['mean_iou']:.3f}, largest score difference "
              f"{match['max_score_diff']:.3f}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared", help="folder holding reference/")
    parser.add_argument("--scale", type=int, default=9, help="enlargement of the shapes val images (320 px)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    time_sizes(args.repeats)
    shapes = args.shared / "reference" / "shapes"
    if (shapes / "checkpoint.pth").is_file():
        detection_effect(shapes, args.scale)
    else:
        print(f"\n{shapes}: not found, so no detection comparison (it needs the trained shapes model)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
