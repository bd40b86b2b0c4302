"""A Trainer checkpoint archived with no flags and served: the server applies its own pipeline, names and
thresholds, and answers what super-gradients' predict() would (see tests/sg_oracle.py)."""

from __future__ import annotations

import requests
from test_finetuned import PIPELINES, photo, png, processing_params, trainer_checkpoint

import sg_oracle
from reference_match import unmatched
from yolonas import random_model
from yolonas_tools.cli import run_command
from yolonas_tools.serve import server


def test_served_finetuned_checkpoint_matches_predict(endpoints, model_store, tmp_path):
    model = random_model("s", num_classes=3, seed=11)
    params = processing_params(PIPELINES["bgr_rescale_normalize_512x384"], conf=0.15)
    path = trainer_checkpoint(tmp_path / "ckpt_best.pth", model, params)
    assert (
        run_command(
            "archive", ["--variant", "s", "--weights", path, "--model-name", "pets", "--export-path", str(model_store)]
        )
        == 0
    )
    server.register(endpoints, "pets")
    try:
        image = photo(480, 640, 3)
        headers = {**endpoints.auth(), "Content-Type": "image/png"}
        response = requests.post(
            f"{endpoints.inference}/predictions/pets", data=png(image), headers=headers, timeout=120
        )
        assert response.status_code == 200, response.text
        detections = response.json()["detections"]
        expected = sg_oracle.predict(model, image, params)
        assert expected and {d["class_name"] for d in detections} <= {"cat", "dog", "bird"}
        assert unmatched(detections, sg_oracle.as_record(expected, 640, 480)) == ([], [])
    finally:
        requests.delete(f"{endpoints.management}/models/pets", headers=endpoints.auth("management"), timeout=60)
