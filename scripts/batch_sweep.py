"""Latency and throughput of one archive at several batch sizes, on the running server.

    python scripts/batch_sweep.py [--archive yolo_nas_s] [--batch-sizes 1 4 8] [--batches 3] [--rounds 3]

For each batch size N the archive is registered again as ``<name>_sweep_b<N>`` (one worker, batch_size=N), driven
by N clients (``--concurrency`` for more) that send the same image back to back, and unregistered. A round sends
``--batches`` x N requests after one warm-up batch. The table shows, per batch size, the medians over the rounds of
each round's p50 / p90 request latency (nearest rank, yolonas_tools/measure/load.py) and its images per second.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import requests

from yolonas_tools.measure.load import Load, drive
from yolonas_tools.paths import REPO, RUN_DIR
from yolonas_tools.serve.clients import Endpoints, predict
from yolonas_tools.serve.server import ServerError, register


def drive_model(endpoints: Endpoints, model: str, image: Path, clients: int, count: int) -> Load:
    """``count`` requests from ``clients`` threads, each sending its next request as soon as the last returns."""

    def send(session: requests.Session) -> str | None:
        response = predict(endpoints, model, image, {}, timeout=600)
        return None if response.status_code == 200 else f"HTTP {response.status_code}: {response.text.strip()}"

    load = drive(send, clients, total=count)
    if load.errors:
        raise ServerError(f"{model}: {next(iter(load.errors))}")
    return load


def sweep_one(args: argparse.Namespace, endpoints: Endpoints, batch_size: int) -> list[Load]:
    model = f"{Path(args.archive).stem}_sweep_b{batch_size}"
    register(endpoints, args.archive, name=model, batch_size=batch_size, max_batch_delay=args.max_batch_delay)
    try:
        clients = max(batch_size, args.concurrency or 0)
        drive_model(endpoints, model, args.image, clients, clients)  # warm-up: first-call allocations, lazy init
        return [
            drive_model(endpoints, model, args.image, clients, args.batches * batch_size) for _ in range(args.rounds)
        ]
    finally:
        requests.delete(f"{endpoints.management}/models/{model}", headers=endpoints.auth("management"), timeout=120)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", default="yolo_nas_s", help="an archive in the server's model store")
    parser.add_argument("--image", type=Path, default=REPO / "assets" / "sample.jpg")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--batches", type=int, default=3, help="full batches per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, help="clients (default and minimum: the batch size)")
    parser.add_argument("--max-batch-delay", type=int, default=100, help="milliseconds")
    parser.add_argument("--run-dir", type=Path, default=RUN_DIR)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    endpoints = Endpoints.load(args.run_dir)
    print(f"{args.archive} on {args.image.name}: {args.rounds} rounds of {args.batches} batches, medians over rounds")
    print(f"{'batch':>5} {'clients':>7} {'p50 ms':>8} {'p90 ms':>8} {'images/s':>9}")
    for batch_size in args.batch_sizes:
        try:
            rounds = sweep_one(args, endpoints, batch_size)
        except (ServerError, requests.RequestException) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        p50 = statistics.median(r.percentile(50) for r in rounds)
        p90 = statistics.median(r.percentile(90) for r in rounds)
        throughput = statistics.median(r.per_second for r in rounds)
        clients = max(batch_size, args.concurrency or 0)
        print(f"{batch_size:>5} {clients:>7} {p50:>8.0f} {p90:>8.0f} {throughput:>9.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
