"""Preprocessing as data: each step, the COCO default against super-gradients' recorded numbers, and translation
of Trainer checkpoints' processing_params."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from yolonas_serving.pipeline import COCO_PIPELINE, Pipeline
from yolonas_serving.steps import BoxTransform, PipelineError, StandardizeImage

SHAPES_PARAMS = {
    "class_names": ["circle", "square", "triangle", "ring_rect"],
    "image_processor": {
        "ComposeProcessing": {
            "processings": [
                {"DetectionLongestMaxSizeRescale": {"output_shape": [320, 320]}},
                {"DetectionBottomRightPadding": {"output_shape": [320, 320], "pad_value": 114}},
                {"StandardizeImage": {"max_value": 255.0}},
                {"ImagePermute": {"permutation": [2, 0, 1]}},
            ]
        }
    },
    "iou": 0.7,
    "conf": 0.25,
}


def image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_coco_pipeline_matches_super_gradients_records(reference_dir):
    """predict.json records the steps super-gradients' predict() ran, and the scale and padding it used for each
    reference image."""
    recorded = json.loads((reference_dir / "predict.json").read_text())
    steps = [{"type": name, **args} for step in COCO_PIPELINE.to_spec() for name, args in step.items()]
    assert steps == recorded["preprocessing"]
    for record in recorded["images"]:
        tensor, transform = COCO_PIPELINE(image(record["height"], record["width"]))
        pre = record["preprocess"]
        top, bottom, left, right = pre["pad_top_bottom_left_right"]
        assert tensor.shape == (3, 640, 640) and tensor.dtype == np.float32
        assert transform.scale_x == pytest.approx(pre["scale"]) and transform.scale_y == pytest.approx(pre["scale"])
        assert (transform.pad_x, transform.pad_y) == (left, top)
        resized_h, resized_w = pre["resized_hw"]
        assert top + resized_h + bottom == 640 and left + resized_w + right == 640


def test_coco_pipeline_pixels_are_opencv_bilinear_centre_padded_with_114():
    rgb = image(480, 640)
    tensor, _ = COCO_PIPELINE(rgb)
    expected = np.full((640, 640, 3), 114, dtype=np.uint8)
    expected[81 : 81 + 477, 2 : 2 + 636] = cv2.resize(rgb, (636, 477), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(tensor, expected.transpose(2, 0, 1) / np.float32(255))


def test_small_images_are_scaled_up_and_exact_fits_are_not_resized():
    _, small = COCO_PIPELINE(image(100, 50))
    assert small.scale_x == pytest.approx(6.36)
    _, exact = COCO_PIPELINE(image(636, 300))
    assert exact.scale_x == 1.0 and exact.pad_x == (640 - 300) // 2


def test_box_transform_round_trip():
    rgb = image(300, 500)
    _, transform = COCO_PIPELINE(rgb)
    original = np.array([[10.0, 20.0, 400.0, 290.0]], dtype=np.float32)
    network = original * transform.scale_x + np.array([transform.pad_x, transform.pad_y] * 2, dtype=np.float32)
    np.testing.assert_allclose(transform.to_original(network), original, atol=1e-3)


def test_reduced_size_decode_keeps_original_coordinates():
    """An image decoded at 1/4 scale maps boxes back onto the full-resolution image."""
    full, full_t = COCO_PIPELINE(image(1200, 1600))
    _, draft_t = COCO_PIPELINE(image(300, 400), original_size=(1600, 1200))
    assert draft_t.original_size == (1600, 1200)
    assert draft_t.scale_x == pytest.approx(full_t.scale_x) and draft_t.pad_y == full_t.pad_y


def test_trainer_processing_params_translate_to_the_same_spec():
    pipeline = Pipeline.from_processing_params(SHAPES_PARAMS)
    assert pipeline.to_spec() == SHAPES_PARAMS["image_processor"]["ComposeProcessing"]["processings"]
    assert pipeline.input_size == (320, 320)
    tensor, transform = pipeline(image(200, 400))
    assert tensor.shape == (3, 320, 320)
    assert (transform.pad_x, transform.pad_y) == (0, 0)  # bottom-right padding keeps the image top-left
    np.testing.assert_allclose(tensor[:, 160:, :], 114 / 255, atol=1e-7)


def test_every_supported_step():
    spec = [
        "ReverseImageChannels",
        {"DetectionRescale": {"output_shape": (256, 320)}},
        {"NormalizeImage": {"mean": [1, 2, 3], "std": [2, 2, 2]}},
        {"ImagePermute": {"permutation": [2, 0, 1]}},
    ]
    rgb = image(100, 200)
    tensor, transform = Pipeline.from_spec(spec)(rgb)
    resized = cv2.resize(rgb[..., ::-1], (320, 256), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    expected = ((resized - np.array([1, 2, 3], np.float32)) / 2).transpose(2, 0, 1)
    np.testing.assert_allclose(tensor, expected, rtol=1e-6)
    assert (transform.scale_x, transform.scale_y) == (1.6, 2.56)
    assert Pipeline.from_spec(spec).reverses_channels


def test_auto_padding_follows_the_image():
    pipeline = Pipeline.from_spec(
        [
            {"DetectionLongestMaxSizeRescale": {"output_shape": [500, 500]}},
            {"DetectionAutoPadding": {"shape_multiple": [32, 32], "pad_value": 0}},
            "StandardizeImage",
            "ImagePermute",
        ]
    )
    assert pipeline.input_size is None
    tensor, _ = pipeline(image(250, 500))
    assert tensor.shape == (3, 256, 512)


def test_center_padding_puts_the_odd_pixel_bottom_right():
    pipeline = Pipeline.from_spec(
        [
            {"DetectionLongestMaxSizeRescale": {"output_shape": [63, 63]}},
            {"DetectionCenterPadding": {"output_shape": [64, 64], "pad_value": [1, 2, 3]}},
            "ImagePermute",
        ]
    )
    tensor, transform = pipeline(image(63, 31))
    assert (transform.pad_x, transform.pad_y) == (16, 0)
    assert tensor[:, 63, 0].tolist() == [1, 2, 3]


@pytest.mark.parametrize(
    "spec, message",
    [
        ([{"DetectionRandomAffine": {}}, "ImagePermute"], "unknown preprocessing step 'DetectionRandomAffine'"),
        ([{"DetectionRescale": {"output_shape": [300, 300]}}, "ImagePermute"], "multiples of 32"),
        ([{"DetectionRescale": {"output_shape": [320, 320]}}], "ImagePermute"),
        ([{"DetectionCenterPadding": {"output_shape": [320, 320]}}, "ImagePermute"], "needs a rescale"),
        ([{"StandardizeImage": {"max_value": 255}}, "ImagePermute"], "pad to a fixed size"),
        ([{"DetectionRescale": {"output_shape": "big"}}, "ImagePermute"], "output_shape"),
        ([{"StandardizeImage": {"maximum": 1}}, "ImagePermute"], "bad arguments"),
    ],
)
def test_bad_pipelines_fail_when_built(spec, message):
    with pytest.raises(PipelineError, match=message):
        Pipeline.from_spec(spec)


def test_input_size_and_padding_overrides_keep_the_margin():
    resized = COCO_PIPELINE.with_input_size(320, 416)
    assert resized.input_size == (320, 416)
    assert resized.steps[0].output_shape == (316, 412)  # COCO keeps 4 px between the rescale and the padding
    bottom_right = Pipeline.from_processing_params(SHAPES_PARAMS).with_padding("center")
    _, transform = bottom_right(image(160, 320))
    assert transform.pad_y == 80
    with pytest.raises(PipelineError, match="padding must be one of"):
        COCO_PIPELINE.with_padding("left")
    assert COCO_PIPELINE.with_padding("fixed") == COCO_PIPELINE


def test_minimal_padding_is_the_fixed_input_without_the_padding_rows():
    """A 16:9 picture under COCO's pipeline: 640x384 instead of 640x640, the same pixels where the picture is, and
    boxes map back to the same original coordinates."""
    picture = image(720, 1280)
    minimal = COCO_PIPELINE.with_padding("minimal")
    assert minimal.input_size is None
    assert Pipeline.from_spec(minimal.to_spec()) == minimal
    small, small_transform = minimal(picture)
    square, square_transform = COCO_PIPELINE(picture)
    assert small.shape == (3, 384, 640) and square.shape == (3, 640, 640)
    # 1280x720 scaled by 636/1280 is 636x358: 2 px left and right, 13 above and 13 below (141 in the square input).
    assert (small_transform.pad_x, small_transform.pad_y) == (2, 13) and square_transform.pad_y == 141
    np.testing.assert_array_equal(small[:, 13 : 13 + 358], square[:, 141 : 141 + 358])
    assert (small[:, :13] == np.float32(114 / 255)).all() and (small[:, 13 + 358 :] == np.float32(114 / 255)).all()
    box = np.array([[10, 20, 300, 200]], dtype=np.float32)
    shifted = box + np.array([0, 141 - 13, 0, 141 - 13], dtype=np.float32)
    np.testing.assert_allclose(small_transform.to_original(box), square_transform.to_original(shifted), rtol=1e-6)
    portrait, _ = minimal(image(1280, 720))
    assert portrait.shape == (3, 640, 384)
    # 640x480 scaled to 636x477: 3 rows of padding, the odd one at the bottom, as in the fixed centre padding.
    four_three, transform = minimal(image(480, 640))
    assert four_three.shape == (3, 480, 640) and (transform.pad_x, transform.pad_y) == (2, 1)
    assert (four_three[:, 0] == np.float32(114 / 255)).all() and (four_three[:, 478:] == np.float32(114 / 255)).all()


def test_minimal_padding_keeps_a_bottom_right_image_at_the_top_left():
    minimal = Pipeline.from_processing_params(SHAPES_PARAMS).with_padding("minimal")
    tensor, transform = minimal(image(160, 320))
    assert tensor.shape == (3, 160, 320) and (transform.pad_x, transform.pad_y) == (0, 0)
    tensor, transform = minimal(image(150, 320))
    assert tensor.shape == (3, 160, 320) and (transform.pad_x, transform.pad_y) == (0, 0)
    assert [s.name for s in minimal.steps][:2] == ["DetectionLongestMaxSizeRescale", "DetectionAutoPadding"]
    with pytest.raises(PipelineError, match="no fixed-size padding"):
        minimal.with_padding("minimal")


def test_box_transform_is_identity_without_geometry():
    transform = BoxTransform(original_size=(10, 10))
    boxes = np.array([[1, 2, 3, 4]], dtype=np.float32)
    np.testing.assert_array_equal(transform.to_original(boxes), boxes)


@pytest.mark.parametrize("max_value", [255.0, 1.0, 127.5])
def test_standardize_in_float32_equals_float64_division(max_value):
    every_byte = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    out, _ = StandardizeImage(max_value).apply(every_byte, BoxTransform(original_size=(16, 16)))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, (every_byte / max_value).astype(np.float32))
