"""TorchServe's gRPC APIs: inference (one image, or a sequence of frames on one stream) and management.

The stubs are generated at setup (``yolonas_tools.generated``); keys travel as ``authorization`` metadata, and a call
whose key was refused is retried once with the renewed key (``clients.with_key``). Options (conf, iou, max_det,
classes, format) travel as extra entries of the request's input map beside the image under ``data``: the handler
sees them like multipart form fields. gRPC metadata never reaches the handler.
"""

from __future__ import annotations

import itertools
import json
import queue
import uuid
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import grpc

from yolonas_tools.generated import inference_pb2, inference_pb2_grpc, management_pb2, management_pb2_grpc
from yolonas_tools.serve.clients import Endpoints, grpc_call, with_key

#  Match max_request_size / max_response_size in config.properties (gRPC's own default is 4 MB).
MAX_MESSAGE_BYTES = 20 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


class PredictionError(RuntimeError):
    """The handler refused a request. TorchServe's gRPC API answers such per-request errors with status OK and the
    handler's ``{"error": ...}`` body, so the client looks at the body."""


def option_inputs(options: Mapping[str, Any] | None) -> dict[str, bytes]:
    """Request options as input-map entries; lists (classes) become comma-separated text."""
    inputs = {}
    for name, value in (options or {}).items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        inputs[name] = str(value).encode()
    return inputs


def _checked(body: bytes) -> bytes:
    if body.startswith(b'{"error"'):
        raise PredictionError(json.loads(body)["error"])
    return body


