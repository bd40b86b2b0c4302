"""A sliced request in process (no server): its tiles and whole-image pass go to the runtime as one batch, run as a
few forwards (one per input shape, at most 16 images each), never one forward per tile; and batching changes
nothing: the answer is the merge of what each tile gives on its own."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import torch
from PIL import Image

from yolonas_serving.detector import Detector
from yolonas_serving.pipeline import Pipeline
from yolonas_serving.protocol.base import Model
from yolonas_serving.runtime import MAX_FORWARD_BATCH, DeferredBatch, WholeBatchRuntime
from yolonas_serving.slicing import gather, merge, tile_grid

NAMES = [f"class{i}" for i in range(4)]
#  Tiles and the whole image scaled to 96 on their longest side, padded to multiples of 32: 200x200 tiles run at
#  96x96, a 1000x400 image at 96x64 (two input shapes).
PIPELINE = Pipeline.from_spec(
    [
        {"DetectionLongestMaxSizeRescale": {"output_shape": [96, 96]}},
        "DetectionAutoPadding",
        "StandardizeImage",
        "ImagePermute",
    ]
)
ANCHORS = 50


class CountingRuntime(WholeBatchRuntime):
    """Stands in for the network: each image's outputs depend on that image alone (seeded by its content); records
    every forward's input shape and every batch's announcements."""

    def __init__(self) -> None:
        self.forwards: list[tuple[int, ...]] = []
        self.batches: list[list[int]] = []  # per batch: the images announced at begin, then each expect()

    def begin(self, expected: int) -> DeferredBatch:
        announced = [expected]
        self.batches.append(announced)

        class Recording(DeferredBatch):
            def expect(self, more: int) -> None:
                announced.append(more)

        return Recording(self)

    def __call__(self, batch: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        self.forwards.append(batch.shape)
        height, width = batch.shape[2:]
        boxes, scores = [], []
        for image in batch:
            generator = torch.Generator().manual_seed(int(image.sum() * 1000) % 2**31)
            corner = torch.rand(ANCHORS, 2, generator=generator) * torch.tensor([width, height])
            boxes.append(torch.cat([corner, corner + torch.rand(ANCHORS, 2, generator=generator) * 40], dim=1))
            scores.append(torch.rand(ANCHORS, len(NAMES), generator=generator) ** 3)
        return torch.stack(boxes), torch.stack(scores)


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def picture(seed: int, width: int = 1000, height: int = 400) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)


def test_a_sliced_request_runs_its_tiles_as_one_batch():
    """18 tiles of 200 and the whole image: three forwards (16 + 2 tiles, then the image at its own shape), all
    within the request's one runtime batch; two images of one request share them (16 + 16 + 4, then 2)."""
    runtime = CountingRuntime()
    detector = Detector(runtime, PIPELINE, Model("fake", NAMES))
    tiles = len(tile_grid(1000, 400, 200, 200, 0.2))
    assert tiles == 18

    responses, timings = detector.handle([{"body": bytearray(png(picture(0)))}], [{"X-Slice": "200"}])
    assert responses[0].status == 200 and json.loads(responses[0].body)["detections"]
    assert runtime.batches == [[1, tiles]] and timings.tiles == [tiles]
    assert sorted(runtime.forwards) == [(1, 3, 64, 96), (2, 3, 96, 96), (MAX_FORWARD_BATCH, 3, 96, 96)]

    runtime.forwards.clear()
    images = [base64.b64encode(png(picture(seed))).decode() for seed in (1, 2)]
    responses, timings = detector.handle([{"body": {"images": images, "slice": 200}}], [{}])
    assert responses[0].status == 200 and len(json.loads(responses[0].body)["results"]) == 2
    assert runtime.batches[-1] == [2, tiles, tiles] and timings.tiles == [2 * tiles]
    assert sorted(runtime.forwards) == [(2, 3, 64, 96), (4, 3, 96, 96), (16, 3, 96, 96), (16, 3, 96, 96)]


def test_batched_tiles_answer_as_each_tile_alone_merged():
    """The sliced answer equals the merge of each tile detected as an image of its own, then the whole image: every
    tile's outputs come back to its own tile."""
    detector = Detector(CountingRuntime(), PIPELINE, Model("fake", NAMES))
    pixels = picture(3)
    options = {"slice": "200x160", "overlap": 0.3, "max_det": 40}
    (sliced,) = detector.detect([detector.prepare(png(pixels), options)])

    def alone(image: np.ndarray):
        (found,) = detector.detect([detector.prepare(png(np.ascontiguousarray(image)), {"max_det": 40})])
        return found

    tiles = tile_grid(1000, 400, 200, 160, 0.3)
    per_tile = [alone(pixels[y0:y1, x0:x1]) for x0, y0, x1, y1 in tiles]
    expected = merge(gather(tiles, per_tile, alone(pixels))).first(40)
    assert len(sliced) == 40 and len(merge(gather(tiles, per_tile, alone(pixels)))) > 40
    np.testing.assert_array_equal(sliced.boxes, expected.boxes)
    np.testing.assert_array_equal(sliced.scores, expected.scores)
    np.testing.assert_array_equal(sliced.class_ids, expected.class_ids)
