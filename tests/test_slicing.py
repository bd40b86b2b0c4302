"""Sliced inference against sahi 0.12.8 itself: the tile grid, the three merges, and get_sliced_prediction end to end
with a made-up detector that sahi and our functions both run."""

from __future__ import annotations

import numpy as np
import pytest
from sahi.models.base import DetectionModel
from sahi.postprocess.backends import get_postprocess_backend, set_postprocess_backend
from sahi.postprocess.combine import GreedyNMMPostprocess, NMMPostprocess, NMSPostprocess
from sahi.predict import get_sliced_prediction
from sahi.prediction import ObjectPrediction
from sahi.slicing import get_slice_bboxes
from sahi.utils.compatibility import fix_full_shape_list, fix_shift_amount_list

from yolonas_serving.postprocess import Detections
from yolonas_serving.slicing import (
    MATCH_METRICS,
    MERGE_METHODS,
    full_pass_needed,
    gather,
    merge,
    postprocess_for,
    shift,
    tile_grid,
)

SAHI_POSTPROCESS = {"greedynmm": GreedyNMMPostprocess, "nmm": NMMPostprocess, "nms": NMSPostprocess}


@pytest.fixture(autouse=True)
def numpy_backend():
    # sahi picks torchvision when CUDA is present, whose NMS over IoU tests '>' rather than '>=': we follow numpy.
    before = get_postprocess_backend()
    set_postprocess_backend("numpy")
    yield
    set_postprocess_backend(before)


def detections(boxes, scores, class_ids) -> Detections:
    return Detections(np.array(boxes, np.float32).reshape(-1, 4), np.array(scores, np.float32), np.array(class_ids))


def to_sahi(found: Detections, shift_amount=(0, 0), full_shape=None) -> list[ObjectPrediction]:
    return [
        ObjectPrediction(
            bbox=[float(v) for v in found.boxes[i]],
            score=float(found.scores[i]),
            category_id=int(found.class_ids[i]),
            shift_amount=list(shift_amount),
            full_shape=full_shape,
        )
        for i in range(len(found))
    ]


def from_sahi(predictions: list[ObjectPrediction]) -> Detections:
    """sahi's result as Detections, stably sorted by score as merge sorts its own."""
    boxes = np.array([p.bbox.to_xyxy() for p in predictions], np.float64).reshape(-1, 4)
    scores = np.array([p.score.value for p in predictions], np.float64)
    class_ids = np.array([p.category.id for p in predictions], np.int64)
    rank = np.argsort(-scores, kind="stable")
    return Detections(boxes[rank], scores[rank], class_ids[rank])


def assert_same(ours: Detections, theirs: Detections) -> None:
    assert len(ours) == len(theirs)
    assert ours.boxes.dtype == np.float32 and ours.scores.dtype == np.float32 and ours.class_ids.dtype == np.int64
    np.testing.assert_array_equal(ours.class_ids, theirs.class_ids)
    np.testing.assert_allclose(ours.boxes, theirs.boxes, rtol=0, atol=1e-3)
    np.testing.assert_allclose(ours.scores, theirs.scores, rtol=0, atol=1e-6)


# --- the grid ---------------------------------------------------------------------------------------------------


def sahi_grid(width: int, height: int, tile_width: int, tile_height: int, overlap: float) -> list[tuple[int, ...]]:
    bboxes = get_slice_bboxes(
        image_height=height,
        image_width=width,
        slice_height=tile_height,
        slice_width=tile_width,
        overlap_height_ratio=overlap,
        overlap_width_ratio=overlap,
    )
    return [tuple(b) for b in bboxes]


def test_grid_by_hand():
    # 0.2 * 640 = 128 px of overlap, a step of 512; the last column and row are pulled back inside the image.
    assert tile_grid(1500, 1000, 640, 640, 0.2) == [
        (0, 0, 640, 640),
        (512, 0, 1152, 640),
        (860, 0, 1500, 640),
        (0, 360, 640, 1000),
        (512, 360, 1152, 1000),
        (860, 360, 1500, 1000),
    ]
    # A tile larger than the image gives one tile the size of the image; int() truncates 0.29 * 100 to 28.
    assert tile_grid(100, 50, 640, 640, 0.2) == [(0, 0, 100, 50)]
    assert tile_grid(172, 100, 100, 100, 0.29) == [(0, 0, 100, 100), (72, 0, 172, 100)]


