"""Where things live in the checkout (the handler packages archives copy, the model store, weights, the server's run
folder, the commands), the console scripts installed beside this interpreter, and how TorchServe's settings read."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
HANDLER_DIR = REPO / "handler"
SCRIPTS_DIR = REPO / "scripts"
MODEL_STORE = REPO / "model_store"
WEIGHTS_DIR = REPO / "weights"
#  Where serve.sh keeps the server's working folder (key file, logs, TMPDIR); YOLONAS_RUN_DIR points elsewhere.
RUN_DIR = Path(os.environ.get("YOLONAS_RUN_DIR", REPO / "run"))


def installed_command(name: str) -> str | None:
    """Path of a console script such as ``torchserve``: the one beside this interpreter first, so a
    non-activated ``.venv/bin/python scripts/...`` still finds its own venv's tools, else the one on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else shutil.which(name)


def read_properties(path: Path) -> dict[str, str]:
    """A TorchServe config.properties as a dict (later lines win, as in Java's Properties)."""
    props = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip()
    return props


def write_json_atomically(path: Path, data: Any, indent: int | None = 1) -> None:
    """Write ``data`` as JSON (compact without ``indent``) so that readers never see half a file."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=indent, separators=None if indent else (",", ":")))
    os.replace(temporary, path)
