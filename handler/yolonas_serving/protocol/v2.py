"""KServe v2 / Open Inference Protocol: one BYTES input of shape ``[N]`` (N images; base64 in JSON, raw under the
binary tensor extension), our options in ``parameters``; answered with v2 outputs, as JSON or binary tensors.

Outputs: ``boxes`` FP32 [D, 4], ``scores`` FP32 [D], ``class_ids`` INT64 [D], ``class_names`` BYTES [D] and, for a
tracking archive, ``track_ids`` INT64 [D]. With N images each gains a leading N axis, rows padded to the largest
count (0, -1 for ids, ""), and ``num_detections``, ``image_sizes`` and ``errors`` say the rest.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import RequestError
from ..options import RequestOptions
from ..postprocess import Detections
from .base import Answer, ImageResult, Model, ParsedRequest, RequestLimits, Response, Result, b64decode_each, too_many

#  Parameters the v2 protocol and its clients reserve. binary_data_output, binary_data and binary_data_size are
#  honoured; the others (sequence and scheduling hints, classification, content_type) mean nothing to a detector
#  and are ignored. Anything under the triton_ prefix is reserved too.
RESERVED = frozenset(
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
RESERVED_PREFIX = "triton_"
OUTPUTS = ("boxes", "scores", "class_ids", "class_names", "track_ids", "num_detections", "image_sizes", "errors")
#  One image is answered with these unless others are asked for (track_ids too when the detections are tracked).
SINGLE_OUTPUTS = ("boxes", "scores", "class_ids", "class_names")
#  The binary tensor extension (Triton, KServe): the body is a JSON header of this many bytes, then raw tensors.
BINARY_HEADER = "inference-header-content-length"


# --- the binary tensor codec ---------------------------------------------------------------------------------------


def split_bytes_tensor(raw: bytes, where: str, limits: RequestLimits) -> list[bytes]:
    """A binary BYTES tensor: each element is a 4-byte little-endian length, then that many bytes."""
    elements, offset = [], 0
    while offset < len(raw):
        if len(elements) == limits.max_images:  # stop early: a body of empty elements would be millions of them
            raise too_many(len(elements) + 1, limits)
        if offset + 4 > len(raw):
            raise RequestError(f"{where}: truncated element length at byte {offset}")
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise RequestError(f"{where}: element of {size} bytes runs past the tensor's end")
        elements.append(raw[offset : offset + size])
        offset += size
    return elements


def tensor_bytes(datatype: str, data: list) -> bytes:
    """A tensor in the binary layout: little-endian numbers; BYTES as a 4-byte length and the bytes per element."""
    if datatype == "BYTES":
        encoded = [str(v).encode("utf-8") for v in data]
        return b"".join(struct.pack("<I", len(e)) + e for e in encoded)
    return np.asarray(data, dtype="<f4" if datatype == "FP32" else "<i8").tobytes()


# --- requests --------------------------------------------------------------------------------------------------------


def _parameters(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RequestError(f"v2 parameters must be a JSON object ({where}); got {type(value).__name__}")
    return value


def _ours(parameters: dict[str, Any]) -> dict[str, Any]:
    """The options among v2 parameters: reserved names are the protocol's, not ours."""
    return {k: v for k, v in parameters.items() if k not in RESERVED and not str(k).startswith(RESERVED_PREFIX)}


def _requested_outputs(body: dict[str, Any], binary_default: bool) -> dict[str, bool] | None:
    requested = body.get("outputs")
    if requested is None:
        return None
    if not isinstance(requested, list) or not all(isinstance(o, dict) for o in requested):
        raise RequestError("v2 outputs must be a list of objects with a name")
    outputs = {}
    for output in requested:
        name = output.get("name")
        if name not in OUTPUTS:
            raise RequestError(f"unknown v2 output {name!a}; this model has {', '.join(OUTPUTS)}")
        binary = _parameters(output.get("parameters"), f"output {name}").get("binary_data", binary_default)
        outputs[name] = bool(binary)
    return outputs


@dataclass
class V2Request(ParsedRequest):
    request_id: str | None = None
    outputs: dict[str, bool] | None = None  # each output asked for, and whether in binary; None: the default set
    binary_default: bool = False

    def answer(self, options: RequestOptions) -> Answer:
        if options.format == "jpeg":
            raise RequestError("a v2 request is answered with tensors; ask for an annotated picture without v2")
        return V2Answer(self.request_id, self.outputs, self.binary_default, self.many)


