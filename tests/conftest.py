"""Shared fixtures: the reference data in ../shared (skipped where absent), seeded checkpoints made on the fly,
archives, and real TorchServe servers on free ports in temporary folders. Helpers tests import live in helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import REFERENCE, SHAPES, build_archive, require
from yolonas import save_random_checkpoint
from yolonas_tools.serve import server
from yolonas_tools.serve.clients import Endpoints

torch.set_num_threads(2)


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
