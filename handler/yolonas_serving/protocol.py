"""Request parsing and response rendering, independent of TorchServe.

Request shapes (one image each; TorchServe batches requests):
- raw body: the image bytes, any image content type; options in the query string;
- multipart form: the image in any file field, options in text fields;
- JSON: ``{"image": "<base64>", "conf": 0.5, ...}``;
- KServe v2 / Open Inference Protocol JSON: ``{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
  "data": ["<base64>"]}], "parameters": {"conf": 0.5}}``, answered in v2 form.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .errors import RequestError
from .postprocess import Detections, NMSOptions

OPTION_NAMES = ("conf", "iou", "max_det", "classes", "format")
RESPONSE_FORMATS = ("json", "jpeg")
MAX_DET_LIMIT = 10_000
#  Multipart fields that hold the image, in order of preference; any other bytes field will do too.
IMAGE_FIELDS = ("image", "file", "data", "body")


@dataclass
class ImageRequest:
    image: bytes
    options: dict[str, Any] = field(default_factory=dict)
    v2: bool = False
    request_id: str | None = None


def _b64(value: Any, where: str) -> bytes:
    if not isinstance(value, str):
        raise RequestError(f"{where} must be a base64 string; got {type(value).__name__}")
    if value.startswith("data:") and "," in value:
        value = value.split(",", 1)[1]  # data URI: data:image/jpeg;base64,...
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{where} is not valid base64") from None


def _parse_v2(body: dict[str, Any]) -> ImageRequest:
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise RequestError("a v2 request needs exactly one input holding one image (TorchServe batches requests)")
    tensor = inputs[0]
    if tensor.get("datatype") != "BYTES":
        raise RequestError(f"v2 input datatype must be BYTES (the encoded image); got {tensor.get('datatype')!a}")
    data = tensor.get("data")
    if isinstance(data, list):
        if len(data) != 1:
            raise RequestError(f"a v2 input must hold one image; got {len(data)}")
        data = data[0]
    parameters = (body.get("parameters") or {}, tensor.get("parameters") or {})
    if not all(isinstance(p, dict) for p in parameters):
        raise RequestError("v2 parameters must be a JSON object of options")
    options = {**parameters[0], **parameters[1]}
    options.pop("content_type", None)  # the v2 spec lets clients tag BYTES; ours is always base64
    request_id = body.get("id")  # TorchServe's OIP gRPC service always sends one, "" when the client set none
    return ImageRequest(
        _b64(data, "v2 input data"), options, v2=True, request_id=None if request_id is None else str(request_id)
    )


def _parse_json(body: Any) -> ImageRequest:
    if not isinstance(body, dict):
        raise RequestError(f"a JSON request must be an object; got {type(body).__name__}")
    if "inputs" in body:
        return _parse_v2(body)
    if "image" not in body:
        raise RequestError('a JSON request needs "image": "<base64 of the encoded image>"')
    options = {k: v for k, v in body.items() if k != "image"}
    return ImageRequest(_b64(body["image"], '"image"'), options)


def _load_json(text: str | bytes | bytearray) -> Any:
    try:
        return json.loads(text)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nested too deep
        raise RequestError(f"the body is not valid JSON: {exc}") from None


def _field_type(headers: dict[str, Any], name: str) -> str:
    """TorchServe files each input's content type under the input's name."""
    entry = headers.get(name)
    return (entry.get("content-type") or "") if isinstance(entry, dict) else ""


def header_options(headers: dict[str, Any]) -> dict[str, str]:
    """Options sent as ``X-Conf``, ``X-Iou``, ``X-Max-Det``, ``X-Classes``, ``X-Format`` headers (for raw bodies:
    TorchServe does not pass the query string to handlers)."""
    options = {}
    for key, value in headers.items():
        if isinstance(value, str) and key.lower().startswith("x-"):
            name = key[2:].lower().replace("-", "_")
            if name in OPTION_NAMES:
                options[name] = value
    return options


def parse_request(row: dict[str, Any], headers: dict[str, Any] | None = None) -> ImageRequest:
    """One TorchServe input row (``{"body": ...}`` or multipart fields) and its headers -> an ImageRequest."""
    headers = headers or {}
    if not row:
        raise RequestError("empty request: send an image as the body, a form file, or JSON")
    if "body" in row:
        request = _parse_body(row["body"], _field_type(headers, "body"))
    else:
        request = _parse_form(row, headers)
    for key, value in header_options(headers).items():
        request.options.setdefault(key, value)
    return request


def _parse_body(body: Any, content_type: str) -> ImageRequest:
    if isinstance(body, (dict, list)):  # TorchServe already decoded an application/json body
        return _parse_json(body)
    if isinstance(body, str):
        return _parse_json(_load_json(body))
    if isinstance(body, (bytes, bytearray)):
        if content_type.startswith("application/json") or bytes(body[:1]) in (b"{", b"["):
            return _parse_json(_load_json(bytes(body)))
        return ImageRequest(bytes(body))
    raise RequestError(f"unexpected request body of type {type(body).__name__}")


def _parse_form(row: dict[str, Any], headers: dict[str, Any]) -> ImageRequest:
    """Multipart: the image is the field named like an image field, else the one with a binary content type,
    else the largest; the other fields are options."""
    files = {k: v for k, v in row.items() if isinstance(v, (bytes, bytearray))}
    if not files:
        raise RequestError("no image in the request: send it as the body, a form file, or JSON")
    binary = [k for k in files if _field_type(headers, k).startswith(("image/", "application/octet-stream"))]
    name = next((n for n in IMAGE_FIELDS if n in files), None) or (binary[0] if binary else None)
    name = name or max(files, key=lambda k: len(files[k]))
    options = _text_options({k: v for k, v in row.items() if k != name})
    return ImageRequest(bytes(files[name]), options)


def _text_options(fields: dict[str, Any]) -> dict[str, Any]:
    options = {}
    for key, value in fields.items():
        if isinstance(value, (bytes, bytearray)):
            try:
                value = bytes(value).decode("utf-8")
            except UnicodeDecodeError:
                raise RequestError(f"form field {key!a} is binary; send one image per request") from None
        options[key] = value
    return options


#  Messages quote client values with !a (ASCII escapes): TorchServe 0.12 sends the message as the HTTP reason
#  phrase, framing it by character count, so a non-ASCII message corrupts the reply and kills the worker.
def _number(options: dict[str, Any], key: str, kind: type) -> Any:
    value = options[key]
    if isinstance(value, bool):
        raise RequestError(f"{key} must be a number; got {value!a}")
    try:
        number = kind(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(float("inf"))
        raise RequestError(f"{key} must be a number; got {value!a}") from None
    if kind is int and isinstance(value, float) and value != number:
        raise RequestError(f"{key} must be an integer; got {value!a}")
    if number != number:  # NaN
        raise RequestError(f"{key} must be a number; got NaN")
    return number


def _classes(value: Any, names: list[str]) -> tuple[int, ...]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items:
        raise RequestError(f"classes must be a list of class ids or names; got {value!a}")
    lookup = {name: i for i, name in enumerate(names)}
    ids = []
    for item in items:
        item = item.strip() if isinstance(item, str) else item
        if isinstance(item, str) and item in lookup:
            ids.append(lookup[item])
        elif (isinstance(item, int) and not isinstance(item, bool)) or (isinstance(item, str) and item.isdecimal()):
            class_id = int(item)
            if not 0 <= class_id < len(names):
                raise RequestError(f"class id {class_id} is out of range 0..{len(names) - 1}")
            ids.append(class_id)
        else:
            raise RequestError(f"unknown class {item!a}; known names are {ascii(names[:5])}... ({len(names)} in all)")
    return tuple(sorted(set(ids)))


def parse_options(
    options: dict[str, Any], defaults: NMSOptions, names: list[str], accept: str | None = None
) -> tuple[NMSOptions, str]:
    """Validate per-request options against the model's defaults; returns NMS options and the response format."""
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise RequestError(f"unknown option(s) {ascii(unknown)}; known: {', '.join(OPTION_NAMES)}")
    result = defaults
    if "conf" in options:
        conf = _number(options, "conf", float)
        if not 0.0 <= conf <= 1.0:
            raise RequestError(f"conf must be between 0 and 1; got {conf}")
        result = replace(result, conf=conf)
    if "iou" in options:
        iou = _number(options, "iou", float)
        if not 0.0 < iou <= 1.0:
            raise RequestError(f"iou must be in (0, 1]; got {iou}")
        result = replace(result, iou=iou)
    if "max_det" in options:
        max_det = _number(options, "max_det", int)
        if not 1 <= max_det <= MAX_DET_LIMIT:
            raise RequestError(f"max_det must be between 1 and {MAX_DET_LIMIT}; got {max_det}")
        result = replace(result, max_det=max_det)
    if "classes" in options and options["classes"] is not None:
        result = replace(result, classes=_classes(options["classes"], names))
    response_format = "jpeg" if accept and "image/jpeg" in accept else "json"
    if "format" in options:
        response_format = str(options["format"]).lower()
        if response_format not in RESPONSE_FORMATS:
            raise RequestError(f"format must be one of {', '.join(RESPONSE_FORMATS)}; got {options['format']!a}")
    return result, response_format


