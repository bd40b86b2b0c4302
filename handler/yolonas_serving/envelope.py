"""TorchServe's request envelope, opened and answered: the rows a batch hands the handler (a body, headers, form
fields) parsed into image requests, and the responses rendered back, independent of the rest of TorchServe.

Request shapes (TorchServe batches requests; one request holds one image or several):
- raw body: the image bytes, any image content type; options in ``X-`` headers;
- multipart form: the image in any file field, options in text fields;
- JSON: ``{"image": "<base64>", "conf": 0.5, ...}``, or ``{"images": ["<base64>", ...], ...}`` for several;
- KServe v2 / Open Inference Protocol: one BYTES input of shape ``[N]`` (N images, base64 in JSON, raw with the
  binary tensor extension), our options in ``parameters``; answered in v2 form, as JSON or binary outputs.
A body may be compressed (``Content-Encoding: gzip`` or ``deflate``, as Triton's client offers); answers are not.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
import zlib
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .errors import RequestError
from .postprocess import Detections, NMSOptions

OPTION_NAMES = ("conf", "iou", "max_det", "classes", "agnostic", "format")
RESPONSE_FORMATS = ("json", "jpeg")
MAX_DET_LIMIT = 10_000
#  Multipart fields that hold the image, in order of preference; any other bytes field will do too.
IMAGE_FIELDS = ("image", "file", "data", "body")
#  The binary tensor extension (Triton, KServe): the body is a JSON header of this many bytes, then raw tensors.
BINARY_HEADER = "inference-header-content-length"
#  Request body encodings and their zlib window bits ("deflate" is the zlib format, as HTTP and Triton's client use it).
CONTENT_ENCODINGS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
#  A compressed body may expand to this many times the request's byte limit (room for base64 and JSON around images).
MAX_EXPANSION = 2
#  Parameters the v2 protocol and its clients reserve. binary_data_output, binary_data and binary_data_size are
#  honoured; the others (sequence and scheduling hints, classification, content_type) mean nothing to a detector
#  and are ignored. Anything under the triton_ prefix is reserved too.
V2_RESERVED = frozenset(
    {
        "binary_data_output",
        "binary_data",
        "binary_data_size",
        "classification",
        "content_type",
        "sequence_id",
        "sequence_start",
        "sequence_end",
        "priority",
        "timeout",
        "headers",
    }
)
V2_RESERVED_PREFIX = "triton_"
#  Every v2 output; one image is answered with the first four unless others are asked for.
V2_OUTPUTS = ("boxes", "scores", "class_ids", "class_names", "num_detections", "image_sizes", "errors")
V2_SINGLE_OUTPUTS = V2_OUTPUTS[:4]


@dataclass(frozen=True)
class RequestLimits:
    """Per request (one TorchServe request may hold several images)."""

    max_images: int = 16
    max_bytes: int = 20 * 1024 * 1024  # all images' encoded bytes together


@dataclass
class ImageRequest:
    """One image and its options (scripts call Detector.prepare with it)."""

    image: bytes
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class V2Answer:
    """How a v2 request wants its answer: its id, and each output to send with whether it goes in binary."""

    request_id: str | None
    outputs: dict[str, bool] | None  # None: the default set, binary when ``binary_default``
    binary_default: bool = False


@dataclass
class ParsedRequest:
    """One TorchServe request: its images in order (an image that could not be read is its RequestError), the
    options they share, and the answer's form (``many``: a list of results; ``v2``: the Open Inference Protocol)."""

    images: list[bytes | RequestError]
    options: dict[str, Any] = field(default_factory=dict)
    many: bool = False
    v2: V2Answer | None = None


def _b64(value: Any, where: str) -> bytes:
    if not isinstance(value, str):
        raise RequestError(f"{where} must be a base64 string; got {type(value).__name__}")
    if value.startswith("data:") and "," in value:
        value = value.split(",", 1)[1]  # data URI: data:image/jpeg;base64,...
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{where} is not valid base64") from None


