"""Offline batch job: every image of a folder through the running server, resumable, nothing dropped silently.

    python scripts/batch_predict.py FOLDER --model yolo_nas_s --out results.json [--concurrency 4] [--transport grpc]

Images are found recursively by extension (jpg, jpeg, png, webp, bmp, tif, tiff, gif). Every image ends in exactly
one of two files:

- ``results.json``: COCO-format detections, ``[{"image_id", "file_name", "category_id", "bbox": [x, y, w, h],
  "score"}]`` in original-image pixels; ``category_id`` is the model's class index. ``results.images.json`` holds
  the COCO ``images`` (id, file_name, width, height, also for images without detections) and ``categories``.
- ``results.failures.json``: ``[{"file_name", "error", "status", "transient", "attempts"}]``.

``results.summary.json`` (also printed) counts them, with the elapsed time and images/s of this run.

Transient failures are retried up to ``--retries`` times with exponential backoff: HTTP 5xx (503 no worker free,
507 and 500 "Worker died." when a worker crashes, times out or restarts), gRPC UNAVAILABLE / RESOURCE_EXHAUSTED /
DEADLINE_EXCEEDED, connection errors and client timeouts. Refusals of the image itself (4xx) are never retried. A
refused key or an unknown model stops the run: the images not sent yet are listed as transient failures.

Progress is appended to ``results.journal.jsonl`` as each image finishes, so a crash, Ctrl-C or a server restart
loses nothing: rerunning with the same ``--out`` skips finished images and retries the transient failures
(``--retry-failed`` retries the permanent ones too).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from yolonas_tools.paths import RUN_DIR
from yolonas_tools.serve.batch import JournalError, grpc_sender, rest_sender, run
from yolonas_tools.serve.clients import Endpoints, add_option_arguments, request_options


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--model", default="yolo_nas_s")
    parser.add_argument("--out", type=Path, default=Path("results.json"), help="COCO results; other files beside it")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight (TorchServe batches them)")
    parser.add_argument("--transport", choices=["rest", "grpc"], default="rest")
    add_option_arguments(parser)
    parser.add_argument("--retries", type=int, default=5, help="per image, for transient failures")
    parser.add_argument("--backoff", type=float, default=1.0, help="seconds before the first retry; doubles each time")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    parser.add_argument("--retry-failed", action="store_true", help="also resend images the server refused (4xx)")
    parser.add_argument("--run-dir", type=Path, default=RUN_DIR, help="the server's working folder (server.json, keys)")
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        parser.error(f"{args.folder} is not a folder")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    endpoints = Endpoints.load(args.run_dir)
    options = request_options(args)
    make_sender = grpc_sender if args.transport == "grpc" else rest_sender
    send = make_sender(endpoints, args.model, options, args.timeout)
    # The transport may differ between runs; anything that changes the detections may not.
    header = {"model": args.model, "folder": str(args.folder.resolve()), "options": options}
    try:
        summary = run(
            args.folder, args.out, send, header, args.concurrency, args.retries, args.backoff, args.retry_failed
        )
    except JournalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({**summary, "transport": args.transport}, indent=1))
    if summary["stopped"]:
        print(f"stopped early: {summary['stopped']}; rerun with the same --out to continue", file=sys.stderr)
    if summary["failed"]:
        print(f"{summary['failed']} image(s) failed: see {summary['files']['failures']}", file=sys.stderr)
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
