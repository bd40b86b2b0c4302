"""Send images to the running server and print their detections.

    python scripts/predict.py assets/sample.jpg [--model yolo_nas_s] [--conf 0.5] [--save annotated.jpg]

Reads the inference key from the server's key_file.json itself. ``--save`` asks the server for the annotated
picture (``Accept: image/jpeg``) and writes it; with several images, ``--save`` names a folder.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import requests

from common import RUN_DIR, Endpoints

MIME = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp", ".bmp": "image/bmp",
        ".tif": "image/tiff", ".tiff": "image/tiff", ".gif": "image/gif"}  # fmt: skip


def option_headers(conf: float | None, iou: float | None, max_det: int | None, classes: str | None) -> dict[str, str]:
    """Options travel as X-* headers with a raw image body (TorchServe does not pass query strings on)."""
    headers = {}
    for name, value in (("X-Conf", conf), ("X-Iou", iou), ("X-Max-Det", max_det), ("X-Classes", classes)):
        if value is not None:
            headers[name] = str(value)
    return headers


#  TorchServe answers these when a worker died under the request (crash, timeout, scale-down): retry once.
RETRY_STATUSES = (500, 503, 507)


def predict(
    endpoints: Endpoints, model: str, image: Path, headers: dict[str, str], picture: bool = False, timeout: float = 60
) -> requests.Response:
    request_headers = {"Content-Type": MIME.get(image.suffix.lower(), "application/octet-stream"), **headers}
    if picture:
        request_headers["Accept"] = "image/jpeg"
    url = f"{endpoints.inference}/predictions/{model}"
    data = image.read_bytes()
    for attempt in range(2):
        response = requests.post(url, data=data, headers={**request_headers, **endpoints.auth()}, timeout=timeout)
        if response.status_code not in RETRY_STATUSES or attempt:
            return response
        time.sleep(1.0)
    return response


def print_table(image: Path, result: dict) -> None:
    detections = result["detections"]
    width, height = result["image_size"]
    print(f"{image} ({width}x{height}): {len(detections)} detections from {result['model']}")
    if detections:
        print(f"  {'class':<16} {'score':>6}  box (x1, y1, x2, y2)")
    for d in detections:
        box = ", ".join(f"{v:7.1f}" for v in d["box"])
        print(f"  {d['class_name']:<16} {d['score']:6.3f}  ({box})")


def add_request_arguments(parser: argparse.ArgumentParser) -> None:
    """Images, model and per-request options: shared by the REST and gRPC clients."""
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--model", default="yolo_nas_s")
    parser.add_argument("--conf", type=float)
    parser.add_argument("--iou", type=float)
    parser.add_argument("--max-det", type=int)
    parser.add_argument("--classes", help="comma-separated class ids or names")
    parser.add_argument("--save", type=Path, help="write the annotated picture (a folder when several images)")
    parser.add_argument("--json", action="store_true", help="print the raw JSON responses")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_request_arguments(parser)
    parser.add_argument("--run-dir", type=Path, default=RUN_DIR)
    args = parser.parse_args()
    endpoints = Endpoints.load(args.run_dir)
    headers = option_headers(args.conf, args.iou, args.max_det, args.classes)
    failed = 0
    for image in args.images:
        response = predict(endpoints, args.model, image, headers)
        if not response.ok:
            print(f"{image}: HTTP {response.status_code}: {response.text.strip()}", file=sys.stderr)
            failed += 1
            continue
        result = response.json()
        print(json.dumps(result)) if args.json else print_table(image, result)
        if args.save:
            target = args.save / f"{image.stem}_annotated.jpg" if len(args.images) > 1 else args.save
            target.parent.mkdir(parents=True, exist_ok=True)
            picture = predict(endpoints, args.model, image, headers, picture=True)
            picture.raise_for_status()
            target.write_bytes(picture.content)
            print(f"  annotated picture: {target}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
