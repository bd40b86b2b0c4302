"""What the protocols share: request limits, the parsed request and the answer it chooses, an image's result and
the response it becomes."""

from __future__ import annotations

import base64
import binascii
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import RequestError
from ..options import RequestOptions
from ..postprocess import Detections


@dataclass(frozen=True)
class RequestLimits:
    """Per request (one TorchServe request may hold several images)."""

    max_images: int = 16
    max_bytes: int = 20 * 1024 * 1024  # all images' encoded bytes together


DEFAULT_LIMITS = RequestLimits()


@dataclass(frozen=True)
class Model:
    """What an answer names: the model as registered, its version and its class names."""

    name: str
    names: list[str]
    version: str = ""


@dataclass
class ImageResult:
    """One image's detections and original (width, height); its pixels when the answer draws them."""

    detections: Detections
    size: tuple[int, int]
    pixels: np.ndarray | None = None


#  An image's result, or the error that stopped it.
Result = ImageResult | RequestError


@dataclass
class Response:
    body: str | bytes
    status: int = 200
    content_type: str = "application/json"
    error: str | None = None
    headers: dict[str, str] = field(default_factory=dict)  # more response headers (the v2 binary extension's)


def error_response(exc: RequestError) -> Response:
    return Response(json.dumps({"error": exc.message}), status=exc.status, error=exc.message)


class Answer(ABC):
    """The form of a request's answer, chosen once from the request and its options."""

    #  The answer draws on the image: keep its pixels at full resolution.
    keeps_pixels: bool = False

    @abstractmethod
    def render(self, results: list[Result], model: Model) -> Response:
        """The response for the request's results, in order (each an image's result or its error)."""


@dataclass
class ParsedRequest(ABC):
    """One TorchServe request: its images in order (an image that could not be read is its RequestError), the raw
    option values they share, by option name, and whether the answer is a list."""

    images: list[bytes | RequestError]
    options: dict[str, Any] = field(default_factory=dict)
    many: bool = False  # answered with one result per image, in order (several images were sent, or a list)
    accept: str | None = None  # the Accept header

    @abstractmethod
    def answer(self, options: RequestOptions) -> Answer:
        """The form of the answer for these checked options; a RequestError when they contradict the request."""


def b64decode(value: Any, where: str) -> bytes:
    if not isinstance(value, str):
        raise RequestError(f"{where} must be a base64 string; got {type(value).__name__}")
    if value.startswith("data:") and "," in value:
        value = value.split(",", 1)[1]  # data URI: data:image/jpeg;base64,...
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{where} is not valid base64") from None


def too_many(count: int, limits: RequestLimits) -> RequestError:
    return RequestError(f"{count} images in one request; at most {limits.max_images}", status=413)


def b64decode_each(values: list[Any], where: str, limits: RequestLimits) -> list[bytes | RequestError]:
    """Each image judged alone: one bad element becomes that image's error."""
    if len(values) > limits.max_images:
        raise too_many(len(values), limits)
    images: list[bytes | RequestError] = []
    for i, value in enumerate(values):
        try:
            images.append(b64decode(value, f"{where}[{i}]"))
        except RequestError as exc:
            images.append(exc)
    return images
