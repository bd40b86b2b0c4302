"""NMS and mapping back, against hand-made cases with known answers; the defaults against what super-gradients'
predict() recorded in the reference data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from yolonas_serving.options import RequestOptions
from yolonas_serving.postprocess import NMSOptions, postprocess, select
from yolonas_serving.settings import HandlerSettings
from yolonas_serving.steps import BoxTransform


def nms(pre_nms_top_k: int = 1024, multi_label: bool = True, **options: object) -> NMSOptions:
    """The NMS options of a request with these options (the archive's defaults otherwise)."""
    return RequestOptions(**options).nms(pre_nms_top_k, multi_label)


def scores_for(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


BOXES = torch.tensor([[0, 0, 100, 100], [2, 2, 102, 102], [300, 300, 400, 400], [0, 0, 100, 100]], dtype=torch.float32)


def test_threshold_is_strict_and_nms_is_class_aware():
    scores = scores_for([[0.9, 0.0], [0.8, 0.0], [0.25, 0.6], [0.0, 0.7]])
    boxes, conf, labels = select(BOXES, scores, nms(conf=0.25, iou=0.7))
    # box 1 overlaps box 0 (IoU 0.92) in class 0 and is suppressed; box 3 is class 1, so it survives box 0.
    # box 2's class-0 score equals the threshold and is dropped (strictly greater is kept).
    assert labels.tolist() == [0, 1, 1]
    assert conf.tolist() == pytest.approx([0.9, 0.7, 0.6])
    assert boxes[0].tolist() == [0, 0, 100, 100]


def test_multi_label_keeps_one_box_for_several_classes():
    scores = scores_for([[0.9, 0.8], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    _, conf, labels = select(BOXES, scores, nms())
    assert sorted(labels.tolist()) == [0, 1]
    _, conf, labels = select(BOXES, scores, nms(multi_label=False))
    assert labels.tolist() == [0] and conf.tolist() == pytest.approx([0.9])


def test_class_agnostic_nms_suppresses_across_classes():
    scores = scores_for([[0.9, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.8]])
    _, _, labels = select(BOXES, scores, nms(agnostic=True))
    assert labels.tolist() == [0]


def test_pre_nms_top_k_and_max_det():
    boxes = torch.tensor([[i * 10.0, 0, i * 10.0 + 5, 5] for i in range(50)])
    scores = torch.linspace(0.3, 0.99, 50)[:, None]
    _, conf, _ = select(boxes, scores, nms(pre_nms_top_k=10, max_det=300))
    assert len(conf) == 10 and conf.min() >= scores[40, 0]
    _, conf, _ = select(boxes, scores, nms(max_det=3))
    assert conf.tolist() == sorted(conf.tolist(), reverse=True) and len(conf) == 3


def test_class_filter_applies_before_top_k():
    scores = scores_for([[0.9, 0.3], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    _, _, labels = select(BOXES, scores, nms(classes=(1,), pre_nms_top_k=1))
    assert labels.tolist() == [1]


def test_no_candidates_give_empty_arrays():
    result = postprocess(BOXES[None], torch.zeros(1, 4, 2), [BoxTransform((10, 10))], [nms()])[0]
    assert len(result) == 0 and result.boxes.shape == (0, 4)


def test_boxes_map_back_and_clip_after_nms():
    transform = BoxTransform(original_size=(200, 100), scale_x=0.5, scale_y=0.5, pad_x=10, pad_y=20)
    boxes = torch.tensor([[[0.0, 10.0, 60.0, 40.0], [100, 50, 200, 200]]])
    scores = torch.tensor([[[0.9], [0.8]]])
    result = postprocess(boxes, scores, [transform], [nms()])[0]
    np.testing.assert_allclose(result.boxes, [[0, 0, 100, 40], [180, 60, 200, 100]])
    assert result.class_ids.dtype == np.int64


def test_the_defaults_are_those_super_gradients_predict_ran_with(reference_dir):
    """The README says the defaults are super-gradients' (conf, iou, max_det; multi-label, 1024 candidates into a
    class-aware NMS): predict.json records the parameters its predict() ran with."""
    recorded = json.loads((reference_dir / "predict.json").read_text())["predict_params"]
    settings = HandlerSettings()
    options = settings.options
    assert recorded == {"conf": options.conf, "iou": options.iou, "nms_top_k": settings.pre_nms_top_k,
                        "max_predictions": options.max_det, "multi_label_per_box": settings.multi_label,
                        "class_agnostic_nms": options.agnostic}  # fmt: skip
