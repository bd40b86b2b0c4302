"""Request shapes, option validation and response rendering."""

from __future__ import annotations

import base64
import gzip
import json
import zlib

import numpy as np
import pytest

from yolonas_serving.envelope import (
    RequestLimits,
    V2Answer,
    parse_options,
    parse_request,
    render_json,
    render_json_many,
    render_v2,
)
from yolonas_serving.errors import RequestError
from yolonas_serving.postprocess import Detections, NMSOptions

IMAGE = b"\x89PNG fake image bytes"
B64 = base64.b64encode(IMAGE).decode()
NAMES = ["person", "bicycle", "car"]


def test_raw_body():
    request = parse_request({"body": bytearray(IMAGE)}, {"body": {"content-type": "image/png"}})
    assert request.images == [IMAGE] and request.options == {}


def test_raw_body_options_come_from_x_headers():
    headers = {"body": {"content-type": "image/jpeg"}, "X-Conf": "0.5", "x-max-det": "7", "X-Other": "1"}
    assert parse_request({"body": IMAGE}, headers).options == {"conf": "0.5", "max_det": "7"}


def test_multipart_picks_the_image_field_and_reads_text_options():
    headers = {"photo": {"content-type": "image/jpeg"}, "conf": {"content-type": ""}}
    request = parse_request({"conf": bytearray(b"0.4"), "photo": bytearray(IMAGE)}, headers)
    assert request.images == [IMAGE] and request.options == {"conf": "0.4"}


def test_json_with_base64_and_a_data_uri():
    request = parse_request({"body": {"image": B64, "iou": 0.5}})
    assert request.images == [IMAGE] and request.options == {"iou": 0.5}
    assert parse_request({"body": {"image": f"data:image/png;base64,{B64}"}}).images == [IMAGE]


def test_json_sent_as_bytes_or_text_is_parsed():
    body = json.dumps({"image": B64}).encode()
    assert parse_request({"body": body}, {"body": {"content-type": "application/json"}}).images == [IMAGE]
    assert parse_request({"body": body.decode()}).images == [IMAGE]


def test_kserve_v2_request():
    body = {
        "id": "req-1",
        "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [B64]}],
        "parameters": {"conf": 0.3},
    }
    request = parse_request({"body": body})
    assert request.v2.request_id == "req-1" and request.options == {"conf": 0.3} and not request.many