def _too_many(count: int, limits: RequestLimits) -> RequestError:
    return RequestError(f"{count} images in one request; at most {limits.max_images}", status=413)


def _b64_each(values: list[Any], where: str, limits: RequestLimits) -> list[bytes | RequestError]:
    """Each image judged alone: one bad element becomes that image's error."""
    if len(values) > limits.max_images:
        raise _too_many(len(values), limits)
    images: list[bytes | RequestError] = []
    for i, value in enumerate(values):
        try:
            images.append(_b64(value, f"{where}[{i}]"))
        except RequestError as exc:
            images.append(exc)
    return images


def _v2_parameters(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RequestError(f"v2 parameters must be a JSON object ({where}); got {type(value).__name__}")
    return value


def _ours(parameters: dict[str, Any]) -> dict[str, Any]:
    """The options among v2 parameters: reserved names are the protocol's, not ours."""
    return {k: v for k, v in parameters.items() if k not in V2_RESERVED and not str(k).startswith(V2_RESERVED_PREFIX)}


def _split_bytes_tensor(raw: bytes, where: str, limits: RequestLimits) -> list[bytes]:
    """A binary BYTES tensor: each element is a 4-byte little-endian length, then that many bytes."""
    elements, offset = [], 0
    while offset < len(raw):
        if len(elements) == limits.max_images:  # stop early: a body of empty elements would be millions of them
            raise _too_many(len(elements) + 1, limits)
        if offset + 4 > len(raw):
            raise RequestError(f"{where}: truncated element length at byte {offset}")
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise RequestError(f"{where}: element of {size} bytes runs past the tensor's end")
        elements.append(raw[offset : offset + size])
        offset += size
    return elements


def _v2_outputs(body: dict[str, Any], binary_default: bool) -> dict[str, bool] | None:
    requested = body.get("outputs")
    if requested is None:
        return None
    if not isinstance(requested, list) or not all(isinstance(o, dict) for o in requested):
        raise RequestError("v2 outputs must be a list of objects with a name")
    outputs = {}
    for output in requested:
        name = output.get("name")
        if name not in V2_OUTPUTS:
            raise RequestError(f"unknown v2 output {name!a}; this model has {', '.join(V2_OUTPUTS)}")
        binary = _v2_parameters(output.get("parameters"), f"output {name}").get("binary_data", binary_default)
        outputs[name] = bool(binary)
    return outputs


def _parse_v2(body: dict[str, Any], limits: RequestLimits, binary: bytes | None = None) -> ParsedRequest:
    """A v2 request; ``binary`` holds the raw tensors that follow the JSON header under the binary extension."""
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise RequestError("a v2 request needs exactly one input: a BYTES tensor of shape [N] holding N images")
    tensor = inputs[0]
    if tensor.get("datatype") != "BYTES":
        raise RequestError(f"v2 input datatype must be BYTES (the encoded image); got {tensor.get('datatype')!a}")
    request_parameters = _v2_parameters(body.get("parameters"), "request")
    tensor_parameters = _v2_parameters(tensor.get("parameters"), "input")
    if "binary_data_size" in tensor_parameters:
        size = tensor_parameters["binary_data_size"]
        if binary is None or not isinstance(size, int) or not 0 <= size <= len(binary):
            raise RequestError("v2 input binary_data_size does not match the binary data after the JSON header")
        images: list[bytes | RequestError] = list(_split_bytes_tensor(binary[:size], "v2 binary input", limits))
    else:
        data = tensor.get("data")
        images = _b64_each(data if isinstance(data, list) else [data], "v2 input data", limits)
    if not images:
        raise RequestError("the v2 input holds no image")
    shape = tensor.get("shape")
    if shape is not None and (
        not isinstance(shape, list) or not all(isinstance(d, int) for d in shape) or math.prod(shape) != len(images)
    ):
        raise RequestError(f"v2 input shape {ascii(shape)} does not match its {len(images)} element(s)")
    binary_default = bool(request_parameters.get("binary_data_output", False))
    request_id = body.get("id")  # TorchServe's OIP gRPC service always sends one, "" when the client set none
    answer = V2Answer(
        None if request_id is None else str(request_id), _v2_outputs(body, binary_default), binary_default
    )
    options = {**_ours(request_parameters), **_ours(tensor_parameters)}
    return ParsedRequest(images, options, many=len(images) != 1, v2=answer)


def _parse_json(body: Any, limits: RequestLimits, binary: bytes | None = None) -> ParsedRequest:
    if not isinstance(body, dict):
        raise RequestError(f"a JSON request must be an object; got {type(body).__name__}")
    if "inputs" in body or binary is not None:
        return _parse_v2(body, limits, binary)
    if "images" in body:
        images = body["images"]
        if not isinstance(images, list) or not images:
            raise RequestError('"images" must be a non-empty list of base64 strings')
        return ParsedRequest(
            _b64_each(images, '"images"', limits), {k: v for k, v in body.items() if k != "images"}, True
        )
    if "image" not in body:
        raise RequestError('a JSON request needs "image": "<base64 of the encoded image>" (or "images": [...])')
    return ParsedRequest([_b64(body["image"], '"image"')], {k: v for k, v in body.items() if k != "image"})


def _load_json(text: str | bytes | bytearray) -> Any:
    try:
        return json.loads(text)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nested too deep
        raise RequestError(f"the body is not valid JSON: {exc}") from None


def _field_type(headers: dict[str, Any], name: str) -> str:
    """TorchServe files each input's content type under the input's name."""
    entry = headers.get(name)
    return (entry.get("content-type") or "") if isinstance(entry, dict) else ""


def _header(headers: dict[str, Any], name: str) -> str | None:
    """A request header by case-insensitive name (TorchServe keeps the client's spelling)."""
    return next((v for k, v in headers.items() if k.lower() == name and isinstance(v, str)), None)


def header_options(headers: dict[str, Any]) -> dict[str, str]:
    """Options sent as ``X-Conf``, ``X-Iou``, ``X-Max-Det``, ``X-Classes``, ``X-Agnostic``, ``X-Format`` headers (for
    raw bodies: TorchServe does not pass the query string to handlers)."""
    options = {}
    for key, value in headers.items():
        if isinstance(value, str) and key.lower().startswith("x-"):
            name = key[2:].lower().replace("-", "_")
            if name in OPTION_NAMES:
                options[name] = value
    return options


def parse_request(
    row: dict[str, Any], headers: dict[str, Any] | None = None, limits: RequestLimits = RequestLimits()
) -> ParsedRequest:
    """One TorchServe input row (``{"body": ...}`` or multipart fields) and its headers -> its images and options."""
    headers = headers or {}
    if not row:
        raise RequestError("empty request: send an image as the body, a form file, or JSON")
    if "body" in row:
        body = _decompressed(row["body"], _header(headers, "content-encoding"), limits)
        request = _parse_body(body, _field_type(headers, "body"), _header(headers, BINARY_HEADER), limits)
    else:
        request = _parse_form(row, headers)
    for key, value in header_options(headers).items():
        request.options.setdefault(key, value)
    total = sum(len(image) for image in request.images if isinstance(image, bytes))
    if total > limits.max_bytes:
        raise RequestError(f"the request's images hold {total} bytes; at most {limits.max_bytes}", status=413)
    return request


def _decompressed(body: Any, encoding: str | None, limits: RequestLimits) -> Any:
    """The body with its ``Content-Encoding`` undone; the expansion is bounded, so that a small compressed body cannot
    fill the worker's memory."""
    name = (encoding or "").strip().lower()
    if name in ("", "identity"):
        return body
    if name not in CONTENT_ENCODINGS:
        raise RequestError(
            f"Content-Encoding {encoding!a} is not supported; send {', '.join(CONTENT_ENCODINGS)} or none", status=415
        )
    if not isinstance(body, (bytes, bytearray)):  # TorchServe decoded it as JSON or text: it was not compressed
        raise RequestError(f"a {name} body must be sent as bytes (application/octet-stream), not as JSON or text")
    bound = MAX_EXPANSION * limits.max_bytes
    inflater = zlib.decompressobj(CONTENT_ENCODINGS[name])
    try:
        raw = inflater.decompress(bytes(body), bound + 1)
    except zlib.error as exc:
        raise RequestError(f"the body is not valid {name} data ({exc})") from None
    if len(raw) > bound:
        raise RequestError(f"the {name} body expands beyond {bound} bytes", status=413)
    if not inflater.eof:
        raise RequestError(f"the {name} body is truncated")
    return raw


def _parse_body(body: Any, content_type: str, binary_header: str | None, limits: RequestLimits) -> ParsedRequest:
    if binary_header is not None:
        return _parse_binary_extension(body, binary_header, limits)
    if isinstance(body, (dict, list)):  # TorchServe already decoded an application/json body
        return _parse_json(body, limits)
    if isinstance(body, str):
        return _parse_json(_load_json(body), limits)
    if isinstance(body, (bytes, bytearray)):
        if content_type.startswith("application/json") or bytes(body[:1]) in (b"{", b"["):
            return _parse_json(_load_json(bytes(body)), limits)
        return ParsedRequest([bytes(body)])
    raise RequestError(f"unexpected request body of type {type(body).__name__}")


def _parse_binary_extension(body: Any, header_length: str, limits: RequestLimits) -> ParsedRequest:
    """JSON header of ``Inference-Header-Content-Length`` bytes, then the raw tensors."""
    if isinstance(body, dict):  # nothing after the header: TorchServe decoded it as JSON
        return _parse_json(body, limits)
    if not isinstance(body, (str, bytes, bytearray)):  # other JSON TorchServe decoded: null, a number, a list
        raise RequestError(f"a v2 request must be a JSON object; got {type(body).__name__}")
    raw = body.encode("utf-8") if isinstance(body, str) else bytes(body)
    if not header_length.strip().isdecimal() or int(header_length) > len(raw):
        raise RequestError(f"Inference-Header-Content-Length {header_length!a} does not fit a {len(raw)}-byte body")
    size = int(header_length)
    return _parse_json(_load_json(raw[:size]), limits, raw[size:])


def _parse_form(row: dict[str, Any], headers: dict[str, Any]) -> ParsedRequest:
    """Multipart: the image is the field named like an image field, else the one with a binary content type,
    else the largest; the other fields are options."""
    files = {k: v for k, v in row.items() if isinstance(v, (bytes, bytearray))}
    if not files:
        raise RequestError("no image in the request: send it as the body, a form file, or JSON")
    binary = [k for k in files if _field_type(headers, k).startswith(("image/", "application/octet-stream"))]
    name = next((n for n in IMAGE_FIELDS if n in files), None) or (binary[0] if binary else None)
    name = name or max(files, key=lambda k: len(files[k]))
    options = _text_options({k: v for k, v in row.items() if k != name})
    return ParsedRequest([bytes(files[name])], options)


def _text_options(fields: dict[str, Any]) -> dict[str, Any]:
    options = {}
    for key, value in fields.items():
        if isinstance(value, (bytes, bytearray)):
            try:
                value = bytes(value).decode("utf-8")
            except UnicodeDecodeError:
                raise RequestError(f"form field {key!a} is binary; send several images as JSON or v2") from None
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


def _flag(value: Any, key: str) -> bool:
    """A boolean option from JSON (true/false) or text (headers, form fields: true/false/1/0)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise RequestError(f"{key} must be true or false; got {value!a}")


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
    if "agnostic" in options:
        result = replace(result, class_agnostic=_flag(options["agnostic"], "agnostic"))
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


#  An image's result: its detections and original (width, height), or the error that stopped it.
ImageResult = tuple[Detections, tuple[int, int]] | RequestError


def render_json_many(model: str, results: list[ImageResult], names: list[str]) -> dict[str, Any]:
    """Several images: one entry per image, in order; an image that failed gets ``{"error", "status"}``."""
    entries = [
        {"error": r.message, "status": r.status}
        if isinstance(r, RequestError)
        else render_json(model, r[0], names, r[1])
        for r in results
    ]
    for entry in entries:
        entry.pop("model", None)
    return {"model": model, "results": entries}


def _v2_columns(results: list[ImageResult], names: list[str], many: bool) -> dict[str, tuple[str, list[int], list]]:
    """Every v2 output as (datatype, shape, flat data). One image: [count, ...]. N images: a leading N axis, each
    image's rows padded to the largest count K (boxes and scores 0, class_ids -1, class_names ""); num_detections
    says how many rows of each are real, errors holds "" or the image's error."""
    found = [(r[0], r[1]) if not isinstance(r, RequestError) else (Detections.empty(), (0, 0)) for r in results]
    counts = [len(d) for d, _ in found]
    width = max(counts, default=0)
    boxes, scores, ids, labels = [], [], [], []
    for detections, _ in found:
        pad = width - len(detections) if many else 0
        boxes += np.round(detections.boxes.astype(np.float64), 2).reshape(-1).tolist() + [0.0] * (4 * pad)
        scores += np.round(detections.scores.astype(np.float64), 5).tolist() + [0.0] * pad
        ids += detections.class_ids.tolist() + [-1] * pad
        labels += [names[i] for i in detections.class_ids] + [""] * pad
    lead = [len(results), width] if many else [counts[0]]
    errors = ["" if not isinstance(r, RequestError) else r.message for r in results]
    return {
        "boxes": ("FP32", [*lead, 4], boxes),
        "scores": ("FP32", lead, scores),
        "class_ids": ("INT64", lead, ids),
        "class_names": ("BYTES", lead, labels),
        "num_detections": ("INT64", [len(results)], counts),
        "image_sizes": ("INT64", [len(results), 2], [v for _, size in found for v in size]),
        "errors": ("BYTES", [len(results)], errors),
    }


def _raw(datatype: str, data: list) -> bytes:
    """The binary tensor extension's layout: little-endian numbers; BYTES as 4-byte length + bytes per element."""
    if datatype == "BYTES":
        encoded = [str(v).encode("utf-8") for v in data]
        return b"".join(struct.pack("<I", len(e)) + e for e in encoded)
    return np.asarray(data, dtype="<f4" if datatype == "FP32" else "<i8").tobytes()


def render_v2(
    model: str,
    results: list[ImageResult],
    names: list[str],
    answer: V2Answer,
    many: bool = False,
    model_version: str = "",
) -> tuple[bytes, dict[str, str]]:
    """The Open Inference Protocol (KServe v2) response body and its headers. Outputs asked for in binary follow the
    JSON header as raw bytes (``Inference-Header-Content-Length`` says where the header ends). ``model_version`` is
    always present: TorchServe's OIP gRPC service reads it (and ``id``) as strings and kills the worker when they are
    missing."""
    columns = _v2_columns(results, names, many)
    if answer.outputs is not None:
        wanted = answer.outputs
    else:
        wanted = {name: answer.binary_default for name in (V2_OUTPUTS if many else V2_SINGLE_OUTPUTS)}
    outputs, tensors = [], []
    for name, binary in wanted.items():
        datatype, shape, data = columns[name]
        output: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
        if binary:
            tensors.append(_raw(datatype, data))
            output["parameters"] = {"binary_data_size": len(tensors[-1])}
        else:
            output["data"] = data
        outputs.append(output)
    response: dict[str, Any] = {"model_name": model, "model_version": model_version, "outputs": outputs}
    if not many and not isinstance(results[0], RequestError):
        response["parameters"] = {"image_size": list(results[0][1])}
    if answer.request_id is not None:
        response["id"] = answer.request_id
    header = json.dumps(response, separators=(",", ":")).encode()
    if not tensors:
        return header, {"content-type": "application/json"}
    headers = {"content-type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))}
    return header + b"".join(tensors), headers
