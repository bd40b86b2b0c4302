"""Archives more than one integration module serves, built once per session into the session's model store: the
trained shapes checkpoint (../shared/reference/shapes, a YOLO-NAS S at 320x320, which keeps the conversions quick) as
every CPU backend."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import build_archive
from yolonas_tools.cli import run_command
from yolonas_tools.data.synthetic import write_shapes_images

#  INT8 is calibrated on synthetic shapes images, not the val images its accuracy is measured on.
CALIBRATION_IMAGES = 16


@pytest.fixture(scope="session")
def shapes_archive(shapes_dir: Path, model_store: Path) -> Path:
    """The shapes checkpoint archived with no flags (torch fp32, its own pipeline), as shapes.mar."""
    return build_archive(shapes_dir / "checkpoint.pth", model_store, "shapes")


@pytest.fixture(scope="session")
def converted_archives(shapes_dir: Path, model_store: Path) -> dict[str, Path]:
    """backend -> archive: the shapes checkpoint as onnx and openvino, under the names the docs' unzip commands use
    (yolo_nas_s_onnx.mar, yolo_nas_s_openvino.mar)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("openvino")
    return {
        backend: build_archive(
            shapes_dir / "checkpoint.pth", model_store, f"yolo_nas_s_{backend}", "--backend", backend
        )
        for backend in ("onnx", "openvino")
    }


@pytest.fixture(scope="session")
def reduced_precision_archives(shapes_dir: Path, model_store: Path, tmp_path_factory) -> dict[str, Path]:
    """backend -> archive: the shapes checkpoint as auto and int8 with their defaults (minimal padding); int8 under
    its default name (yolo_nas_s_int8.mar), as a user would build it."""
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    calibration = tmp_path_factory.mktemp("calibration")
    write_shapes_images(calibration, CALIBRATION_IMAGES, seed=1)
    int8 = ["--variant", "s", "--weights", str(shapes_dir / "checkpoint.pth"), "--backend", "int8",
            "--calibration-images", str(calibration), "--export-path", str(model_store)]  # fmt: skip
    assert run_command("archive", int8) == 0
    return {
        "auto": build_archive(shapes_dir / "checkpoint.pth", model_store, "shapes_auto", "--backend", "auto"),
        "int8": model_store / "yolo_nas_s_int8.mar",
    }
