"""Validate a YOLO-NAS model on a labelled dataset: mAP50-95, mAP50, precision, recall and per-class AP (pycocotools).

    python scripts/val.py --model yolo_nas_s --data coco/annotations/instances_val2017.json --server
    python scripts/val.py --model shapes --data val/data.yaml --weights checkpoint.pth --out results.json

DATASET is an Ultralytics data YAML (``path``, ``val``, ``names``; YOLO txt labels) or a COCO JSON (images in
``--images``, found automatically in COCO's own layout). ``--server`` (the default) sends every image through the
running TorchServe's model ``--model``; ``--weights`` runs the same Detector in process, with the preprocessing,
names and settings that a Trainer checkpoint's ``processing_params`` carry. Both read the same JSON response, so
they give the same numbers. Detection settings follow super-gradients' validation: conf 0.001, IoU 0.7, up to 1024
candidates before NMS (the archive's setting) and 300 detections per image.

Metrics (mAP50-95, mAP50, precision and recall at the best-F1 threshold, AR100) are pycocotools' COCOeval, as
yolonas_tools/measure/evaluation.py defines them; ``--out`` writes the definitions beside the numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from yolonas_tools.data.datasets import DatasetError, load_dataset
from yolonas_tools.measure.evaluation import (
    DEFINITIONS,
    EvalOptions,
    EvaluationError,
    collect,
    evaluate,
    format_table,
    local_detector,
    local_responses,
    server_responses,
)
from yolonas_tools.paths import RUN_DIR
from yolonas_tools.serve.clients import Endpoints


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="yolo_nas_s", help="model name on the server (a label with --weights)")
    parser.add_argument("--data", type=Path, required=True, help="Ultralytics data .yaml or COCO .json")
    parser.add_argument("--images", type=Path, help="image folder of a COCO .json (default: COCO's layout)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--server", action="store_true", help="through the running TorchServe (the default)")
    where.add_argument("--weights", type=Path, help="run this checkpoint in process instead")
    parser.add_argument("--conf", type=float, default=EvalOptions.conf)
    parser.add_argument("--iou", type=float, default=EvalOptions.iou)
    parser.add_argument("--max-det", type=int, default=EvalOptions.max_det)
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass with --weights")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight with --server")
    parser.add_argument("--device", default="cpu", help="with --weights: cpu or cuda[:N]")
    parser.add_argument("--run-dir", type=Path, default=RUN_DIR, help="the server's working folder")
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    options = EvalOptions(args.conf, args.iou, args.max_det)
    start = time.perf_counter()
    endpoints = None if args.weights else Endpoints.load(args.run_dir)
    try:
        dataset = load_dataset(args.data, args.images)
        if args.weights:
            detector = local_detector(args.weights, args.model, args.device)
            if len(detector.names) != len(dataset.names):
                raise EvaluationError(f"the model has {len(detector.names)} classes, the dataset {len(dataset.names)}")
            responses = local_responses(detector, dataset.images, options, args.batch_size)
        else:
            responses = server_responses(endpoints, args.model, dataset.images, options, args.concurrency)
        detections = collect(dataset, responses)
    except (DatasetError, EvaluationError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - start
    results = evaluate(dataset, detections)
    print(results.coco_summary.rstrip())
    print(format_table(results))
    print(f"{len(dataset.images)} images in {seconds:.1f} s ({'in process' if args.weights else 'server'})")
    if args.out:
        report = {
            "model": args.model,
            "data": str(args.data),
            "source": str(args.weights) if args.weights else f"server {endpoints.inference}",
            "options": asdict(options),
            "seconds": round(seconds, 2),
            **results.to_json(),
            "definitions": DEFINITIONS,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
        print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
