"""Property-based tests (hypothesis) of the request chain: decode, preprocess, NMS, options and whole batches.

Whatever arrives, the only exception is RequestError (a 4xx for that request); whatever is answered is well-formed.
"""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
import torchvision
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from yolonas_serving.decode import DecodeLimits, decode_image
from yolonas_serving.detector import Detector
from yolonas_serving.errors import RequestError
from yolonas_serving.options import MAX_DET_LIMIT, RequestOptions, parse_options
from yolonas_serving.pipeline import COCO_PIPELINE, BoxTransform
from yolonas_serving.postprocess import NMSOptions, select, to_original
from yolonas_serving.protocol.base import Model
from yolonas_serving.protocol.request import parse_request
from yolonas_serving.runtime import WholeBatchRuntime

#  derandomize: the same examples on every run, so the suite is deterministic.
PROPERTY = settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
NAMES = ["personne âgée"] + [f"class{i}" for i in range(1, 80)]  # one non-ASCII name, as fine-tuned models have
PAD = np.float32(114 / 255)
INPUT = 640
#  (format, mode) pairs Pillow writes; the decoder must turn each into RGB uint8.
FORMAT_MODES = [
    *[("PNG", m) for m in ("1", "L", "LA", "P", "RGB", "RGBA", "I;16")],
    *[("JPEG", m) for m in ("L", "RGB", "CMYK")],
    *[("WEBP", m) for m in ("RGB", "RGBA")],
    *[("BMP", m) for m in ("1", "L", "P", "RGB")],
    *[("TIFF", m) for m in ("RGB", "RGBA", "LA", "I;16", "I", "F", "CMYK")],
    *[("GIF", m) for m in ("L", "P")],
]


