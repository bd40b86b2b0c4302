"""What decoding large JPEGs at reduced size (the handler's ``jpeg_draft``) saves and changes (scripts/draft_decode.py).

``time_sizes`` times synthetic JPEGs through decoding and the COCO pipeline with and without draft decoding and
compares the network inputs (beside the difference another resize filter makes); ``detection_effect`` runs the
trained shapes model on its val images enlarged, with and without draft decoding: mAP50-95 and agreement.
"""

from __future__ import annotations

import dataclasses
import shutil
import statistics
import tempfile
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from yolonas_serving.decode import decode_image
from yolonas_serving.draw import encode_jpeg
from yolonas_serving.pipeline import COCO_PIPELINE
from yolonas_serving.postprocess import Detections
from yolonas_tools.data.datasets import load_dataset
from yolonas_tools.data.synthetic import shapes_image
from yolonas_tools.measure.evaluation import (
    EvalOptions,
    agreement,
    detections_from_response,
    evaluate,
    local_detector,
    local_responses,
)
from yolonas_tools.measure.load import in_turns

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


def time_sizes(repeats: int) -> Iterator[str]:
    """The timing table, one line at a time (the header first)."""
    rng = np.random.default_rng(0)
    yield (f"{'JPEG':>10} {'full ms':>8} {'draft ms':>8} {'saved':>6} | {'draft vs full':>13} {'max':>5} | "
           f"{'area vs full':>12} {'max':>5}")  # fmt: skip
    for width, height in SIZES:
        data = encode_jpeg(Image.fromarray(shapes_image(rng, size=width)[:height]), quality=90)
        calls = {"full": lambda: network_input(data, False), "draft": lambda: network_input(data, True)}  # noqa: B023
        times = in_turns(calls, repeats)
        full_ms, draft_ms = (statistics.median(ms for ms, _ in times[kind]) for kind in ("full", "draft"))
        full = network_input(data, False)
        drafted, drafted_max = grey_levels(network_input(data, True), full)
        area, area_max = grey_levels(area_filtered_input(data), full)
        yield (f"{width}x{height:<5} {full_ms:>8.1f} {draft_ms:>8.1f} {full_ms / draft_ms:>5.1f}x | {drafted:>13.2f} "
               f"{drafted_max:>5.0f} | {area:>12.2f} {area_max:>5.0f}")  # fmt: skip


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


def detection_effect(shapes: Path, scale: int) -> Iterator[str]:
    """mAP50-95 and agreement of the shapes model on its enlarged val images, with and without draft decoding."""
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
        yield (f"\nshapes val enlarged to {size.width}x{size.height}: mAP50-95 full decode {maps[False]:.4f}, "
               f"draft {maps[True]:.4f} (difference {maps[True] - maps[False]:+.4f})")  # fmt: skip
        ids = [e.id for e in dataset.images]
        # Only detections the archive would return (conf 0.25) are compared, not val's conf 0.001 long tail.
        kept = {d: [above(found[d][i], 0.25) for i in ids] for d in (False, True)}
        match = agreement(kept[False], kept[True])
        yield (f"detections at conf 0.25: {match['detections_fp32']} full, {match['detections']} draft; matched "
               f"{match['matched']:.3f}, mean IoU {match['mean_iou']:.3f}, largest score difference "
               f"{match['max_score_diff']:.3f}")  # fmt: skip


def report(shared: Path, scale: int, repeats: int, threads: int) -> Iterator[str]:
    """Everything scripts/draft_decode.py prints, one line at a time: the timings, then the detection comparison
    if ``shared`` holds the trained shapes model."""
    torch.set_num_threads(threads)
    yield from time_sizes(repeats)
    shapes = shared / "reference" / "shapes"
    if (shapes / "checkpoint.pth").is_file():
        yield from detection_effect(shapes, scale)
    else:
        yield f"\n{shapes}: not found, so no detection comparison (it needs the trained shapes model)"
