"""Build TorchServe archives (.mar) for YOLO-NAS.

    python scripts/archive.py --variant s --weights weights/yolo_nas_s_coco.pth --export-path model_store
    python scripts/archive.py --variant s --random-weights 0 --export-path model_store
    python scripts/archive.py --all --random-weights 0
    python scripts/archive.py --variant s --weights W.pth --backend int8 --calibration-images DIR
    python scripts/archive.py --variant s --random-weights 0 --set conf=0.4 --set maxWorkers=2 --version 2.0

``--backend`` picks what the archive stores and runs, a row of ``yolonas_serving/backends.py`` (``--help`` lists
them): torch by default; int8 is calibrated with NNCF on ``--calibration-images``, decoded and preprocessed exactly
as served; auto is chosen when the worker loads. The backends that trade exactness for speed (auto, int8 and the
bf16/fp16 ones) run ``--padding minimal`` unless told otherwise (``--padding fixed`` keeps super-gradients' square
input). ``--tracker bytetrack`` builds an archive that tracks objects per sequence (implies sequence batching).
Archives of other backends than torch are named ``yolo_nas_<variant>_<backend>`` unless ``--model-name`` is given.

Any other setting goes in with ``--handler-config FILE`` (YAML shaped like model-config.yaml: TorchServe's keys at the
top, the handler's under ``handler:``) and ``--set KEY=VALUE`` (repeatable; VALUE is read as YAML, so 0.4 is a
number and true a boolean; KEY is a TorchServe key such as maxWorkers or a handler key such as conf, optionally as
handler.conf). Flags first, then the file, then --set. Every key and value is checked here exactly as the worker
checks it at load (yolonas_serving/settings.py), so a bad one fails now, naming the key, the value and what is
allowed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from yolonas import VARIANTS
from yolonas_serving.backends import BACKENDS
from yolonas_serving.pipeline import PADDING_MODES
from yolonas_serving.tracking import TRACKER_DEFAULTS
from yolonas_tools.build.archive import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_BATCH_DELAY_MS,
    DEFAULT_WORKERS,
    MAX_NUM_SEQUENCE,
    SEQUENCE_MAX_IDLE_MS,
    VERSION_PATTERN,
    ArchiveError,
    ArchiveSpec,
    build_archive,
    default_name,
    load_or_make_checkpoint,
    read_overrides,
    resolve_settings,
)
from yolonas_tools.paths import MODEL_STORE


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--variant", choices=list(VARIANTS))
    which.add_argument("--all", action="store_true", help="build S, M and L")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--weights", type=Path, help="a super-gradients or Ultralytics checkpoint")
    source.add_argument(
        "--random-weights", type=int, metavar="SEED", help="seeded random weights (offline demos, tests)"
    )
    parser.add_argument("--num-classes", type=int, default=80, help="with --random-weights")
    parser.add_argument("--names", type=Path, help="class names: JSON list, index_to_name mapping or one per line")
    parser.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"), help="network input (multiples of 32)")
    parser.add_argument(
        "--padding",
        choices=PADDING_MODES,
        help="where the image sits in the network input. fixed: the checkpoint's fixed-size input (super-gradients' "
        "square); center / bottom-right: that size, the image placed so; minimal: pad only to the next multiple of "
        "32, so a 16:9 picture runs at 640x384 (about 40%% less work; outputs differ slightly from the square "
        "input). Default: minimal for the backends that already trade exactness for speed "
        f"({', '.join(name for name, row in BACKENDS.items() if row.minimal_padding)}), else fixed",
    )
    parser.add_argument("--conf", type=float)
    parser.add_argument("--iou", type=float)
    parser.add_argument(
        "--backend",
        default="torch",
        choices=BACKENDS,
        help="inference backend: " + "; ".join(f"{name}: {row.summary}" for name, row in BACKENDS.items()),
    )
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
    parser.add_argument(
        "--tracker",
        choices=list(TRACKER_DEFAULTS),
        help="track objects: one tracker of this kind per sequence (implies --sequence-batching; its parameters "
        "with --set, e.g. --set lost_track_buffer=60; same as --set tracker=KIND)",
    )
    parser.add_argument("--model-name", help="archive/model name (default yolo_nas_<variant>)")
    parser.add_argument("--version", default="1.0", help="model version, served at /predictions/<model>/<version>")
    parser.add_argument(
        "--handler-config",
        type=Path,
        metavar="FILE",
        help="YAML shaped like model-config.yaml: TorchServe keys at the top, handler keys under handler:",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any TorchServe model key (maxWorkers, responseTimeout, ...) or handler key (conf, max_det, "
        "class_agnostic, torch_threads, jpeg_draft, max_images_per_request, ...); VALUE is YAML; repeatable",
    )
    parser.add_argument("--export-path", type=Path, default=MODEL_STORE)
    args = parser.parse_args(argv)
    if args.all and (args.weights or args.model_name):
        parser.error("--all builds from --random-weights; give --variant with --weights or --model-name")
    if BACKENDS[args.backend].needs_calibration != (args.calibration_images is not None):
        calibrated = ", ".join(name for name, row in BACKENDS.items() if row.needs_calibration)
        parser.error(f"--backend {calibrated} needs --calibration-images DIR, and only it uses them")
    if args.calibration_images is not None and not args.calibration_images.is_dir():
        parser.error(f"--calibration-images {args.calibration_images}: not a folder")
    if not VERSION_PATTERN.match(args.version):
        parser.error(f"--version {args.version!r}: letters, digits, '.', '_' and '-', starting with a letter or digit")
    if args.handler_config is not None and not args.handler_config.is_file():
        parser.error(f"--handler-config {args.handler_config}: not a file")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    variants = list(VARIANTS) if args.all else [args.variant]
    try:
        overrides = read_overrides(
            args.handler_config, ([f"tracker={args.tracker}"] if args.tracker else []) + args.set
        )
        with tempfile.TemporaryDirectory() as tmp:
            for variant in variants:
                ckpt = load_or_make_checkpoint(variant, args.weights, args.random_weights, args.num_classes, Path(tmp))
                settings, names = resolve_settings(
                    ckpt, args.backend, tuple(args.input_size) if args.input_size else None, args.padding, args.names,
                    args.conf, args.iou,
                )  # fmt: skip
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
                    overrides=overrides,
                    version=args.version,
                )
                path = build_archive(ckpt, spec, args.export_path)
                print(
                    f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB): {ckpt.source}; preprocessing from "
                    f"{settings.preprocessing_source}"
                )
    except ArchiveError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
