"""The whole chain in process (no TorchServe): parity with super-gradients' predict(), batches with bad items,
pictures, v2 answers and mixed input shapes."""

from __future__ import annotations

import base64
import io
import json
import time

import numpy as np
import pytest
from PIL import Image

from reference_match import unmatched
from yolonas import load_model
from yolonas_serving.classes import default_names
from yolonas_serving.detector import Detector
from yolonas_serving.pipeline import COCO_PIPELINE, Pipeline
from yolonas_serving.protocol.base import Model
from yolonas_serving.runtime import DeferredBatch, TorchRuntime, WholeBatchRuntime

MODEL = Model("s", default_names(80))


@pytest.fixture(scope="module")
def reference_detector(reference_dir) -> Detector:
    model = load_model(reference_dir / "checkpoint.pth")
    return Detector(TorchRuntime(model), COCO_PIPELINE, Model("yolo_nas_s", default_names(80)))


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_matches_super_gradients_predict(reference_detector, reference_dir):
    predict = json.loads((reference_dir / "predict.json").read_text())
    rows = [{"body": (reference_dir / r["file"]).read_bytes()} for r in predict["images"]]
    responses, _ = reference_detector.handle(rows, [{}] * len(rows))  # both images in one batch
    for response, record in zip(responses, predict["images"]):
        body = json.loads(response.body)
        assert body["image_size"] == [record["width"], record["height"]]
        missing, extra = unmatched(body["detections"], record)
        assert (missing, extra) == ([], []), f"{record['file']}: {len(missing)} missing, {len(extra)} extra"


def test_a_bad_item_fails_alone(reference_detector, reference_dir):
    good = (reference_dir / "images" / "img_b_h800_w600.png").read_bytes()
    rows = [{"body": good}, {"body": b"\xff\xd8\xff\xe0 truncated jpeg"}, {"body": good}, {"body": good}]
    headers = [{}, {}, {"X-Conf": "2"}, {}]
    responses, timings = reference_detector.handle(rows, headers)
    assert [r.status for r in responses] == [200, 400, 400, 200]
    assert "unreadable image header" in json.loads(responses[1].body)["error"]
    assert "conf: got '2'; allowed: a number in [0, 1]" in json.loads(responses[2].body)["error"]
    assert responses[0].body == responses[3].body
    assert len(timings.detections) == 2


def test_picture_response(reference_detector, reference_dir):
    data = (reference_dir / "images" / "img_a_h480_w640.png").read_bytes()
    responses, _ = reference_detector.handle([{"body": data}], [{"Accept": "image/jpeg"}])
    picture = Image.open(io.BytesIO(responses[0].body))
    assert responses[0].content_type == "image/jpeg" and picture.format == "JPEG" and picture.size == (640, 480)
    assert np.abs(np.asarray(picture, dtype=float) - np.asarray(Image.open(io.BytesIO(data)), dtype=float)).max() > 100


def test_v2_answer_carries_the_same_detections(reference_detector, reference_dir):
    data = (reference_dir / "images" / "img_a_h480_w640.png").read_bytes()
    v2 = {
        "id": "7",
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(data).decode()]}],
    }
    responses, _ = reference_detector.handle([{"body": v2}, {"body": data}], [{}, {}])
    answer, plain = json.loads(responses[0].body), json.loads(responses[1].body)
    outputs = {o["name"]: o["data"] for o in answer["outputs"]}
    assert answer["id"] == "7"
    assert outputs["scores"] == [d["score"] for d in plain["detections"]]
    assert outputs["class_names"] == [d["class_name"] for d in plain["detections"]]
    assert np.reshape(outputs["boxes"], (-1, 4)).tolist() == [d["box"] for d in plain["detections"]]


def test_auto_padding_batches_by_shape(random_checkpoint):
    """Different image shapes under DetectionAutoPadding need separate forward passes; results keep their slots."""
    pipeline = Pipeline.from_spec(
        [
            {"DetectionLongestMaxSizeRescale": {"output_shape": [160, 160]}},
            "DetectionAutoPadding",
            "StandardizeImage",
            "ImagePermute",
        ]
    )
    calls = []

    class CountingRuntime(TorchRuntime):
        def __call__(self, batch):
            calls.append(batch.shape)
            return super().__call__(batch)

    detector = Detector(CountingRuntime(load_model(random_checkpoint("s"))), pipeline, MODEL)
    rng = np.random.default_rng(0)
    wide, tall = rng.integers(0, 255, (80, 160, 3), np.uint8), rng.integers(0, 255, (160, 96, 3), np.uint8)
    responses, _ = detector.handle([{"body": png(wide)}, {"body": png(tall)}, {"body": png(wide)}], [{}] * 3)
    assert sorted(calls) == [(1, 3, 160, 96), (2, 3, 96, 160)]
    sizes = [json.loads(r.body)["image_size"] for r in responses]
    assert sizes == [[160, 80], [96, 160], [160, 80]]
    assert responses[0].body == responses[2].body


