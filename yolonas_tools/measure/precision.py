"""What reduced precision costs (scripts/backend_accuracy.py): each backend's detections against fp32 torch's, and
its mAP50-95 on the shapes model.

For every backend an archive is built (the ``archive`` command) and opened in process exactly as a worker opens it;
``compare_backends`` yields one row per backend other than torch: agreement with fp32 torch (``evaluation.agreement``)
on the reference checkpoint's images and on the shapes model's val images, and the shapes model's mAP50-95 beside
fp32 torch's in the same run. INT8 archives are calibrated on synthetic shapes images, not the val images.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from yolonas_tools.build import archive
from yolonas_tools.cli import run_command
from yolonas_tools.data.datasets import load_dataset
from yolonas_tools.data.synthetic import write_shapes_images
from yolonas_tools.measure.evaluation import (
    EvalOptions,
    agreement,
    detect_all,
    detections_from_response,
    evaluate,
    local_responses,
)

DEFAULT_BACKENDS = ("torch-bf16", "openvino", "openvino-bf16", "int8")
CALIBRATION_IMAGES = 64


def build(checkpoint: Path, backend: str, store: Path, calibration: Path) -> Path:
    name = f"{checkpoint.parent.name}_{backend.replace('-', '_')}"
    flags = ["--calibration-images", str(calibration)] if backend == "int8" else []
    built = run_command("archive", ["--variant", "s", "--weights", str(checkpoint), "--backend", backend,
                                    "--model-name", name, "--export-path", str(store), *flags])  # fmt: skip
    if built != 0:
        raise archive.ArchiveError(f"could not archive {name} (the archive command's error is above)")
    return store / f"{name}.mar"


def compare_backends(backends: list[str], shared: Path, threads: int) -> Iterator[dict]:
    """One row per backend of ``backends`` against fp32 torch, on the reference data in ``shared``/reference."""
    torch.set_num_threads(threads)
    reference = shared / "reference" / "yolo_nas_s"
    shapes = shared / "reference" / "shapes"
    dataset = load_dataset(shapes / "val" / "data.yaml")
    val_images = [entry.path for entry in dataset.images]
    ref_images = sorted((reference / "images").glob("*.png"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        calibration = tmp / "calibration"
        write_shapes_images(calibration, CALIBRATION_IMAGES, seed=1)
        results: dict[str, dict] = {}
        for backend in ["torch", *backends]:
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
            yield {"backend": backend, "map50_95": result["map"], "map50_95_fp32": fp32["map"],
                   "map_drop": fp32["map"] - result["map"],
                   "reference": agreement(fp32["reference"], result["reference"]),
                   "shapes": agreement(fp32["shapes"], result["shapes"])}  # fmt: skip


def format_table(rows: list[dict]) -> str:
    lines = [
        f"\n{'backend':<14} {'mAP50-95':>8} {'fp32':>7} {'drop':>7} | reference: {'matched':>7} {'IoU':>6} "
        f"{'max dS':>6} | shapes: {'matched':>7} {'IoU':>6} {'max dS':>6}"
    ]
    for row in rows:
        ref, shp = row["reference"], row["shapes"]
        lines.append(
            f"{row['backend']:<14} {row['map50_95']:>8.4f} {row['map50_95_fp32']:>7.4f} {row['map_drop']:>7.4f} | "
            f"{'':>11}{ref['matched']:>7.3f} {ref['mean_iou']:>6.3f} {ref['max_score_diff']:>6.3f} | "
            f"{'':>8}{shp['matched']:>7.3f} {shp['mean_iou']:>6.3f} {shp['max_score_diff']:>6.3f}"
        )
    return "\n".join(lines)
