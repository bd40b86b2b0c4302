"""The TorchServe handler in process, driven through TorchServe's own Context and metrics cache (no server)."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import zipfile
from pathlib import Path
from types import ModuleType

import pytest
import torch
import yaml
from ts.context import Context, RequestProcessor
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

from helpers import REPO
from yolonas_serving.detector import Detector
from yolonas_serving.pipeline import Pipeline
from yolonas_serving.settings import HandlerSettings


def handler_module(folder: Path) -> ModuleType:
    """yolo_nas_handler.py of ``folder`` (an extracted archive, or handler/), loaded by path as TorchServe loads it."""
    spec = importlib.util.spec_from_file_location("yolo_nas_handler", folder / "yolo_nas_handler.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def loaded(s_archive: Path, tmp_path_factory: pytest.TempPathFactory):
    model_dir = tmp_path_factory.mktemp("extracted")
    with zipfile.ZipFile(s_archive) as zf:
        zf.extractall(model_dir)
    manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
    config = yaml.safe_load((model_dir / "model-config.yaml").read_text())
    config["maxWorkers"] = 2  # two workers share the cores: each must take its half, not the process default
    config["handler"]["max_det"] = 123  # TorchServe's copy of the config, not the file, is what the handler uses
    metrics = MetricsCacheYamlImpl(str(REPO / "metrics.yaml"))
    metrics.initialize_cache()
    context = Context(
        "yolo_nas_s", str(model_dir), manifest, 4, None, "0.12.0", metrics=metrics, model_yaml_config=config
    )
    handler = handler_module(model_dir).YoloNASHandler()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(len(os.sched_getaffinity(0)) + 1)  # what no rule gives: the handler must change it
        handler.initialize(context)
        yield handler, context, torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)


def call(handler, context, rows, headers):
    context.request_processor = [RequestProcessor(h) for h in headers]
    context.request_ids = {i: f"req-{i}" for i in range(len(rows))}
    context.metrics.request_ids = context.request_ids
    return handler.handle(rows, context)


def test_threads_default_to_cores_divided_by_max_workers(loaded):
    _, context, threads = loaded
    cores = len(os.sched_getaffinity(0))
    assert context.model_yaml_config["maxWorkers"] == 2 and threads == max(1, cores // 2)
    assert HandlerSettings(torch_threads=3).threads(max_workers=8) == 3
    assert HandlerSettings().threads(max_workers=64) == 1


def test_handle_answers_each_item_and_records_metrics(loaded, reference_dir, caplog):
    handler, context, _ = loaded
    caplog.set_level(logging.INFO, logger="ts.metrics.caching_metric")
    good = (reference_dir / "images" / "img_a_h480_w640.png").read_bytes()
    rows = [{"body": good}, {"body": b"not an image"}, {"body": good}]
    headers = [
        {"body": {"content-type": "image/png"}},
        {"body": {"content-type": "image/png"}},
        {"Accept": "image/jpeg"},
    ]
    bodies = call(handler, context, rows, headers)
    assert context.get_response_status(0)[0] in (None, 200)  # None: TorchServe answers 200
    assert context.get_response_status(1)[0] == 400
    assert "not an image" in context.get_response_status(1)[1]
    assert json.loads(bodies[1])["error"].startswith("not an image")
    assert json.loads(bodies[0])["model"] == "yolo_nas_s"
    assert context.get_response_content_type(2) == "image/jpeg" and bodies[2][:2] == b"\xff\xd8"
    emitted = "\n".join(r.getMessage() for r in caplog.records)
    for line in ("YoloNASBatchSize.Count:3|", "YoloNASImages.Count:2|", "YoloNASPreprocessSeconds.Seconds:"):
        assert f"[METRICS]{line}" in emitted, line
    assert "Failed to update metric" not in emitted


def test_handler_settings_come_from_torchserves_config(loaded):
    handler, context, _ = loaded
    assert context.model_yaml_config["handler"]["max_det"] == 123
    assert handler.detector.settings.options.max_det == 123


def test_detector_from_a_model_dir_without_config_file_takes_the_defaults(s_archive, tmp_path):
    with zipfile.ZipFile(s_archive) as zf:
        zf.extractall(tmp_path)
    manifest = json.loads((tmp_path / "MAR-INF" / "MANIFEST.json").read_text())
    (tmp_path / manifest["model"].pop("configFile")).unlink()
    (tmp_path / "MAR-INF" / "MANIFEST.json").write_text(json.dumps(manifest))
    detector = Detector.from_model_dir(tmp_path)
    assert detector.settings == HandlerSettings()
    assert detector.pipeline == Pipeline.from_spec(HandlerSettings().pipeline)


def test_a_batch_that_raises_is_answered_item_by_item_and_the_worker_lives_on(loaded, monkeypatch):
    """An unexpected exception must not leave handle(): on a sequence-batching model TorchServe 0.12 would lose the
    model for good (notes: a failed batch over StreamPredictions2 kills the frontend's worker thread)."""
    handler, context, _ = loaded

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(handler.detector, "handle", broken)
    bodies = call(handler, context, [{"body": b"x"}, {"body": b"y"}], [{}, {}])
    assert [context.get_response_status(i)[0] for i in range(2)] == [500, 500]
    assert json.loads(bodies[0]) == {"error": "internal error: ZeroDivisionError"}


def test_a_tracking_archive_follows_each_sequence(s_archive, tmp_path, reference_dir):
    """Track ids per sequence id (TorchServe's ts_request_sequence_id header); the id is sent back as a header so
    an HTTP client learns the one TorchServe made up; a sequence's end frees its tracker."""
    with zipfile.ZipFile(s_archive) as zf:
        zf.extractall(tmp_path)
    manifest = json.loads((tmp_path / "MAR-INF" / "MANIFEST.json").read_text())
    config = yaml.safe_load((tmp_path / "model-config.yaml").read_text())
    config.update(sequenceBatching=True, sequenceMaxIdleMSec=1000, maxNumSequence=2)
    config["handler"].update(tracker="bytetrack", track_activation_threshold=0.3, multi_label=False)
    metrics = MetricsCacheYamlImpl(str(REPO / "metrics.yaml"))
    metrics.initialize_cache()
    context = Context("t", str(tmp_path), manifest, 4, None, "0.12.0", metrics=metrics, model_yaml_config=config)
    handler = handler_module(tmp_path).YoloNASHandler()
    handler.initialize(context)
    trackers = handler.detector.trackers
    assert trackers.max_sequences == 4 and trackers.idle_s == 1 + 5.0
    frame = (reference_dir / "images" / "img_a_h480_w640.png").read_bytes()
    headers = [{"ts_request_sequence_id": "a"}, {"ts_request_sequence_id": "b"}]
    for _ in range(3):
        bodies = call(handler, context, [{"body": frame}, {"body": frame}], headers)
    first, second = (json.loads(body)["detections"] for body in bodies)
    assert first and [d["track_id"] for d in first] == [d["track_id"] for d in second]  # same frames, own trackers
    assert max(d["track_id"] for d in first) >= 0  # confirmed after two frames (weak boxes stay untracked: -1)
    assert context.get_response_headers(0)["ts_request_sequence_id"] == "a"
    call(handler, context, [{"body": frame}], [{"ts_request_sequence_id": "b", "X-Sequence-End": "true"}])
    assert "a" in trackers and "b" not in trackers  # b ended with its last frame


def test_unknown_handler_settings_fail_at_load():
    with pytest.raises(ValueError, match="unknown keys \\['confidence'\\]"):
        HandlerSettings.from_config({"confidence": 0.5})
    with pytest.raises(ValueError, match="unknown preprocessing step"):
        HandlerSettings.from_config({"pipeline": [{"Mosaic": {}}, "ImagePermute"]})


def test_reason_phrases_are_ascii():
    """TorchServe 0.12 frames the reason phrase by characters, not bytes: non-ASCII would kill the worker."""
    yolo_nas_handler = handler_module(REPO / "handler")
    assert yolo_nas_handler._reason_phrase("unknown class 'chat noir ü'") == "unknown class 'chat noir \\xfc'"
    assert yolo_nas_handler._reason_phrase(None) == ""