def make_image(mode: str, width: int, height: int, seed: int) -> Image.Image:
    """Blocky noise (cheap to encode at 2000 px) in ``mode``; 16-bit and float modes get their full range."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    rgb = np.ascontiguousarray(blocks.repeat(8, 0).repeat(8, 1)[:height, :width])
    if mode == "I;16":
        return Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)
    if mode == "I":
        return Image.fromarray(rgb[..., 0].astype(np.int32) * 257)
    if mode == "F":
        return Image.fromarray(rgb[..., 0].astype(np.float32) * 1.5 - 50)  # outside 0..255 on purpose
    return Image.fromarray(rgb).convert(mode)


@st.composite
def encoded_images(draw: st.DrawFn, max_side: int = 2000) -> tuple[bytes, int, int, int]:
    """(bytes, width, height, EXIF orientation): any supported format and mode, sides 1..max_side."""
    side = st.one_of(st.integers(1, 48), st.integers(1, max_side))
    width, height = draw(side), draw(side)
    fmt, mode = draw(st.sampled_from(FORMAT_MODES))
    image = make_image(mode, width, height, draw(st.integers(0, 2**16)))
    options = {}
    orientation = 1
    if fmt == "JPEG":
        orientation = draw(st.integers(1, 8))
        exif = Image.Exif()
        exif[0x0112] = orientation
        options = {"exif": exif, "quality": draw(st.integers(30, 95))}
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue(), width, height, orientation


def check_input_tensor(tensor: np.ndarray, transform: BoxTransform, size: tuple[int, int]) -> None:
    """The network input is (3, 640, 640) in [0, 1]; the transform says where the image sits and the rest is
    padding, so transform and pixels agree."""
    assert tensor.shape == (3, INPUT, INPUT) and tensor.dtype == np.float32
    assert np.isfinite(tensor).all() and tensor.min() >= 0.0 and tensor.max() <= 1.0
    assert transform.original_size == size
    width, height = size
    x0, y0 = transform.pad_x, transform.pad_y
    x1, y1 = x0 + width * transform.scale_x, y0 + height * transform.scale_y
    assert -1e-3 <= x0 < x1 <= INPUT + 1e-3 and -1e-3 <= y0 < y1 <= INPUT + 1e-3
    assert max(x1 - x0, y1 - y0) == pytest.approx(636, abs=1.0)  # longest side scaled to 636 (rounded)
    left, right = math.floor(x0 + 1e-3), math.ceil(x1 - 1e-3)
    top, bottom = math.floor(y0 + 1e-3), math.ceil(y1 - 1e-3)
    for pad in (tensor[:, :, :left], tensor[:, :, right:], tensor[:, :top, :], tensor[:, bottom:, :]):
        assert (pad == PAD).all()
    # Round trip: the image's corners go to the network input and back.
    corners = np.array([[x0, y0, x1, y1]], dtype=np.float32)
    np.testing.assert_allclose(transform.to_original(corners), [[0, 0, width, height]], rtol=1e-4, atol=1e-3)


@PROPERTY
@given(encoded_images(), st.booleans())
def test_any_image_decodes_and_preprocesses_to_a_well_formed_input(sample, draft: bool):
    data, width, height, orientation = sample
    decoded = decode_image(data, DecodeLimits(), min_longest_side=COCO_PIPELINE.shrinks_to if draft else None)
    size = (height, width) if orientation >= 5 else (width, height)  # EXIF 5..8 transpose
    assert decoded.original_size == size
    pixels = decoded.pixels
    assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3 and pixels.flags.c_contiguous
    rows, cols = pixels.shape[:2]
    # Draft decoding only shrinks large JPEGs, and never below the length the pipeline rescales the longest side to.
    assert rows <= size[1] and cols <= size[0] and max(rows, cols) >= min(max(size), 636)
    if not draft:
        assert (cols, rows) == size
    tensor, transform = COCO_PIPELINE(pixels, decoded.original_size)
    check_input_tensor(tensor, transform, size)


def check_decode_outcome(data: bytes) -> None:
    try:
        decoded = decode_image(data)
    except RequestError as exc:
        assert exc.status in (400, 413) and exc.message
        return
    assert decoded.pixels.dtype == np.uint8 and decoded.pixels.shape[2] == 3


@PROPERTY
@given(st.binary(max_size=4096))
def test_random_bytes_are_refused_with_a_request_error(data: bytes):
    check_decode_outcome(data)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the metadata we corrupt on purpose
@PROPERTY
@given(encoded_images(max_side=96), st.data())
def test_truncated_and_corrupted_images_fail_only_as_request_errors(sample, data: st.DataObject):
    encoded = bytearray(sample[0])
    cut = data.draw(st.integers(0, len(encoded)), label="cut")
    check_decode_outcome(bytes(encoded[:cut]))
    for _ in range(data.draw(st.integers(1, 8), label="flips")):
        position = data.draw(st.integers(0, len(encoded) - 1))
        encoded[position] = data.draw(st.integers(0, 255))
    check_decode_outcome(bytes(encoded))


@st.composite
def nms_cases(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, NMSOptions, BoxTransform]:
    anchors, classes = draw(st.integers(1, 300)), draw(st.integers(1, 8))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    corner = torch.rand(anchors, 2, generator=generator) * 800 - 80  # may start outside the network input
    extent = torch.rand(anchors, 2, generator=generator) * 300 + 1
    boxes = torch.cat([corner, corner + extent], dim=1)
    scores = torch.rand(anchors, classes, generator=generator)
    scores[torch.rand(anchors, classes, generator=generator) < 0.2] = draw(st.sampled_from([0.0, 0.25, 0.5, 1.0]))
    if draw(st.booleans()):  # duplicates: NMS ties
        boxes[anchors // 2 :] = boxes[: anchors - anchors // 2].clone()
    chosen = draw(st.none() | st.lists(st.integers(0, classes - 1), min_size=1, max_size=classes, unique=True))
    options = NMSOptions(
        conf=draw(st.floats(0, 1)),
        iou=draw(st.floats(0.01, 1)),
        pre_nms_top_k=draw(st.integers(1, 1024)),
        max_det=draw(st.integers(1, 400)),
        multi_label=draw(st.booleans()),
        agnostic=draw(st.booleans()),
        classes=None if chosen is None else tuple(sorted(chosen)),
    )
    width, height = draw(st.integers(1, 4000)), draw(st.integers(1, 4000))
    scale = 636 / max(width, height)
    pad_x, pad_y = (INPUT - round(width * scale)) // 2, (INPUT - round(height * scale)) // 2
    return boxes, scores, options, BoxTransform((width, height), scale, scale, pad_x, pad_y)


@settings(PROPERTY, max_examples=80)
@given(nms_cases())
def test_nms_output_is_well_formed(case):
    boxes, scores, options, transform = case
    kept_boxes, kept_scores, labels = select(boxes, scores, options)
    n = len(kept_scores)
    assert n <= min(options.max_det, options.pre_nms_top_k) and kept_boxes.shape == (n, 4) and labels.shape == (n,)
    assert (kept_scores[:-1] >= kept_scores[1:]).all(), "sorted by score, highest first"
    assert (kept_scores > options.conf).all() if options.multi_label else (kept_scores >= options.conf).all()
    allowed = options.classes if options.classes is not None else range(scores.shape[1])
    assert set(labels.tolist()) <= set(allowed)
    # Every kept score is the box's real score for that class; kept boxes of one class overlap at most `iou`.
    anchor_of = [int((boxes == b).all(dim=1).nonzero()[0]) for b in kept_boxes]
    for anchor, label, score in zip(anchor_of, labels.tolist(), kept_scores.tolist()):
        assert any(
            math.isclose(scores[a, label].item(), score) for a in (boxes == boxes[anchor]).all(dim=1).nonzero()[:, 0]
        )
    overlap = torchvision.ops.box_iou(kept_boxes, kept_boxes)
    same_group = torch.ones_like(overlap, dtype=torch.bool) if options.agnostic else labels[:, None] == labels
    off_diagonal = ~torch.eye(n, dtype=torch.bool)
    assert (overlap[same_group & off_diagonal] <= options.iou + 1e-5).all()

    detections = to_original(kept_boxes, kept_scores, labels, transform)
    width, height = transform.original_size
    mapped = detections.boxes
    assert mapped.dtype == np.float32 and detections.class_ids.dtype == np.int64
    assert (mapped[:, 0::2] >= 0).all() and (mapped[:, 0::2] <= width).all()
    assert (mapped[:, 1::2] >= 0).all() and (mapped[:, 1::2] <= height).all()
    assert (mapped[:, 0] <= mapped[:, 2]).all() and (mapped[:, 1] <= mapped[:, 3]).all()


@settings(PROPERTY, max_examples=100)
@given(
    st.floats(0.01, 50), st.floats(0.01, 50), st.floats(-700, 700), st.floats(-700, 700), st.integers(1, 5000),
    st.integers(1, 5000), st.lists(st.floats(-1e4, 1e4), min_size=4, max_size=4),
)  # fmt: skip
def test_box_transform_round_trip(scale_x, scale_y, pad_x, pad_y, width, height, box):
    transform = BoxTransform((width, height), scale_x, scale_y, pad_x, pad_y)
    original = np.array([box], dtype=np.float64)
    network = original * [scale_x, scale_y, scale_x, scale_y] + [pad_x, pad_y, pad_x, pad_y]
    back = transform.to_original(network.astype(np.float32))
    np.testing.assert_allclose(
        back, original, rtol=1e-4, atol=1e-3 * (1 + max(abs(pad_x) / scale_x, abs(pad_y) / scale_y))
    )


#  What a client might send as an option: valid values, wrong types, out of range, NaN/inf, huge, odd strings.
SPECIAL_NUMBERS = [math.inf, -math.inf, math.nan, 1e300, -0.0, 0, 1, 0.5, 10**9, 10**30, True]
ODD_STRINGS = ["0.5", "1e999", "inf", "-inf", "nan", "-0", " 3 ", "1_0", "0x10", "²", "٣", "", "person,car", "3, 5"]
ANY_VALUE = st.one_of(
    st.none(), st.sampled_from(SPECIAL_NUMBERS + ODD_STRINGS), st.floats(), st.integers(), st.text(max_size=8),
    st.lists(st.integers(-3, 90), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)  # fmt: skip
CLASS_VALUES = st.one_of(
    ANY_VALUE,
    st.lists(st.integers(-3, 90) | st.sampled_from([*NAMES[:3], "unicorn", "²", "٣", " 7", "7.0"]), max_size=4),
    st.lists(st.sampled_from(NAMES[:3] + ["12", "unicorn", "²", "٣", "99"]), min_size=1, max_size=3).map(",".join),
)  # fmt: skip
OPTION_VALUES = {"conf": ANY_VALUE, "iou": ANY_VALUE, "max_det": ANY_VALUE, "classes": CLASS_VALUES,
                 "format": st.one_of(st.sampled_from(["json", "jpeg", "JPEG", "png"]), ANY_VALUE),
                 "slice": st.one_of(st.sampled_from(["640", "64x48", "x", "0x64", "off"]), ANY_VALUE),
                 "overlap": ANY_VALUE, "merge": st.one_of(st.sampled_from(["nms", "NMM", "x"]), ANY_VALUE),
                 "agnostic": ANY_VALUE}  # fmt: skip


@st.composite
def option_dicts(draw: st.DrawFn) -> dict:
    """Some of the options, each valid or hostile, and now and then an unknown one."""
    options = {name: draw(values) for name, values in OPTION_VALUES.items() if draw(st.booleans())}
    if draw(st.integers(0, 9)) == 0:
        options[draw(st.text(max_size=6))] = draw(ANY_VALUE)
    return options


VALID_OPTIONS = st.fixed_dictionaries(
    {},
    optional={"conf": st.floats(0, 1), "iou": st.floats(0.01, 1), "max_det": st.integers(1, 400),
              "classes": st.lists(st.sampled_from(NAMES), min_size=1, max_size=5),
              "format": st.sampled_from(["json", "jpeg"]),
              "slice": st.sampled_from(["64", "96x64", "off", 48]), "overlap": st.floats(0, 0.9),
              "merge": st.sampled_from(["greedynmm", "nmm", "nms"])},
)  # fmt: skip


@settings(PROPERTY, max_examples=300)
@given(option_dicts())
def test_options_are_valid_or_refused(options):
    try:
        parsed = parse_options(options, RequestOptions(), NAMES)
    except RequestError as exc:
        assert exc.status == 400 and exc.message.isascii()  # the message becomes an HTTP reason phrase
        return
    assert 0.0 <= parsed.conf <= 1.0 and 0.0 < parsed.iou <= 1.0 and 1 <= parsed.max_det <= MAX_DET_LIMIT
    assert parsed.classes is None or (parsed.classes and set(parsed.classes) <= set(range(len(NAMES))))
    assert parsed.format in (None, "json", "jpeg")
    assert parsed.slice is None or min(parsed.slice) >= 32


class FakeRuntime(WholeBatchRuntime):
    def __call__(self, batch: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return fake_forward(batch)


def fake_forward(batch: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Stands in for the network: boxes anywhere around the input, scores from the pixels (deterministic)."""
    generator = torch.Generator().manual_seed(int(batch.sum() * 1000) % 2**31)
    count, anchors = batch.shape[0], 500
    corner = torch.rand(count, anchors, 2, generator=generator) * 760 - 60
    boxes = torch.cat([corner, corner + torch.rand(count, anchors, 2, generator=generator) * 200], dim=2)
    return boxes, torch.rand(count, anchors, len(NAMES), generator=generator) ** 4


