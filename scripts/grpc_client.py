"""TorchServe's gRPC APIs for YOLO-NAS: inference (one image, or a sequence of frames on one stream) and management.

    python scripts/grpc_client.py predict IMAGE... [--model yolo_nas_s] [--conf 0.5] [--classes person,car] [--save OUT]
    python scripts/grpc_client.py stream FRAME... --model yolo_nas_s_stream     # needs a sequence-batching archive
    python scripts/grpc_client.py register yolo_nas_m.mar [--name NAME] [--workers 1] [--batch-size 4]
    python scripts/grpc_client.py scale yolo_nas_s --workers 2
    python scripts/grpc_client.py describe yolo_nas_s
    python scripts/grpc_client.py list
    python scripts/grpc_client.py unregister yolo_nas_m

The stubs are generated from the installed TorchServe (``python scripts/gen_grpc.py`` writes ``generated/``); the
keys come from the server's key_file.json and travel as ``authorization`` metadata. Options (conf, iou, max_det,
classes, format) travel as extra entries of the request's input map beside the image under ``data``: the handler
sees them like multipart form fields. gRPC metadata never reaches the handler.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc
from predict import add_request_arguments, print_table  # the REST client's: the JSON is the same

from common import REPO, RUN_DIR, Endpoints

GENERATED = REPO / "generated"
if str(GENERATED) not in sys.path:
    sys.path.insert(0, str(GENERATED))
try:
    import inference_pb2
    import inference_pb2_grpc
    import management_pb2
    import management_pb2_grpc
except ModuleNotFoundError as exc:
    raise SystemExit(f"gRPC stubs not found in {GENERATED} ({exc}): run python scripts/gen_grpc.py") from None

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

    def _metadata(self, kind: str) -> tuple[tuple[str, str], ...]:
        # Read the key on every call: TorchServe regenerates keys when they expire.
        return (("authorization", f"Bearer {self.endpoints.key(kind)}"),)

    # Inference

    def predict(self, model: str, image: bytes, options: Mapping[str, Any] | None = None, version: str = "") -> bytes:
        """One image -> the handler's response body: detections as JSON, or a JPEG with ``format="jpeg"``."""
        request = inference_pb2.PredictionsRequest(
            model_name=model, model_version=version, input={"data": image, **option_inputs(options)}
        )
        reply = self.inference.Predictions(request, metadata=self._metadata("inference"), timeout=self.timeout)
        return _checked(reply.prediction)

    def stream(
        self,
        model: str,
        frames: Iterable[bytes],
        options: Mapping[str, Any] | None = None,
        sequence_id: str | None = None,
    ) -> Iterator[bytes]:
        """Frames over one bidirectional StreamPredictions2 call, one response body per frame, in order.

        The model must be archived with sequence batching (``sequenceBatching: true`` and ``sequenceMaxIdleMSec`` in
        its model-config.yaml); TorchServe 0.12 fails the call otherwise. Frames go in lock-step, the next one as soon
        as the previous answer arrives: replies carry neither the sequence id nor a request id, and TorchServe ends
        the response stream as soon as the client stops sending, dropping answers still in flight.
        """
        sequence_id = sequence_id or f"yolonas-{uuid.uuid4()}"
        extra = option_inputs(options)
        answered: queue.Queue[bool] = queue.Queue()

        def requests() -> Iterator[inference_pb2.PredictionsRequest]:
            for frame in frames:
                yield inference_pb2.PredictionsRequest(
                    model_name=model, input={"data": frame, **extra}, sequence_id=sequence_id
                )
                if not answered.get():  # False: the call ended early
                    return

        call = self.inference.StreamPredictions2(requests(), metadata=self._metadata("inference"))
        try:
            for reply in call:
                answered.put(True)
                if reply.HasField("status") and reply.status.code != 0:  # google.rpc.Status: 0 is OK
                    raise PredictionError(reply.status.message)
                yield _checked(reply.prediction)
        finally:
            answered.put(False)
            call.cancel()

    # Management

    def _manage(self, rpc: str, request: Any) -> str:
        """The reply's message: JSON text for describe and list, a plain sentence for the others."""
        reply = getattr(self.management, rpc)(request, metadata=self._metadata("management"), timeout=self.timeout)
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


def _print_result(label: str, body: bytes, args: argparse.Namespace, count: int) -> None:
    if args.save:
        target = args.save / f"{Path(label).stem}_annotated.jpg" if count > 1 else args.save
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(body)
        print(f"{label}: annotated picture {target}")
    elif args.json:
        print(body.decode())
    else:
        print_table(Path(label), json.loads(body))


def _options(args: argparse.Namespace) -> dict[str, Any]:
    return {"conf": args.conf, "iou": args.iou, "max_det": args.max_det, "classes": args.classes,
            "format": "jpeg" if args.save else None}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=RUN_DIR, help="the server's working folder (server.json, keys)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per call")
    commands = parser.add_subparsers(dest="command", required=True)
    for command, help_text in (
        ("predict", "one request per image"),
        ("stream", "the images as frames of one sequence"),
    ):
        add_request_arguments(commands.add_parser(command, help=help_text))
    commands.choices["stream"].add_argument("--sequence-id", help="default: a new random id")
    register = commands.add_parser("register", help="register an archive of the model store")
    register.add_argument("archive")
    register.add_argument("--name", help="model name (default: the archive's)")
    register.add_argument("--workers", type=int, default=1)
    register.add_argument("--batch-size", type=int, help="default: the archive's model-config.yaml")
    register.add_argument("--max-batch-delay", type=int, help="milliseconds; default: the archive's")
    scale = commands.add_parser("scale", help="set a model's number of workers")
    scale.add_argument("name")
    scale.add_argument("--workers", type=int, required=True)
    commands.add_parser("describe", help="a model's settings and workers").add_argument("name")
    commands.add_parser("list", help="registered models")
    commands.add_parser("unregister", help="remove a model").add_argument("name")
    return parser.parse_args(argv)


def run(client: GrpcClient, args: argparse.Namespace) -> None:
    if args.command == "predict":
        for image in args.images:
            _print_result(
                str(image), client.predict(args.model, image.read_bytes(), _options(args)), args, len(args.images)
            )
    elif args.command == "stream":
        frames = (image.read_bytes() for image in args.images)
        replies = client.stream(args.model, frames, _options(args), args.sequence_id)
        for image, body in zip(args.images, replies):
            _print_result(str(image), body, args, len(args.images))
    elif args.command == "register":
        print(client.register(args.archive, args.name, args.workers, args.batch_size, args.max_batch_delay))
    elif args.command == "scale":
        print(client.scale(args.name, args.workers))
    elif args.command == "describe":
        print(json.dumps(client.describe(args.name), indent=2))
    elif args.command == "list":
        for model in client.list_models():
            print(f"{model['modelName']}\t{model['modelUrl']}")
    else:
        print(client.unregister(args.name))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with GrpcClient(Endpoints.load(args.run_dir), args.timeout) as client:
        try:
            run(client, args)
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
        except PredictionError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
