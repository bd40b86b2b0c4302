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

from yolonas_serving.detector import Detector, Timings
from yolonas_serving.settings import HandlerSettings

logger = logging.getLogger(__name__)


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
        self.detector = Detector.from_model_dir(model_dir, device, context.model_name, settings)
        if not self.detector.runtime.uses_torch_threads:
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
        responses, timings = self.detector.handle(data, headers)
        for i, response in enumerate(responses):
            context.set_response_content_type(i, response.content_type)
            for key, value in response.headers.items():  # TorchServe 0.12 sends these on as HTTP headers
                context.set_response_header(i, key, value)
            if response.status != 200:
                context.set_response_status(response.status, _reason_phrase(response.error), idx=i)
        _record_metrics(context.metrics, len(data), timings, time.perf_counter() - start)
        return [response.body for response in responses]


def _reason_phrase(message: str | None) -> str:
    """TorchServe 0.12 frames the reason phrase by its length in characters, not bytes: a non-ASCII phrase corrupts
    the reply and kills the worker. Escape it (the JSON body keeps the message as it is)."""
    return (message or "").encode("ascii", "backslashreplace").decode("ascii")


def _record_metrics(metrics: Any, batch_size: int, timings: Timings, handler_s: float) -> None:
    """Stage times per batch and the handler's time per answered image as histograms in seconds (TorchServe's
    frontend exports them with Prometheus' default buckets, see metrics.yaml); batch size as a gauge; images and
    detections as counters (their ratio is the mean number of detections per image)."""
    histogram = MetricTypes.HISTOGRAM
    metrics.add_time("YoloNASPreprocessSeconds", timings.preprocess_ms / 1000, unit="s", metric_type=histogram)
    metrics.add_time("YoloNASInferenceSeconds", timings.inference_ms / 1000, unit="s", metric_type=histogram)
    metrics.add_time("YoloNASPostprocessSeconds", timings.postprocess_ms / 1000, unit="s", metric_type=histogram)
    for _ in timings.detections:
        metrics.add_time("YoloNASImageSeconds", handler_s, unit="s", metric_type=histogram)
    metrics.add_metric("YoloNASBatchSize", batch_size, unit="count", metric_type=MetricTypes.GAUGE)
    metrics.add_counter("YoloNASImages", len(timings.detections))
    metrics.add_counter("YoloNASDetections", sum(timings.detections))
