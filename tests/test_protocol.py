"""The wire formats: request shapes of the plain and v2 protocols, compressed bodies, and the answers each renders."""

from __future__ import annotations

import base64
import gzip
import json
import zlib

import numpy as np
import pytest

from yolonas_serving.errors import RequestError
from yolonas_serving.options import RequestOptions
from yolonas_serving.postprocess import Detections
from yolonas_serving.protocol.base import ImageResult, Model, RequestLimits
from yolonas_serving.protocol.plain import JsonAnswer, PictureAnswer
from yolonas_serving.protocol.request import parse_request
from yolonas_serving.protocol.v2 import V2Answer, V2Request

IMAGE = b"\x89PNG fake image bytes"
B64 = base64.b64encode(IMAGE).decode()
NAMES = ["person", "bicycle", "car"]
MODEL = Model("yolo_nas_s", NAMES)


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
    assert isinstance(request, V2Request)
    assert request.request_id == "req-1" and request.options == {"conf": 0.3} and not request.many


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


def test_the_answer_is_chosen_once_from_the_request_and_its_options():
    single = parse_request({"body": IMAGE})
    assert isinstance(single.answer(RequestOptions()), JsonAnswer)
    assert isinstance(single.answer(RequestOptions(format="jpeg")), PictureAnswer)
    accepting = parse_request({"body": IMAGE}, {"Accept": "image/jpeg"})
    assert isinstance(accepting.answer(RequestOptions()), PictureAnswer)
    assert isinstance(accepting.answer(RequestOptions(format="json")), JsonAnswer)
    several = parse_request({"body": {"images": [B64, B64]}})
    assert several.answer(RequestOptions()).many
    with pytest.raises(RequestError, match="an annotated picture answers one image"):
        several.answer(RequestOptions(format="jpeg"))
    v2 = parse_request({"body": {"inputs": [{"name": "image", "datatype": "BYTES", "data": [B64]}]}})
    assert isinstance(v2.answer(RequestOptions()), V2Answer)
    with pytest.raises(RequestError, match="answered with tensors"):
        v2.answer(RequestOptions(format="jpeg"))


DETECTIONS = Detections(
    boxes=np.array([[1.234, 2.0, 30.0, 40.5]], dtype=np.float32),
    scores=np.array([0.912345], dtype=np.float32),
    class_ids=np.array([2]),
)


def test_render_json():
    body = json.loads(JsonAnswer().render([ImageResult(DETECTIONS, (640, 480))], MODEL).body)
    assert body == {
        "model": "yolo_nas_s",
        "image_size": [640, 480],
        "detections": [{"box": [1.23, 2.0, 30.0, 40.5], "score": 0.91234, "class_id": 2, "class_name": "car"}],
    }


def test_render_v2():
    response = V2Answer("req-1", None).render([ImageResult(DETECTIONS, (640, 480))], MODEL)
    body = json.loads(response.body)
    outputs = {o["name"]: o for o in body["outputs"]}
    assert response.content_type == "application/json" and response.headers == {}
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
    assert request.binary_default and request.outputs is None
    outputs = [{"name": "scores", "parameters": {"binary_data": False, "classification": 0}}, {"name": "boxes"}]
    body, headers = v2_binary_body([IMAGE], {"triton_enable_empty_final_response": True}, outputs)
    request = parse_request({"body": body}, headers)
    assert request.options == {} and request.outputs == {"scores": False, "boxes": False} and not request.many


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
    results = [ImageResult(DETECTIONS, (640, 480)), failed]
    single = json.loads(JsonAnswer().render(results[:1], MODEL).body)
    assert json.loads(JsonAnswer(many=True).render(results, MODEL).body) == {
        "model": "yolo_nas_s",
        "results": [{k: v for k, v in single.items() if k != "model"}, {"error": "not an image", "status": 400}],
    }
    response = V2Answer(None, None, binary_default=True, many=True).render(results, MODEL)
    body = response.body
    size = int(response.headers["Inference-Header-Content-Length"])
    header, raw = json.loads(body[:size]), body[size:]
    assert response.content_type == "application/octet-stream"
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


def test_tracked_detections_carry_track_ids_in_json_and_v2():
    tracked = Detections(DETECTIONS.boxes, DETECTIONS.scores, DETECTIONS.class_ids, np.array([7]))
    body = json.loads(JsonAnswer().render([ImageResult(tracked, (640, 480))], MODEL).body)
    assert body["detections"][0]["track_id"] == 7
    assert (
        "track_id"
        not in json.loads(JsonAnswer().render([ImageResult(DETECTIONS, (640, 480))], MODEL).body)["detections"][0]
    )
    outputs = {
        o["name"]: o
        for o in json.loads(V2Answer(None, None).render([ImageResult(tracked, (9, 9))], MODEL).body)["outputs"]
    }
    assert outputs["track_ids"] == {"name": "track_ids", "datatype": "INT64", "shape": [1], "data": [7]}
    many = V2Answer(None, None, many=True).render(
        [ImageResult(tracked, (9, 9)), ImageResult(Detections.empty(), (9, 9))], MODEL
    )
    outputs = {o["name"]: o for o in json.loads(many.body)["outputs"]}
    assert outputs["track_ids"]["shape"] == [2, 1] and outputs["track_ids"]["data"] == [7, -1]


def test_options_come_from_every_request_shape_under_one_name():
    """Headers for raw bodies, form fields, JSON keys and v2 parameters all give the same raw options."""
    want = {"slice": "640", "overlap": "0.3"}
    assert parse_request({"body": IMAGE}, {"X-Slice": "640", "x-overlap": "0.3"}).options == want
    assert parse_request({"data": IMAGE, "slice": b"640", "overlap": b"0.3"}).options == want
    assert parse_request({"body": {"image": B64, **want}}).options == want
    v2 = {"inputs": [{"name": "image", "datatype": "BYTES", "data": [B64]}], "parameters": want}
    assert parse_request({"body": v2}).options == want


def test_a_body_of_empty_binary_elements_stops_at_the_image_limit():
    """20 MB of zero-length elements would be five million images: splitting stops at the limit instead."""
    raw = b"\x00\x00\x00\x00" * 1_000_000
    header = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(raw)}}]}).encode()  # fmt: skip
    with pytest.raises(RequestError, match="17 images in one request; at most 16") as caught:
        parse_request({"body": header + raw}, {"Inference-Header-Content-Length": str(len(header))})
    assert caught.value.status == 413
