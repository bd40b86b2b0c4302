"""The serving spine against a real TorchServe: register, dynamic batching, per-item errors inside a batch,
parity with super-gradients' predict() through the server, unregister."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from answers import as_record

from helpers import REPO, build_archive
from reference_match import unmatched
from yolonas_tools.measure import bench
from yolonas_tools.measure.load import Load
from yolonas_tools.serve import server


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
    assert all(set(d) == {"box", "score", "class_id", "class_name"} for d in body["detections"])


def _metric(endpoints, name: str, model: str) -> float | None:
    text = requests.get(f"{endpoints.metrics}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and f'ModelName="{model}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return None


def test_concurrent_requests_form_one_batch_and_a_corrupt_item_fails_alone(endpoints, reference_dir: Path):
    """Four concurrent requests within a long batch delay reach the handler as one batch of four: three different
    images, each answered with its own detections (what it gets alone), and a corrupt one that gets 400 with a
    message. Then the model is unregistered."""
    images = [(reference_dir / "images" / name).read_bytes() for name in ("img_b_h800_w600.png", "img_a_h480_w640.png")]
    images.append((REPO / "assets" / "sample.jpg").read_bytes())
    alone = []
    for image in images:
        response = post_image(endpoints, "yolo_nas_s", image, "application/octet-stream")
        assert response.status_code == 200, response.text
        alone.append(response.json())
    assert len({tuple(body["image_size"]) for body in alone}) == len(images), "a mix-up must show"
    server.register(endpoints, "yolo_nas_s", name="batched", batch_size=4, max_batch_delay=5000)
    try:
        bodies = [images[0], images[1], b"\x89PNG\r\n\x1a\n this is not really a png", images[2]]
        with ThreadPoolExecutor(4) as pool:
            responses = list(
                pool.map(lambda body: post_image(endpoints, "batched", body, "application/octet-stream"), bodies)
            )
        assert [r.status_code for r in responses] == [200, 200, 400, 200], [r.text[:200] for r in responses]
        assert "error" in responses[2].json()
        for response, expected in zip((responses[0], responses[1], responses[3]), alone, strict=True):
            body = response.json()
            assert body["image_size"] == expected["image_size"]
            assert unmatched(body["detections"], as_record(expected)) == ([], [])
        assert _metric(endpoints, "YoloNASBatchSize", "batched") == 4.0
        assert _metric(endpoints, "YoloNASImages", "batched") == 3.0
    finally:
        management = endpoints.auth("management")
        deleted = requests.delete(f"{endpoints.management}/models/batched", headers=management, timeout=60)
    assert deleted.status_code == 200, deleted.text
    assert post_image(endpoints, "batched", images[0]).status_code == 404


def test_logs_keep_lifecycle_lines_but_not_per_request_chatter(endpoints, reference_dir: Path):
    """log4j2.xml drops the dozen INFO lines TorchServe writes per request (echoed metric lines, backend timings) and
    keeps its lifecycle lines; the metrics themselves still reach Prometheus."""
    before = _metric(endpoints, "YoloNASImages", "yolo_nas_s") or 0.0
    image = (reference_dir / "images" / "img_a_h480_w640.png").read_bytes()
    for _ in range(3):
        assert post_image(endpoints, "yolo_nas_s", image).status_code == 200
    # The frontend echoes a metric line before it counts it: once counted, an echo would be in the log.
    deadline = time.monotonic() + 30
    while (_metric(endpoints, "YoloNASImages", "yolo_nas_s") or 0.0) < before + 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _metric(endpoints, "YoloNASImages", "yolo_nas_s") == before + 3
    logs = endpoints.run_dir / "logs"
    ts_log, model_log = (logs / "ts_log.log").read_text(), (logs / "model_log.log").read_text()
    for chatter in ("[METRICS]", "Backend response time", "Looping backend response", "Sending response for jobId"):
        assert chatter not in ts_log
    assert "Backend received inference at" not in model_log
    assert "Model yolo_nas_s loaded" in ts_log
    assert "YOLO-NAS yolo_nas_s ready" in model_log
    assert (logs / "access_log.log").read_text().count('"POST /predictions/yolo_nas_s HTTP/1.1" 200') >= 3


def test_the_bench_load_generator_drives_the_server_on_keep_alive_connections(endpoints):
    """bench.py's served windows: KeepAliveSession clients with the inference key, answered 200 every time."""
    load = bench.serve(endpoints, "yolo_nas_s", bench.test_jpeg(), concurrency=2, duration=1.0, load=Load())
    assert load.served >= 2 and not load.errors and load.per_second > 0


def test_parity_with_super_gradients_through_the_server(endpoints, reference_dir: Path, model_store: Path):
    build_archive(reference_dir / "checkpoint.pth", model_store, "reference_s")
    server.register(endpoints, "reference_s")
    try:
        predict = json.loads((reference_dir / "predict.json").read_text())
        for record in predict["images"]:
            response = post_image(endpoints, "reference_s", (reference_dir / record["file"]).read_bytes())
            assert response.status_code == 200, response.text
            missing, extra = unmatched(response.json()["detections"], record)
            assert (missing, extra) == ([], []), f"{record['file']}: {missing[:3]} missing, {extra[:3]} extra"
    finally:
        requests.delete(f"{endpoints.management}/models/reference_s", headers=endpoints.auth("management"), timeout=60)
