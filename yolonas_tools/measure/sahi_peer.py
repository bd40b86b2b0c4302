"""sahi's own sliced inference against our server: a ``sahi`` DetectionModel whose inference is one request to
TorchServe per tile, so ``sahi.predict.get_sliced_prediction`` cuts, shifts and merges while the served model
detects. The tests compare it with the server's own sliced answer (lossless PNG tiles: the same pixels); bench.py
--sliced times it as a client would run it (JPEG tiles over one keep-alive connection).

sahi is a development dependency (requirements-dev.txt): import this module only where it is installed.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image
from sahi.models.base import DetectionModel
from sahi.predict import get_sliced_prediction
from sahi.prediction import ObjectPrediction
from sahi.utils.compatibility import fix_full_shape_list, fix_shift_amount_list

from yolonas_serving.draw import encode_jpeg
from yolonas_serving.options import RequestOptions, parse_options
from yolonas_tools.measure.load import KeepAliveSession
from yolonas_tools.serve.clients import Endpoints, authorized_request, option_headers

ENCODINGS = {"png": "image/png", "jpeg": "image/jpeg"}
#  Fast zlib level: a tile is encoded per request, and the bytes only cross the loopback.
PNG_COMPRESSION = 1


def encode(pixels: np.ndarray, encoding: str) -> bytes:
    """An RGB uint8 image as PNG (lossless) or JPEG (quality 90, as the bench's pictures)."""
    image = Image.fromarray(pixels)
    if encoding == "jpeg":
        return encode_jpeg(image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=PNG_COMPRESSION)
    return buffer.getvalue()


def tile_options(options: RequestOptions, conf: float) -> dict[str, Any]:
    """The options of one tile's request: the detector's own (a tile is detected as a plain image, never sliced
    again whatever the archive's default) with sahi's threshold for the call."""
    classes = None if options.classes is None else ",".join(map(str, options.classes))
    return {"conf": conf, "iou": options.iou, "max_det": options.max_det, "agnostic": str(options.agnostic).lower(),
            "classes": classes, "slice": "off"}  # fmt: skip


class ServedDetectionModel(DetectionModel):
    """A served model as sahi sees a detector: ``perform_inference`` posts the tile (or the whole image) and keeps
    the detections of the answer; the threshold sahi holds (``confidence_threshold``, which also picks its merge
    below 0.1) goes with each request as ``conf``."""

    def __init__(
        self,
        endpoints: Endpoints,
        model: str,
        options: RequestOptions | None = None,
        encoding: str = "png",
        session: KeepAliveSession | None = None,
    ):
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {list(ENCODINGS)}; got {encoding!r}")
        self.endpoints = endpoints
        self.url = f"{endpoints.inference}/predictions/{model}"
        self.options = options or RequestOptions()
        self.encoding = encoding
        self.session = session or KeepAliveSession()
        self.requests = 0
        super().__init__(confidence_threshold=self.options.conf, device="cpu")

    def load_model(self) -> None:
        self.model = self.url  # nothing to load: the server holds the model

    def perform_inference(self, image: np.ndarray) -> None:
        headers = {"Content-Type": ENCODINGS[self.encoding],
                   **option_headers(tile_options(self.options, self.confidence_threshold))}  # fmt: skip
        response = authorized_request(self.endpoints, "POST", self.url, session=self.session,
                                      data=encode(image, self.encoding), headers=headers, timeout=300)  # fmt: skip
        self.requests += 1
        if response.status_code != 200:
            raise RuntimeError(f"{self.url} answered {response.status_code}: {response.text[:300]}")
        self._original_predictions = json.loads(response.text)["detections"]

    def _create_object_prediction_list_from_original_predictions(
        self,
        shift_amount_list: list[list[int | float]] | None = [[0, 0]],  # noqa: B006 (sahi's signature)
        full_shape_list: list[list[int | float]] | None = None,
    ) -> None:
        # Tiles come as [[x, y]] and [[H, W]], the whole-image pass as flat [0, 0] and [H, W].
        shift_amount = fix_shift_amount_list(shift_amount_list)[0]
        full_shape = (fix_full_shape_list(full_shape_list) or [None])[0]
        self._object_prediction_list_per_image = [
            [
                ObjectPrediction(
                    bbox=[float(v) for v in found["box"]],
                    category_id=int(found["class_id"]),
                    category_name=found["class_name"],
                    score=float(found["score"]),
                    shift_amount=shift_amount,
                    full_shape=full_shape,
                )
                for found in self._original_predictions
            ]
        ]


def sliced_detections(model: ServedDetectionModel, image: np.ndarray) -> list[dict[str, Any]]:
    """``get_sliced_prediction`` of an RGB image with the model's request options translated to sahi's arguments,
    answered in the server's JSON form (``box``, ``score``, ``class_id``, ``class_name``), by score."""
    options = model.options
    if options.slice is None:
        raise ValueError("sliced_detections needs options with a slice size")
    result = get_sliced_prediction(
        image,
        model,
        slice_width=options.slice[0],
        slice_height=options.slice[1],
        overlap_width_ratio=options.overlap,
        overlap_height_ratio=options.overlap,
        perform_standard_pred=options.standard_pred,
        postprocess_type=options.merge.upper(),
        postprocess_match_metric=options.match_metric.upper(),
        postprocess_match_threshold=options.match_threshold,
        postprocess_class_agnostic=options.agnostic,
        verbose=0,
    )
    found = [
        {
            "box": [float(v) for v in p.bbox.to_xyxy()],
            "score": float(p.score.value),
            "class_id": p.category.id,
            "class_name": p.category.name,
        }
        for p in result.object_prediction_list
    ]
    return sorted(found, key=lambda d: -d["score"])


def served_model(endpoints: Endpoints, model: str, options: Mapping[str, Any], names: list[str],
                 encoding: str = "png", session: KeepAliveSession | None = None) -> ServedDetectionModel:  # fmt: skip
    """The adapter for raw request options by name (as a request sends them), checked by the server's own table
    against ``names`` (for ``classes``). Options not given take the table's defaults, not the archive's: to compare
    with an archive that sets its own, send them."""
    return ServedDetectionModel(endpoints, model, parse_options(options, RequestOptions(), names), encoding, session)
