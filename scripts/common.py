"""What the command-line scripts share: repo paths, the handler packages on sys.path, and the running server."""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HANDLER_DIR = REPO / "handler"
MODEL_STORE = REPO / "model_store"
WEIGHTS_DIR = REPO / "weights"
#  Where serve.sh keeps the server's working folder (key file, logs, TMPDIR); YOLONAS_RUN_DIR points elsewhere.
RUN_DIR = Path(os.environ.get("YOLONAS_RUN_DIR", REPO / "run"))

if str(HANDLER_DIR) not in sys.path:
    sys.path.insert(0, str(HANDLER_DIR))


def installed_command(name: str) -> str | None:
    """Path of a console script such as ``torchserve``: the one beside this interpreter first, so a
    non-activated ``.venv/bin/python scripts/...`` still finds its own venv's tools, else the one on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else shutil.which(name)


@dataclass(frozen=True)
class Endpoints:
    """Where a running server listens, as ``server.py start`` recorded it in ``RUN_DIR/server.json``."""

    inference: str
    management: str
    metrics: str
    grpc_inference: str
    grpc_management: str
    run_dir: Path

    @classmethod
    def load(cls, run_dir: Path = RUN_DIR) -> Endpoints:
        path = Path(run_dir) / "server.json"
        if not path.is_file():
            raise SystemExit(f"no running server recorded in {path}: start one with scripts/serve.sh start")
        data = json.loads(path.read_text())
        return cls(run_dir=Path(run_dir), **data)

    def key(self, kind: str) -> str:
        """The current ``inference`` or ``management`` key from TorchServe's key_file.json."""
        return read_key(self.run_dir / "key_file.json", kind)

    def auth(self, kind: str = "inference") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key(kind)}"}


def read_key(key_file: Path, kind: str) -> str:
    """TorchServe writes ``{"management": {"key": ...}, "inference": {"key": ...}, "API": {"key": ...}}``."""
    try:
        return json.loads(Path(key_file).read_text())[kind]["key"]
    except (OSError, ValueError, KeyError) as exc:
        raise SystemExit(f"cannot read the {kind} key from {key_file}: {exc}") from None
