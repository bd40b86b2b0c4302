"""Validation through the session's TorchServe: the shapes checkpoint, archived with no flags, reproduces
super-gradients' own mAP (expected.json) and the in-process Detector's numbers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import requests
import yaml

from helpers import MAP_TOLERANCE, REPO, build_archive
from yolonas_tools.cli import run_command
from yolonas_tools.data.datasets import load_dataset
from yolonas_tools.measure import evaluation
from yolonas_tools.serve import server

MODEL = "shapes_val"  # a name of its own: other tests may register "shapes" with other flags


@pytest.fixture(scope="module")
def shapes_model(ts_server, model_store: Path, shapes_dir: Path):
    build_archive(shapes_dir / "checkpoint.pth", model_store, MODEL)
    server.register(ts_server, MODEL)
    yield MODEL
    requests.delete(f"{ts_server.management}/models/{MODEL}", headers=ts_server.auth("management"), timeout=60)


def test_server_reproduces_super_gradients_and_in_process_numbers(
    endpoints, shapes_model: str, shapes_dir: Path, tmp_path: Path, capsys
):
    expected = json.loads((shapes_dir / "expected.json").read_text())
    data = shapes_dir / "val" / "data.yaml"
    out = tmp_path / "server.json"
    argv = ["--model", shapes_model, "--data", str(data), "--server", "--run-dir", str(endpoints.run_dir),
            "--out", str(out)]  # fmt: skip
    assert run_command("val", argv) == 0
    served = json.loads(out.read_text())
    assert served["metrics"]["mAP50-95"] == pytest.approx(expected["mAP50-95"], abs=MAP_TOLERANCE)
    assert served["metrics"]["mAP50"] == pytest.approx(expected["mAP50"], abs=MAP_TOLERANCE)
    assert served["source"] == f"server {endpoints.inference}"
    assert "WARNING" not in capsys.readouterr().err  # class names and image sizes agree with the dataset

    dataset = load_dataset(data)
    detector = evaluation.local_detector(shapes_dir / "checkpoint.pth", shapes_model)
    responses = evaluation.local_responses(detector, dataset.images, evaluation.EvalOptions(), batch_size=8)
    local = evaluation.evaluate(dataset, evaluation.collect(dataset, responses))
    metrics = served["metrics"]
    assert (local.map50_95, local.map50, local.precision, local.recall) == pytest.approx(
        (metrics["mAP50-95"], metrics["mAP50"], metrics["precision"], metrics["recall"]), abs=1e-4
    )
    assert [c.ap50_95 for c in local.classes] == pytest.approx([c["AP50-95"] for c in served["classes"]], abs=1e-4)


def test_an_unknown_model_stops_validation_with_the_server_error(endpoints, tmp_path: Path, capsys):
    (tmp_path / "images" / "val").mkdir(parents=True)
    shutil.copy(REPO / "assets" / "sample.jpg", tmp_path / "images" / "val")
    data = tmp_path / "data.yaml"
    data.write_text(yaml.safe_dump({"path": ".", "val": "images/val", "names": {0: "person"}}))
    argv = ["--model", "no_such_model", "--data", str(data), "--run-dir", str(endpoints.run_dir)]
    assert run_command("val", argv) == 1
    assert "HTTP 404" in capsys.readouterr().err
