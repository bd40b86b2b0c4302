"""Build TorchServe archives (.mar) for YOLO-NAS.

    python scripts/archive.py --variant s --weights weights/yolo_nas_s_coco.pth --export-path model_store
    python scripts/archive.py --variant s --random-weights 0 --export-path model_store
    python scripts/archive.py --all --random-weights 0
    python scripts/archive.py --variant s --weights W.pth --backend int8 --calibration-images DIR

The archive holds the handler, the ``yolonas`` and ``yolonas_serving`` packages, what the backend loads (the
weights re-saved as a plain ``{"net": state_dict}`` whatever the input format, or their ONNX / OpenVINO
conversion), ``index_to_name.json`` and a ``model-config.yaml`` whose
``handler:`` section records every choice: preprocessing pipeline, class count, thresholds, backend. A Trainer
checkpoint's ``processing_params`` (pipeline, class names, conf, iou) are honoured; flags override them.

``--backend`` picks what the archive stores and runs (see ``yolonas_serving/runtime.py`` and ``convert.py``):
torch (default), torch-bf16, cuda-fp16, onnx, openvino, openvino-bf16, int8 (OpenVINO INT8, calibrated with NNCF
on ``--calibration-images``, decoded and preprocessed exactly as served) or auto (chosen when the worker loads).
Archives of other backends than torch are named ``yolo_nas_<variant>_<backend>`` unless ``--model-name`` is given.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import yaml
from convert import write_backend_files

from common import HANDLER_DIR, MODEL_STORE, installed_command
from yolonas import read_checkpoint, save_random_checkpoint
from yolonas.checkpoint import Checkpoint
from yolonas_serving.classes import INDEX_TO_NAME, load_names, names_to_mapping, read_names_file
from yolonas_serving.detector import Detector
from yolonas_serving.pipeline import Pipeline
from yolonas_serving.runtime import BACKENDS
from yolonas_serving.settings import HandlerSettings, settings_from_checkpoint

HANDLER_FILE = HANDLER_DIR / "yolo_nas_handler.py"
PACKAGES = ("yolonas", "yolonas_serving")

#  Serving defaults measured on a 2-core CPU (see README, "Batching"): one worker using every core, small batches
#  that fill under load without holding a lone request long.
DEFAULT_BATCH_SIZE = 4
DEFAULT_MAX_BATCH_DELAY_MS = 5
DEFAULT_WORKERS = 1
RESPONSE_TIMEOUT_S = {"s": 60, "m": 120, "l": 120}
#  --sequence-batching (gRPC StreamPredictions2): a stream idle this long is closed; this many streams at once.
SEQUENCE_MAX_IDLE_MS = 10_000
MAX_NUM_SEQUENCE = 4


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


def resolve_settings(ckpt: Checkpoint, args: argparse.Namespace) -> tuple[HandlerSettings, list[str]]:
    """Pipeline, names and thresholds: the checkpoint's processing_params first, then command-line overrides."""
    try:
        return settings_from_checkpoint(
            ckpt.num_classes,
            ckpt.variant,
            ckpt.processing_params,
            input_size=tuple(args.input_size) if args.input_size else None,
            padding=args.padding,
            names=read_names_file(args.names) if args.names else None,
            conf=args.conf,
            iou=args.iou,
            backend=args.backend,
        )
    except ValueError as exc:  # PipelineError included: an unknown step fails here, at archive time
        raise SystemExit(f"cannot archive {ckpt.variant.upper()}: {exc}") from None


def model_config(spec: ArchiveSpec) -> dict:
    config = {
        "minWorkers": spec.workers,
        "maxWorkers": spec.workers,
        "batchSize": spec.batch_size,
        "maxBatchDelay": spec.max_batch_delay,
        "responseTimeout": RESPONSE_TIMEOUT_S[spec.variant],
    }
    if spec.sequence_batching:
        config.update(sequenceBatching=True, sequenceMaxIdleMSec=SEQUENCE_MAX_IDLE_MS, maxNumSequence=MAX_NUM_SEQUENCE)
    return {**config, "handler": spec.settings.as_config()}


def build_archive(ckpt: Checkpoint, spec: ArchiveSpec, export_path: Path) -> Path:
    """Stage the archive's files and run torch-model-archiver; returns the .mar path."""
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
        config.write_text(yaml.safe_dump(model_config(spec), sort_keys=False))
        archiver = installed_command("torch-model-archiver")
        if archiver is None:
            raise SystemExit(
                "torch-model-archiver is not installed in this environment: pip install -r requirements.txt"
            )
        command = [
            archiver, "--model-name", spec.name, "--version", "1.0",
            "--serialized-file", str(serialized), "--handler", str(HANDLER_FILE),
            "--extra-files", str(extra), "--config-file", str(config),
            "--export-path", str(export_path), "--force",
        ]  # fmt: skip
        subprocess.run(command, check=True)
    return export_path / f"{spec.name}.mar"


