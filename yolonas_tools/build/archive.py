"""TorchServe archives (.mar) for YOLO-NAS, built as ``scripts/archive.py`` describes.

The archive holds the handler, the ``yolonas`` and ``yolonas_serving`` packages, what the backend loads (the
weights re-saved as a plain ``{"net": state_dict}`` whatever the input format, or their ONNX / OpenVINO
conversion), ``index_to_name.json`` and a ``model-config.yaml`` whose
``handler:`` section records every choice: preprocessing pipeline, class count, thresholds, backend. A Trainer
checkpoint's ``processing_params`` (pipeline, class names, conf, iou) are honoured; flags override them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from yolonas import CheckpointError, read_checkpoint, save_random_checkpoint
from yolonas.checkpoint import Checkpoint
from yolonas_serving.classes import INDEX_TO_NAME, names_to_mapping, read_names_file
from yolonas_serving.detector import Detector
from yolonas_serving.pipeline import Pipeline
from yolonas_serving.settings import (
    KNOWN_KEYS,
    MODEL_KEYS,
    NO_TRACKER,
    HandlerSettings,
    SettingsError,
    check_model_config,
    settings_from_checkpoint,
)
from yolonas_tools.build.backends import calibration_batches, write_backend_files
from yolonas_tools.paths import HANDLER_DIR, installed_command


class ArchiveError(Exception):
    """An archive that cannot be built as asked; the message names the setting or file and what is wrong."""


HANDLER_FILE = HANDLER_DIR / "yolo_nas_handler.py"
PACKAGES = ("yolonas", "yolonas_serving")

#  Serving defaults measured on a 2-core CPU (see README, "Batching"): one worker using every core, small batches
#  that fill under load (requests queue while the worker computes) without holding a lone request: 1 ms served
#  lone requests 4 ms sooner than 5 ms and as many images/s at 4 clients. 0 is not an option: TorchServe 0.12
#  reads 0 in model-config.yaml as unset and waits its default 100 ms.
DEFAULT_BATCH_SIZE = 4
DEFAULT_MAX_BATCH_DELAY_MS = 1
DEFAULT_WORKERS = 1
RESPONSE_TIMEOUT_S = {"s": 60, "m": 120, "l": 120}
#  --sequence-batching (gRPC StreamPredictions2): a stream idle this long is closed; this many streams at once.
SEQUENCE_MAX_IDLE_MS = 10_000
MAX_NUM_SEQUENCE = 4
#  Handler keys fixed by what the archive holds: changing them alone would not match the stored model files.
FIXED_BY_ARCHIVE = {
    "variant": "--variant",
    "num_classes": "the checkpoint (or --num-classes)",
    "backend": "--backend",
    "pipeline": "--input-size / --padding (or the checkpoint's processing_params)",
    "preprocessing_source": "how the pipeline was chosen",
}
#  What TorchServe accepts as a model version in URLs (/predictions/<model>/<version>).
VERSION_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class ArchiveSpec:
    variant: str
    name: str
    settings: HandlerSettings
    names: list[str]
    batch_size: int = DEFAULT_BATCH_SIZE
    max_batch_delay: int = DEFAULT_MAX_BATCH_DELAY_MS
    workers: int = DEFAULT_WORKERS
    calibration_images: Path | None = None  # int8 only
    sequence_batching: bool = False
    overrides: dict = field(default_factory=dict)  # TorchServe keys at the top, handler keys under "handler"
    version: str = "1.0"


def resolve_settings(
    ckpt: Checkpoint,
    backend: str = "torch",
    input_size: tuple[int, int] | None = None,
    padding: str | None = None,
    names_file: Path | None = None,
    conf: float | None = None,
    iou: float | None = None,
) -> tuple[HandlerSettings, list[str]]:
    """Pipeline, names and thresholds: the checkpoint's processing_params first, then these overrides."""
    try:
        return settings_from_checkpoint(
            ckpt.num_classes,
            ckpt.variant,
            ckpt.processing_params,
            input_size=input_size,
            padding=padding,
            names=read_names_file(names_file) if names_file else None,
            conf=conf,
            iou=iou,
            backend=backend,
        )
    except ValueError as exc:  # PipelineError included: an unknown step fails here, at archive time
        raise ArchiveError(f"cannot archive {ckpt.variant.upper()}: {exc}") from None


def model_config(spec: ArchiveSpec) -> dict:
    config = {
        "minWorkers": spec.workers,
        "maxWorkers": spec.workers,
        "batchSize": spec.batch_size,
        "maxBatchDelay": spec.max_batch_delay,
        "responseTimeout": RESPONSE_TIMEOUT_S[spec.variant],
    }
    overrides = dict(spec.overrides)
    asked = overrides.pop("handler", {})
    handler = {**spec.settings.as_config(), **asked}
    tracking = handler["tracker"] != NO_TRACKER
    if tracking and "multi_label" not in asked:
        handler["multi_label"] = False  # trackers match boxes whatever their class: one box per object
    if spec.sequence_batching or tracking:
        sequences = min(MAX_NUM_SEQUENCE, spec.batch_size)  # TorchServe 0.12 stalls sequences beyond batchSize
        config.update(sequenceBatching=True, sequenceMaxIdleMSec=SEQUENCE_MAX_IDLE_MS, maxNumSequence=sequences)
    config = {**config, **overrides, "handler": handler}
    try:
        check_model_config(config)
    except (SettingsError, ValueError) as exc:  # ValueError: an unknown preprocessing step
        raise ArchiveError(f"cannot archive {spec.name}: {exc}") from None
    return config


