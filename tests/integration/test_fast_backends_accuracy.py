"""What the fast backends and draft decoding cost in accuracy, measured through the session's TorchServe on the
trained shapes model (../shared/reference/shapes; skipped where absent).

- The reduced-precision backends (``torch-bf16``, ``openvino-bf16``, ``auto``: OpenVINO bf16 on a CPU with native
  bf16, fp32 elsewhere; ``int8``: NNCF, calibrated on a few synthetic shapes images, not the val images), archived
  with their defaults, answer the val images box by box as fp32 torch does, as ``scripts/backend_accuracy.py``
  measures: at least 90% of the boxes matched, with a mean IoU of at least 0.9; where the CPU has no native bf16,
  the bf16 rows and auto compute in fp32 and agree with fp32 torch all but exactly.
- ``auto`` and ``int8`` are served and validated with
  ``scripts/val.py --server``: their mAP50-95 stays within 0.005 (auto) and 0.01 (int8) of super-gradients' own fp32
  number (expected.json). The square val images give the same input with either padding.
- Their default minimal padding (the input follows the picture's shape) keeps that accuracy on wide pictures: on
  the val images widened to 480x320 (their edge columns repeated, labels shifted), auto and int8 lose no more than
  those bounds against the torch fp32 archive with super-gradients' fixed 320x320 padding (measured in process on
  such archives: torch fixed 0.8062; auto minimal 0.8118, int8 minimal 0.8111). The checkpoint pads bottom-right,
  so that is ``DetectionAutoPadding``; our centred
  ``DetectionCenterAutoPadding`` is checked in process against fixed centre padding of the same checkpoint (torch
  fp32 0.7929 against 0.7901).
- A camera-sized JPEG (4000x3000 as seen, stored 3000x4000 with EXIF orientation 6) is answered in the oriented
  frame, and draft decoding (libjpeg at 1/8 size) finds the objects full decoding finds, where full decoding
  answers exactly what the in-process Detector answers for the same bytes.
"""

from __future__ import annotations

import io
import json
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import cv2
import pytest
import requests
import yaml
from PIL import Image

from helpers import build_archive, predict_json
from reference_match import unmatched
from yolonas_serving.backends import cpu_has_bf16
from yolonas_serving.postprocess import Detections
from yolonas_tools.cli import run_command
from yolonas_tools.data.datasets import load_dataset
from yolonas_tools.measure import evaluation
from yolonas_tools.measure.evaluation import agreement, detections_from_response
from yolonas_tools.serve import server

pytest.importorskip("openvino")

#  mAP50-95 may fall this far below super-gradients' fp32 number (the issue's bounds).
TOLERANCE = {"auto": 0.005, "int8": 0.01}
#  Reduced precision against fp32 on the same images (the bounds; scripts/backend_accuracy.py measured int8
#  0.979 matched with a mean IoU of 0.989, bf16 on a CPU with native bf16 1.000 and 0.997).
MIN_MATCHED = 0.9
MIN_MEAN_IOU = 0.9
REDUCED = {"torch-bf16": "shapes_bf16_torch", "openvino-bf16": "shapes_bf16_openvino", "auto": "shapes_fast_auto",
           "int8": "shapes_fast_int8"}  # fmt: skip
CAMERA_SIZE = (4000, 3000)  # width, height as seen after orientation


@pytest.fixture(scope="module")
def shapes_models(ts_server, model_store: Path, shapes_dir: Path, shapes_archive: Path, reduced_precision_archives):
    """Names of the models on the session server: the shapes checkpoint as torch (the session's archive, draft
    decoding on), torch without draft decoding, and the reduced-precision backends (REDUCED) with their defaults
    (auto and int8, the session's archives: minimal padding)."""
    archives = {
        "shapes_draft": shapes_archive,
        REDUCED["auto"]: reduced_precision_archives["auto"],
        REDUCED["int8"]: reduced_precision_archives["int8"],
    }
    built = {
        REDUCED["torch-bf16"]: ["--backend", "torch-bf16"],
        REDUCED["openvino-bf16"]: ["--backend", "openvino-bf16"],
        "shapes_full_decode": ["--set", "jpeg_draft=false"],
    }
    for name, flags in built.items():
        archives[name] = build_archive(shapes_dir / "checkpoint.pth", model_store, name, *flags)
    for name, archive in archives.items():
        server.register(ts_server, archive.name, name=name)
    yield list(archives)
    for name in archives:
        requests.delete(f"{ts_server.management}/models/{name}", headers=ts_server.auth("management"), timeout=60)


