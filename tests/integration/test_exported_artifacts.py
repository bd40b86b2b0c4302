"""The documented way out of TorchServe: the unzip commands of the README and docs take the ONNX and OpenVINO files
out of real archives (the session's, of the shapes model), and ONNX Runtime and OpenVINO load them and agree."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from helpers import REPO

ort = pytest.importorskip("onnxruntime")
ov = pytest.importorskip("openvino")
SIZE = 320  # the shapes model's network input
CLASSES = 4  # circle, square, triangle, ring_rect


def documented_unzip_commands() -> list[str]:
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    blocks = [block for page in pages for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S)]
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip().startswith("unzip ")]


@pytest.mark.skipif(shutil.which("unzip") is None, reason="unzip is not installed")
def test_documented_unzip_commands_extract_loadable_models(converted_archives, tmp_path: Path):
    commands = documented_unzip_commands()
    assert len(commands) == 2, commands
    (tmp_path / "model_store").symlink_to(converted_archives["onnx"].parent)  # the commands read model_store/
    for command in commands:
        done = subprocess.run(shlex.split(command), cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, (command, done.stdout, done.stderr)
    onnx, openvino = tmp_path / "yolo_nas_s_onnx", tmp_path / "yolo_nas_s_openvino"
    assert sorted(p.name for p in onnx.iterdir()) == ["model-config.yaml", "model.onnx"]
    assert sorted(p.name for p in openvino.iterdir()) == ["model-config.yaml", "model.bin", "model.xml"]

    batch = np.random.default_rng(0).random((2, 3, SIZE, SIZE), dtype=np.float32)
    session = ort.InferenceSession(str(onnx / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    boxes, scores = session.run(["boxes", "scores"], {"images": batch})
    assert boxes.shape[0] == scores.shape[0] == 2 and boxes.shape[2] == 4 and scores.shape[2] == CLASSES
    # f32 explicitly: OpenVINO would otherwise compute in bf16 on CPUs that have it.
    compiled = ov.Core().compile_model(str(openvino / "model.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    result = compiled(batch)
    np.testing.assert_allclose(result[0], boxes, atol=0.01, rtol=1e-3)
    np.testing.assert_allclose(result[1], scores, atol=1e-3)
