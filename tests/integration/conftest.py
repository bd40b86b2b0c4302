"""Archives more than one integration module serves, built once per session into the session's model store."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import build_archive

#  A smaller network input than the default keeps the ONNX and OpenVINO conversions quick.
FAST_INPUT = ["--input-size", "320", "320"]


@pytest.fixture(scope="session")
def fast_input() -> list[str]:
    """The archive flags for that input, for modules that build more archives to compare with these."""
    return FAST_INPUT


@pytest.fixture(scope="session")
def converted_archives(random_checkpoint, model_store: Path) -> dict[str, Path]:
    """backend -> archive: the seeded S checkpoint as onnx and openvino at 320x320, under the names the docs' unzip
    commands use (yolo_nas_s_onnx.mar, yolo_nas_s_openvino.mar)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("openvino")
    return {
        backend: build_archive(
            random_checkpoint("s"), model_store, f"yolo_nas_s_{backend}", "--backend", backend, *FAST_INPUT
        )  # fmt: skip
        for backend in ("onnx", "openvino")
    }


@pytest.fixture(scope="session")
def shapes_archive(shapes_dir: Path, model_store: Path) -> Path:
    """The trained shapes checkpoint archived with no flags (torch fp32, its own pipeline), as shapes.mar."""
    return build_archive(shapes_dir / "checkpoint.pth", model_store, "shapes")
