"""Every CPU backend archived by scripts/archive.py and served by TorchServe with the same contract: onnx and
openvino (fp32) answer what torch answers; int8 (calibrated on synthetic images) and auto answer; batches of any
size work. S at 320x320 keeps it quick; M and L are measured by scripts/bench.py, not here."""

from __future__ import annotations

import io
import json
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image

from helpers import build_archive, predict_json
from reference_match import unmatched
from yolonas_tools.cli import run_command
from yolonas_tools.data.synthetic import shapes_image, write_shapes_images
from yolonas_tools.serve import server

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")

INPUT = ["--input-size", "320", "320"]
BACKENDS = ("torch", "onnx", "openvino", "int8", "auto")


@pytest.fixture(scope="module")
def served(ts_server, random_checkpoint, model_store, tmp_path_factory):
    """backend -> model name, each archived from the same checkpoint and registered on the session server."""
    pytest.importorskip("nncf")
    checkpoint = random_checkpoint("s")
    names = {}
    for backend in BACKENDS:
        if backend == "int8":  # through the default name, as a user would
            images = write_shapes_images(tmp_path_factory.mktemp("calibration"), 4, seed=3)[0].parent
            assert (
                run_command(
                    "archive",
                    [
                        "--variant",
                        "s",
                        "--weights",
                        str(checkpoint),
                        "--backend",
                        "int8",
                        "--calibration-images",
                        str(images),
                        "--export-path",
                        str(model_store),
                        *INPUT,
                    ],
                )
                == 0
            )
            names[backend] = "yolo_nas_s_int8"
        else:
            names[backend] = f"backend_{backend}"
            build_archive(checkpoint, model_store, names[backend], "--backend", backend, *INPUT)
        server.register(ts_server, names[backend])
    yield names
    for name in names.values():
        requests.delete(f"{ts_server.management}/models/{name}", headers=ts_server.auth("management"), timeout=60)


@pytest.fixture(scope="module")
def image() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(shapes_image(np.random.default_rng(5), size=400)[:300]).save(buffer, format="PNG")
    return buffer.getvalue()


def as_record(body: dict) -> dict:
    found = body["detections"]
    width, height = body["image_size"]
    return {"width": width, "height": height, "boxes_xyxy": [d["box"] for d in found],
            "scores": [d["score"] for d in found], "class_ids": [d["class_id"] for d in found]}  # fmt: skip


def test_archives_hold_what_their_backend_loads(served, model_store):
    expected = {
        "torch": ("weights.pth", set()),
        "onnx": ("model.onnx", set()),
        "openvino": ("model.xml", {"model.bin"}),
        "int8": ("model.xml", {"model.bin"}),
        "auto": ("weights.pth", {"openvino.xml", "openvino.bin"}),
    }
    for backend, name in served.items():
        with zipfile.ZipFile(model_store / f"{name}.mar") as mar:
            files = set(mar.namelist())
            manifest = json.loads(mar.read("MAR-INF/MANIFEST.json"))
            config = mar.read("model-config.yaml").decode()
        serialized, beside = expected[backend]
        assert manifest["model"]["serializedFile"] == serialized
        assert {serialized, *beside} <= files
        others = {"weights.pth", "model.onnx", "model.xml", "model.bin", "openvino.xml"} - {serialized, *beside}
        assert not files & others, (backend, files & others)
        assert f"backend: {backend}" in config


def test_float_backends_answer_what_torch_answers(endpoints, served, image):
    reference = predict_json(endpoints, served["torch"], image, "image/png")
    assert reference["detections"], "the seeded model should find boxes in the test image"
    for backend in ("onnx", "openvino"):
        body = predict_json(endpoints, served[backend], image, "image/png")
        assert body["model"] == served[backend] and body["image_size"] == reference["image_size"]
        assert unmatched(body["detections"], as_record(reference)) == ([], []), backend


def test_every_backend_serves_batches(endpoints, served, image):
    """Four concurrent requests reach each worker as one batch (or a few): all answered, like the single one."""
    for backend, name in served.items():
        single = predict_json(endpoints, name, image, "image/png")
        with ThreadPoolExecutor(4) as pool:
            bodies = list(pool.map(lambda _, model=name: predict_json(endpoints, model, image, "image/png"), range(4)))
        for body in bodies:
            assert set(body) == set(single) and body["image_size"] == single["image_size"]
            if backend in ("torch", "onnx", "openvino"):
                assert unmatched(body["detections"], as_record(single)) == ([], []), backend
            else:  # reduced precision may move a borderline box, never the whole answer
                count = len(single["detections"])
                assert abs(len(body["detections"]) - count) <= max(2, count // 10)


def test_archive_refuses_inconsistent_backend_flags(random_checkpoint, tmp_path):
    weights = str(random_checkpoint("s"))
    for flags in (["--backend", "int8"], ["--calibration-images", str(tmp_path)], ["--backend", "tensorrt"],
                  ["--backend", "int8", "--calibration-images", str(tmp_path / "missing")]):  # fmt: skip
        with pytest.raises(SystemExit):
            run_command("archive", ["--variant", "s", "--weights", weights, "--export-path", str(tmp_path), *flags])
    assert not list(tmp_path.glob("*.mar"))
