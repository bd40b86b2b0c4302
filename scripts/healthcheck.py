"""Is the server of a run folder healthy? For Docker's HEALTHCHECK, Kubernetes probes and cron: no key to copy.

    python scripts/healthcheck.py [--run-dir run] [--model yolo_nas_s ...] [--timeout 10]

Healthy means: the key file can be read, /ping answers "Healthy" with the inference key, every model asked for (by
default every registered model, and at least one) has a READY worker, and the key renewer is running and checked the
keys recently (without it every key expires within token_expiration_min). Prints one line saying why, exits 0 when
healthy and 1 otherwise: a key that TorchServe refuses because it expired is named, with the renewer's state.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from yolonas_tools.paths import RUN_DIR
from yolonas_tools.serve.keys import expired_keys
from yolonas_tools.serve.server import Unhealthy, check_health, renewer_status


def explained(reason: str, run_dir: Path) -> str:
    """TorchServe refuses an expired key as it refuses a wrong one (400 InvalidKeyException, nothing more): say which
    key expired, and how the key renewer fares, whose job it was to renew it."""
    expired = expired_keys(run_dir / "key_file.json") if "InvalidKeyException" in reason else []
    if not expired:
        return reason
    return f"{'; '.join(expired)} (TorchServe answers 400 InvalidKeyException); {renewer_status(run_dir.resolve())[1]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=RUN_DIR, help="the server's folder (server.json, keys)")
    parser.add_argument("--model", action="append", default=[], help="a model that must have a READY worker "
                        "(repeatable; default: every registered model)")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per call")
    args = parser.parse_args(argv)
    try:
        print(f"healthy: {check_health(args.run_dir, args.model, args.timeout)}")
    except Unhealthy as exc:
        print(f"unhealthy: {explained(str(exc), args.run_dir)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
