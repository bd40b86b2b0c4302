"""TorchServe's gRPC APIs for YOLO-NAS: inference (one image, or a sequence of frames on one stream) and management.

    python scripts/grpc_client.py predict IMAGE... [--model yolo_nas_s] [--conf 0.5] [--classes person,car] [--save OUT]
    python scripts/grpc_client.py stream FRAME... --model yolo_nas_s_stream     # needs a sequence-batching archive
    python scripts/grpc_client.py register yolo_nas_m.mar [--name NAME] [--workers 1] [--batch-size 4]
    python scripts/grpc_client.py scale yolo_nas_s --workers 2
    python scripts/grpc_client.py describe yolo_nas_s
    python scripts/grpc_client.py list
    python scripts/grpc_client.py unregister yolo_nas_m

The stubs are generated from the installed TorchServe (``python scripts/gen_grpc.py`` writes
``yolonas_tools/generated/``); keys and options travel as ``yolonas_tools/serve/clients.py`` describes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import grpc

from yolonas_tools.paths import RUN_DIR
from yolonas_tools.serve.clients import Endpoints, add_request_arguments, print_table, request_options
from yolonas_tools.serve.grpc_client import GrpcClient, PredictionError


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
    return {**request_options(args), "format": "jpeg" if args.save else None}


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
