"""Send images to the running server and print their detections.

    python scripts/predict.py assets/sample.jpg [--model yolo_nas_s] [--conf 0.5] [--save annotated.jpg]

Reads the inference key from the server's key_file.json itself. ``--save`` asks the server for the annotated
picture (``Accept: image/jpeg``) and writes it; with several images, ``--save`` names a folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from yolonas_tools.paths import RUN_DIR
from yolonas_tools.serve.clients import (
    Endpoints,
    add_request_arguments,
    option_headers,
    predict,
    print_table,
    request_options,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_request_arguments(parser)
    parser.add_argument("--run-dir", type=Path, default=RUN_DIR)
    args = parser.parse_args(argv)
    endpoints = Endpoints.load(args.run_dir)
    headers = option_headers(request_options(args))
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
