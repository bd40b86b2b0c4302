"""TorchServe handler for YOLO-NAS: a thin shell over yolonas_serving.Detector.

It adapts TorchServe's calling convention (initialize, handle, per-item statuses, metrics) and nothing more; the
archive holds this file, the ``yolonas`` and ``yolonas_serving`` packages, the weights and model-config.yaml.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from ts.metrics.metric_type_enum import MetricTypes

from yolonas_serving.detector import Detector
from yolonas_serving.errors import RequestError
from yolonas_serving.protocol.base import error_response
from yolonas_serving.settings import HandlerSettings
from yolonas_serving.timing import STAGES, Timings
from yolonas_serving.tracking import SequenceTrackers

logger = logging.getLogger(__name__)
#  The request header TorchServe keeps a sequence's id in (gRPC sequence_id, or HTTP's ts_request_sequence_id).
SEQUENCE_HEADER = "ts_request_sequence_id"
#  The worker forgets an idle sequence this long after TorchServe does (its idle clock starts a batch later).
IDLE_MARGIN_S = 5.0


class YoloNASHandler:
    def __init__(self) -> None:
        self.detector: Detector | None = None
        self.initialized = False

    def initialize(self, context: Any) -> None:
        properties = context.system_properties
        model_dir = properties["model_dir"]
        config = context.model_yaml_config or {}
        settings = HandlerSettings.from_config(config.get("handler"))
        threads = settings.threads(int(config.get("maxWorkers", config.get("minWorkers", 1))))
        torch.set_num_threads(threads)
        gpu_id = properties.get("gpu_id")
        device = f"cuda:{gpu_id}" if torch.cuda.is_available() and gpu_id is not None else "cpu"
        trackers = sequence_trackers(settings, config)
        self.detector = Detector.from_model_dir(model_dir, device, context.model_name, settings, trackers)
        if self.detector.backend.own_threads:
            # torch is left with small glue ops (stacking, NMS); with several threads, its idle OpenMP threads would
            # spin on the cores the runtime's own threads compute on.
            torch.set_num_threads(1)
        self.detector.warm_up(tuple(sorted({1, int(properties.get("batch_size") or 1)})))
        logger.info(
            "YOLO-NAS %s ready: backend %s on %s, %d threads", context.model_name, settings.backend, device, threads
        )
        self.initialized = True

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[str | bytes]:
        start = time.perf_counter()
        headers = [context.get_all_request_header(i) for i in range(len(data))]
        tracking = self.detector.trackers is not None
        sequences = [context.get_sequence_id(i) for i in range(len(data))] if tracking else None
        try:
            responses, timings = self.detector.handle(data, headers, sequences)
        except Exception as exc:  # a batch that raises would kill a sequence-batching model for good
            logger.exception("the batch failed")
            failure = error_response(RequestError(f"internal error: {type(exc).__name__}", status=500))
            responses, timings = [failure] * len(data), Timings()
        for i, response in enumerate(responses):
            context.set_response_content_type(i, response.content_type)
            for key, value in response.headers.items():  # TorchServe 0.12 sends these on as HTTP headers
                context.set_response_header(i, key, value)
            if tracking and sequences[i]:  # TorchServe makes up an HTTP sequence's id but does not send it back
                context.set_response_header(i, SEQUENCE_HEADER, sequences[i])
            if response.status != 200:
                context.set_response_status(response.status, _reason_phrase(response.error), idx=i)
        _record_metrics(context.metrics, len(data), timings, time.perf_counter() - start)
        return [response.body for response in responses]


def sequence_trackers(settings: HandlerSettings, config: dict[str, Any]) -> SequenceTrackers | None:
    """One tracker per sequence when the archive tracks. TorchServe bounds the sequences (maxNumSequence) and
    forgets an idle one after sequenceMaxIdleMSec without telling the worker, so the worker forgets it a little
    later by itself; its own bound leaves room for sequences the frontend has forgotten and the worker not yet."""
    tracker = settings.tracker_settings()
    if tracker is None:
        return None
    idle_s = int(config.get("sequenceMaxIdleMSec", 0)) / 1000 + IDLE_MARGIN_S
    return SequenceTrackers(tracker, 2 * int(config.get("maxNumSequence", 1)), idle_s)


def _reason_phrase(message: str | None) -> str:
    """TorchServe 0.12 frames the reason phrase by its length in characters, not bytes: a non-ASCII phrase corrupts
    the reply and kills the worker. Escape it (the JSON body keeps the message as it is)."""
    return (message or "").encode("ascii", "backslashreplace").decode("ascii")


def _record_metrics(metrics: Any, batch_size: int, timings: Timings, handler_s: float) -> None:
    """Stage times per batch and the handler's time per answered image as histograms in seconds (TorchServe's
    frontend exports them with Prometheus' default buckets, see metrics.yaml); the tiles of each sliced request as a
    histogram in hundreds;
    batch size as a gauge; images and detections as counters (their ratio is the mean number of detections per
    image)."""
    histogram = MetricTypes.HISTOGRAM
    for stage in STAGES:
        name = f"YoloNAS{stage.capitalize()}Seconds"
        metrics.add_time(name, timings.ms[stage] / 1000, unit="s", metric_type=histogram)
    for _ in timings.detections:
        metrics.add_time("YoloNASImageSeconds", handler_s, unit="s", metric_type=histogram)
    for tiles in timings.tiles:  # in hundreds: the frontend's fixed buckets (0.005 to 10) then read 0.5 to 1000 tiles
        metrics.add_metric("YoloNASTilesPerRequest", tiles / 100, unit="hundreds", metric_type=histogram)
    metrics.add_metric("YoloNASBatchSize", batch_size, unit="count", metric_type=MetricTypes.GAUGE)
    metrics.add_counter("YoloNASImages", len(timings.detections))
    metrics.add_counter("YoloNASDetections", sum(timings.detections))
