#!/usr/bin/env bash
# From a fresh clone to detections: set up .venv, get official S weights (or fall back to seeded random weights
# when offline), build model_store/yolo_nas_s.mar, start TorchServe, and print the detections for assets/sample.jpg.
# Environment (the test sets these to stay clear of a server already running from this checkout): YOLONAS_RUN_DIR and
# YOLONAS_PORTS as scripts/serve.sh describes them, and YOLONAS_MODEL_STORE for another folder than model_store/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
STORE=${YOLONAS_MODEL_STORE:-model_store}
if "$PY" scripts/get_weights.py --variant s --out weights; then
  WEIGHTS=$(ls weights/yolo_nas_s_coco.pth weights/yolo_nas_s.pt 2>/dev/null | head -n 1)
  "$PY" scripts/archive.py --variant s --weights "$WEIGHTS" --export-path "$STORE"
else
  echo "################################################################################" >&2
  echo "# OFFLINE: official weights unavailable. Serving SEEDED RANDOM WEIGHTS instead. #" >&2
  echo "# The detections below are MEANINGLESS; they only show the service works.      #" >&2
  echo "################################################################################" >&2
  "$PY" scripts/archive.py --variant s --random-weights 0 --export-path "$STORE"
fi
bash scripts/serve.sh stop >/dev/null
bash scripts/serve.sh start yolo_nas_s --model-store "$STORE"
"$PY" scripts/predict.py assets/sample.jpg --model yolo_nas_s
echo "The server keeps running: scripts/serve.sh status | stop"
