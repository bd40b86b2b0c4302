"""Fine-tuned (Trainer) checkpoints: their processing_params drive preprocessing, names and thresholds.

That a Trainer checkpoint answers as super-gradients would rests on the shapes model, a checkpoint super-gradients'
Trainer wrote: its settings come from its processing_params (here), and its mAP equals super-gradients' own
(tests/test_val.py in process, tests/integration/test_val_server.py served). The steps it does not use (channel
reversal, plain rescale, normalisation, centre and automatic padding) are checked against tests/sg_oracle.py, an
independent rewrite of super-gradients' predict(), itself held here to super-gradients' own predict.json."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import sg_oracle
from reference_match import unmatched
from yolonas import load_model, random_model, read_checkpoint
from yolonas_serving.classes import default_names
from yolonas_serving.detector import Detector
from yolonas_serving.settings import settings_from_checkpoint
from yolonas_tools.cli import run_command

NAMES = ["cat", "dog", "bird"]


def processing_params(processings: list, conf: float = 0.3, iou: float = 0.6) -> dict:
    return {
        "class_names": NAMES,
        "image_processor": {"ComposeProcessing": {"processings": processings}},
        "conf": conf,
        "iou": iou,
    }


#  Pipelines a user's Trainer could have saved, each with another input size (all multiples of 32).
PIPELINES = {
    "bgr_rescale_normalize_512x384": [
        "ReverseImageChannels",
        {"DetectionRescale": {"output_shape": (384, 512)}},
        {"NormalizeImage": {"mean": [103.5, 116.3, 123.7], "std": [57.4, 57.1, 58.4]}},
        {"ImagePermute": {"permutation": (2, 0, 1)}},
    ],
    "center_416": [
        {"DetectionLongestMaxSizeRescale": {"output_shape": [416, 416]}},
        {"DetectionCenterPadding": {"output_shape": [416, 416], "pad_value": [0, 0, 0]}},
        {"StandardizeImage": {"max_value": 255.0}},
        {"ImagePermute": {"permutation": [2, 0, 1]}},
    ],
    "bottom_right_320": [
        {"DetectionLongestMaxSizeRescale": {"output_shape": [320, 320]}},
        {"DetectionBottomRightPadding": {"output_shape": [320, 320], "pad_value": 114}},
        {"StandardizeImage": {"max_value": 255.0}},
        {"ImagePermute": {"permutation": [2, 0, 1]}},
    ],
    "auto_padding_800": [
        {"DetectionLongestMaxSizeRescale": {"output_shape": [800, 800]}},
        {"DetectionAutoPadding": {"shape_multiple": [32, 32], "pad_value": 114}},
        {"StandardizeImage": {"max_value": 255.0}},
        {"ImagePermute": {"permutation": [2, 0, 1]}},
    ],
}


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return random_model("s", num_classes=3, seed=11)


def trainer_checkpoint(path, model, params: dict) -> str:
    """The layout super-gradients' Trainer writes (ckpt_best.pth), extras included."""
    state = model.state_dict()
    torch.save(
        {"net": state, "ema_net": state, "processing_params": params, "epoch": 41, "acc": 0.5,
         "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 0.01}]}},
        path,
    )  # fmt: skip
    return str(path)


def photo(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth random colour field: closer to a photograph than white noise."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    return np.asarray(coarse.resize((width, height), Image.BICUBIC))


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_checkpoint_of_super_gradients_trainer_keeps_its_processing_params(shapes_dir):
    params = read_checkpoint(shapes_dir / "checkpoint.pth").processing_params
    settings, names = settings_from_checkpoint(4, "s", params)
    assert settings.pipeline == params["image_processor"]["ComposeProcessing"]["processings"]
    assert settings.pipeline[1] == {"DetectionBottomRightPadding": {"output_shape": [320, 320], "pad_value": 114}}
    assert names == params["class_names"] == ["circle", "square", "triangle", "ring_rect"]
    assert (settings.options.conf, settings.options.iou) == (params["conf"], params["iou"]) == (0.25, 0.7)
    assert settings.preprocessing_source == "checkpoint processing_params"


def test_the_oracle_reproduces_super_gradients_predict(reference_dir):
    """sg_oracle.predict() on the reference checkpoint, with the steps and thresholds predict.json records, finds
    what super-gradients' predict() found, within the torch backend's tolerance (reference_match)."""
    recorded = json.loads((reference_dir / "predict.json").read_text())
    steps = [{step["type"]: {k: v for k, v in step.items() if k != "type"}} for step in recorded["preprocessing"]]
    params = {"class_names": default_names(80), "image_processor": {"ComposeProcessing": {"processings": steps}},
              "conf": recorded["predict_params"]["conf"], "iou": recorded["predict_params"]["iou"]}  # fmt: skip
    model = load_model(reference_dir / "checkpoint.pth", fuse=False)
    for record in recorded["images"]:
        image = np.asarray(Image.open(reference_dir / record["file"]).convert("RGB"))
        expected = sg_oracle.predict(model, image, params)
        assert len(expected) == record["num_detections"]
        assert unmatched(expected, record) == ([], []), record["file"]


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_detections_match_super_gradients_predict(tmp_path, model, pipeline):
    params = processing_params(PIPELINES[pipeline], conf=0.15)
    ckpt = read_checkpoint(trainer_checkpoint(tmp_path / "ckpt_best.pth", model, params))
    settings, names = settings_from_checkpoint(ckpt.num_classes, ckpt.variant, ckpt.processing_params)
    assert names == NAMES and (settings.options.conf, settings.options.iou) == (0.15, 0.6)
    detector = Detector.from_settings(settings, str(tmp_path / "ckpt_best.pth"), names, "finetuned")
    for height, width, seed in ((300, 500, 1), (720, 540, 2)):
        image = photo(height, width, seed)
        response = json.loads(detector.handle([{"body": png(image)}], [{}])[0][0].body)
        expected = sg_oracle.predict(model, image, params)
        assert len(expected) > 0, "the test image should produce detections"
        missing, extra = unmatched(response["detections"], sg_oracle.as_record(expected, width, height))
        assert (missing, extra) == ([], []), f"{pipeline} {width}x{height}: {missing[:2]} missing, {extra[:2]} extra"
        assert {d["class_name"] for d in response["detections"]} <= set(NAMES)


def archive_files(mar) -> tuple[dict, dict]:
    with zipfile.ZipFile(mar) as zf:
        return yaml.safe_load(zf.read("model-config.yaml")), json.loads(zf.read("index_to_name.json"))


def test_archive_records_the_checkpoint_choices(tmp_path, model):
    params = processing_params(PIPELINES["center_416"], conf=0.45, iou=0.55)
    path = trainer_checkpoint(tmp_path / "ckpt.pth", model, params)
    assert (
        run_command(
            "archive", ["--variant", "s", "--weights", path, "--model-name", "pets", "--export-path", str(tmp_path)]
        )
        == 0
    )
    config, names = archive_files(tmp_path / "pets.mar")
    handler = config["handler"]
    assert handler["pipeline"] == json.loads(json.dumps(PIPELINES["center_416"]))
    assert handler["preprocessing_source"] == "checkpoint processing_params"
    assert (handler["conf"], handler["iou"], handler["num_classes"]) == (0.45, 0.55, 3)
    assert names == {"0": "cat", "1": "dog", "2": "bird"}
    assert "sequenceBatching" not in config


def test_archiving_leaves_the_staging_of_another_build_of_that_name_alone(tmp_path, model, monkeypatch):
    """torch-model-archiver deletes <temp dir>/<model name> before staging there: another build of the same name,
    running at that moment, must not lose its files."""
    shared_tmp = tmp_path / "shared_tmp"
    other_build = shared_tmp / "pets" / "staged-by-another-build.txt"
    other_build.parent.mkdir(parents=True)
    other_build.write_text("still needed")
    monkeypatch.setenv("TMPDIR", str(shared_tmp))
    path = trainer_checkpoint(tmp_path / "ckpt.pth", model, processing_params(PIPELINES["center_416"]))
    args = ["--variant", "s", "--weights", path, "--model-name", "pets", "--export-path", str(tmp_path / "store")]
    assert run_command("archive", args) == 0
    assert other_build.read_text() == "still needed"
    assert (tmp_path / "store" / "pets.mar").is_file()


def test_flags_override_the_checkpoint(tmp_path, model):
    path = trainer_checkpoint(tmp_path / "ckpt.pth", model, processing_params(PIPELINES["bottom_right_320"]))
    (tmp_path / "names.txt").write_text("tabby\nbeagle\nrobin\n")
    flags = ["--input-size", "512", "640", "--padding", "center", "--names", str(tmp_path / "names.txt"),
             "--conf", "0.5", "--iou", "0.4", "--batch-size", "2", "--sequence-batching"]  # fmt: skip
    assert (
        run_command(
            "archive",
            ["--variant", "s", "--weights", path, "--model-name", "over", "--export-path", str(tmp_path), *flags],
        )
        == 0
    )
    config, names = archive_files(tmp_path / "over.mar")
    handler = config["handler"]
    assert handler["pipeline"][:2] == [
        {"DetectionLongestMaxSizeRescale": {"output_shape": [512, 640]}},
        {"DetectionCenterPadding": {"output_shape": [512, 640], "pad_value": 114.0}},
    ]
    assert "input size overridden to 512x640" in handler["preprocessing_source"]
    assert (handler["conf"], handler["iou"]) == (0.5, 0.4) and names["1"] == "beagle"
    assert (config["batchSize"], config["sequenceBatching"], config["sequenceMaxIdleMSec"]) == (2, True, 10_000)


def test_without_processing_params_the_coco_defaults_apply_and_say_so(tmp_path, random_checkpoint):
    assert run_command("archive", ["--variant", "s", "--weights", str(random_checkpoint("s")), "--model-name", "plain",
                         "--export-path", str(tmp_path)]) == 0  # fmt: skip
    config, names = archive_files(tmp_path / "plain.mar")
    assert "COCO defaults" in config["handler"]["preprocessing_source"]
    assert config["handler"]["pipeline"][1] == {
        "DetectionCenterPadding": {"output_shape": [640, 640], "pad_value": 114.0}
    }
    assert names["0"] == "person" and len(names) == 80


def test_unknown_step_fails_at_archive_time(tmp_path, model, capsys):
    steps = [{"DetectionRandomAffine": {"degrees": 5}}, *PIPELINES["center_416"]]
    path = trainer_checkpoint(tmp_path / "ckpt.pth", model, processing_params(steps))
    assert run_command("archive", ["--variant", "s", "--weights", path, "--export-path", str(tmp_path)]) == 1
    assert "unknown preprocessing step 'DetectionRandomAffine'" in capsys.readouterr().err
    assert not (tmp_path / "yolo_nas_s.mar").exists()


@pytest.mark.parametrize("variant, file, message", [
    ("m", "checkpoint", "expected YOLO-NAS M weights; found S"),
    ("s", "not_a_checkpoint", "not_a_checkpoint"),
])  # fmt: skip
def test_a_wrong_checkpoint_fails_with_its_reason(tmp_path, model, capsys, variant, file, message):
    """The wrong variant, or a file that is no checkpoint, ends in one error line (exit 1), not a traceback."""
    path = trainer_checkpoint(tmp_path / "checkpoint.pth", model, processing_params(PIPELINES["center_416"]))
    (tmp_path / "not_a_checkpoint").write_text("hello")
    weights = str(path if file == "checkpoint" else tmp_path / file)
    assert run_command("archive", ["--variant", variant, "--weights", weights, "--export-path", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