def render_json(model: str, detections: Detections, names: list[str], image_size: tuple[int, int]) -> dict[str, Any]:
    """The plain JSON response: boxes in original-image pixels, sorted by score."""
    return {
        "model": model,
        "image_size": list(image_size),
        "detections": [
            {
                "box": [round(float(v), 2) for v in box],
                "score": round(float(score), 5),
                "class_id": int(class_id),
                "class_name": names[class_id],
            }
            for box, score, class_id in zip(detections.boxes, detections.scores, detections.class_ids)
        ],
    }


def render_v2(
    model: str,
    detections: Detections,
    names: list[str],
    image_size: tuple[int, int],
    request_id: str | None,
    model_version: str = "",
) -> dict[str, Any]:
    """The Open Inference Protocol (KServe v2) response. ``model_version`` is always present: TorchServe's OIP gRPC
    service reads it (and ``id``) as strings and kills the worker when they are missing."""
    count = len(detections)
    boxes = np.round(detections.boxes.astype(np.float64), 2).reshape(-1).tolist()
    response: dict[str, Any] = {
        "model_name": model,
        "model_version": model_version,
        "outputs": [
            {"name": "boxes", "datatype": "FP32", "shape": [count, 4], "data": boxes},
            {
                "name": "scores",
                "datatype": "FP32",
                "shape": [count],
                "data": np.round(detections.scores.astype(np.float64), 5).tolist(),
            },
            {"name": "class_ids", "datatype": "INT64", "shape": [count], "data": detections.class_ids.tolist()},
            {
                "name": "class_names",
                "datatype": "BYTES",
                "shape": [count],
                "data": [names[i] for i in detections.class_ids],
            },
        ],
        "parameters": {"image_size": list(image_size)},
    }
    if request_id is not None:
        response["id"] = request_id
    return response
