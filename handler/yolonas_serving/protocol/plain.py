"""The plain protocol: an image as the raw body (options in ``X-`` headers), as a multipart form file (options in
the other fields), or base64 in JSON (``{"image": ..., "conf": 0.5}``, or ``{"images": [...], ...}`` for several).
Answered with JSON detections (a list of results for several images), or the annotated picture."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..draw import draw_detections, encode_jpeg
from ..errors import RequestError
from ..options import RequestOptions
from ..postprocess import Detections
from .base import Answer, ImageResult, Model, ParsedRequest, RequestLimits, Response, Result, b64decode, b64decode_each

#  Multipart fields that hold the image, in order of preference; any other bytes field will do too.
IMAGE_FIELDS = ("image", "file", "data", "body")


@dataclass
class PlainRequest(ParsedRequest):
    """Answered with the picture when ``format`` is jpeg, or when unset and Accept asks for image/jpeg."""

    def answer(self, options: RequestOptions) -> Answer:
        wants_picture = options.format == "jpeg" or (options.format is None and "image/jpeg" in (self.accept or ""))
        if wants_picture and self.many:
            raise RequestError("an annotated picture answers one image; send several images for JSON answers")
        return PictureAnswer() if wants_picture else JsonAnswer(self.many)


def parse_json(body: dict[str, Any], limits: RequestLimits) -> PlainRequest:
    """``{"image": "<base64>", ...options}`` or ``{"images": [...], ...options}``."""
    if "images" in body:
        images = body["images"]
        if not isinstance(images, list) or not images:
            raise RequestError('"images" must be a non-empty list of base64 strings')
        options = {k: v for k, v in body.items() if k != "images"}
        return PlainRequest(b64decode_each(images, '"images"', limits), options, many=True)
    if "image" not in body:
        raise RequestError('a JSON request needs "image": "<base64 of the encoded image>" (or "images": [...])')
    return PlainRequest([b64decode(body["image"], '"image"')], {k: v for k, v in body.items() if k != "image"})


def parse_raw(body: bytes | bytearray) -> PlainRequest:
    return PlainRequest([bytes(body)])


def field_type(headers: dict[str, Any], name: str) -> str:
    """TorchServe files each input's content type under the input's name."""
    entry = headers.get(name)
    return (entry.get("content-type") or "") if isinstance(entry, dict) else ""


def parse_form(row: dict[str, Any], headers: dict[str, Any]) -> PlainRequest:
    """Multipart (and gRPC's input map): the image is the field named like an image field, else the one with a
    binary content type, else the largest; the other fields are options."""
    files = {k: v for k, v in row.items() if isinstance(v, (bytes, bytearray))}
    if not files:
        raise RequestError("no image in the request: send it as the body, a form file, or JSON")
    binary = [k for k in files if field_type(headers, k).startswith(("image/", "application/octet-stream"))]
    name = next((n for n in IMAGE_FIELDS if n in files), None) or (binary[0] if binary else None)
    name = name or max(files, key=lambda k: len(files[k]))
    options = {}
    for key, value in row.items():
        if key == name:
            continue
        if isinstance(value, (bytes, bytearray)):
            try:
                value = bytes(value).decode("utf-8")
            except UnicodeDecodeError:
                raise RequestError(f"form field {key!a} is binary; send several images as JSON or v2") from None
        options[key] = value
    return PlainRequest([bytes(files[name])], options)


def detection_entries(detections: Detections, names: list[str]) -> list[dict[str, Any]]:
    """Boxes in original-image pixels, sorted by score; ``track_id`` where the detections were tracked."""
    entries = [
        {
            "box": [round(float(v), 2) for v in box],
            "score": round(float(score), 5),
            "class_id": int(class_id),
            "class_name": names[class_id],
        }
        for box, score, class_id in zip(detections.boxes, detections.scores, detections.class_ids)
    ]
    if detections.track_ids is not None:
        for entry, track_id in zip(entries, detections.track_ids):
            entry["track_id"] = int(track_id)
    return entries


def result_json(result: ImageResult, names: list[str]) -> dict[str, Any]:
    return {"image_size": list(result.size), "detections": detection_entries(result.detections, names)}


@dataclass
class JsonAnswer(Answer):
    """``{"model", "image_size", "detections"}``; with ``many``, ``{"model", "results": [...]}`` where an image that
    failed gets ``{"error", "status"}``."""

    many: bool = False

    def render(self, results: list[Result], model: Model) -> Response:
        if self.many:
            entries = [
                {"error": r.message, "status": r.status} if isinstance(r, RequestError) else result_json(r, model.names)
                for r in results
            ]
            answer = {"model": model.name, "results": entries}
        else:
            answer = {"model": model.name, **result_json(results[0], model.names)}
        return Response(json.dumps(answer, separators=(",", ":")))


class PictureAnswer(Answer):
    """The image with its detections drawn on it, as a JPEG."""

    keeps_pixels = True

    def render(self, results: list[Result], model: Model) -> Response:
        (result,) = results
        picture = draw_detections(result.pixels, result.detections, model.names)
        return Response(encode_jpeg(picture), content_type="image/jpeg")
