"""Start, stop and inspect TorchServe with this repo's config.properties.

    python scripts/server.py start [MODEL ...|all] [--foreground] [--renew-margin-min M]   # serve.sh start wraps this
    python scripts/server.py stop
    python scripts/server.py status
    python scripts/server.py renewer                # start the key renewer again, should it ever be gone

Each server gets its own working folder (default ``run/``): TMPDIR (TorchServe keeps one PID file per TMPDIR), logs,
the key file TorchServe writes at start, and ``server.json`` with its addresses for the other scripts. Beside
TorchServe runs scripts/key_renewer.py, which renews the keys before they expire (``renewer.pid``,
``logs/renewer.log``). ``stop`` ends both, workers included. ``--foreground`` (the Docker image) stays attached and
stops everything on SIGTERM or when TorchServe exits. Tests start servers the same way on free ports in temporary
folders.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import requests

from yolonas_tools.paths import MODEL_STORE, RUN_DIR
from yolonas_tools.serve.clients import Endpoints, NoServerError
from yolonas_tools.serve.keys import KeyFileError
from yolonas_tools.serve.server import (
    ServerError,
    key_status,
    renewer_status,
    start,
    start_renewer,
    status,
    stop,
    wait_in_foreground,
)


def _print_usage(endpoints: Endpoints, models: list[str]) -> None:
    name = Path(models[0]).stem if models and models != ["all"] else "yolo_nas_s"
    print(
        f"TorchServe is up: inference {endpoints.inference}, management {endpoints.management}, "
        f"metrics {endpoints.metrics}/metrics, gRPC {endpoints.grpc_inference} / {endpoints.grpc_management}"
    )
    key_file = endpoints.run_dir / "key_file.json"
    print(f"Keys are in {key_file}. For example:")
    print(f"  python scripts/predict.py IMAGE --model {name}")
    print(f"  KEY=$(python -c \"import json; print(json.load(open('{key_file}'))['inference']['key'])\")")
    print(
        f'  curl -H "Authorization: Bearer $KEY" -H "Content-Type: image/jpeg" --data-binary @IMAGE '
        f"{endpoints.inference}/predictions/{name}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["start", "stop", "status", "renewer"])
    parser.add_argument("models", nargs="*", help="archives in the model store to register at start (name or name.mar; "
                        "all: every archive)")  # fmt: skip
    parser.add_argument("--run-dir", type=Path, default=RUN_DIR)
    parser.add_argument("--model-store", type=Path, default=MODEL_STORE)
    parser.add_argument("--renew-margin-min", type=float, help="renew keys this long before they expire (default: "
                        "$YOLONAS_RENEW_MARGIN_MIN, else 10 or token_expiration_min / 2 if smaller)")  # fmt: skip
    parser.add_argument("--foreground", action="store_true", help="start: stay attached until stopped (containers)")
    args = parser.parse_intermixed_args(argv)  # "start --run-dir DIR MODEL" as well as "--run-dir DIR start MODEL"
    try:
        if args.command == "start":
            missing = [
                m
                for m in args.models
                if m != "all" and not (args.model_store / (m if m.endswith(".mar") else f"{m}.mar")).is_file()
            ]
            if missing:
                raise ServerError(f"no archive for {missing} in {args.model_store}: build it with scripts/archive.py")
            endpoints = start(args.run_dir, args.model_store, args.models, renew_margin_min=args.renew_margin_min)
            _print_usage(endpoints, args.models)
            if args.foreground:
                sys.stdout.flush()
                return wait_in_foreground(args.run_dir)
        elif args.command == "stop":
            print("stopped" if stop(args.run_dir) else "no server was running")
        elif args.command == "renewer":
            healthy, line = renewer_status(args.run_dir.resolve())
            if healthy:
                print(f"already running: {line}")
            else:
                print(f"key renewer started (pid {start_renewer(args.run_dir, args.renew_margin_min)})")
        else:
            for line in key_status(args.run_dir):
                print(line)
            for model in status(Endpoints.load(args.run_dir)):
                workers = ", ".join(f"{w['id']} {w['status']}" for w in model.get("workers", []))
                print(
                    f"{model['modelName']} v{model['modelVersion']}: batch {model['batchSize']}, "
                    f"delay {model['maxBatchDelay']} ms, workers [{workers}]"
                )
    except (ServerError, NoServerError, KeyFileError, requests.RequestException) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
