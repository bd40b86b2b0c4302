"""The Open Inference Protocol (KServe v2) over REST and gRPC, and annotated pictures (REST and scripts/predict.py)."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
from PIL import Image

from yolonas_tools.generated import open_inference_grpc_pb2 as oip
from yolonas_tools.generated import open_inference_grpc_pb2_grpc as oip_grpc
from yolonas_tools.serve import server

REPO = Path(__file__).resolve().parents[2]
MODEL = "yolo_nas_s"
OUTPUTS = {"boxes": "FP32", "scores": "FP32", "class_ids": "INT64", "class_names": "BYTES"}


@pytest.fixture(scope="module")
def image_path(reference_dir: Path) -> Path:
    return reference_dir / "images" / "img_a_h480_w640.png"


def post(endpoints, url: str, **kwargs) -> requests.Response:
    headers = {**endpoints.auth(), **kwargs.pop("headers", {})}
    return requests.post(f"{endpoints.inference}{url}", headers=headers, timeout=120, **kwargs)


def plain(endpoints, image: bytes, headers: dict[str, str] | None = None) -> dict:
    response = post(
        endpoints, f"/predictions/{MODEL}", data=image, headers={"Content-Type": "image/png", **(headers or {})}
    )
    assert response.status_code == 200, response.text
    return response.json()


def assert_same_detections(outputs: dict[str, list], detections: list[dict]) -> None:
    """v2 columns against the plain JSON rows (both rounded by the handler, through different code paths)."""
    assert outputs["class_names"] == [d["class_name"] for d in detections]
    assert outputs["class_ids"] == [d["class_id"] for d in detections]
    np.testing.assert_allclose(outputs["scores"], [d["score"] for d in detections], atol=1e-5)
    np.testing.assert_allclose(np.reshape(outputs["boxes"], (-1, 4)), [d["box"] for d in detections], atol=0.011)


def test_v2_rest_equals_plain_rest(endpoints, image_path: Path):
    image = image_path.read_bytes()
    expected = plain(endpoints, image, {"X-Conf": "0.4"})
    request = {
        "id": "req-7",
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(image).decode()]}],
        "parameters": {"conf": 0.4},
    }
    # The OIP endpoint, and /predictions: the path KServe's TorchServe wrapper forwards v2 requests to.
    for url in (f"/v2/models/{MODEL}/infer", f"/predictions/{MODEL}"):
        response = post(endpoints, url, json=request)
        assert response.status_code == 200, response.text
        body = response.json()
        assert (body["model_name"], body["id"]) == (MODEL, "req-7")
        assert body["parameters"]["image_size"] == expected["image_size"]
        assert {o["name"]: o["datatype"] for o in body["outputs"]} == OUTPUTS
        count = len(expected["detections"])
        assert [o["shape"] for o in body["outputs"]] == [[count, 4], [count], [count], [count]]
        assert_same_detections({o["name"]: o["data"] for o in body["outputs"]}, expected["detections"])


@pytest.fixture(scope="module")
def oip_server(tmp_path_factory: pytest.TempPathFactory, model_store: Path, s_archive: Path):
    """TorchServe serves the OIP gRPC service on its gRPC inference port only when asked to."""
    run_dir = tmp_path_factory.mktemp("run_oip")
    extra = {"ts_open_inference_protocol": "true"}
    endpoints = server.start(run_dir, model_store, models=[MODEL], ports=server.free_ports(), extra_config=extra)
    yield endpoints
    server.stop(run_dir)


def test_v2_grpc_equals_plain_rest(oip_server, image_path: Path):
    image = image_path.read_bytes()
    expected = plain(oip_server, image)
    tensor = oip.ModelInferRequest.InferInputTensor(
        name="image", datatype="BYTES", shape=[1], contents=oip.InferTensorContents(bytes_contents=[image])
    )
    metadata = (("authorization", f"Bearer {oip_server.key('inference')}"),)
    with grpc.insecure_channel(oip_server.grpc_inference) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ModelReady(oip.ModelReadyRequest(name=MODEL), metadata=metadata, timeout=30).ready
        request = oip.ModelInferRequest(model_name=MODEL, id="req-8", inputs=[tensor])
        # TorchServe 0.12 forwards neither request nor tensor parameters to the handler: this conf is ignored.
        request.parameters["conf"].string_param = "0.9"
        replies = [stub.ModelInfer(request, metadata=metadata, timeout=120)]
        request.ClearField("id")  # TorchServe then sends id "" to the handler, which must still answer with one
        replies.append(stub.ModelInfer(request, metadata=metadata, timeout=120))
    assert [r.id for r in replies] == ["req-8", ""]
    for reply in replies:
        assert reply.model_name == MODEL
        assert {o.name: o.datatype for o in reply.outputs} == OUTPUTS
        columns = {o.name: o.contents for o in reply.outputs}
        outputs = {
            "boxes": list(columns["boxes"].fp32_contents),
            "scores": list(columns["scores"].fp32_contents),
            "class_ids": list(columns["class_ids"].int64_contents),
            # TorchServe writes each BYTES element as JSON text ("person" with its quotes).
            "class_names": [json.loads(name) for name in columns["class_names"].bytes_contents],
        }
        assert_same_detections(outputs, expected["detections"])


def rgb(data: bytes | Path) -> np.ndarray:
    source = io.BytesIO(data) if isinstance(data, bytes) else data
    return np.asarray(Image.open(source).convert("RGB")).astype(np.int16)


def outline(box: list[float], shape: tuple[int, ...], width: int = 2) -> np.ndarray:
    """A mask of the box's edges (as drawn: ``width`` pixels inside the box)."""
    x1, y1 = (max(0, round(v)) for v in box[:2])
    x2, y2 = min(shape[1] - 1, round(box[2])), min(shape[0] - 1, round(box[3]))
    mask = np.zeros(shape[:2], dtype=bool)
    mask[y1 : y1 + width, x1 : x2 + 1] = mask[y2 - width + 1 : y2 + 1, x1 : x2 + 1] = True
    mask[y1 : y2 + 1, x1 : x1 + width] = mask[y1 : y2 + 1, x2 - width + 1 : x2 + 1] = True
    return mask


