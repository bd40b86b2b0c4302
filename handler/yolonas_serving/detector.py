"""The serving chain, free of TorchServe: request -> decode -> preprocess -> batch -> runtime -> NMS -> response.

A TorchServe handler, a CLI or an in-process validator all drive the same :class:`Detector`.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .decode import DecodedImage, DecodeLimits, decode_image
from .draw import draw_detections, encode_jpeg
from .errors import RequestError
from .pipeline import BoxTransform, Pipeline
from .postprocess import Detections, NMSOptions, postprocess
from .protocol import ImageRequest, parse_options, parse_request, render_json, render_v2
from .runtime import build_runtime
from .settings import HandlerSettings

Runtime = Callable[[np.ndarray], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Prepared:
    """One decoded, preprocessed request, waiting for the forward pass."""

    tensor: np.ndarray  # [3, h, w] float32
    transform: BoxTransform
    options: NMSOptions
    response_format: str
    request: ImageRequest
    image: np.ndarray | None = None  # kept only when the response is a picture


@dataclass
class Response:
    body: str | bytes
    status: int = 200
    content_type: str = "application/json"
    error: str | None = None


@dataclass
class Timings:
    preprocess_ms: float = 0.0
    inference_ms: float = 0.0
    postprocess_ms: float = 0.0
    detections: list[int] = field(default_factory=list)


def error_response(exc: RequestError) -> Response:
    return Response(json.dumps({"error": exc.message}), status=exc.status, error=exc.message)


@dataclass
class Detector:
    runtime: Runtime
    pipeline: Pipeline
    names: list[str]
    model_name: str
    model_version: str = ""
    defaults: NMSOptions = NMSOptions()
    limits: DecodeLimits = DecodeLimits()
    jpeg_draft: bool = True  # decode large JPEGs at reduced size when the pipeline shrinks them anyway

    @classmethod
    def from_settings(
        cls,
        settings: HandlerSettings,
        weights: str,
        names: list[str],
        model_name: str,
        device: str = "cpu",
        model_version: str = "",
    ) -> Detector:
        """The detector an archive describes (its handler settings, weights file and class names)."""
        runtime = build_runtime(settings.backend, weights, settings.variant, settings.num_classes, device)
        return cls(
            runtime=runtime,
            pipeline=Pipeline.from_spec(settings.pipeline),
            names=names,
            model_name=model_name,
            model_version=model_version,
            defaults=settings.nms_options(),
            limits=settings.decode_limits(),
            jpeg_draft=settings.jpeg_draft,
        )

    def decode(self, data: bytes, response_format: str = "json") -> DecodedImage:
        """Decode within the archive's limits; at reduced size where allowed (never for annotated pictures)."""
        draft_side = self.pipeline.shrinks_to if self.jpeg_draft and response_format == "json" else None
        return decode_image(data, self.limits, min_longest_side=draft_side)

    def prepare(self, request: ImageRequest, accept: str | None = None) -> Prepared:
        options, response_format = parse_options(request.options, self.defaults, self.names, accept)
        image = self.decode(request.image, response_format)
        tensor, transform = self.pipeline(image.pixels, image.original_size)
        keep = image.pixels if response_format == "jpeg" else None
        return Prepared(tensor, transform, options, response_format, request, keep)

    def detect(self, items: list[Prepared], timings: Timings | None = None) -> list[Detections]:
        """One forward pass per distinct input shape (one in all for fixed-size pipelines)."""
        timings = timings if timings is not None else Timings()
        results: list[Detections | None] = [None] * len(items)
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, item in enumerate(items):
            groups[item.tensor.shape].append(i)
        for indices in groups.values():
            start = time.perf_counter()
            boxes, scores = self.runtime(np.stack([items[i].tensor for i in indices]))
            middle = time.perf_counter()
            detections = postprocess(
                boxes, scores, [items[i].transform for i in indices], [items[i].options for i in indices]
            )
            timings.inference_ms += (middle - start) * 1000
            timings.postprocess_ms += (time.perf_counter() - middle) * 1000
            for i, d in zip(indices, detections):
                results[i] = d
        return results  # type: ignore[return-value]

    def warm_up(self, batch_sizes: tuple[int, ...] = (1,)) -> None:
        """Run grey images through the chain so the first requests do not pay for lazy initialisation."""
        tensor, transform = self.pipeline(np.full((480, 640, 3), 114, dtype=np.uint8))
        request = ImageRequest(b"")
        for size in batch_sizes:
            self.detect([Prepared(tensor, transform, self.defaults, "json", request)] * size)

    def render(self, item: Prepared, detections: Detections) -> Response:
        size = item.transform.original_size
        if item.response_format == "jpeg":
            picture = draw_detections(item.image, detections, self.names)
            return Response(encode_jpeg(picture), content_type="image/jpeg")
        if item.request.v2:
            body = render_v2(self.model_name, detections, self.names, size, item.request.request_id, self.model_version)
        else:
            body = render_json(self.model_name, detections, self.names, size)
        return Response(json.dumps(body, separators=(",", ":")))

    def handle(self, rows: list[dict[str, Any]], headers: list[dict[str, Any]]) -> tuple[list[Response], Timings]:
        """A batch of raw TorchServe rows and their headers -> one response per row; a bad row fails alone."""
        timings = Timings()
        responses: list[Response | None] = [None] * len(rows)
        prepared: dict[int, Prepared] = {}
        start = time.perf_counter()
        for i, row in enumerate(rows):
            try:
                accept = next((v for k, v in headers[i].items() if k.lower() == "accept"), None)
                prepared[i] = self.prepare(parse_request(row, headers[i]), accept)
            except RequestError as exc:
                responses[i] = error_response(exc)
        timings.preprocess_ms = (time.perf_counter() - start) * 1000
        if prepared:
            order = list(prepared)
            detections = self.detect([prepared[i] for i in order], timings)
            start = time.perf_counter()
            for i, d in zip(order, detections):
                responses[i] = self.render(prepared[i], d)
                timings.detections.append(len(d))
            timings.postprocess_ms += (time.perf_counter() - start) * 1000
        return responses, timings  # type: ignore[return-value]