@pytest.mark.parametrize(
    "row, headers, message",
    [
        ({}, {}, "empty request"),
        ({"body": b'{"image": '}, {"body": {"content-type": "application/json"}}, "not valid JSON"),
        ({"body": {"image": "!!notbase64"}}, {}, "not valid base64"),
        ({"body": {"picture": B64}}, {}, '"image"'),
        ({"body": [1, 2]}, {}, "must be an object"),
        ({"body": {"inputs": [{"datatype": "FP32", "data": [1]}]}}, {}, "BYTES"),
        ({"body": {"inputs": [{"datatype": "BYTES", "shape": [1], "data": [B64, B64]}]}}, {}, "does not match"),
        ({"body": {"inputs": [{"datatype": "BYTES", "data": [B64]}] * 2}}, {}, "exactly one input"),
        ({"body": {"inputs": [{"datatype": "BYTES", "data": [B64]}], "outputs": [{"name": "masks"}]}}, {}, "masks"),
        ({"body": {"images": []}}, {}, "non-empty list"),
        ({"body": {"images": [B64] * 17}}, {}, "at most 16"),
        ({"body": b'{"inputs": []}xx'}, {"Inference-Header-Content-Length": "99"}, "does not fit"),
        ({"body": {"inputs": [{"datatype": "BYTES", "shape": [0], "data": []}]}}, {}, "holds no image"),
        ({"body": 99999999999}, {"Inference-Header-Content-Length": "4"}, "must be a JSON object"),
        ({"body": None}, {"Inference-Header-Content-Length": "4"}, "must be a JSON object"),
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
        ({"binary_data_output": True}, "unknown option"),  # reserved v2 names are taken out of v2 requests only
        ({"agnostic": "maybe"}, "agnostic must be true or false"),
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
    body, headers = render_v2("yolo_nas_s", [(DETECTIONS, (640, 480))], NAMES, V2Answer("req-1", None))
    body = json.loads(body)
    outputs = {o["name"]: o for o in body["outputs"]}
    assert headers == {"content-type": "application/json"}
    assert body["id"] == "req-1" and body["parameters"]["image_size"] == [640, 480]
    assert list(outputs) == ["boxes", "scores", "class_ids", "class_names"]
    assert outputs["boxes"]["shape"] == [1, 4] and outputs["boxes"]["data"] == [1.23, 2.0, 30.0, 40.5]
    assert outputs["class_names"]["data"] == ["car"] and outputs["class_ids"]["datatype"] == "INT64"


def v2_binary_body(images: list[bytes], parameters: dict, outputs: list | None = None) -> tuple[bytes, dict]:
    """What Triton's and KServe's clients send under the binary tensor extension."""
    raw = b"".join(len(i).to_bytes(4, "little") + i for i in images)
    header = {"inputs": [{"name": "image", "shape": [len(images)], "datatype": "BYTES",
                          "parameters": {"binary_data_size": len(raw)}}], "parameters": parameters}  # fmt: skip
    if outputs is not None:
        header["outputs"] = outputs
    text = json.dumps(header).encode()
    return text + raw, {"Inference-Header-Content-Length": str(len(text))}


def test_binary_extension_input_and_reserved_parameters():
    body, headers = v2_binary_body([IMAGE, b"other"], {"binary_data_output": True, "conf": 0.4, "priority": 1})
    request = parse_request({"body": bytearray(body)}, {**headers, "body": {"content-type": ""}})
    assert request.images == [IMAGE, b"other"] and request.many
    assert request.options == {"conf": 0.4}  # reserved parameters are not options
    assert request.v2.binary_default and request.v2.outputs is None
    outputs = [{"name": "scores", "parameters": {"binary_data": False, "classification": 0}}, {"name": "boxes"}]
    body, headers = v2_binary_body([IMAGE], {"triton_enable_empty_final_response": True}, outputs)
    request = parse_request({"body": body}, headers)
    assert request.options == {} and request.v2.outputs == {"scores": False, "boxes": False} and not request.many


@pytest.mark.parametrize("encoding, compress", [("gzip", gzip.compress), ("Deflate", zlib.compress)])
def test_compressed_bodies_as_triton_sends_them(encoding, compress):
    body, headers = v2_binary_body([IMAGE, b"other"], {"conf": 0.4})
    request = parse_request({"body": compress(body)}, {**headers, "Content-Encoding": encoding})
    assert request.images == [IMAGE, b"other"] and request.options == {"conf": 0.4}
    raw = parse_request({"body": bytearray(compress(IMAGE))}, {"content-encoding": encoding.lower()})
    assert raw.images == [IMAGE]
    assert parse_request({"body": IMAGE}, {"Content-Encoding": "identity"}).images == [IMAGE]


@pytest.mark.parametrize(
    "body, encoding, message, status",
    [
        (gzip.compress(IMAGE), "br", "'br' is not supported", 415),
        (IMAGE, "gzip", "not valid gzip data", 400),
        (gzip.compress(IMAGE)[:-12], "gzip", "truncated", 400),
        (zlib.compress(bytes(2048)), "deflate", "expands beyond 1024 bytes", 413),
        ({"image": B64}, "gzip", "must be sent as bytes", 400),
    ],
)
def test_bad_compressed_bodies(body, encoding, message, status):
    """A compressed body that cannot be undone, or that would expand past twice the byte limit, fails alone."""
    with pytest.raises(RequestError, match=message) as caught:
        parse_request({"body": body}, {"Content-Encoding": encoding}, RequestLimits(max_bytes=512))
    assert caught.value.status == status


def test_several_images_each_judged_alone():
    request = parse_request({"body": {"images": [B64, "!!", B64], "conf": 0.3}})
    assert request.many and request.options == {"conf": 0.3}
    assert request.images[0] == IMAGE and request.images[2] == IMAGE
    assert isinstance(request.images[1], RequestError) and '"images"[1]' in request.images[1].message
    with pytest.raises(RequestError, match="hold 210 bytes; at most 100") as caught:
        parse_request({"body": {"images": [B64] * 10}}, limits=RequestLimits(max_bytes=100))
    assert caught.value.status == 413


def test_render_many_json_and_v2_binary():
    failed = RequestError("not an image", status=400)
    results = [(DETECTIONS, (640, 480)), failed]
    assert render_json_many("m", results, NAMES) == {
        "model": "m",
        "results": [{k: v for k, v in render_json("m", DETECTIONS, NAMES, (640, 480)).items() if k != "model"},
                    {"error": "not an image", "status": 400}],
    }  # fmt: skip
    body, headers = render_v2("m", results, NAMES, V2Answer(None, None, binary_default=True), many=True)
    size = int(headers["Inference-Header-Content-Length"])
    header, raw = json.loads(body[:size]), body[size:]
    assert headers["content-type"] == "application/octet-stream"
    shapes = {o["name"]: o["shape"] for o in header["outputs"]}
    assert shapes == {"boxes": [2, 1, 4], "scores": [2, 1], "class_ids": [2, 1], "class_names": [2, 1],
                      "num_detections": [2], "image_sizes": [2, 2], "errors": [2]}  # fmt: skip
    tensors, offset = {}, 0
    for output in header["outputs"]:
        length = output["parameters"]["binary_data_size"]
        tensors[output["name"]] = raw[offset : offset + length]
        offset += length
    assert offset == len(raw)
    np.testing.assert_allclose(np.frombuffer(tensors["boxes"], "<f4"), [1.23, 2, 30, 40.5, 0, 0, 0, 0], rtol=1e-6)
    assert np.frombuffer(tensors["class_ids"], "<i8").tolist() == [2, -1]
    assert np.frombuffer(tensors["num_detections"], "<i8").tolist() == [1, 0]
    assert tensors["class_names"] == b"\x03\x00\x00\x00car\x00\x00\x00\x00"
    assert tensors["errors"] == b"\x00\x00\x00\x00\x0c\x00\x00\x00not an image"


def test_agnostic_option():
    assert parse_options({"agnostic": "true"}, NMSOptions(), NAMES)[0].class_agnostic
    assert not parse_options({"agnostic": False}, NMSOptions(class_agnostic=True), NAMES)[0].class_agnostic


def test_a_body_of_empty_binary_elements_stops_at_the_image_limit():
    """20 MB of zero-length elements would be five million images: splitting stops at the limit instead."""
    raw = b"\x00\x00\x00\x00" * 1_000_000
    header = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(raw)}}]}).encode()  # fmt: skip
    with pytest.raises(RequestError, match="17 images in one request; at most 16") as caught:
        parse_request({"body": header + raw}, {"Inference-Header-Content-Length": str(len(header))})
    assert caught.value.status == 413