def test_annotated_picture(endpoints, image_path: Path, tmp_path: Path):
    image = image_path.read_bytes()
    original = rgb(image_path)
    top = plain(endpoints, image, {"X-Conf": "0.5"})["detections"][0]
    pictures = {}
    for name, headers in (("accept", {"Accept": "image/jpeg"}), ("format", {"X-Format": "jpeg"})):
        response = post(
            endpoints,
            f"/predictions/{MODEL}",
            data=image,
            headers={"Content-Type": "image/png", "X-Conf": "0.5", **headers},
        )
        assert response.status_code == 200 and response.headers["Content-Type"].startswith("image/jpeg"), response.text[
            :200
        ]
        pictures[name] = response.content
    assert pictures["accept"] == pictures["format"]
    drawn = rgb(pictures["accept"])
    assert drawn.shape == original.shape
    blank = post(endpoints, f"/predictions/{MODEL}", data=image,
                 headers={"Content-Type": "image/png", "X-Conf": "1.0", "Accept": "image/jpeg"})  # fmt: skip
    undrawn = rgb(blank.content)  # no score exceeds 1.0: nothing drawn, only JPEG noise
    edges = outline(top["box"], original.shape)
    assert np.abs(undrawn - original).mean() < 6 and np.abs(undrawn - original)[edges].mean() < 10
    assert np.abs(drawn - original)[edges].mean() > 25, "the top detection's box is not drawn"

    # scripts/predict.py --save asks for the same picture.
    saved = tmp_path / "annotated.jpg"
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "predict.py"), str(image_path), "--conf", "0.5", "--save", str(saved)],
        env=dict(os.environ, YOLONAS_RUN_DIR=str(endpoints.run_dir)), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"detections from {MODEL}" in done.stdout
    assert saved.read_bytes() == pictures["accept"]


def test_v2_grpc_several_images(oip_server, image_path: Path, reference_dir: Path):
    """Shape [N] through TorchServe's OIP gRPC: N answers in order (outputs gain a leading N axis)."""
    images = [image_path.read_bytes(), b"not an image", (reference_dir / "images" / "img_b_h800_w600.png").read_bytes()]
    tensor = oip.ModelInferRequest.InferInputTensor(
        name="image", datatype="BYTES", shape=[3], contents=oip.InferTensorContents(bytes_contents=images)
    )
    metadata = (("authorization", f"Bearer {oip_server.key('inference')}"),)
    with grpc.insecure_channel(oip_server.grpc_inference) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        reply = stub.ModelInfer(
            oip.ModelInferRequest(model_name=MODEL, inputs=[tensor]), metadata=metadata, timeout=120
        )
    outputs = {o.name: o for o in reply.outputs}
    counts = list(outputs["num_detections"].contents.int64_contents)
    errors = [json.loads(e) for e in outputs["errors"].contents.bytes_contents]
    assert counts[1] == 0 and errors[0] == errors[2] == "" and errors[1].startswith("not an image")
    width = max(counts)
    assert list(outputs["boxes"].shape) == [3, width, 4]
    boxes = np.reshape(outputs["boxes"].contents.fp32_contents, (3, width, 4))
    scores = np.reshape(outputs["scores"].contents.fp32_contents, (3, width))
    ids = np.reshape(outputs["class_ids"].contents.int64_contents, (3, width))
    names = np.reshape([json.loads(n) for n in outputs["class_names"].contents.bytes_contents], (3, width))
    for slot in (0, 2):
        n = counts[slot]
        columns = {"boxes": boxes[slot, :n].tolist(), "scores": scores[slot, :n].tolist(),
                   "class_ids": ids[slot, :n].tolist(), "class_names": names[slot, :n].tolist()}  # fmt: skip
        assert_same_detections(columns, plain(oip_server, images[slot])["detections"])


def test_v2_grpc_refuses_a_missing_or_wrong_key(oip_server, image_path: Path):
    """The OIP gRPC service sits behind TorchServe's token check like its own APIs: no key, a made-up one and the
    management key are refused with PERMISSION_DENIED; the inference key then works on the same channel."""
    tensor = oip.ModelInferRequest.InferInputTensor(
        name="image",
        datatype="BYTES",
        shape=[1],
        contents=oip.InferTensorContents(bytes_contents=[image_path.read_bytes()]),
    )
    infer = oip.ModelInferRequest(model_name=MODEL, inputs=[tensor])
    refused = (
        (),
        (("authorization", "Bearer wrong-key"),),
        (("authorization", f"Bearer {oip_server.key('management')}"),),
    )
    with grpc.insecure_channel(oip_server.grpc_inference) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        for rpc, request in ((stub.ModelInfer, infer), (stub.ModelReady, oip.ModelReadyRequest(name=MODEL))):
            for metadata in refused:
                with pytest.raises(grpc.RpcError) as error:
                    rpc(request, metadata=metadata, timeout=60)
                assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED, (
                    request,
                    metadata,
                    error.value.details(),
                )
        reply = stub.ModelInfer(
            infer, metadata=(("authorization", f"Bearer {oip_server.key('inference')}"),), timeout=120
        )
    assert {o.name for o in reply.outputs} == set(OUTPUTS)
