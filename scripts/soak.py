"""Load and soak test: drive one model with a bounded request loop; report throughput, latency and memory.

    python scripts/soak.py --model yolo_nas_s --minutes 10 --concurrency 4 [--interval S] [--image IMG] [--json F]

``--concurrency`` client threads post the same image back to back (or ``--interval`` seconds apart; raw body,
REST, every request with a timeout) until the time is up. Keys are read as the other clients read them (a key
renewed mid-call is retried once), and the report counts the inference keys seen: more than one means the soak
crossed a renewal. After one warm-up round, the resident memory (RSS) of the model's workers (their pids from the
management API) and of the frontend is read, then sampled every ``--sample-every`` seconds. Printed: requests
served, errors by kind, requests/s, p50/p95/p99 latency (nearest rank), and memory at start and end with the
growth. A worker whose pid changed was restarted: that counts as an error too. Exit status 1 when anything failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from yolonas_tools.measure.soak import SoakError, print_report, soak
from yolonas_tools.paths import REPO, RUN_DIR
from yolonas_tools.serve.clients import Endpoints


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="yolo_nas_s")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--image", type=Path, default=REPO / "assets" / "sample.jpg")
    parser.add_argument("--interval", type=float, default=0.0, help="seconds each client waits between requests")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    parser.add_argument("--sample-every", type=float, default=30.0, help="seconds between memory samples")
    parser.add_argument("--json", type=Path, help="also write the report here")
    parser.add_argument("--run-dir", type=Path, default=RUN_DIR)
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.concurrency < 1 or args.interval < 0:
        parser.error("--minutes must be positive, --concurrency at least 1 and --interval not negative")
    endpoints = Endpoints.load(args.run_dir)
    try:
        report = soak(endpoints, args.model, args.image, args.minutes, args.concurrency, args.timeout,
                      args.sample_every, args.interval)  # fmt: skip
    except SoakError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print_report(report, args.image)
    if args.json:
        args.json.write_text(json.dumps({**asdict(report), "growth_mb": report.growth_mb()}, indent=1))
    return 1 if report.error_count else 0


if __name__ == "__main__":
    sys.exit(main())