def test_warm_up_runs_the_requested_batch_sizes(random_checkpoint):
    seen = []
    model = load_model(random_checkpoint("s"))
    runtime = TorchRuntime(model)

    class RecordingRuntime(WholeBatchRuntime):
        def __call__(self, batch):
            seen.append(len(batch))
            return runtime(batch)

    detector = Detector(RecordingRuntime(), COCO_PIPELINE, MODEL)
    detector.warm_up((1, 4))
    assert seen == [1, 4]


def test_warm_up_covers_camera_shapes_where_the_runtime_compiles_per_size(random_checkpoint):
    """Under minimal padding the input follows the picture; a runtime that compiles per input size (OpenVINO on
    such an IR) is warmed on 4:3, 16:9 and square pictures, so the usual camera frames never wait for a compile."""
    runtime = TorchRuntime(load_model(random_checkpoint("s")))
    seen = []

    class PerSizeRuntime(WholeBatchRuntime):
        compiles_per_size = True

        def __call__(self, batch):
            seen.append(batch.shape[2:])
            return runtime(batch)

    Detector(PerSizeRuntime(), COCO_PIPELINE.with_padding("minimal"), MODEL).warm_up((1,))
    assert sorted(seen) == [(384, 640), (480, 640), (640, 640)]


def test_each_image_starts_on_the_runtime_before_the_next_is_decoded(random_checkpoint):
    """The runtime gets each image as soon as it is decoded (OpenVINO's streams compute it while the next one is
    decoded), and every row still gets its own answer."""
    events = []
    runtime = TorchRuntime(load_model(random_checkpoint("s")))

    class RecordingBatch(DeferredBatch):
        def add(self, image):
            events.append("start")
            return super().add(image)

    class StartingRuntime(WholeBatchRuntime):
        def begin(self, expected):
            events.append(f"begin {expected}")
            return RecordingBatch(runtime)

        def __call__(self, batch):
            return runtime(batch)

    detector = Detector(StartingRuntime(), COCO_PIPELINE, MODEL)
    decode = detector.decode
    detector.decode = lambda *args, **kwargs: events.append("decode") or decode(*args, **kwargs)
    pixels = np.random.default_rng(0).integers(0, 255, (48, 64, 3), np.uint8)
    rows = [{"body": png(pixels)}, {"body": b"not an image"}, {"body": png(pixels[:, ::-1].copy())}]
    responses, timings = detector.handle(rows, [{}] * 3)
    assert events == ["begin 3", "decode", "start", "decode", "decode", "start"]
    assert [r.status for r in responses] == [200, 400, 200]
    alone, _ = detector.handle(rows[2:], [{}])
    assert responses[2].body == alone[0].body
    assert len(timings.detections) == 2


def test_time_waiting_for_a_free_stream_counts_as_inference(random_checkpoint):
    """Starting an image blocks while every stream is busy: that wait is inference in the stage times, not
    preprocessing."""
    runtime = TorchRuntime(load_model(random_checkpoint("s")))

    class BusyStreams(DeferredBatch):
        def add(self, image):
            time.sleep(0.2)
            return super().add(image)

    class StreamedRuntime(WholeBatchRuntime):
        def begin(self, expected):
            return BusyStreams(runtime)

        def __call__(self, batch):
            return runtime(batch)

    detector = Detector(StreamedRuntime(), COCO_PIPELINE, MODEL)
    pixels = np.random.default_rng(0).integers(0, 255, (48, 64, 3), np.uint8)
    responses, timings = detector.handle([{"body": png(pixels)}] * 2, [{}] * 2)
    assert [r.status for r in responses] == [200, 200]
    assert timings.ms["inference"] >= 400 and timings.ms["preprocess"] < 200