@st.composite
def request_rows(draw: st.DrawFn) -> tuple[dict, dict]:
    """One TorchServe input row and its headers: images, garbage, JSON (plain or v2), forms, with options."""
    image = draw(st.one_of(encoded_images(max_side=200).map(lambda s: s[0]), st.binary(max_size=64)))
    options = draw(st.one_of(VALID_OPTIONS, option_dicts()))
    kind = draw(st.sampled_from(["raw", "json", "json-text", "v2", "form", "odd"]))
    headers: dict = {}
    if kind == "raw":
        row = {"body": bytearray(image)}
        headers = {"body": {"content-type": draw(st.sampled_from(["image/png", "text/plain", "application/json"]))}}
        headers.update({f"X-{k.replace('_', '-').title()}": str(v) for k, v in options.items() if isinstance(k, str)})
    elif kind in ("json", "json-text"):
        import base64

        body = {"image": draw(st.one_of(st.just(base64.b64encode(image).decode()), st.text(max_size=8))), **options}
        row = {"body": body if kind == "json" else json.dumps(body)}
    elif kind == "v2":
        import base64

        inputs = [{"name": "image", "datatype": draw(st.sampled_from(["BYTES", "FP32"])),
                   "shape": [1], "data": [base64.b64encode(image).decode()]}]  # fmt: skip
        inputs[0]["parameters"] = draw(st.one_of(option_dicts(), ANY_VALUE))
        parameters = draw(st.one_of(st.just(options), ANY_VALUE))
        row = {"body": {"inputs": draw(st.sampled_from([inputs, inputs * 2, [], "x"])), "parameters": parameters}}
    elif kind == "form":
        row = {"file": bytearray(image), **{str(k): bytearray(str(v).encode()) for k, v in options.items()}}
    else:
        nested = [{"body": "[" * 5000}, {"body": bytearray(b'{"image":' * 5000)}]  # deeper than Python's json
        row = draw(st.sampled_from([{}, {"body": None}, {"body": 7}, {"body": [1, 2]}, {"a": "text only"}, *nested]))
    return row, headers


