"""The serving chain, free of TorchServe: request -> decode -> preprocess (whole image, or its tiles) -> runtime
batch -> NMS (and the tiles' merge) -> tracking -> answer.

A TorchServe handler, a CLI or an in-process validator all drive the same :class:`Detector`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from .backends import BACKENDS, Backend, build_runtime
from .classes import load_names
from .decode import DecodedImage, DecodeLimits, decode_image
from .errors import RequestError
from .options import RequestOptions, parse_options
from .pipeline import Pipeline
from .postprocess import Detections, NMSOptions, select, to_original
from .protocol.base import Answer, ImageResult, Model, ParsedRequest, Response, Result, error_response
from .protocol.request import parse_request
from .runtime import Runtime, RuntimeBatch
from .settings import HandlerSettings
from .slicing import Tile, full_pass_needed, gather, merge, postprocess_for, tile_grid
from .steps import BoxTransform
from .timing import Timings
from .tracking import SequenceTrackers

#  (height, width) of the grey pictures :meth:`Detector.warm_up` runs.
WARM_UP_SHAPES = ((480, 640), (720, 1280), (640, 640))


@dataclass
class NetworkInput:
    """One forward's input: the image, or one of its tiles, preprocessed; its slot in the runtime batch."""

    tensor: np.ndarray  # [3, h, w] float32
    transform: BoxTransform  # back to the pixels of what was preprocessed (the image, or the tile)
    slot: int = -1


@dataclass
class Prepared:
    """One decoded image waiting for its forward passes: one input, or one per tile (then the whole image's when
    sahi would add it)."""

    inputs: list[NetworkInput]
    options: RequestOptions
    nms: NMSOptions
    size: tuple[int, int]  # (width, height) of the original image
    tiles: list[Tile] | None = None  # sliced: the tiles, in the order of ``inputs``
    pixels: np.ndarray | None = None  # kept only when the answer draws on it