def stage_backend_files(ckpt: Checkpoint, spec: ArchiveSpec, folder: Path, extra: Path) -> Path:
    """The backend's serialized file in ``folder``; the files it needs beside it are moved into ``extra``."""
    folder.mkdir()
    pipeline = Pipeline.from_spec(spec.settings.pipeline)
    calibration = None
    if spec.calibration_images is not None:
        from quantize import calibration_batches

        calibration = calibration_batches(spec.calibration_images, pipeline)
        print(f"calibrating INT8 on {len(calibration)} images from {spec.calibration_images}")
    try:
        serialized, beside = write_backend_files(spec.settings.backend, ckpt, pipeline.input_size, folder, calibration)
    except (ValueError, ImportError) as exc:  # missing calibration images, openvino or nncf not installed
        raise SystemExit(f"cannot archive {spec.name} with backend {spec.settings.backend}: {exc}") from None
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
    manifest = json.loads((folder / "MAR-INF" / "MANIFEST.json").read_text())["model"]
    config = yaml.safe_load((folder / "model-config.yaml").read_text())
    settings = HandlerSettings.from_config(config.get("handler"))
    names = load_names(folder, settings.num_classes)
    serialized = str(folder / manifest["serializedFile"])
    return Detector.from_settings(settings, serialized, names, manifest["modelName"], device)


def load_or_make_checkpoint(args: argparse.Namespace, variant: str, tmp: Path) -> Checkpoint:
    if args.weights:
        ckpt = read_checkpoint(args.weights)
        if ckpt.variant != variant:
            raise SystemExit(f"{args.weights} holds YOLO-NAS {ckpt.variant.upper()} weights, not {variant.upper()}")
        return ckpt
    path = save_random_checkpoint(tmp / f"random_{variant}.pth", variant, args.num_classes, args.random_weights)
    print(
        f"WARNING: {variant.upper()} uses seeded random weights (seed {args.random_weights}): its detections are "
        "meaningless",
        file=sys.stderr,
    )
    return read_checkpoint(path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--variant", choices=["s", "m", "l"])
    which.add_argument("--all", action="store_true", help="build S, M and L")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--weights", type=Path, help="a super-gradients or Ultralytics checkpoint")
    source.add_argument(
        "--random-weights", type=int, metavar="SEED", help="seeded random weights (offline demos, tests)"
    )
    parser.add_argument("--num-classes", type=int, default=80, help="with --random-weights")
    parser.add_argument("--names", type=Path, help="class names: JSON list, index_to_name mapping or one per line")
    parser.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"), help="network input (multiples of 32)")
    parser.add_argument("--padding", choices=["center", "bottom-right"])
    parser.add_argument("--conf", type=float)
    parser.add_argument("--iou", type=float)
    parser.add_argument("--backend", default="torch", choices=BACKENDS, help="inference backend (see README)")
    parser.add_argument(
        "--calibration-images",
        type=Path,
        metavar="DIR",
        help="--backend int8: images to calibrate on (up to 300, sorted by name)",
    )
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--max-batch-delay", type=int, default=DEFAULT_MAX_BATCH_DELAY_MS, help="milliseconds")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS)
    parser.add_argument(
        "--sequence-batching",
        action="store_true",
        help=f"serve gRPC StreamPredictions2 streams (idle timeout {SEQUENCE_MAX_IDLE_MS} ms, {MAX_NUM_SEQUENCE} "
        "streams at once)",
    )
    parser.add_argument("--model-name", help="archive/model name (default yolo_nas_<variant>)")
    parser.add_argument("--export-path", type=Path, default=MODEL_STORE)
    args = parser.parse_args(argv)
    if args.all and (args.weights or args.model_name):
        parser.error("--all builds from --random-weights; give --variant with --weights or --model-name")
    if (args.backend == "int8") != (args.calibration_images is not None):
        parser.error("--backend int8 needs --calibration-images DIR, and only it uses them")
    if args.calibration_images is not None and not args.calibration_images.is_dir():
        parser.error(f"--calibration-images {args.calibration_images}: not a folder")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    variants = ["s", "m", "l"] if args.all else [args.variant]
    with tempfile.TemporaryDirectory() as tmp:
        for variant in variants:
            ckpt = load_or_make_checkpoint(args, variant, Path(tmp))
            settings, names = resolve_settings(ckpt, args)
            spec = ArchiveSpec(
                variant=variant,
                name=args.model_name or default_name(variant, args.backend),
                settings=settings,
                names=names,
                batch_size=args.batch_size,
                max_batch_delay=args.max_batch_delay,
                workers=args.workers,
                calibration_images=args.calibration_images,
                sequence_batching=args.sequence_batching,
            )
            path = build_archive(ckpt, spec, args.export_path)
            print(
                f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB): {ckpt.source}; preprocessing from "
                f"{settings.preprocessing_source}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
