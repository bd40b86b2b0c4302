"""What tests share besides fixtures: paths, the reference data in ../shared (skipped where absent), archives built
as a user builds them, and archive copies with other settings."""

from __future__ import annotations

import functools
import os
import zipfile
from pathlib import Path

import pytest
import requests
import yaml

from yolonas import read_checkpoint
from yolonas_tools.cli import run_command
from yolonas_tools.paths import REPO

SHARED = Path(os.environ.get("YOLONAS_SHARED", REPO.parent / "shared"))
REFERENCE = SHARED / "reference" / "yolo_nas_s"
SHAPES = SHARED / "reference" / "shapes"
#  How far the shapes model's fp32 mAP50-95 and mAP50 may be from super-gradients' own (shapes/expected.json), in
#  process and served: measured 0 in process (equal to the last digit).
MAP_TOLERANCE = 5e-4

__all__ = ["MAP_TOLERANCE", "REFERENCE", "REPO", "SHAPES", "SHARED", "build_archive", "predict_json", "require",
           "with_model_config"]  # fmt: skip


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"reference data not found at {path} (it ships beside the project in ../shared, not in the repo)")
    return path


@functools.cache
def checkpoint_variant(checkpoint: Path) -> str:
    """The variant a checkpoint holds, read once per session (reading takes seconds; the same few checkpoints are
    archived many times)."""
    return read_checkpoint(checkpoint).variant


def build_archive(checkpoint: Path, store: Path, name: str, *flags: str) -> Path:
    """Run scripts/archive.py as a user would."""
    variant = checkpoint_variant(Path(checkpoint))
    assert run_command("archive", ["--variant", variant, "--weights", str(checkpoint), "--model-name", name,
                                   "--export-path", str(store), *flags]) == 0  # fmt: skip
    return store / f"{name}.mar"


def with_model_config(archive: Path, target: Path, **changes: object) -> Path:
    """A copy of ``archive`` with ``changes`` applied to its model-config.yaml (None removes a key): for settings
    TorchServe reads from the archive only that scripts/archive.py has no flag for (responseTimeout, no batching)."""
    with zipfile.ZipFile(archive) as source, zipfile.ZipFile(target, "w") as copy:
        for item in source.infolist():
            data = source.read(item.filename)
            if item.filename == "model-config.yaml":
                config = {k: v for k, v in {**yaml.safe_load(data), **changes}.items() if v is not None}
                data = yaml.safe_dump(config, sort_keys=False).encode()
            copy.writestr(item, data)
    return target


def predict_json(endpoints, model: str, data: bytes, content_type: str = "image/jpeg") -> dict:
    """``data`` posted as a raw body to ``model``; the detections JSON of a 200 answer."""
    headers = {**endpoints.auth(), "Content-Type": content_type}
    response = requests.post(f"{endpoints.inference}/predictions/{model}", data=data, headers=headers, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()