def served_detections(endpoints, model: str, images: list[Path]) -> list[Detections]:
    """Each image's detections from ``model`` at the archive's defaults, four requests in flight."""
    with ThreadPoolExecutor(4) as pool:
        bodies = pool.map(lambda image: predict_json(endpoints, model, image.read_bytes(), "image/png"), images)
        return [detections_from_response(body) for body in bodies]


@pytest.fixture(scope="module")
def val_images(shapes_dir: Path) -> list[Path]:
    return [entry.path for entry in load_dataset(shapes_dir / "val" / "data.yaml").images]


@pytest.fixture(scope="module")
def fp32_detections(ts_server, shapes_models, val_images: list[Path]) -> list[Detections]:
    return served_detections(ts_server, "shapes_draft", val_images)


@pytest.mark.parametrize("backend", list(REDUCED))
def test_reduced_precision_agrees_with_fp32_box_by_box(endpoints, fp32_detections, val_images, backend: str):
    """Matched greedily by class at IoU >= 0.5 (evaluation.agreement, as scripts/backend_accuracy.py measures)."""
    found = agreement(fp32_detections, served_detections(endpoints, REDUCED[backend], val_images))
    assert found["detections_fp32"] >= len(val_images), "the shapes model finds the val images' shapes"
    assert found["matched"] >= MIN_MATCHED and found["mean_iou"] >= MIN_MEAN_IOU, (backend, found)
    if backend != "int8" and not cpu_has_bf16():
        # Without native bf16 these compute in fp32 (torch falls back, OpenVINO keeps f32): float noise at most.
        assert found["matched"] >= 0.99 and found["mean_iou"] >= 0.999, (backend, found)
        assert found["max_score_diff"] <= 1e-3, (backend, found)


def served_map(endpoints, model: str, data: Path, out: Path) -> float:
    argv = ["--model", model, "--data", str(data), "--server", "--run-dir", str(endpoints.run_dir), "--out", str(out)]
    assert run_command("val", argv) == 0
    return json.loads(out.read_text())["metrics"]["mAP50-95"]


@pytest.mark.parametrize("backend", ["auto", "int8"])
def test_fast_backend_keeps_map_of_fp32(endpoints, shapes_models, shapes_dir: Path, tmp_path: Path, backend: str):
    expected = json.loads((shapes_dir / "expected.json").read_text())
    found = served_map(endpoints, f"shapes_fast_{backend}", shapes_dir / "val" / "data.yaml", tmp_path / "val.json")
    assert found == pytest.approx(expected["mAP50-95"], abs=TOLERANCE[backend]), (backend, found)


def widened_dataset(shapes_dir: Path, target: Path) -> Path:
    """The val set with each 320x320 image widened to 480x320 by repeating its edge columns (labels shifted): wide
    pictures whose minimal padding differs from the fixed square. Returns its data.yaml."""
    source = shapes_dir / "val"
    for folder in ("images/val", "labels/val"):
        (target / folder).mkdir(parents=True)
    for image in sorted((source / "images" / "val").iterdir()):
        pixels = cv2.imread(str(image))
        width = pixels.shape[1]
        side = width // 4
        cv2.imwrite(str(target / "images/val" / image.name), cv2.copyMakeBorder(pixels, 0, 0, side, side,
                                                                                 cv2.BORDER_REPLICATE))  # fmt: skip
        rows = []
        for line in (source / "labels" / "val" / f"{image.stem}.txt").read_text().splitlines():
            if line.strip():
                cls, cx, cy, w, h = line.split()
                wide = width + 2 * side
                rows.append(f"{cls} {(float(cx) * width + side) / wide:.6f} {cy} {float(w) * width / wide:.6f} {h}")
        (target / "labels/val" / f"{image.stem}.txt").write_text("\n".join(rows) + "\n")
    (target / "data.yaml").write_text((source / "data.yaml").read_text())
    return target / "data.yaml"


@pytest.fixture(scope="module")
def widened_data(shapes_dir: Path, tmp_path_factory) -> Path:
    return widened_dataset(shapes_dir, tmp_path_factory.mktemp("widened"))


@pytest.fixture(scope="module")
def widened(ts_server, shapes_models, widened_data: Path, tmp_path_factory) -> tuple[Path, float]:
    """(the widened set's data.yaml, the torch fp32 archive's mAP50-95 on it with the checkpoint's fixed padding)."""
    out = tmp_path_factory.mktemp("widened_torch") / "torch.json"
    return widened_data, served_map(ts_server, "shapes_draft", widened_data, out)


