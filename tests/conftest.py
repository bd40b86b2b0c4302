"""Shared fixtures: paths, the reference data in ../shared (skipped where absent), seeded checkpoints made on the
fly, archives, and real TorchServe servers on free ports in temporary folders."""

from __future__ import annotations

import os
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "handler"), str(REPO / "scripts"), str(REPO / "generated")]

import archive  # noqa: E402
import server  # noqa: E402
from common import Endpoints  # noqa: E402
from yolonas import save_random_checkpoint  # noqa: E402

SHARED = Path(os.environ.get("YOLONAS_SHARED", REPO.parent / "shared"))
REFERENCE = SHARED / "reference" / "yolo_nas_s"
SHAPES = SHARED / "reference" / "shapes"

torch.set_num_threads(2)


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"reference data not found at {path} (it ships beside the project in ../shared, not in the repo)")
    return path


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return require(REFERENCE)


@pytest.fixture(scope="session")
def shapes_dir() -> Path:
    return require(SHAPES)


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """make(variant, num_classes=80, seed=0) -> path of a seeded {"net": sd} checkpoint, cached for the session."""
    folder = tmp_path_factory.mktemp("checkpoints")
    made: dict[tuple, Path] = {}

    def make(variant: str = "s", num_classes: int = 80, seed: int = 0) -> Path:
        key = (variant, num_classes, seed)
        if key not in made:
            made[key] = save_random_checkpoint(
                folder / f"{variant}_{num_classes}_{seed}.pth", variant, num_classes, seed
            )
        return made[key]

    return make


def build_archive(checkpoint: Path, store: Path, name: str, *flags: str) -> Path:
    """Run scripts/archive.py's main as a user would."""
    assert archive.main(["--variant", _variant(checkpoint), "--weights", str(checkpoint), "--model-name", name,
                         "--export-path", str(store), *flags]) == 0  # fmt: skip
    return store / f"{name}.mar"


def _variant(checkpoint: Path) -> str:
    from yolonas import read_checkpoint

    return read_checkpoint(checkpoint).variant


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


@pytest.fixture(scope="session")
def model_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model_store")


@pytest.fixture(scope="session")
def s_archive(random_checkpoint, model_store: Path) -> Path:
    """YOLO-NAS S with seeded random weights, archived as yolo_nas_s.mar."""
    return build_archive(random_checkpoint("s"), model_store, "yolo_nas_s")


@pytest.fixture(scope="session")
def ts_server(tmp_path_factory: pytest.TempPathFactory, model_store: Path, s_archive: Path):
    """One TorchServe for the session, shipped config on free ports, yolo_nas_s registered."""
    run_dir = tmp_path_factory.mktemp("run")
    endpoints = server.start(run_dir, model_store, models=["yolo_nas_s"], ports=server.free_ports())
    yield endpoints
    server.stop(run_dir)


@pytest.fixture
def endpoints(ts_server: Endpoints) -> Endpoints:
    return ts_server
