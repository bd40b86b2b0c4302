"""Every CPU backend archived by scripts/archive.py and served by TorchServe with the same contract, on the trained
shapes model (the session's archives of it, at its 320x320 input): onnx and openvino (fp32) answer what torch answers;
every backend, int8 (calibrated on synthetic images) and auto included, answers concurrent requests for different
images, batched, each with its own image's answer. M and L are measured by scripts/bench.py, and what reduced
precision costs by test_fast_backends_accuracy.py."""

from __future__ import annotations

import io
import json
import zipfile
from concurrent.futures import ThreadPoolExecutor
from itertools import combinations

import numpy as np
import pytest
import requests
from answers import as_record
from PIL import Image

from helpers import predict_json
from reference_match import unmatched
from yolonas_tools.cli import run_command
from yolonas_tools.data.synthetic import shapes_image
from yolonas_tools.serve import server

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")

BACKENDS = ("torch", "onnx", "openvino", "int8", "auto")


@pytest.fixture(scope="module")
def served(ts_server, shapes_archive, converted_archives, reduced_precision_archives):
    """backend -> model name, each an archive of the same checkpoint, registered on the session server."""
    archives = {"torch": shapes_archive, **converted_archives, **reduced_precision_archives}
    names = {backend: f"backend_{backend}" for backend in BACKENDS}
    for backend, name in names.items():
        server.register(ts_server, archives[backend].name, name=name)
    yield {backend: (name, archives[backend]) for backend, name in names.items()}
    for name in names.values():
        requests.delete(f"{ts_server.management}/models/{name}", headers=ts_server.auth("management"), timeout=60)


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    """Four different synthetic shapes pictures, each of its own height."""
    pictures = []
    for seed in range(4):
        buffer = io.BytesIO()
        Image.fromarray(shapes_image(np.random.default_rng(5 + seed), size=400)[: 300 - 20 * seed]).save(buffer, "PNG")
        pictures.append(buffer.getvalue())
    return pictures


def test_archives_hold_what_their_backend_loads(served):
    expected = {
        "torch": ("weights.pth", set()),
        "onnx": ("model.onnx", set()),
        "openvino": ("model.xml", {"model.bin"}),
        "int8": ("model.xml", {"model.bin"}),
        "auto": ("weights.pth", {"openvino.xml", "openvino.bin"}),
    }
    for backend, (_, archive) in served.items():
        with zipfile.ZipFile(archive) as mar:
            files = set(mar.namelist())
            manifest = json.loads(mar.read("MAR-INF/MANIFEST.json"))
            config = mar.read("model-config.yaml").decode()
        serialized, beside = expected[backend]
        assert manifest["model"]["serializedFile"] == serialized
        assert {serialized, *beside} <= files
        others = {"weights.pth", "model.onnx", "model.xml", "model.bin", "openvino.xml"} - {serialized, *beside}
        assert not files & others, (backend, files & others)
        assert f"backend: {backend}" in config


def test_float_backends_answer_what_torch_answers(endpoints, served, images):
    for image in images:
        reference = predict_json(endpoints, served["torch"][0], image, "image/png")
        assert reference["detections"], "the shapes model should find the shapes of every test image"
        for backend in ("onnx", "openvino"):
            name = served[backend][0]
            body = predict_json(endpoints, name, image, "image/png")
            assert body["model"] == name and body["image_size"] == reference["image_size"]
            assert unmatched(body["detections"], as_record(reference)) == ([], []), backend


def test_every_backend_answers_concurrent_requests_each_with_its_own_image(endpoints, served, images):
    """Concurrent requests for four different images reach each worker in batches; every answer is the one its
    image gets alone, so a batch that mixed images or answers up would fail."""
    order = [0, 1, 2, 3, 3, 2, 1, 0]  # each image twice, never next to itself
    for backend, (name, _) in served.items():
        alone = [predict_json(endpoints, name, image, "image/png") for image in images]
        for i, j in combinations(range(len(images)), 2):  # so that a mix-up shows
            assert alone[i]["image_size"] != alone[j]["image_size"]
            assert unmatched(alone[i]["detections"], as_record(alone[j])) != ([], []), (backend, i, j)
        with ThreadPoolExecutor(4) as pool:
            bodies = list(pool.map(lambda k, model=name: predict_json(endpoints, model, images[k], "image/png"), order))
        for k, body in zip(order, bodies, strict=True):
            assert set(body) == set(alone[k]) and body["image_size"] == alone[k]["image_size"], (backend, k)
            assert unmatched(body["detections"], as_record(alone[k])) == ([], []), (backend, k)


def test_archive_refuses_inconsistent_backend_flags(random_checkpoint, tmp_path, capsys):
    weights = str(random_checkpoint("s"))
    calibration = "--backend int8 needs --calibration-images DIR, and only it uses them"
    refusals = {
        ("--backend", "int8"): calibration,
        ("--calibration-images", str(tmp_path)): calibration,
        ("--backend", "tensorrt"): "argument --backend: invalid choice: 'tensorrt'",
        ("--backend", "int8", "--calibration-images", str(tmp_path / "missing")):
            f"--calibration-images {tmp_path / 'missing'}: not a folder",
    }  # fmt: skip
    for flags, message in refusals.items():
        with pytest.raises(SystemExit) as refused:
            run_command("archive", ["--variant", "s", "--weights", weights, "--export-path", str(tmp_path), *flags])
        assert refused.value.code == 2 and message in capsys.readouterr().err, flags
    assert not list(tmp_path.glob("*.mar"))
