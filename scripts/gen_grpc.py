"""Generate Python gRPC stubs from the .proto files inside the installed TorchServe frontend jar.

    python scripts/gen_grpc.py        # writes generated/ (gitignored); scripts/setup.sh runs it

Nothing generated is committed: the stubs always match the installed TorchServe and grpcio-tools.
"""

from __future__ import annotations

import sys
import tempfile
import zipfile
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "generated"
PROTOS = (
    "proto/inference.proto",
    "proto/management.proto",
    "proto/open_inference_grpc.proto",
    "google/rpc/status.proto",
)


def frontend_jar() -> Path:
    import ts

    jar = Path(ts.__file__).parent / "frontend" / "model-server.jar"
    if not jar.is_file():
        raise SystemExit(f"TorchServe frontend jar not found at {jar}")
    return jar


def generate(out: Path = OUT) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(frontend_jar()) as jar:
        for name in PROTOS:
            jar.extract(name, tmp)
        well_known = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/*.proto ship with grpcio-tools
        args = [
            "protoc",
            f"-I{tmp}/proto",
            f"-I{tmp}",
            f"-I{well_known}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
        ]
        args += [str(Path(tmp) / name) for name in PROTOS]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
    return out


if __name__ == "__main__":
    print(f"gRPC stubs in {generate()}")
    sys.exit(0)
