"""Several images in one request: answered in order, each judged alone, and batched with other requests' images in
one forward pass (TorchServe batches requests; the detector batches their images)."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import torch
from PIL import Image

from yolonas_serving.detector import Detector
from yolonas_serving.pipeline import COCO_PIPELINE
from yolonas_serving.protocol.base import Model
from yolonas_serving.runtime import WholeBatchRuntime
from yolonas_serving.settings import HandlerSettings

NAMES = [f"class{i}" for i in range(80)]
MODEL = Model("fake", NAMES)


class PerImageRuntime(WholeBatchRuntime):
    """Stands in for the network: each image's outputs depend on that image alone; records batch sizes."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def __call__(self, batch: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        self.batches.append(len(batch))
        boxes, scores = [], []
        for image in batch:
            generator = torch.Generator().manual_seed(int(image.sum() * 1000) % 2**31)
            corner = torch.rand(300, 2, generator=generator) * 500
            boxes.append(torch.cat([corner, corner + torch.rand(300, 2, generator=generator) * 120], dim=1))
            scores.append(torch.rand(300, len(NAMES), generator=generator) ** 4)
        return torch.stack(boxes), torch.stack(scores)


def png(seed: int, size: tuple[int, int]) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (*size[::-1], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_images_of_several_requests_share_one_forward_pass_and_match_single_answers():
    runtime = PerImageRuntime()
    detector = Detector(runtime, COCO_PIPELINE, MODEL)
    a, b, c = png(1, (320, 240)), png(2, (200, 300)), png(3, (640, 480))
    rows = [
        {"body": {"images": [b64(a), b64(b"not an image"), b64(b)], "conf": 0.3}},
        {"body": bytearray(c)},
        {"body": {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": [b64(c), b64(a)]}]}},
    ]
    responses, timings = detector.handle(rows, [{}, {"X-Conf": "0.3"}, {}])
    assert runtime.batches == [5] and len(timings.detections) == 5  # 2 + 1 + 2 decodable images
    assert [r.status for r in responses] == [200, 200, 200]
    results = json.loads(responses[0].body)["results"]
    assert results[1]["status"] == 400 and results[1]["error"].startswith("not an image")
    for entry, image in ((results[0], a), (results[2], b)):
        alone, _ = detector.handle([{"body": bytearray(image)}], [{"X-Conf": "0.3"}])
        assert {k: v for k, v in json.loads(alone[0].body).items() if k != "model"} == entry
    alone, _ = detector.handle([{"body": bytearray(c)}], [{"X-Conf": "0.3"}])
    assert json.loads(responses[1].body) == json.loads(alone[0].body)
    v2 = {o["name"]: o for o in json.loads(responses[2].body)["outputs"]}
    assert v2["image_sizes"]["data"] == [640, 480, 320, 240] and v2["errors"]["data"] == ["", ""]


def test_limits_on_images_and_bytes_refuse_the_whole_request():
    settings = HandlerSettings(max_images_per_request=2, max_request_bytes=10_000_000)
    detector = Detector(PerImageRuntime(), COCO_PIPELINE, MODEL, settings)
    image = b64(png(1, (64, 64)))
    responses, _ = detector.handle([{"body": {"images": [image] * 3}}, {"body": {"images": [image] * 2}}], [{}, {}])
    assert responses[0].status == 413 and "3 images in one request; at most 2" in responses[0].error
    assert responses[1].status == 200


def test_an_annotated_picture_answers_one_image():
    detector = Detector(PerImageRuntime(), COCO_PIPELINE, MODEL)
    image = b64(png(1, (64, 64)))
    responses, _ = detector.handle([{"body": {"images": [image] * 2, "format": "jpeg"}}], [{}])
    assert responses[0].status == 400 and "annotated picture answers one image" in responses[0].error


def test_a_v2_request_is_never_answered_with_a_picture():
    """v2 clients (the OIP gRPC route included) need tensors back: format=jpeg is refused, Accept is ignored."""
    detector = Detector(PerImageRuntime(), COCO_PIPELINE, MODEL)
    tensor = {"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64(png(1, (64, 64)))]}
    rows = [{"body": {"inputs": [tensor], "parameters": {"format": "jpeg"}}}, {"body": {"inputs": [tensor]}}]
    responses, _ = detector.handle(rows, [{}, {"Accept": "image/jpeg"}])
    assert responses[0].status == 400 and "answered with tensors" in responses[0].error
    assert responses[1].status == 200 and responses[1].content_type == "application/json"
    assert json.loads(responses[1].body)["outputs"]
