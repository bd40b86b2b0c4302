"""The serving chain, free of TorchServe: request -> decode -> preprocess -> batch -> runtime -> NMS -> response.

A TorchServe handler, a CLI or an in-process validator all drive the same :class:`Detector`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from .classes import load_names
from .decode import DecodedImage, DecodeLimits, decode_image
from .draw import draw_detections, encode_jpeg
from .envelope import (
    ImageRequest,
    ImageResult,
    ParsedRequest,
    RequestLimits,
    parse_options,
    parse_request,
    render_json,
    render_json_many,
    render_v2,
)
from .errors import RequestError
from .pipeline import BoxTransform, Pipeline
from .postprocess import Detections, NMSOptions, postprocess
from .runtime import Forward, RuntimeBatch, begin_batch, build_runtime
from .settings import HandlerSettings

#  (height, width) of the grey pictures :meth:`Detector.warm_up` runs.
WARM_UP_SHAPES = ((480, 640), (720, 1280), (640, 640))


@dataclass
class Prepared:
    """One decoded, preprocessed request, waiting for the forward pass."""

    tensor: np.ndarray  # [3, h, w] float32
    transform: BoxTransform
    options: NMSOptions
    response_format: str
    image: np.ndarray | None = None  # kept only when the response is a picture
    slot: int = -1  # its place in the runtime batch once started


@dataclass
class Response:
    body: str | bytes
    status: int = 200
    content_type: str = "application/json"
    error: str | None = None
    headers: dict[str, str] = field(default_factory=dict)  # more response headers (the v2 binary extension's)


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
    runtime: Forward
    pipeline: Pipeline
    names: list[str]
    model_name: str
    model_version: str = ""
    defaults: NMSOptions = NMSOptions()
    limits: DecodeLimits = DecodeLimits()
    jpeg_draft: bool = True  # decode large JPEGs at reduced size when the pipeline shrinks them anyway
    request_limits: RequestLimits = RequestLimits()

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
            request_limits=settings.request_limits(),
        )

    @classmethod
    def from_model_dir(
        cls,
        model_dir: str | Path,
        device: str = "cpu",
        model_name: str | None = None,
        settings: HandlerSettings | None = None,
    ) -> Detector:
        """The detector an extracted archive describes, as a TorchServe worker builds it: the weights file, name and
        version its MAR-INF/MANIFEST.json names, its class names and ``settings``, by default the ``handler:``
        section of its model-config.yaml (the defaults where it has none). ``model_name`` is the name it was
        registered under, the manifest's by default. Threads follow torch's current setting."""
        folder = Path(model_dir)
        manifest = json.loads((folder / "MAR-INF" / "MANIFEST.json").read_text())["model"]
        if settings is None:
            config_file = folder / manifest.get("configFile", "model-config.yaml")
            config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else None
            settings = HandlerSettings.from_config((config or {}).get("handler"))
        names = load_names(folder, settings.num_classes)
        weights = str(folder / manifest["serializedFile"])
        version = str(manifest.get("modelVersion", ""))
        return cls.from_settings(settings, weights, names, model_name or manifest["modelName"], device, version)

    def decode(self, data: bytes, response_format: str = "json") -> DecodedImage:
        """Decode within the archive's limits; at reduced size where allowed (never for annotated pictures)."""
        draft_side = self.pipeline.shrinks_to if self.jpeg_draft and response_format == "json" else None
        return decode_image(data, self.limits, min_longest_side=draft_side)

    def prepare(self, request: ImageRequest, accept: str | None = None) -> Prepared:
        options, response_format = parse_options(request.options, self.defaults, self.names, accept)
        return self.prepare_image(request.image, options, response_format)

    def prepare_image(self, data: bytes, options: NMSOptions, response_format: str) -> Prepared:
        image = self.decode(data, response_format)
        tensor, transform = self.pipeline(image.pixels, image.original_size)
        keep = image.pixels if response_format == "jpeg" else None
        return Prepared(tensor, transform, options, response_format, keep)

    def _prepare_request(
        self, parsed: ParsedRequest, accept: str | None, batch: RuntimeBatch, timings: Timings
    ) -> list[Prepared | RequestError]:
        """Options hold for the whole request; each image is decoded alone, may fail alone, and starts on the
        runtime as soon as it is ready. Starting it waits while every stream is busy: that counts as inference."""
        if parsed.v2 is not None:
            accept = None  # a v2 client may accept anything; its answer is always v2 tensors
        options, response_format = parse_options(parsed.options, self.defaults, self.names, accept)
        if parsed.many and response_format == "jpeg":
            raise RequestError("an annotated picture answers one image; send several images for JSON answers")
        if parsed.v2 is not None and response_format == "jpeg":
            raise RequestError("a v2 request is answered with tensors; ask for an annotated picture without v2")
        items: list[Prepared | RequestError] = []
        for data in parsed.images:
            try:
                if isinstance(data, RequestError):
                    raise data
                item = self.prepare_image(data, options, response_format)
            except RequestError as exc:
                items.append(exc)
                continue
            started = time.perf_counter()
            item.slot = batch.add(item.tensor)
            timings.inference_ms += (time.perf_counter() - started) * 1000
            items.append(item)
        if not parsed.many and isinstance(items[0], RequestError):
            raise items[0]
        return items

    def _finish(self, batch: RuntimeBatch, item: Prepared, timings: Timings) -> Detections:
        """Wait for one image's outputs and turn them into its detections."""
        start = time.perf_counter()
        boxes, scores = batch.result(item.slot)
        middle = time.perf_counter()
        (found,) = postprocess(boxes, scores, [item.transform], [item.options])
        timings.inference_ms += (middle - start) * 1000
        timings.postprocess_ms += (time.perf_counter() - middle) * 1000
        timings.detections.append(len(found))
        return found

    def detect(self, items: list[Prepared], timings: Timings | None = None) -> list[Detections]:
        """Detections of prepared images, in order (one forward per distinct input shape where the runtime batches;
        image by image on OpenVINO's streams)."""
        timings = timings if timings is not None else Timings()
        with begin_batch(self.runtime, len(items)) as batch:
            for item in items:
                item.slot = batch.add(item.tensor)
            return [self._finish(batch, item, timings) for item in items]

    def warm_up(self, batch_sizes: tuple[int, ...] = (1,)) -> None:
        """Run grey images through the chain so the first requests do not pay for lazy initialisation: one 4:3
        picture, and for a runtime that compiles per input size also a 16:9 one and a square one (each size it
        compiles costs memory, so other shapes compile when first seen)."""
        shapes = WARM_UP_SHAPES if getattr(self.runtime, "compiles_per_size", False) else WARM_UP_SHAPES[:1]
        for height, width in shapes:
            tensor, transform = self.pipeline(np.full((height, width, 3), 114, dtype=np.uint8))
            for size in batch_sizes:
                self.detect([Prepared(tensor, transform, self.defaults, "json")] * size)

    def render(
        self, parsed: ParsedRequest, items: list[Prepared | RequestError], results: list[ImageResult]
    ) -> Response:
        """One request's answer: an annotated picture, v2 outputs, or JSON (one result, or one per image)."""
        first = items[0]
        if isinstance(first, Prepared) and first.response_format == "jpeg":
            picture = draw_detections(first.image, results[0][0], self.names)
            return Response(encode_jpeg(picture), content_type="image/jpeg")
        if parsed.v2 is not None:
            body, headers = render_v2(self.model_name, results, self.names, parsed.v2, parsed.many, self.model_version)
            return Response(body, content_type=headers.pop("content-type"), headers=headers)
        if parsed.many:
            answer = render_json_many(self.model_name, results, self.names)
        else:
            detections, size = results[0]
            answer = render_json(self.model_name, detections, self.names, size)
        return Response(json.dumps(answer, separators=(",", ":")))

    def handle(self, rows: list[dict[str, Any]], headers: list[dict[str, Any]]) -> tuple[list[Response], Timings]:
        """A batch of raw TorchServe rows and their headers -> one response per row; a bad row fails alone, and so
        does a bad image among several in one row. Each image starts on the runtime once decoded, and each row is
        answered once its images are done, so decoding and post-processing overlap the forward passes where the
        runtime runs asynchronously. The stage times are those of this thread: inference is the time it waited."""
        timings = Timings()
        responses: list[Response | None] = [None] * len(rows)
        parsed_rows: dict[int, tuple[ParsedRequest, str | None]] = {}
        for i, row in enumerate(rows):
            try:
                accept = next((v for k, v in headers[i].items() if k.lower() == "accept"), None)
                parsed_rows[i] = (parse_request(row, headers[i], self.request_limits), accept)
            except RequestError as exc:
                responses[i] = error_response(exc)
        requests: dict[int, tuple[ParsedRequest, list[Prepared | RequestError]]] = {}
        with begin_batch(self.runtime, sum(len(parsed.images) for parsed, _ in parsed_rows.values())) as batch:
            start = time.perf_counter()
            for i, (parsed, accept) in parsed_rows.items():
                try:
                    requests[i] = (parsed, self._prepare_request(parsed, accept, batch, timings))
                except RequestError as exc:
                    responses[i] = error_response(exc)
            # So far inference_ms holds only the waits for a free stream while the images started.
            timings.preprocess_ms = (time.perf_counter() - start) * 1000 - timings.inference_ms
            for i, (parsed, items) in requests.items():
                results: list[ImageResult] = [
                    (self._finish(batch, item, timings), item.transform.original_size)
                    if isinstance(item, Prepared)
                    else item
                    for item in items
                ]
                start = time.perf_counter()
                responses[i] = self.render(parsed, items, results)
                timings.postprocess_ms += (time.perf_counter() - start) * 1000
        return responses, timings  # type: ignore[return-value]