@settings(PROPERTY, max_examples=100, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(request_rows(), min_size=1, max_size=4))
def test_any_batch_gets_one_well_formed_response_per_request(batch):
    detector = Detector(FakeRuntime(), COCO_PIPELINE, Model("fake", NAMES))
    rows, headers = [row for row, _ in batch], [h for _, h in batch]
    for row, header in batch:  # the request parser alone also raises nothing but RequestError
        try:
            parse_request(row, header)
        except RequestError:
            pass
    responses, timings = detector.handle(rows, headers)
    assert len(responses) == len(rows)
    for response in responses:
        event(f"status {response.status} {response.content_type}")
        if response.status != 200:
            assert response.status in (400, 413)
            assert json.loads(response.body) == {"error": response.error} and response.error.isascii()
        elif response.content_type == "image/jpeg":
            assert response.body[:3] == b"\xff\xd8\xff"
        else:
            body = json.loads(response.body)
            detections = body["detections"] if "detections" in body else _v2_detections(body)
            width, height = body["image_size"] if "image_size" in body else body["parameters"]["image_size"]
            scores = [d["score"] for d in detections]
            assert scores == sorted(scores, reverse=True)
            for d in detections:
                x1, y1, x2, y2 = d["box"]
                assert 0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height and 0 <= d["score"] <= 1
    assert len(timings.detections) == sum(r.status == 200 for r in responses)


def _v2_detections(body: dict) -> list[dict]:
    outputs = {o["name"]: o for o in body["outputs"]}
    boxes = np.asarray(outputs["boxes"]["data"], dtype=np.float64).reshape(-1, 4)
    return [{"box": list(b), "score": s} for b, s in zip(boxes, outputs["scores"]["data"])]