@pytest.mark.parametrize("backend", ["auto", "int8"])
def test_minimal_padding_keeps_map_on_wide_pictures(endpoints, widened, reduced_precision_archives, tmp_path: Path,
                                                    backend: str):  # fmt: skip
    with zipfile.ZipFile(reduced_precision_archives[backend]) as archive:
        pipeline = yaml.safe_load(archive.read("model-config.yaml"))["handler"]["pipeline"]
    assert [next(iter(step)) for step in pipeline][:2] == ["DetectionLongestMaxSizeRescale", "DetectionAutoPadding"]
    data, fixed_fp32 = widened
    found = served_map(endpoints, f"shapes_fast_{backend}", data, tmp_path / "minimal.json")
    assert found >= fixed_fp32 - TOLERANCE[backend], (backend, found, fixed_fp32)


def test_centred_minimal_padding_keeps_map_on_wide_pictures(shapes_dir: Path, widened_data: Path):
    """In process, torch fp32: the checkpoint with fixed centre padding against the same with minimal centre
    padding (DetectionCenterAutoPadding), on the widened pictures."""
    detector = evaluation.local_detector(shapes_dir / "checkpoint.pth", "shapes")
    dataset = load_dataset(widened_data)
    found = {}
    for name, pipeline in (("fixed", detector.pipeline.with_padding("center")),
                           ("minimal", detector.pipeline.with_padding("center").with_padding("minimal"))):  # fmt: skip
        responses = evaluation.local_responses(replace(detector, pipeline=pipeline), dataset.images,
                                               evaluation.EvalOptions(), batch_size=4)  # fmt: skip
        found[name] = evaluation.evaluate(dataset, evaluation.collect(dataset, responses)).map50_95
    assert found["minimal"] >= found["fixed"] - TOLERANCE["auto"], found


def camera_jpeg(shapes_dir: Path) -> tuple[bytes, bytes]:
    """(stored 3000x4000 with EXIF orientation 6, the same scene stored upright): a shapes val image enlarged onto
    a 4000x3000 grey canvas."""
    first = load_dataset(shapes_dir / "val" / "data.yaml").images[0].path
    width, height = CAMERA_SIZE
    canvas = Image.new("RGB", CAMERA_SIZE, (114, 114, 114))
    with Image.open(first) as image:
        square = image.convert("RGB").resize((height, height), Image.Resampling.LANCZOS)
    canvas.paste(square, ((width - height) // 2, 0))
    # Orientation 6 means "rotate 90 degrees clockwise to display": store the scene turned the other way.
    stored = canvas.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated, upright = io.BytesIO(), io.BytesIO()
    stored.save(rotated, format="JPEG", quality=90, exif=exif)
    canvas.save(upright, format="JPEG", quality=90)
    return rotated.getvalue(), upright.getvalue()


def test_camera_jpeg_draft_decoding_finds_what_full_decoding_finds(endpoints, shapes_models, shapes_dir: Path):
    rotated, upright = camera_jpeg(shapes_dir)
    with Image.open(io.BytesIO(rotated)) as image:
        assert image.size == (3000, 4000) and image.getexif()[0x0112] == 6
    full = predict_json(endpoints, "shapes_full_decode", rotated)
    draft = predict_json(endpoints, "shapes_draft", rotated)
    assert full["image_size"] == draft["image_size"] == list(CAMERA_SIZE)
    assert len(full["detections"]) >= 1, "the shapes model should find the val image's shapes"

    # Full decoding through the server is the in-process Detector's answer for the same bytes, exactly.
    detector = evaluation.local_detector(shapes_dir / "checkpoint.pth", "shapes")
    detector.settings = replace(detector.settings, jpeg_draft=False)
    (local,) = detector.detect([detector.prepare(rotated)])
    record = {"width": CAMERA_SIZE[0], "height": CAMERA_SIZE[1], "boxes_xyxy": local.boxes.tolist(),
              "scores": local.scores.tolist(), "class_ids": local.class_ids.tolist()}  # fmt: skip
    assert unmatched(full["detections"], record) == ([], [])

    # EXIF orientation is honoured: the stored-rotated JPEG finds what the upright one finds, where it finds it.
    straight = agreement(
        [detections_from_response(predict_json(endpoints, "shapes_full_decode", upright))],
        [detections_from_response(full)],
    )
    assert straight["matched"] == 1.0 and straight["mean_iou"] > 0.95

    # Draft decoding (1/8 of each side here) moves boxes by resampling noise only.
    same = agreement([detections_from_response(full)], [detections_from_response(draft)])
    assert same["matched"] == 1.0, same
    assert same["mean_iou"] > 0.95 and same["max_score_diff"] < 0.1, same
