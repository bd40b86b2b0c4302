"""The serving spine against a real TorchServe: register, batch, per-item errors, parity, unregister."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from conftest import build_archive
import server


def post_image(endpoints, model: str, data: bytes, content_type: str = "image/png", **headers) -> requests.Response:
    headers = {**endpoints.auth(), "Content-Type": content_type, **headers}
    return requests.post(f"{endpoints.inference}/predictions/{model}", data=data, headers=headers, timeout=120)


def test_single_request_returns_detections(endpoints, reference_dir: Path):
    image = reference_dir / "images" / "img_a_h480_w640.png"
    response = post_image(endpoints, "yolo_nas_s", image.read_bytes())
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "yolo_nas_s"
    assert body["image_size"] == [640, 480]
    scores = [d["score"] for d in body["detections"]]
    assert scores == sorted(scores, reverse=True)
