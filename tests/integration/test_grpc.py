"""gRPC against the session TorchServe: the client's inference and management calls, options in the input map,
results equal to REST, a sequence of frames on one StreamPredictions2 stream, and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import requests

from helpers import build_archive
from yolonas_tools.generated import inference_pb2, inference_pb2_grpc
from yolonas_tools.serve.grpc_client import GrpcClient, PredictionError

REPO = Path(__file__).resolve().parents[2]
MODEL = "yolo_nas_s"


def rest_predict(endpoints, image: bytes, headers: dict[str, str] | None = None) -> dict:
    response = requests.post(
        f"{endpoints.inference}/predictions/{MODEL}",
        data=image,
        headers={**endpoints.auth(), "Content-Type": "image/png", **(headers or {})},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def client(ts_server):
    with GrpcClient(ts_server) as client:
        yield client


@pytest.fixture(scope="module")
def images(reference_dir: Path) -> list[bytes]:
    return [(reference_dir / "images" / name).read_bytes() for name in ("img_a_h480_w640.png", "img_b_h800_w600.png")]


def test_predict_equals_rest(client, endpoints, images):
    for image in images:
        result = json.loads(client.predict(MODEL, image))
        assert result["detections"], "the seeded random model detects plenty"
        assert result == rest_predict(endpoints, image)


def test_options_travel_in_the_input_map(client, endpoints, images):
    everything = json.loads(client.predict(MODEL, images[0]))["detections"]
    top_class = everything[0]["class_name"]
    options = {"conf": 0.3, "iou": 0.5, "max_det": 5, "classes": [top_class]}
    result = json.loads(client.predict(MODEL, images[0], options))
    headers = {"X-Conf": "0.3", "X-Iou": "0.5", "X-Max-Det": "5", "X-Classes": top_class}
    assert result == rest_predict(endpoints, images[0], headers)
    detections = result["detections"]
    assert 0 < len(detections) <= 5 < len(everything)
    assert all(d["score"] > 0.3 and d["class_name"] == top_class for d in detections)
    picture = client.predict(MODEL, images[0], {"format": "jpeg"})
    assert picture[:3] == b"\xff\xd8\xff"


def test_handler_errors_raise_prediction_error(client, images):
    # TorchServe answers these with status OK and the handler's error body; the client must not pass them on.
    with pytest.raises(PredictionError, match="not an image"):
        client.predict(MODEL, b"definitely not an image")
    with pytest.raises(PredictionError, match=r"conf: got '7'; allowed: a number in \[0, 1\]"):
        client.predict(MODEL, images[0], {"conf": 7})


def test_unknown_model_is_an_rpc_error(client, images):
    with pytest.raises(grpc.RpcError) as error:
        client.predict("no_such_model", images[0])
    assert error.value.code() == grpc.StatusCode.INTERNAL and "not found" in error.value.details().lower()


def test_rpcs_need_their_own_token(endpoints, images):
    request = inference_pb2.PredictionsRequest(model_name=MODEL, input={"data": images[0]})
    with grpc.insecure_channel(endpoints.grpc_inference) as channel:
        stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
        for token in ("wrong", endpoints.key("management")):  # keys are per API
            with pytest.raises(grpc.RpcError) as error:
                stub.Predictions(request, metadata=(("authorization", f"Bearer {token}"),), timeout=30)
            assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_management_lifecycle(client, s_archive: Path):
    name = "grpc_managed"
    assert "registered" in client.register(s_archive.name, name=name, batch_size=2, max_batch_delay=20)
    try:
        [described] = client.describe(name)
        assert (described["batchSize"], described["maxBatchDelay"], len(described["workers"])) == (2, 20, 1)
        assert {MODEL, name} <= {m["modelName"] for m in client.list_models()}
        assert client.list_models(page_size=1) == client.list_models()  # pages add up to the full list
        assert "scaled" in client.scale(name, 2).lower()
        workers = client.describe(name)[0]["workers"]
        assert [w["status"] for w in workers] == ["READY", "READY"]
    finally:
        assert "unregistered" in client.unregister(name)
    with pytest.raises(grpc.RpcError) as error:
        client.describe(name)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_stream_of_frames_equals_single_predictions(client, endpoints, images, random_checkpoint, model_store: Path):
    name = "yolo_nas_s_stream"
    archive = build_archive(random_checkpoint("s"), model_store, name, "--sequence-batching")
    client.register(archive.name, name=name)
    try:
        frames = [images[0], images[1], images[0]]
        replies = [json.loads(body) for body in client.stream(name, frames, {"conf": 0.5})]
        expected = [rest_predict(endpoints, frame, {"X-Conf": "0.5"}) for frame in frames]
        for reply, single in zip(replies, expected, strict=True):
            assert reply["detections"] == single["detections"] and reply["image_size"] == single["image_size"]
        # A bad frame ends the stream with the handler's message; the frames before it were answered.
        answered = []
        with pytest.raises(PredictionError, match="not an image"):
            for body in client.stream(name, [images[0], b"not an image", images[1]]):
                answered.append(body)
        assert len(answered) == 1
    finally:
        client.unregister(name)


def test_cli(endpoints, images, reference_dir: Path):
    env = dict(os.environ, YOLONAS_RUN_DIR=str(endpoints.run_dir))
    image = reference_dir / "images" / "img_a_h480_w640.png"
    commands = {
        "predict": ["predict", str(image), "--conf", "0.4", "--json"],
        "list": ["list"],
        "describe": ["describe", MODEL],
        "describe unknown": ["describe", "nothing_here"],
    }

    def cli(args: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(REPO / "scripts" / "grpc_client.py"), *args],
                              env=env, capture_output=True, text=True, timeout=300)  # fmt: skip

    with ThreadPoolExecutor(len(commands)) as pool:  # independent commands: their start-ups overlap
        done = dict(zip(commands, pool.map(cli, commands.values()), strict=True))
    for name in ("predict", "list", "describe"):
        assert done[name].returncode == 0, (name, done[name].stderr)
    assert json.loads(done["predict"].stdout) == rest_predict(endpoints, images[0], {"X-Conf": "0.4"})
    assert MODEL in done["list"].stdout
    assert json.loads(done["describe"].stdout)[0]["modelName"] == MODEL
    assert done["describe unknown"].returncode == 1 and "NOT_FOUND" in done["describe unknown"].stderr
