"""Settings are checked once, the same way, when an archive is built (scripts/archive.py --set / --handler-config)
and when a worker loads it (HandlerSettings.from_config): a bad value fails there, never on every request."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from yolonas_serving.backends import BACKENDS
from yolonas_serving.options import RequestOptions
from yolonas_serving.settings import (
    HANDLER_KEYS,
    HandlerSettings,
    SettingsError,
    check_model_config,
    settings_from_checkpoint,
)
from yolonas_serving.steps import PipelineError
from yolonas_tools.build import archive
from yolonas_tools.cli import run_command


@pytest.mark.parametrize(
    "section, message",
    [
        ({"conf": "0.3"}, "conf: got '0.3'; allowed: a number in [0, 1]"),
        ({"max_det": 0}, "max_det: got 0; allowed: an integer in [1, 10000]"),
        ({"multi_label": 1}, "multi_label: got 1; allowed: true or false"),
        ({"torch_threads": 2.0}, "torch_threads: got 2.0; allowed: an integer in [0, 1024]"),
        ({"conf": float("nan")}, "conf: got nan"),
        ({"confidence": 0.5, "jpeg_draft": "no"}, "unknown keys ['confidence']; jpeg_draft: got 'no'"),
        ({"tracker": "deepsort"}, "tracker: got 'deepsort'; allowed: one of off, bytetrack"),
        ({"lost_track_buffer": 60}, "tracker parameters ['lost_track_buffer'] need a tracker"),
        ({"tracker": "sort", "high_conf_det_threshold": 0.5}, "tracker sort: unknown parameters"),
        ({"tracker": "bytetrack", "frame_rate": -1}, "frame_rate: got -1"),
    ],
)
def test_the_worker_refuses_wrong_types_and_ranges(section, message):
    with pytest.raises(SettingsError, match=re.escape(message)):
        HandlerSettings.from_config(section)


def test_every_key_has_a_kind_and_the_defaults_pass_it():
    fields = set(HandlerSettings.__dataclass_fields__) - {"options", "tracker_parameters"}
    assert set(HANDLER_KEYS) == fields
    assert HandlerSettings.from_config(HandlerSettings().as_config()) == HandlerSettings()
    settings = HandlerSettings.from_config({"conf": 1, "agnostic": True, "slice": "640x480", "tracker": "bytetrack",
                                            "lost_track_buffer": 60})  # fmt: skip
    assert settings.options == RequestOptions(conf=1.0, agnostic=True, slice=(640, 480))
    assert settings.tracker_settings().arguments()["lost_track_buffer"] == 60
    assert HandlerSettings.from_config(settings.as_config()) == settings


def test_model_keys_are_checked_too():
    with pytest.raises(SettingsError, match="responseTimeout: got '60'; allowed: an integer"):
        check_model_config({"responseTimeout": "60"})
    with pytest.raises(SettingsError, match="tracker bytetrack needs sequenceBatching: true"):
        check_model_config({"handler": {"tracker": "bytetrack"}})
    with pytest.raises(SettingsError, match="minWorkers 3 is above maxWorkers 2"):
        check_model_config({"minWorkers": 3, "maxWorkers": 2})
    with pytest.raises(SettingsError, match="unknown keys \\['maxWorker'\\]"):
        check_model_config({"maxWorker": 2})


def run_archive(random_checkpoint, tmp_path: Path, capsys, *flags: str) -> str:
    """archive.py with flags: the error it reports, or argparse's exit status for a usage error ("" when it built
    the archive)."""
    argv = ["--variant", "s", "--weights", str(random_checkpoint("s")), "--model-name", "m",
            "--export-path", str(tmp_path), *flags]  # fmt: skip
    try:
        status = run_command("archive", argv)
    except SystemExit as exc:
        return str(exc.code)
    return capsys.readouterr().err if status else ""


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--set", 'conf="0.3"'], "conf: got '0.3'; allowed: a number in [0, 1]"),
        (["--set", "maxWorkers=0"], "maxWorkers: got 0; allowed: an integer in [1, 64]"),
        (["--max-batch-delay", "0"], "maxBatchDelay: got 0; allowed: an integer in [1, 60000] (TorchServe"),
        (["--set", "handler.max_det=lots"], "max_det: got 'lots'"),
        (["--set", "slice=16"], "slice: got 16; allowed: off, or a tile size"),
        (["--set", "tracker=bytetrack", "--set", "frame_rate=0"], "frame_rate: got 0"),
        (["--set", "confidence=0.3"], "unknown key 'confidence'; handler keys: variant"),
        (["--set", "conf"], "expected KEY=VALUE"),
        (["--set", "backend=onnx"], "backend is fixed by what the archive stores; set it with --backend"),
    ],
)
def test_archive_refuses_bad_settings_naming_key_value_and_range(random_checkpoint, tmp_path, capsys, flags, message):
    assert message in run_archive(random_checkpoint, tmp_path, capsys, *flags)
    assert not list(tmp_path.glob("*.mar"))


def test_archive_refuses_a_bad_handler_config_file_or_version(random_checkpoint, tmp_path, capsys):
    config = tmp_path / "settings.yaml"
    config.write_text(yaml.safe_dump({"batchSize": 2, "handler": {"conf": "0.3"}}))
    assert "conf: got '0.3'" in run_archive(random_checkpoint, tmp_path, capsys, "--handler-config", str(config))
    assert run_archive(random_checkpoint, tmp_path, capsys, "--version", "v 2") == "2"  # argparse's usage error
    assert "--version 'v 2': letters, digits" in capsys.readouterr().err


def test_read_overrides_file_then_set(tmp_path):
    config = tmp_path / "settings.yaml"
    config.write_text(yaml.safe_dump({"maxWorkers": 2, "handler": {"conf": 0.5, "max_det": 50}}))
    overrides = archive.read_overrides(config, ["conf=0.4", "handler.agnostic=true", "responseTimeout=30"])
    assert overrides == {
        "maxWorkers": 2,
        "responseTimeout": 30,
        "handler": {"conf": 0.4, "max_det": 50, "agnostic": True},
    }


def step_names(settings: HandlerSettings) -> list[str]:
    return [next(iter(step)) if isinstance(step, dict) else step for step in settings.pipeline]


def test_padding_defaults_to_minimal_for_the_backends_that_trade_exactness_for_speed():
    fixed = step_names(settings_from_checkpoint(80, "s", None)[0])
    assert fixed[:2] == ["DetectionLongestMaxSizeRescale", "DetectionCenterPadding"]
    for backend in (name for name, row in BACKENDS.items() if row.minimal_padding):
        settings, _ = settings_from_checkpoint(80, "s", None, backend=backend)
        assert step_names(settings)[:2] == ["DetectionLongestMaxSizeRescale", "DetectionCenterAutoPadding"], backend
        assert settings.preprocessing_source.endswith(f"minimal padding (the default for backend {backend})")
        assert step_names(settings_from_checkpoint(80, "s", None, padding="fixed", backend=backend)[0]) == fixed
    for backend in ("torch", "onnx", "openvino"):
        assert step_names(settings_from_checkpoint(80, "s", None, backend=backend)[0]) == fixed
    # A pipeline without fixed-size padding (here already minimal) is kept as it is.
    already = {"image_processor": {"ComposeProcessing": {"processings": [
        {"DetectionLongestMaxSizeRescale": {"output_shape": [320, 320]}},
        {"DetectionAutoPadding": {"shape_multiple": [32, 32], "pad_value": 114}},
        {"StandardizeImage": {"max_value": 255.0}}, {"ImagePermute": {"permutation": [2, 0, 1]}}]}}}  # fmt: skip
    settings, _ = settings_from_checkpoint(80, "s", already, backend="int8")
    assert step_names(settings)[:2] == ["DetectionLongestMaxSizeRescale", "DetectionAutoPadding"]
    # Asking it for fixed-size padding, which it does not have, fails instead of passing quietly.
    with pytest.raises(PipelineError, match="no fixed-size padding"):
        settings_from_checkpoint(80, "s", already, padding="fixed", backend="int8")


def test_a_tracker_implies_sequence_batching_and_one_box_per_object():
    settings, names = settings_from_checkpoint(80, "s", None)
    spec = archive.ArchiveSpec("s", "tracked", settings, names, overrides={"handler": {"tracker": "bytetrack"}})
    config = archive.model_config(spec)
    assert config["sequenceBatching"] is True and config["maxNumSequence"] == archive.MAX_NUM_SEQUENCE
    assert config["handler"]["tracker"] == "bytetrack" and config["handler"]["multi_label"] is False
    spec.overrides = {"handler": {"tracker": "bytetrack", "multi_label": True}}
    assert archive.model_config(spec)["handler"]["multi_label"] is True  # asked for: kept
    spec.overrides = {}
    assert "sequenceBatching" not in archive.model_config(spec)


def test_sequences_beyond_the_batch_size_are_refused():
    """TorchServe 0.12 polls a worker's sequences on batchSize + 1 threads: more sequences stall for seconds."""
    with pytest.raises(SettingsError, match="maxNumSequence 8 is above batchSize 4"):
        check_model_config({"batchSize": 4, "sequenceBatching": True, "sequenceMaxIdleMSec": 100, "maxNumSequence": 8})
    settings, names = settings_from_checkpoint(80, "s", None)
    spec = archive.ArchiveSpec("s", "streams", settings, names, batch_size=2, sequence_batching=True)
    assert archive.model_config(spec)["maxNumSequence"] == 2