class GrpcClient:
    """One channel per API, reused across calls; use as a context manager or call close()."""

    def __init__(self, endpoints: Endpoints, timeout: float = 120.0):
        self.endpoints = endpoints
        self.timeout = timeout
        self._channels = [
            grpc.insecure_channel(endpoints.grpc_inference, options=CHANNEL_OPTIONS),
            grpc.insecure_channel(endpoints.grpc_management),
        ]
        self.inference = inference_pb2_grpc.InferenceAPIsServiceStub(self._channels[0])
        self.management = management_pb2_grpc.ManagementAPIsServiceStub(self._channels[1])

    def __enter__(self) -> GrpcClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until both channels connect: TorchServe opens its gRPC ports after REST, and after the models it
        loads at start."""
        for channel in self._channels:
            grpc.channel_ready_future(channel).result(timeout=timeout)

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    # Inference

    def predict(self, model: str, image: bytes, options: Mapping[str, Any] | None = None, version: str = "") -> bytes:
        """One image -> the handler's response body: detections as JSON, or a JPEG with ``format="jpeg"``."""
        request = inference_pb2.PredictionsRequest(
            model_name=model, model_version=version, input={"data": image, **option_inputs(options)}
        )
        reply = grpc_call(self.endpoints, "inference", self.inference.Predictions, request, timeout=self.timeout)
        return _checked(reply.prediction)

    def stream(
        self,
        model: str,
        frames: Iterable[bytes | tuple[bytes, Mapping[str, Any]]],
        options: Mapping[str, Any] | None = None,
        sequence_id: str | None = None,
        check: bool = True,
    ) -> Iterator[bytes]:
        """Frames over one bidirectional StreamPredictions2 call, one response body per frame, in order.

        The model must be archived with sequence batching (``sequenceBatching: true`` and ``sequenceMaxIdleMSec`` in
        its model-config.yaml); TorchServe 0.12 fails the call otherwise. Frames go in lock-step, the next one as soon
        as the previous answer arrives: replies carry neither the sequence id nor a request id, and TorchServe ends
        the response stream as soon as the client stops sending, dropping answers still in flight.

        A frame may come with options of its own, ``(frame, {"sequence_end": "true"})``, added to ``options`` for it
        alone. ``check=False`` yields a frame the handler refused (its ``{"error": ...}`` body) and goes on with the
        next, as a tracking client does for a corrupt frame; a refusal by TorchServe itself still raises.
        """
        sequence_id = sequence_id or f"yolonas-{uuid.uuid4()}"
        extra = option_inputs(options)
        frames = iter(frames)
        first = next(frames, None)
        if first is None:
            return

        def requests(answered: queue.Queue[bool]) -> Iterator[inference_pb2.PredictionsRequest]:
            for frame in itertools.chain([first], frames):
                data, own = frame if isinstance(frame, tuple) else (frame, None)
                yield inference_pb2.PredictionsRequest(
                    model_name=model, input={"data": data, **extra, **option_inputs(own)}, sequence_id=sequence_id
                )
                if not answered.get():  # False: the call ended early
                    return

        def open_call(key: str) -> tuple[Any, Any, queue.Queue[bool]]:
            """The call and its first reply: a refused key shows there, when only the first frame was sent."""
            answered: queue.Queue[bool] = queue.Queue()
            call = self.inference.StreamPredictions2(requests(answered), metadata=(("authorization", f"Bearer {key}"),))
            try:
                return call, next(call), answered
            except grpc.RpcError:
                answered.put(False)
                call.cancel()
                raise

        call, first_reply, answered = with_key(self.endpoints, "inference", open_call)
        try:
            for reply in itertools.chain([first_reply], call):
                answered.put(True)
                if reply.HasField("status") and reply.status.code != 0:  # google.rpc.Status: 0 is OK
                    raise PredictionError(reply.status.message)
                yield _checked(reply.prediction) if check else reply.prediction
        finally:
            answered.put(False)
            call.cancel()

    # Management

    def _manage(self, rpc: str, request: Any) -> str:
        """The reply's message: JSON text for describe and list, a plain sentence for the others."""
        reply = grpc_call(self.endpoints, "management", getattr(self.management, rpc), request, timeout=self.timeout)
        return reply.msg

    def register(
        self,
        archive: str,
        name: str | None = None,
        workers: int = 1,
        batch_size: int | None = None,
        max_batch_delay: int | None = None,
        response_timeout: int | None = None,
    ) -> str:
        """Register an archive of the model store, synchronously. Unset batch settings come from the archive's
        model-config.yaml (the proto's 0 means unset)."""
        request = management_pb2.RegisterModelRequest(
            url=archive if archive.endswith(".mar") else f"{archive}.mar",
            model_name=name or "",
            initial_workers=workers,
            batch_size=batch_size or 0,
            max_batch_delay=max_batch_delay or 0,
            response_timeout=response_timeout or 0,
            synchronous=True,
        )
        return self._manage("RegisterModel", request)

    def scale(self, name: str, workers: int, version: str = "") -> str:
        """Set the model's worker count (min = max = workers) and wait until it is reached."""
        request = management_pb2.ScaleWorkerRequest(
            model_name=name, model_version=version, min_worker=workers, max_worker=workers, synchronous=True
        )
        return self._manage("ScaleWorker", request)

    def describe(self, name: str, version: str = "") -> list[dict]:
        request = management_pb2.DescribeModelRequest(model_name=name, model_version=version)
        return json.loads(self._manage("DescribeModel", request))

    def list_models(self, page_size: int = 100) -> list[dict]:
        """Every registered model, page by page (a limit of 0, the proto's default, lists nothing)."""
        if page_size < 1:
            raise ValueError(f"page_size must be at least 1; got {page_size}")
        models, token = [], 0
        while True:
            request = management_pb2.ListModelsRequest(limit=page_size, next_page_token=token)
            page = json.loads(self._manage("ListModels", request))
            models += page.get("models", [])
            if "nextPageToken" not in page:
                return models
            token = int(page["nextPageToken"])

    def unregister(self, name: str, version: str = "") -> str:
        return self._manage(
            "UnregisterModel", management_pb2.UnregisterModelRequest(model_name=name, model_version=version)
        )
