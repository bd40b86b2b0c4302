"""Python gRPC stubs generated from the .proto files inside the installed TorchServe frontend jar, into the
package ``yolonas_tools.generated`` (gitignored): ``from yolonas_tools.generated import inference_pb2``.

Nothing generated is committed: the stubs always match the installed TorchServe and grpcio-tools. protoc writes
top-level imports (``import inference_pb2``, ``from google.rpc import status_pb2``); they are made relative to the
package, so nothing has to be put on sys.path. The descriptors keep their proto file names.
"""

from __future__ import annotations

import re
import tempfile
import zipfile
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

OUT = Path(__file__).resolve().parent.parent / "generated"
PROTOS = (
    "proto/inference.proto",
    "proto/management.proto",
    "proto/open_inference_grpc.proto",
    "google/rpc/status.proto",
)
#  protoc's absolute imports of the other generated modules, and what they become inside the package.
SIBLING_IMPORT = re.compile(r"^import (\w+_pb2) as ", re.M)
GOOGLE_RPC_IMPORT = re.compile(r"^from google\.rpc import ", re.M)


class StubsError(Exception):
    """The stubs could not be generated (no TorchServe frontend jar, or protoc failed)."""


def frontend_jar() -> Path:
    import ts

    jar = Path(ts.__file__).parent / "frontend" / "model-server.jar"
    if not jar.is_file():
        raise StubsError(f"TorchServe frontend jar not found at {jar}")
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
            raise StubsError("protoc failed")
    for package in (out, out / "google", out / "google" / "rpc"):
        (package / "__init__.py").touch()
    for module in out.glob("*.py"):
        text = module.read_text()
        relative = GOOGLE_RPC_IMPORT.sub("from .google.rpc import ", SIBLING_IMPORT.sub(r"from . import \1 as ", text))
        if relative != text:
            module.write_text(relative)
    return out
