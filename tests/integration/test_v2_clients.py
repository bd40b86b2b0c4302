"""Clients users already own, unchanged, against the session TorchServe: Triton's HTTP client (JSON and binary tensor
extension, inputs and outputs), KServe's REST client, several images in one request, curl -F forms, and the
latency histograms on /metrics."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import requests

MODEL = "yolo_nas_s"
V2_SINGLE = ("boxes", "scores", "class_ids", "class_names")
tritonclient = pytest.importorskip("tritonclient.http", reason="dev dependency tritonclient[http] not installed")


@pytest.fixture(scope="module")
def images(reference_dir: Path) -> list[bytes]:
    return [(reference_dir / "images" / name).read_bytes() for name in ("img_a_h480_w640.png", "img_b_h800_w600.png")]


def plain(endpoints, image: bytes, conf: float) -> list[dict]:
    response = requests.post(
        f"{endpoints.inference}/predictions/{MODEL}",
        data=image,
        headers={**endpoints.auth(), "Content-Type": "image/png", "X-Conf": str(conf)},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    return response.json()["detections"]


def assert_equal_to_plain(columns: dict[str, np.ndarray], detections: list[dict]) -> None:
    assert [str(n.decode() if isinstance(n, bytes) else n) for n in columns["class_names"]] == [
        d["class_name"] for d in detections
    ]
    assert columns["class_ids"].tolist() == [d["class_id"] for d in detections]
    np.testing.assert_allclose(columns["scores"], [d["score"] for d in detections], atol=1e-5)
    np.testing.assert_allclose(np.reshape(columns["boxes"], (-1, 4)), [d["box"] for d in detections], atol=0.011)


@pytest.fixture(scope="module")
def triton(ts_server):
    client = tritonclient.InferenceServerClient(ts_server.inference.removeprefix("http://"), network_timeout=120)
    yield client
    client.close()


def triton_input(images: list[bytes], binary: bool):
    tensor = tritonclient.InferInput("image", [len(images)], "BYTES")
    # JSON cannot carry raw bytes: in JSON mode each element is the image's base64 text.
    elements = images if binary else [base64.b64encode(i).decode() for i in images]
    tensor.set_data_from_numpy(np.array(elements, dtype=object), binary_data=binary)
    return tensor


@pytest.mark.parametrize("binary_input", [False, True], ids=["json-input", "binary-input"])
@pytest.mark.parametrize("outputs", ["default", "json", "binary"])
def test_triton_client(triton, ts_server, images, binary_input, outputs):
    expected = plain(ts_server, images[0], 0.4)
    names = V2_SINGLE
    requested = None  # the client then adds the reserved parameter binary_data_output itself
    if outputs != "default":
        requested = [tritonclient.InferRequestedOutput(n, binary_data=outputs == "binary") for n in names]
    result = triton.infer(
        MODEL,
        [triton_input(images[:1], binary_input)],
        outputs=requested,
        parameters={"conf": 0.4},
        headers=ts_server.auth(),
        request_id="t-1",
    )
    answer = result.get_response()
    assert answer["id"] == "t-1" and answer["model_name"] == MODEL
    assert all(("data" in o) == (outputs == "json") for o in answer["outputs"])
    assert_equal_to_plain({n: result.as_numpy(n) for n in names}, expected)


@pytest.mark.parametrize("binary_input", [False, True], ids=["json-input", "binary-input"])
@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_triton_client_with_compression(triton, ts_server, images, binary_input, algorithm):
    """The client compresses the body and asks for a compressed answer; the answer comes back uncompressed."""
    result = triton.infer(
        MODEL,
        [triton_input(images[:1], binary_input)],
        parameters={"conf": 0.4},
        headers=ts_server.auth(),
        request_compression_algorithm=algorithm,
        response_compression_algorithm=algorithm,
    )
    assert_equal_to_plain({n: result.as_numpy(n) for n in V2_SINGLE}, plain(ts_server, images[0], 0.4))


def test_triton_client_unknown_option_is_still_refused(triton, ts_server, images):
    with pytest.raises(tritonclient.InferenceServerException, match="unknown option"):
        triton.infer(MODEL, [triton_input(images[:1], True)], parameters={"confidence": 0.4}, headers=ts_server.auth())


def test_several_images_in_one_v2_request(triton, ts_server, images):
    """Shape [N]: N answers in order, a corrupt image gets its own error and the others their detections."""
    batch = [images[0], b"not an image", images[1]]
    result = triton.infer(MODEL, [triton_input(batch, True)], parameters={"conf": 0.4}, headers=ts_server.auth())
    counts = result.as_numpy("num_detections").tolist()
    errors = [e.decode() for e in result.as_numpy("errors")]
    assert counts[1] == 0 and errors[0] == errors[2] == "" and errors[1].startswith("not an image")
    assert result.as_numpy("image_sizes").tolist() == [[640, 480], [0, 0], [600, 800]]
    boxes, scores = result.as_numpy("boxes"), result.as_numpy("scores")
    names, ids = result.as_numpy("class_names"), result.as_numpy("class_ids")
    assert boxes.shape == (3, max(counts), 4) and ids[1].tolist() == [-1] * max(counts)
    for slot, image in ((0, images[0]), (2, images[1])):
        n = counts[slot]
        columns = {"boxes": boxes[slot, :n], "scores": scores[slot, :n], "class_ids": ids[slot, :n],
                   "class_names": names[slot, :n]}  # fmt: skip
        assert_equal_to_plain(columns, plain(ts_server, image, 0.4))


def test_several_images_as_json(ts_server, images):
    body = {"images": [base64.b64encode(i).decode() for i in (images[1], images[0])] + ["!!"], "conf": 0.4}
    response = requests.post(
        f"{ts_server.inference}/predictions/{MODEL}", json=body, headers=ts_server.auth(), timeout=120
    )
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r.get("image_size") for r in results] == [[600, 800], [640, 480], None]
    assert results[0]["detections"] == plain(ts_server, images[1], 0.4)
    assert results[1]["detections"] == plain(ts_server, images[0], 0.4)
    assert results[2] == {"error": '"images"[2] is not valid base64', "status": 400}


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_kserve_client(ts_server, images, binary):
    kserve = pytest.importorskip("kserve", reason="kserve not installed (see requirements-kserve.txt)")
    from kserve.protocol.infer_type import RequestedOutput

    tensor = kserve.InferInput("image", [1], "BYTES")
    element = images[0] if binary else base64.b64encode(images[0]).decode()
    tensor.set_data_from_numpy(np.array([element], dtype=object), binary_data=binary)
    # In binary mode the outputs come back binary too, asked for per output.
    outputs = [RequestedOutput(name, parameters={"binary_data": binary}) for name in V2_SINGLE]
    request = kserve.InferRequest(MODEL, [tensor], request_id="k-1", parameters={"conf": 0.4}, request_outputs=outputs)
    response_headers: dict[str, str] = {}

    async def infer():
        client = kserve.InferenceRESTClient(kserve.RESTConfig(protocol="v2", timeout=120))
        try:
            return await client.infer(ts_server.inference, request, model_name=MODEL, headers=ts_server.auth(),
                                      response_headers=response_headers)  # fmt: skip
        finally:
            await client.close()

    response = asyncio.run(infer())
    assert response.id == "k-1" and response.model_name == MODEL
    assert ("inference-header-content-length" in response_headers) == binary
    columns = {o.name: o.as_numpy() for o in response.outputs}
    assert_equal_to_plain(columns, plain(ts_server, images[0], 0.4))


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_form(ts_server, reference_dir):
    path = reference_dir / "images" / "img_a_h480_w640.png"
    done = subprocess.run(
        ["curl", "-sS", "-H", f"Authorization: Bearer {ts_server.key('inference')}",
         "-F", f"image=@{path}", "-F", "conf=0.3", "-F", "agnostic=true",
         f"{ts_server.inference}/predictions/{MODEL}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    detections = json.loads(done.stdout)["detections"]
    response = requests.post(
        f"{ts_server.inference}/predictions/{MODEL}",
        data=path.read_bytes(),
        headers={**ts_server.auth(), "Content-Type": "image/png", "X-Conf": "0.3", "X-Agnostic": "true"},
        timeout=120,
    )
    assert detections == response.json()["detections"]
    # Class-aware NMS keeps overlapping boxes of different classes; agnostic NMS merges some of them.
    assert len(detections) < len(plain(ts_server, path.read_bytes(), 0.3))


HISTOGRAMS = ("YoloNASPreprocessSeconds", "YoloNASInferenceSeconds", "YoloNASPostprocessSeconds", "YoloNASImageSeconds")
BUCKETS = ["0.005", "0.01", "0.025", "0.05", "0.075", "0.1", "0.25", "0.5", "0.75", "1.0", "2.5", "5.0", "7.5", "10.0",
           "+Inf"]  # fmt: skip


def scrape(endpoints) -> dict[str, dict[str, float]]:
    """name -> {"count": ..., "le=<bound>": ...} for this model's series of each handler histogram."""
    text = requests.get(f"{endpoints.metrics}/metrics", timeout=30).text
    found: dict[str, dict[str, float]] = {name: {} for name in HISTOGRAMS}
    for line in text.splitlines():
        match = re.match(r"(\w+?)_(bucket|count|sum)\{(.*)\} (\S+)$", line)
        if match and match.group(1) in found and f'ModelName="{MODEL}"' in match.group(3):
            bound = re.search(r'le="([^"]+)"', match.group(3))
            key = f"le={bound.group(1)}" if bound else match.group(2)
            found[match.group(1)][key] = float(match.group(4))
    return found


def test_latency_histograms_on_metrics(ts_server, images):
    before = scrape(ts_server)
    plain(ts_server, images[0], 0.4)
    plain(ts_server, images[1], 0.4)
    after = scrape(ts_server)
    for name in HISTOGRAMS:
        assert [k.removeprefix("le=") for k in after[name] if k.startswith("le=")] == BUCKETS, name
        assert after[name]["count"] >= before.get(name, {}).get("count", 0) + (
            2 if name == "YoloNASImageSeconds" else 1
        )
        assert after[name]["le=+Inf"] == after[name]["count"] and after[name]["sum"] > 0