@dataclass
class Detector:
    runtime: Runtime
    pipeline: Pipeline
    model: Model
    settings: HandlerSettings = field(default_factory=HandlerSettings)
    backend: Backend = BACKENDS["torch"]  # the row that runs (auto resolved)
    trackers: SequenceTrackers | None = None

    @classmethod
    def from_settings(
        cls,
        settings: HandlerSettings,
        weights: str,
        names: list[str],
        model_name: str,
        device: str = "cpu",
        model_version: str = "",
        trackers: SequenceTrackers | None = None,
    ) -> Detector:
        """The detector an archive describes (its handler settings, weights file and class names)."""
        runtime, backend = build_runtime(settings.backend, weights, settings.variant, settings.num_classes, device)
        pipeline = Pipeline.from_spec(settings.pipeline)
        return cls(runtime, pipeline, Model(model_name, names, model_version), settings, backend, trackers)

    @classmethod
    def from_model_dir(
        cls,
        model_dir: str | Path,
        device: str = "cpu",
        model_name: str | None = None,
        settings: HandlerSettings | None = None,
        trackers: SequenceTrackers | None = None,
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
        name = model_name or manifest["modelName"]
        return cls.from_settings(settings, weights, names, name, device, version, trackers)

    @property
    def names(self) -> list[str]:
        return self.model.names

    def decode(self, data: bytes, full_resolution: bool = False) -> DecodedImage:
        """Decode within the archive's limits; at reduced size where allowed (never for annotated pictures or
        tiles, which need every pixel)."""
        draft_side = self.pipeline.shrinks_to if self.settings.jpeg_draft and not full_resolution else None
        limits = DecodeLimits(self.settings.max_image_bytes, self.settings.max_image_pixels)
        return decode_image(data, limits, min_longest_side=draft_side)

    def prepare(self, data: bytes, options: RequestOptions | Mapping[str, Any] | None = None,
                keep_pixels: bool = False) -> Prepared:  # fmt: skip
        """One image with its options (checked here when given raw, by name), decoded and preprocessed; the tiles'
        inputs too when ``slice`` is set."""
        if not isinstance(options, RequestOptions):
            options = parse_options(options or {}, self.settings.options, self.names)
        sliced = options.slice is not None
        image = self.decode(data, full_resolution=keep_pixels or sliced)
        item = Prepared([], options, options.nms(self.settings.pre_nms_top_k, self.settings.multi_label),
                        image.original_size, pixels=image.pixels if keep_pixels else None)  # fmt: skip
        if not sliced:
            item.inputs.append(NetworkInput(*self.pipeline(image.pixels, image.original_size)))
            return item
        height, width = image.pixels.shape[:2]
        item.tiles = tile_grid(width, height, *options.slice, options.overlap)
        if len(item.tiles) > self.settings.max_tiles:
            raise RequestError(
                f"slice {options.slice[0]}x{options.slice[1]} cuts this {width}x{height} image into {len(item.tiles)} "
                f"tiles; at most {self.settings.max_tiles} (max_tiles): send a larger slice",
                status=413,
            )
        for x0, y0, x1, y1 in item.tiles:
            item.inputs.append(NetworkInput(*self.pipeline(image.pixels[y0:y1, x0:x1])))
        if full_pass_needed(item.tiles) and options.standard_pred:
            item.inputs.append(NetworkInput(*self.pipeline(image.pixels)))
        return item

    def start(self, item: Prepared, batch: RuntimeBatch, timings: Timings) -> None:
        """Put an image's inputs into the runtime batch (started at once where the runtime runs asynchronously)."""
        with timings.stage("inference"):
            batch.expect(len(item.inputs) - 1)  # the batch counted the image as one
            for network_input in item.inputs:
                network_input.slot = batch.add(network_input.tensor)

    def finish(self, item: Prepared, batch: RuntimeBatch, timings: Timings) -> Detections:
        """Wait for an image's outputs and turn them into its detections: NMS per input, and for a sliced image the
        tiles' detections moved onto the image and merged as sahi merges them, then ``max_det`` of the merge."""
        with timings.stage("inference"):
            outputs = [batch.result(network_input.slot) for network_input in item.inputs]
        with timings.stage("postprocess"):
            found = [
                to_original(*select(boxes[0], scores[0], item.nms), network_input.transform)
                for network_input, (boxes, scores) in zip(item.inputs, outputs)
            ]
            if item.tiles is None:
                detections = found[0]
            else:
                count = len(item.tiles)
                gathered = gather(item.tiles, found[:count], found[count] if len(found) > count else None)
                options = item.options
                method, metric = postprocess_for(options.conf, options.merge, options.match_metric)
                merged = merge(gathered, method, metric, options.match_threshold, options.agnostic)
                detections = merged.first(options.max_det)
        timings.detections.append(len(detections))
        return detections

    def detect(self, items: list[Prepared], timings: Timings | None = None) -> list[Detections]:
        """Detections of prepared images, in order, all in one runtime batch."""
        timings = timings if timings is not None else Timings()
        with self.runtime.begin(len(items)) as batch:
            for item in items:
                self.start(item, batch, timings)
            return [self.finish(item, batch, timings) for item in items]

    def warm_up(self, batch_sizes: tuple[int, ...] = (1,)) -> None:
        """Run grey images through the chain so the first requests do not pay for lazy initialisation: one 4:3
        picture, and for a runtime that compiles per input size also a 16:9 one and a square one (each size it
        compiles costs memory, so other shapes compile when first seen)."""
        shapes = WARM_UP_SHAPES if self.runtime.compiles_per_size else WARM_UP_SHAPES[:1]
        nms = self.settings.options.nms(self.settings.pre_nms_top_k, self.settings.multi_label)
        for height, width in shapes:
            grey = np.full((height, width, 3), 114, dtype=np.uint8)
            for size in batch_sizes:
                items = [Prepared([NetworkInput(*self.pipeline(grey))], self.settings.options, nms, (width, height))]
                self.detect(items * size)

    def _request_items(self, parsed: ParsedRequest, options: RequestOptions, answer: Answer, batch: RuntimeBatch,
                       timings: Timings) -> list[Prepared | RequestError]:  # fmt: skip
        """Each image decoded alone, failing alone, and started on the runtime as soon as it is ready."""
        items: list[Prepared | RequestError] = []
        for data in parsed.images:
            try:
                if isinstance(data, RequestError):
                    raise data
                with timings.stage("preprocess"):
                    item = self.prepare(data, options, keep_pixels=answer.keeps_pixels)
            except RequestError as exc:
                items.append(exc)
                continue
            self.start(item, batch, timings)
            items.append(item)
        tiles = [len(item.tiles) for item in items if isinstance(item, Prepared) and item.tiles is not None]
        if tiles:
            timings.tiles.append(sum(tiles))
        return items

    def _track(self, sequence: str, options: RequestOptions, results: list[Result]) -> None:
        """The sequence's next frames: each image's detections get their track ids, in order."""
        for result in results:
            if isinstance(result, ImageResult):
                result.detections.track_ids = self.trackers.update(sequence, result.detections)
        if options.sequence_end:
            self.trackers.end(sequence)

    def handle(
        self, rows: list[dict[str, Any]], headers: list[dict[str, Any]], sequences: list[str | None] | None = None
    ) -> tuple[list[Response], Timings]:
        """A batch of raw TorchServe rows and their headers -> one response per row; a bad row fails alone, and so
        does a bad image among several in one row. Each image starts on the runtime once decoded, and each row is
        answered once its images are done, so decoding and post-processing overlap the forward passes where the
        runtime runs asynchronously. ``sequences``: each row's sequence id, for an archive that tracks."""
        timings = Timings()
        responses: list[Response | None] = [None] * len(rows)
        requests: dict[int, tuple[ParsedRequest, RequestOptions, Answer]] = {}
        for i, row in enumerate(rows):
            try:
                with timings.stage("preprocess"):
                    parsed = parse_request(row, headers[i], self.settings.request_limits())
                    options = parse_options(parsed.options, self.settings.options, self.names)
                    requests[i] = (parsed, options, parsed.answer(options))
            except RequestError as exc:
                responses[i] = error_response(exc)
        with self.runtime.begin(sum(len(parsed.images) for parsed, _, _ in requests.values())) as batch:
            started = {i: self._request_items(*request, batch, timings) for i, request in requests.items()}
            for i, (parsed, options, answer) in requests.items():
                results: list[Result] = [
                    ImageResult(self.finish(item, batch, timings), item.size, item.pixels)
                    if isinstance(item, Prepared)
                    else item
                    for item in started[i]
                ]
                try:
                    if not parsed.many and isinstance(results[0], RequestError):
                        raise results[0]
                    sequence = sequences[i] if sequences else None
                    with timings.stage("postprocess"):
                        if self.trackers is not None and sequence:
                            self._track(sequence, options, results)
                        responses[i] = answer.render(results, self.model)
                except RequestError as exc:
                    responses[i] = error_response(exc)
        return responses, timings  # type: ignore[return-value]
