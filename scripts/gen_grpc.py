"""Generate Python gRPC stubs from the .proto files inside the installed TorchServe frontend jar.

    python scripts/gen_grpc.py        # writes yolonas_tools/generated/ (gitignored); scripts/setup.sh runs it

Nothing generated is committed: the stubs always match the installed TorchServe and grpcio-tools.
"""

from __future__ import annotations

import sys

from yolonas_tools.serve.grpc_stubs import StubsError, generate


def main(argv: list[str] | None = None) -> int:
    try:
        print(f"gRPC stubs in {generate()}")
    except StubsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