def parse_v2(body: dict[str, Any], limits: RequestLimits, binary: bytes | None = None) -> V2Request:
    """A v2 request; ``binary`` holds the raw tensors that follow the JSON header under the binary extension."""
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise RequestError("a v2 request needs exactly one input: a BYTES tensor of shape [N] holding N images")
    tensor = inputs[0]
    if tensor.get("datatype") != "BYTES":
        raise RequestError(f"v2 input datatype must be BYTES (the encoded image); got {tensor.get('datatype')!a}")
    request_parameters = _parameters(body.get("parameters"), "request")
    tensor_parameters = _parameters(tensor.get("parameters"), "input")
    if "binary_data_size" in tensor_parameters:
        size = tensor_parameters["binary_data_size"]
        if binary is None or not isinstance(size, int) or not 0 <= size <= len(binary):
            raise RequestError("v2 input binary_data_size does not match the binary data after the JSON header")
        images: list[bytes | RequestError] = list(split_bytes_tensor(binary[:size], "v2 binary input", limits))
    else:
        data = tensor.get("data")
        images = b64decode_each(data if isinstance(data, list) else [data], "v2 input data", limits)
    if not images:
        raise RequestError("the v2 input holds no image")
    shape = tensor.get("shape")
    if shape is not None and (
        not isinstance(shape, list) or not all(isinstance(d, int) for d in shape) or math.prod(shape) != len(images)
    ):
        raise RequestError(f"v2 input shape {ascii(shape)} does not match its {len(images)} element(s)")
    binary_default = bool(request_parameters.get("binary_data_output", False))
    request_id = body.get("id")  # TorchServe's OIP gRPC service always sends one, "" when the client set none
    return V2Request(
        images,
        {**_ours(request_parameters), **_ours(tensor_parameters)},
        many=len(images) != 1,
        request_id=None if request_id is None else str(request_id),
        outputs=_requested_outputs(body, binary_default),
        binary_default=binary_default,
    )


# --- answers ---------------------------------------------------------------------------------------------------------


def _columns(results: list[Result], names: list[str], many: bool) -> dict[str, tuple[str, list[int], list]]:
    """Every v2 output as (datatype, shape, flat data). One image: [count, ...]. N images: a leading N axis, each
    image's rows padded to the largest count K (boxes and scores 0, class and track ids -1, class_names "");
    num_detections says how many rows of each are real, errors holds "" or the image's error."""
    found = [(r.detections, r.size) if isinstance(r, ImageResult) else (Detections.empty(), (0, 0)) for r in results]
    counts = [len(d) for d, _ in found]
    width = max(counts, default=0)
    boxes, scores, ids, labels, tracks = [], [], [], [], []
    for detections, _ in found:
        pad = width - len(detections) if many else 0
        boxes += np.round(detections.boxes.astype(np.float64), 2).reshape(-1).tolist() + [0.0] * (4 * pad)
        scores += np.round(detections.scores.astype(np.float64), 5).tolist() + [0.0] * pad
        ids += detections.class_ids.tolist() + [-1] * pad
        labels += [names[i] for i in detections.class_ids] + [""] * pad
        track_ids = detections.track_ids if detections.track_ids is not None else [-1] * len(detections)
        tracks += [int(t) for t in track_ids] + [-1] * pad
    lead = [len(results), width] if many else [counts[0]]
    errors = [r.message if isinstance(r, RequestError) else "" for r in results]
    return {
        "boxes": ("FP32", [*lead, 4], boxes),
        "scores": ("FP32", lead, scores),
        "class_ids": ("INT64", lead, ids),
        "class_names": ("BYTES", lead, labels),
        "track_ids": ("INT64", lead, tracks),
        "num_detections": ("INT64", [len(results)], counts),
        "image_sizes": ("INT64", [len(results), 2], [v for _, size in found for v in size]),
        "errors": ("BYTES", [len(results)], errors),
    }


@dataclass
class V2Answer(Answer):
    """The response body and headers. Outputs asked for in binary follow the JSON header as raw bytes
    (``Inference-Header-Content-Length`` says where the header ends). ``model_version`` is always present:
    TorchServe's OIP gRPC service reads it (and ``id``) as strings and kills the worker when they are missing."""

    request_id: str | None
    outputs: dict[str, bool] | None
    binary_default: bool = False
    many: bool = False

    def render(self, results: list[Result], model: Model) -> Response:
        columns = _columns(results, model.names, self.many)
        if self.outputs is not None:
            wanted = self.outputs
        else:
            tracked = any(isinstance(r, ImageResult) and r.detections.track_ids is not None for r in results)
            default = OUTPUTS if self.many else (*SINGLE_OUTPUTS, "track_ids")
            wanted = {name: self.binary_default for name in default if name != "track_ids" or tracked}
        outputs, tensors = [], []
        for name, binary in wanted.items():
            datatype, shape, data = columns[name]
            output: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
            if binary:
                tensors.append(tensor_bytes(datatype, data))
                output["parameters"] = {"binary_data_size": len(tensors[-1])}
            else:
                output["data"] = data
            outputs.append(output)
        response: dict[str, Any] = {"model_name": model.name, "model_version": model.version, "outputs": outputs}
        if not self.many and isinstance(results[0], ImageResult):
            response["parameters"] = {"image_size": list(results[0].size)}
        if self.request_id is not None:
            response["id"] = self.request_id
        header = json.dumps(response, separators=(",", ":")).encode()
        if not tensors:
            return Response(header)
        headers = {"Inference-Header-Content-Length": str(len(header))}
        return Response(header + b"".join(tensors), content_type="application/octet-stream", headers=headers)
