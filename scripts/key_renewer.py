"""Keep a running TorchServe's keys valid: renew the inference and management keys before they expire.

    python scripts/key_renewer.py --run-dir run/     # scripts/server.py start runs it in the background

TorchServe 0.12 never renews its keys: once ``token_expiration_min`` has passed, every call is refused. This process
reads ``key_file.json`` every few seconds and, for a key with less than the margin left, asks the token API for a
new one (``POST <management>/token?type=inference|management`` with the API key, which never expires). TorchServe
then rewrites key_file.json and refuses the old key at once; the clients re-read the file and retry a refused call
once (``yolonas_tools.serve.clients.with_key``).

The margin is ``--renew-margin-min``, else ``YOLONAS_RENEW_MARGIN_MIN``, else 10 minutes or half the key lifetime,
whichever is smaller. A supervisor restarts the renewing loop if it ever dies and logs it loudly; each check writes
``renewer.json`` (pid, time, what it saw) beside the key file, which ``server.py status`` and ``healthcheck.py``
read. It exits when the server's process is gone.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from yolonas_tools.paths import read_properties
from yolonas_tools.serve.keys import MARGIN_ENV, management_url, renew_forever, renew_margin_s, setup_logging, supervise


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, required=True, help="the server's folder: config.properties, "
                        "key_file.json, server.pid")  # fmt: skip
    parser.add_argument("--renew-margin-min", type=float, help=f"default: ${MARGIN_ENV}, else min(10, lifetime/2)")
    parser.add_argument("--log-file", type=Path, help="default: stderr")
    parser.add_argument("--no-supervisor", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    setup_logging(args.log_file, rotates=args.no_supervisor)
    run_dir = args.run_dir.resolve()
    props = read_properties(run_dir / "config.properties")
    pid_file = run_dir / "server.pid"
    server_pid = int(pid_file.read_text()) if pid_file.is_file() else None
    margin_s = renew_margin_s(float(props.get("token_expiration_min", 60)), args.renew_margin_min)
    if not args.no_supervisor:
        return supervise(argv, server_pid)
    return renew_forever(run_dir / "key_file.json", management_url(props), margin_s, server_pid)


if __name__ == "__main__":
    sys.exit(main())
