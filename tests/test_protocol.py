"""Request shapes, option validation and response rendering."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from yolonas_serving.errors import RequestError
from yolonas_serving.postprocess import Detections, NMSOptions
from yolonas_serving.protocol import parse_options, parse_request, render_json, render_v2

IMAGE = b"\x89PNG fake image bytes"
B64 = base64.b64encode(IMAGE).decode()
NAMES = ["person", "bicycle", "car"]


def test_raw_body():
    request = parse_request({"body": bytearray(IMAGE)}, {"body": {"content-type": "image/png"}})
    assert request.image == IMAGE and request.options == {}


def test_raw_body_options_come_from_x_headers():
    headers = {"body": {"content-type": "image/jpeg"}, "X-Conf": "0.5", "x-max-det": "7", "X-Other": "1"}
    assert parse_request({"body": IMAGE}, headers).options == {"conf": "0.5", "max_det": "7"}


def test_multipart_picks_the_image_field_and_reads_text_options():
    headers = {"photo": {"content-type": "image/jpeg"}, "conf": {"content-type": ""}}
    request = parse_request({"conf": bytearray(b"0.4"), "photo": bytearray(IMAGE)}, headers)
    assert request.image == IMAGE and request.options == {"conf": "0.4"}


def test_json_with_base64_and_a_data_uri():
    request = parse_request({"body": {"image": B64, "iou": 0.5}})
    assert request.image == IMAGE and request.options == {"iou": 0.5}
    assert parse_request({"body": {"image": f"data:image/png;base64,{B64}"}}).image == IMAGE


def test_json_sent_as_bytes_or_text_is_parsed():
    body = json.dumps({"image": B64}).encode()
    assert parse_request({"body": body}, {"body": {"content-type": "application/json"}}).image == IMAGE
    assert parse_request({"body": body.decode()}).image == IMAGE


def test_kserve_v2_request():
    body = {
        "id": "req-1",
        "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [B64]}],
        "parameters": {"conf": 0.3},
    }
    request = parse_request({"body": body})
    assert request.v2 and request.request_id == "req-1" and request.options == {"conf": 0.3}


@pytest.mark.parametrize(
    "row, headers, message",
    [
        ({}, {}, "empty request"),
        ({"body": b'{"image": '}, {"body": {"content-type": "application/json"}}, "not valid JSON"),
        ({"body": {"image": "!!notbase64"}}, {}, "not valid base64"),
        ({"body": {"picture": B64}}, {}, '"image"'),
        ({"body": [1, 2]}, {}, "must be an object"),
        ({"body": {"inputs": [{"datatype": "FP32", "data": [1]}]}}, {}, "BYTES"),
        ({"body": {"inputs": [{"datatype": "BYTES", "data": [B64, B64]}]}}, {}, "one image"),
        ({"conf": "0.3"}, {}, "no image"),
    ],
)
def test_malformed_requests(row, headers, message):
    with pytest.raises(RequestError, match=message):
        parse_request(row, headers)


def test_options_override_defaults_and_names_resolve():
    options, fmt = parse_options({"conf": "0.5", "iou": 0.6, "max_det": "10", "classes": "car,0"}, NMSOptions(), NAMES)
    assert (options.conf, options.iou, options.max_det, options.classes) == (0.5, 0.6, 10, (0, 2))
    assert fmt == "json"
    assert parse_options({}, NMSOptions(), NAMES, accept="image/jpeg")[1] == "jpeg"
    assert parse_options({"format": "JPEG"}, NMSOptions(), NAMES)[1] == "jpeg"


@pytest.mark.parametrize(
    "options, message",
    [
        ({"conf": -0.1}, "conf must be between 0 and 1"),
        ({"conf": "high"}, "conf must be a number"),
        ({"conf": True}, "conf must be a number"),
        ({"conf": float("nan")}, "NaN"),
        ({"iou": 1.5}, "iou must be in"),
        ({"iou": 0}, "iou must be in"),
        ({"max_det": 10**9}, "max_det must be between"),
        ({"max_det": 2.5}, "integer"),
        ({"classes": ["unicorn"]}, "unknown class 'unicorn'"),
        ({"classes": [7]}, "out of range"),
        ({"classes": []}, "list of class ids"),
        ({"format": "png"}, "format must be one of"),
        ({"confidence": 0.5}, "unknown option"),
    ],
)
def test_bad_options(options, message):
    with pytest.raises(RequestError, match=message):
        parse_options(options, NMSOptions(), NAMES)


DETECTIONS = Detections(
    boxes=np.array([[1.234, 2.0, 30.0, 40.5]], dtype=np.float32),
    scores=np.array([0.912345], dtype=np.float32),
    class_ids=np.array([2]),
)


def test_render_json():
    body = render_json("yolo_nas_s", DETECTIONS, NAMES, (640, 480))
    assert body == {
        "model": "yolo_nas_s",
        "image_size": [640, 480],
        "detections": [{"box": [1.23, 2.0, 30.0, 40.5], "score": 0.91234, "class_id": 2, "class_name": "car"}],
    }


def test_render_v2():
    body = render_v2("yolo_nas_s", DETECTIONS, NAMES, (640, 480), "req-1")
    outputs = {o["name"]: o for o in body["outputs"]}
    assert body["id"] == "req-1" and body["parameters"]["image_size"] == [640, 480]
    assert outputs["boxes"]["shape"] == [1, 4] and outputs["boxes"]["data"] == [1.23, 2.0, 30.0, 40.5]
    assert outputs["class_names"]["data"] == ["car"] and outputs["class_ids"]["datatype"] == "INT64"