def read_overrides(handler_config: Path | None, assignments: list[str]) -> dict:
    """--handler-config FILE, then each --set KEY=VALUE, as one override of model-config.yaml."""
    overrides: dict = {"handler": {}}
    if handler_config is not None:
        loaded = yaml.safe_load(handler_config.read_text()) or {}
        if not isinstance(loaded, dict) or not isinstance(loaded.get("handler", {}), dict):
            raise ArchiveError(f"--handler-config {handler_config}: expected a mapping shaped like model-config.yaml")
        overrides.update({k: v for k, v in loaded.items() if k != "handler"})
        overrides["handler"].update(loaded.get("handler") or {})
    for assignment in assignments:
        key, equals, text = assignment.partition("=")
        key = key.strip().removeprefix("handler.")
        if not equals or not key:
            raise ArchiveError(f"--set {assignment!r}: expected KEY=VALUE")
        value = yaml.safe_load(text) if text.strip() else ""
        if key in KNOWN_KEYS:
            overrides["handler"][key] = value
        elif key in MODEL_KEYS:
            overrides[key] = value
        else:
            raise ArchiveError(
                f"--set {assignment!r}: unknown key {key!r}; handler keys: {', '.join(KNOWN_KEYS)}; "
                f"TorchServe keys: {', '.join(MODEL_KEYS)}"
            )
    fixed = sorted(set(overrides["handler"]) & set(FIXED_BY_ARCHIVE))
    if fixed:
        raise ArchiveError(f"{fixed[0]} is fixed by what the archive stores; set it with {FIXED_BY_ARCHIVE[fixed[0]]}")
    return overrides


def build_archive(ckpt: Checkpoint, spec: ArchiveSpec, export_path: Path) -> Path:
    """Stage the archive's files and run torch-model-archiver; returns the .mar path. Every setting and the archiver
    are checked before the (slow) conversions."""
    config_text = yaml.safe_dump(model_config(spec), sort_keys=False)
    archiver = installed_command("torch-model-archiver")
    if archiver is None:
        raise ArchiveError("torch-model-archiver is not installed in this environment: pip install -r requirements.txt")
    export_path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp)
        extra = stage / "extra"
        for package in PACKAGES:
            shutil.copytree(
                HANDLER_DIR / package, extra / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
            )
        (extra / INDEX_TO_NAME).write_text(json.dumps(names_to_mapping(spec.names), indent=1))
        serialized = stage_backend_files(ckpt, spec, stage / "backend", extra)
        config = stage / "model-config.yaml"
        config.write_text(config_text)
        command = [
            archiver, "--model-name", spec.name, "--version", spec.version,
            "--serialized-file", str(serialized), "--handler", str(HANDLER_FILE),
            "--extra-files", str(extra), "--config-file", str(config),
            "--export-path", str(export_path), "--force",
        ]  # fmt: skip
        # The archiver stages in <temp dir>/<model name> after deleting whatever is there: a temp dir of its own
        # keeps two builds of one name at once (a test run and a benchmark, say) from destroying each other's files.
        archiver_tmp = stage / "archiver_tmp"
        archiver_tmp.mkdir()
        subprocess.run(command, check=True, env={**os.environ, "TMPDIR": str(archiver_tmp)})
    return export_path / f"{spec.name}.mar"


def stage_backend_files(ckpt: Checkpoint, spec: ArchiveSpec, folder: Path, extra: Path) -> Path:
    """The backend's serialized file in ``folder``; the files it needs beside it are moved into ``extra``."""
    folder.mkdir()
    pipeline = Pipeline.from_spec(spec.settings.pipeline)
    calibration = None
    if spec.calibration_images is not None:
        calibration = calibration_batches(spec.calibration_images, pipeline)
        print(f"calibrating INT8 on {len(calibration)} images from {spec.calibration_images}")
    try:
        serialized, beside = write_backend_files(spec.settings.backend, ckpt, pipeline.input_size, folder, calibration)
    except (ValueError, ImportError) as exc:  # missing calibration images, openvino or nncf not installed
        raise ArchiveError(f"cannot archive {spec.name} with backend {spec.settings.backend}: {exc}") from None
    for path in beside:
        shutil.move(path, extra / path.name)
    return serialized


def default_name(variant: str, backend: str) -> str:
    suffix = "" if backend == "torch" else "_" + backend.replace("-", "_")
    return f"yolo_nas_{variant}{suffix}"


def open_archive(mar: Path, folder: Path, device: str = "cpu") -> Detector:
    """The Detector a TorchServe worker builds from ``mar``, in process (tools measure archives with it): the
    archive is extracted into ``folder``; threads follow torch's current setting, as in the handler."""
    with zipfile.ZipFile(mar) as contents:
        contents.extractall(folder)
    return Detector.from_model_dir(folder, device)


def load_or_make_checkpoint(
    variant: str, weights: Path | None, random_seed: int | None, num_classes: int, tmp: Path
) -> Checkpoint:
    """The checkpoint at ``weights``, which must hold ``variant``; else seeded random weights (with a warning)."""
    if weights:
        try:
            return read_checkpoint(weights, variant)
        except CheckpointError as exc:
            raise ArchiveError(str(exc)) from None
    path = save_random_checkpoint(tmp / f"random_{variant}.pth", variant, num_classes, random_seed)
    print(
        f"WARNING: {variant.upper()} uses seeded random weights (seed {random_seed}): its detections are meaningless",
        file=sys.stderr,
    )
    return read_checkpoint(path)