@pytest.mark.parametrize("overlap", [0.0, 0.1, 0.15, 0.2, 0.25, 0.29, 0.5, 0.7, 0.9])
def test_grid_matches_sahi(overlap):
    tiles = [(640, 640), (512, 256), (256, 512), (333, 100), (100, 100), (64, 48)]
    sides = [1, 2, 47, 63, 64, 65, 99, 100, 101, 255, 256, 257, 320, 639, 640, 641, 1000, 1279, 1280, 1281, 1999]
    for tile_width, tile_height in tiles:
        for width in sides:
            for height in sides[::3] + [tile_height - 1, tile_height, tile_height + 1]:
                expected = sahi_grid(width, height, tile_width, tile_height, overlap)
                assert tile_grid(width, height, tile_width, tile_height, overlap) == expected, (width, height)


def test_grid_matches_sahi_on_random_sizes():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        width, height = rng.integers(1, 3000, 2)
        tile_width, tile_height = rng.integers(16, 1200, 2)
        overlap = float(rng.choice([0.0, 0.9, rng.uniform(0, 0.95)]))
        expected = sahi_grid(int(width), int(height), int(tile_width), int(tile_height), overlap)
        assert tile_grid(int(width), int(height), int(tile_width), int(tile_height), overlap) == expected


@pytest.mark.parametrize("args", [(0, 10, 5, 5, 0.2), (10, 10, 0, 5, 0.2), (10, 10, 5, 5, 1.0), (10, 10, 5, 5, -0.1)])
def test_grid_rejects_bad_arguments(args):
    with pytest.raises(ValueError):
        tile_grid(*args)


# --- the merge --------------------------------------------------------------------------------------------------


