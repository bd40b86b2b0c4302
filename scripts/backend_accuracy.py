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
import tempfile
from pathlib import Path

import numpy as np
import torch
import torchvision
from datasets import load_dataset
from synthetic_shapes import write_shapes_images
from val import EvalOptions, detections_from_response, evaluate, local_responses

import archive
from common import REPO
from yolonas_serving.detector import Detector
from yolonas_serving.postprocess import Detections
from yolonas_serving.protocol import ImageRequest

DEFAULT_BACKENDS = ("torch-bf16", "openvino", "openvino-bf16", "int8")
CALIBRATION_IMAGES = 64


def match(reference: Detections, other: Detections, min_iou: float = 0.5) -> tuple[list[float], list[float]]:
    """Greedy same-class matching, highest reference score first: (IoUs, absolute score differences)."""
    ious = torchvision.ops.box_iou(torch.from_numpy(reference.boxes).float(), torch.from_numpy(other.boxes).float())
    taken = np.zeros(len(other), dtype=bool)
    matched_ious, score_diffs = [], []
    for i in np.argsort(-reference.scores, kind="stable"):
        row = ious[i].numpy().copy()
        row[taken | (other.class_ids != reference.class_ids[i])] = -1
        j = int(np.argmax(row)) if len(row) else -1
        if j >= 0 and row[j] >= min_iou:
            taken[j] = True
            matched_ious.append(float(row[j]))
            score_diffs.append(abs(float(reference.scores[i]) - float(other.scores[j])))
    return matched_ious, score_diffs


def agreement(reference: list[Detections], other: list[Detections]) -> dict[str, float]:
    ious, diffs, total = [], [], 0
    for ref, oth in zip(reference, other):
        found_ious, found_diffs = match(ref, oth)
        ious += found_ious
        diffs += found_diffs
        total += max(len(ref), len(oth))
    return {
        "matched": len(ious) / total if total else 1.0,
        "mean_iou": float(np.mean(ious)) if ious else float("nan"),
        "max_score_diff": max(diffs, default=0.0),
        "detections_fp32": sum(len(r) for r in reference),
        "detections": sum(len(o) for o in other),
    }


def detect_all(detector: Detector, images: list[Path]) -> list[Detections]:
    found = []
    for path in images:
        prepared = detector.prepare(ImageRequest(path.read_bytes()))
        found += detector.detect([prepared])
    return found


def build(checkpoint: Path, backend: str, store: Path, calibration: Path) -> Path:
    name = f"{checkpoint.parent.name}_{backend.replace('-', '_')}"
    flags = ["--calibration-images", str(calibration)] if backend == "int8" else []
    archive.main(["--variant", "s", "--weights", str(checkpoint), "--backend", backend, "--model-name", name,
                  "--export-path", str(store), *flags])  # fmt: skip
    return store / f"{name}.mar"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default=",".join(DEFAULT_BACKENDS), help="comma-separated")
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared", help="folder holding reference/")
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    reference = args.shared / "reference" / "yolo_nas_s"
    shapes = args.shared / "reference" / "shapes"
    dataset = load_dataset(shapes / "val" / "data.yaml")
    val_images = [entry.path for entry in dataset.images]
    ref_images = sorted((reference / "images").glob("*.png"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        calibration = tmp / "calibration"
        write_shapes_images(calibration, CALIBRATION_IMAGES, seed=1)
        results: dict[str, dict] = {}
        for backend in ["torch", *args.backends.split(",")]:
            result = {}
            for checkpoint, images, key in ((reference / "checkpoint.pth", ref_images, "reference"),
                                            (shapes / "checkpoint.pth", val_images, "shapes")):  # fmt: skip
                mar = build(checkpoint, backend, tmp / "store", calibration)
                detector = archive.open_archive(mar, tmp / mar.stem)
                result[key] = detect_all(detector, images)
                if key == "shapes":
                    responses = local_responses(detector, dataset.images, EvalOptions(), batch_size=4)
                    found = {entry.id: detections_from_response(body) for entry, body in zip(dataset.images, responses)}
                    result["map"] = evaluate(dataset, found).map50_95
                del detector
            results[backend] = result
            if backend == "torch":
                continue
            fp32 = results["torch"]
            row = {"backend": backend, "map50_95": result["map"], "map50_95_fp32": fp32["map"],
                   "map_drop": fp32["map"] - result["map"],
                   "reference": agreement(fp32["reference"], result["reference"]),
                   "shapes": agreement(fp32["shapes"], result["shapes"])}  # fmt: skip
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(
        f"\n{'backend':<14} {'mAP50-95':>8} {'fp32':>7} {'drop':>7} | reference: {'matched':>7} {'IoU':>6} "
        f"{'max dS':>6} | shapes: {'matched':>7} {'IoU':>6} {'max dS':>6}"
    )
    for row in rows:
        ref, shp = row["reference"], row["shapes"]
        print(
            f"{row['backend']:<14} {row['map50_95']:>8.4f} {row['map50_95_fp32']:>7.4f} {row['map_drop']:>7.4f} | "
            f"{'':>11}{ref['matched']:>7.3f} {ref['mean_iou']:>6.3f} {ref['max_score_diff']:>6.3f} | "
            f"{'':>8}{shp['matched']:>7.3f} {shp['mean_iou']:>6.3f} {shp['max_score_diff']:>6.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