def random_detections(rng: np.random.Generator, count: int, classes: int, coarse: bool) -> Detections:
    """Boxes in a few tight clusters (tiles seeing the same objects), some exact duplicates and some zero-width;
    ``coarse`` rounds boxes to pixels and scores to tenths, so that ties in score and coordinates are common."""
    centres = rng.uniform(60, 940, (max(1, count // 8), 2))
    centre = centres[rng.integers(0, len(centres), count)] + rng.normal(0, 12, (count, 2))
    size = rng.uniform(4, 120, (count, 2))
    boxes = np.clip(np.concatenate([centre - size / 2, centre + size / 2], axis=1), 0, 1000)
    scores = rng.uniform(0.3, 1.0, count)
    if coarse:
        boxes, scores = np.round(boxes), np.round(scores, 1)
    twins = rng.integers(0, count, count // 6) if count else np.zeros(0, np.int64)
    boxes, scores = np.concatenate([boxes, boxes[twins]]), np.concatenate([scores, scores[twins]])
    class_ids = rng.integers(0, classes, len(scores))
    class_ids[count:] = class_ids[twins]
    boxes[::11, 2] = boxes[::11, 0]
    order = rng.permutation(len(scores))
    return detections(boxes[order], scores[order], class_ids[order])


def sahi_merge(found: Detections, method: str, metric: str, threshold: float, agnostic: bool) -> Detections:
    postprocess = SAHI_POSTPROCESS[method](
        match_threshold=threshold, match_metric=metric.upper(), class_agnostic=agnostic
    )
    return from_sahi(postprocess(to_sahi(found)))


@pytest.mark.parametrize("agnostic", [False, True])
@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.8])
@pytest.mark.parametrize("metric", MATCH_METRICS)
@pytest.mark.parametrize("method", MERGE_METHODS)
def test_merge_matches_sahi(method, metric, threshold, agnostic):
    rng = np.random.default_rng([MERGE_METHODS.index(method), MATCH_METRICS.index(metric), int(threshold * 10)])
    for trial in range(12):
        found = random_detections(rng, int(rng.integers(20, 150)), classes=int(rng.integers(1, 4)), coarse=trial % 2)
        merged = merge(found, method, metric, threshold, agnostic)
        assert_same(merged, sahi_merge(found, method, metric, threshold, agnostic))
        assert len(merged) < len(found)


@pytest.mark.parametrize("method", MERGE_METHODS)
def test_merge_matches_sahi_on_many_boxes(method):
    # Over 2000 boxes of one class sahi leaves its dense matrix for an R-tree; the result must not change.
    rng = np.random.default_rng(7)
    found = random_detections(rng, 2200, classes=1, coarse=False)
    assert_same(merge(found), sahi_merge(found, "greedynmm", "ios", 0.5, False))
    assert_same(merge(found, method, "iou", 0.5), sahi_merge(found, method, "iou", 0.5, False))


def test_greedy_merge_by_hand():
    found = detections(
        [[0, 0, 10, 10], [5, 0, 15, 10], [0, 0, 10, 10], [50, 50, 60, 60], [0, 0, 6, 10]],
        [0.9, 0.8, 0.7, 0.6, 0.5],
        [0, 0, 1, 0, 1],
    )
    merged = merge(found)  # greedynmm, ios >= 0.5, per class
    assert merged.class_ids.tolist() == [0, 1, 0]
    assert merged.boxes.tolist() == [[0, 0, 15, 10], [0, 0, 10, 10], [50, 50, 60, 60]]
    assert merged.scores.tolist() == pytest.approx([0.9, 0.7, 0.6])
    # One class: the union of all, the best score, the best one's class.
    merged = merge(found, agnostic=True)
    assert merged.boxes.tolist() == [[0, 0, 15, 10], [50, 50, 60, 60]] and merged.class_ids.tolist() == [0, 0]


def test_a_member_that_no_longer_matches_the_grown_box_is_dropped():
    # B and C each have IoU >= 0.5 with A, so A claims both; A grown by B has IoU 60/130 with C: C is neither merged
    # nor kept.
    found = detections([[0, 0, 10, 10], [3, 0, 13, 10], [0, 0, 6, 10]], [0.9, 0.8, 0.7], [0, 0, 0])
    merged = merge(found, "greedynmm", "iou", 0.5)
    assert merged.boxes.tolist() == [[0, 0, 13, 10]] and merged.scores.tolist() == pytest.approx([0.9])
    assert_same(merged, sahi_merge(found, "greedynmm", "iou", 0.5, False))


def test_agnostic_merge_takes_the_class_of_a_tied_member():
    found = detections([[0, 0, 10, 10], [1, 0, 10, 10]], [0.8, 0.8], [3, 5])
    assert merge(found, agnostic=True).class_ids.tolist() == [5]
    assert_same(merge(found, agnostic=True), sahi_merge(found, "greedynmm", "ios", 0.5, True))


def test_merge_of_nothing_and_bad_arguments():
    for method in MERGE_METHODS:
        for agnostic in (False, True):
            merged = merge(Detections.empty(), method, agnostic=agnostic)
            assert len(merged) == 0 and merged.boxes.shape == (0, 4) and merged.boxes.dtype == np.float32
    one = detections([[0, 0, 1, 1]], [0.5], [0])
    for kwargs in ({"method": "lsnms"}, {"metric": "giou"}, {"threshold": 0.0}, {"threshold": 1.5}):
        with pytest.raises(ValueError):
            merge(one, **kwargs)


# --- shifting, gathering and get_sliced_prediction end to end ---------------------------------------------------


def test_shift_and_gather_keep_sahi_order():
    a = detections([[1, 2, 3, 4]], [0.5], [1])
    b = detections([[0, 0, 5, 5], [1, 1, 2, 2]], [0.9, 0.4], [2, 0])
    assert shift(a, 10, 20).boxes.tolist() == [[11, 22, 13, 24]]
    gathered = gather([(0, 0, 8, 8), (6, 0, 14, 8)], [a, b], full=a)
    assert gathered.boxes.tolist() == [[1, 2, 3, 4], [6, 0, 11, 5], [7, 1, 8, 2], [1, 2, 3, 4]]
    assert gathered.scores.tolist() == pytest.approx([0.5, 0.9, 0.4, 0.5])
    assert gathered.class_ids.tolist() == [1, 2, 0, 1]
    with pytest.raises(ValueError):
        gather([(0, 0, 8, 8)], [a, b])


def test_postprocess_for_low_confidence():
    assert postprocess_for(0.25, "greedynmm", "ios") == ("greedynmm", "ios")
    assert postprocess_for(0.1, "nmm", "ios") == ("nmm", "ios")
    assert postprocess_for(0.05, "greedynmm", "ios") == ("nms", "iou")
    assert postprocess_for(0.05, "nms", "ios") == ("nms", "ios")


class Scene:
    """Objects on an image whose pixels encode their own coordinates, so that a detector handed a tile knows where
    the tile lies. Detects the objects mostly inside the image it gets, box clipped, with a score and a jitter that
    depend on the tile: neighbouring tiles report the same object slightly differently."""

    def __init__(self, rng: np.random.Generator, width: int, height: int, count: int, classes: int) -> None:
        x, y = np.meshgrid(np.arange(width), np.arange(height))
        self.image = np.stack([x % 256, y % 256, x // 256 + 16 * (y // 256)], axis=-1).astype(np.uint8)
        corner = rng.uniform(0, 1, (count, 2)) * [width, height]
        size = rng.uniform(8, 400, (count, 2))
        self.boxes = np.concatenate([corner, np.minimum(corner + size, [width, height])], axis=1)
        self.scores = rng.uniform(0.2, 1.0, count)
        self.class_ids = rng.integers(0, classes, count)

    def detect(self, x0: int, y0: int, width: int, height: int, confidence: float) -> Detections:
        inner = np.clip(self.boxes, [x0, y0, x0, y0], [x0 + width, y0 + height] * 2)
        seen = np.prod(inner[:, 2:] - inner[:, :2], axis=1) / np.prod(self.boxes[:, 2:] - self.boxes[:, :2], axis=1)
        jitter = np.sin(np.arange(len(self.scores))[:, None] * 0.7 + [x0, y0, x0 + 1, y0 + 1]) * 1.5
        boxes = np.clip(inner - [x0, y0, x0, y0] + jitter, 0, [width, height] * 2)
        scores = self.scores * (0.7 + 0.3 * seen) + 0.01 * np.cos(x0 + y0)
        keep = np.flatnonzero((seen > 0.3) & (scores > confidence))
        keep = keep[np.argsort(-scores[keep], kind="stable")]
        return detections(boxes[keep], scores[keep], self.class_ids[keep])

    def where(self, image: np.ndarray) -> tuple[int, int]:
        red, green, blue = (int(v) for v in image[0, 0])
        return red + 256 * (blue % 16), green + 256 * (blue // 16)


class SceneModel(DetectionModel):
    """How a detector joins sahi 0.12.8: raw results in perform_inference, ObjectPredictions (tile coordinates,
    with the tile's shift and the full image's shape) in _create_object_prediction_list_from_original_predictions."""

    def __init__(self, scene: Scene, **kwargs) -> None:
        self.scene = scene
        self.calls = 0
        super().__init__(**kwargs)

    def load_model(self) -> None:
        self.model = self.scene

    def perform_inference(self, image: np.ndarray) -> None:
        self.calls += 1
        height, width = image.shape[:2]
        self._original_predictions = self.scene.detect(
            *self.scene.where(image), width, height, self.confidence_threshold
        )

    def _create_object_prediction_list_from_original_predictions(
        self, shift_amount_list=None, full_shape_list=None
    ) -> None:
        # Tiles come as [[x, y]] and [[height, width]], the full pass as [0, 0] and [height, width].
        shift_amount = fix_shift_amount_list(shift_amount_list)[0]
        full_shape = (fix_full_shape_list(full_shape_list) or [None])[0]
        self._object_prediction_list_per_image = [to_sahi(self._original_predictions, shift_amount, full_shape)]


def sliced(scene: Scene, tile: tuple[int, int], overlap: float, confidence: float, **merge_args) -> Detections:
    """Our pipeline, as the worker will run it."""
    height, width = scene.image.shape[:2]
    tiles = tile_grid(width, height, *tile, overlap)
    per_tile = [scene.detect(x0, y0, x1 - x0, y1 - y0, confidence) for x0, y0, x1, y1 in tiles]
    full = scene.detect(0, 0, width, height, confidence) if full_pass_needed(tiles) else None
    method, metric = postprocess_for(confidence, merge_args.pop("method", "greedynmm"), merge_args.pop("metric", "ios"))
    return merge(gather(tiles, per_tile, full), method, metric, **merge_args)


@pytest.mark.parametrize(
    "size, tile, overlap, confidence",
    [
        ((1500, 1000), (640, 640), 0.2, 0.3),
        ((1920, 1080), (512, 384), 0.25, 0.25),
        ((900, 700), (320, 320), 0.5, 0.3),
        ((500, 400), (640, 640), 0.2, 0.3),  # one tile: no full pass, but the merge still runs
        ((1200, 900), (400, 400), 0.2, 0.05),  # low confidence: sahi switches to NMS over IoU
    ],
)
def test_sliced_prediction_matches_sahi(size, tile, overlap, confidence):
    scene = Scene(np.random.default_rng(size[0] + tile[0]), *size, count=60, classes=3)
    model = SceneModel(scene, confidence_threshold=confidence)
    result = get_sliced_prediction(
        scene.image,
        model,
        slice_width=tile[0],
        slice_height=tile[1],
        overlap_width_ratio=overlap,
        overlap_height_ratio=overlap,
        verbose=0,
    )
    theirs = from_sahi(result.object_prediction_list)
    assert len(theirs) > 10
    tiles = tile_grid(*size, *tile, overlap)
    assert model.calls == len(tiles) + full_pass_needed(tiles)
    assert_same(sliced(scene, tile, overlap, confidence), theirs)


def test_sliced_prediction_matches_sahi_with_other_settings():
    scene = Scene(np.random.default_rng(3), 1300, 1000, count=80, classes=2)
    model = SceneModel(scene, confidence_threshold=0.3)
    for method, metric, threshold, agnostic in [("nmm", "iou", 0.3, True), ("nms", "ios", 0.8, False)]:
        result = get_sliced_prediction(
            scene.image,
            model,
            slice_width=480,
            slice_height=480,
            postprocess_type=method.upper(),
            postprocess_match_metric=metric.upper(),
            postprocess_match_threshold=threshold,
            postprocess_class_agnostic=agnostic,
            verbose=0,
        )
        ours = sliced(
            scene,
            (480, 480),
            0.2,
            0.3,
            method=method,
            metric=metric,
            threshold=threshold,
            agnostic=agnostic,
        )
        assert_same(ours, from_sahi(result.object_prediction_list))
