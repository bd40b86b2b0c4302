#!/usr/bin/env bash
# Create .venv at the repo root, install the repository into it in editable mode with everything the scripts and
# tests need (the packages yolonas, yolonas_serving, yolonas_tools and the yolonas-serve command), and generate the
# gRPC stubs.
# Idempotent: a second run only checks. Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[dev]'
# KServe's client pins protobuf<7, which the gRPC stubs cannot use: installed without its dependencies, then those
# (requirements-kserve.txt says why).
.venv/bin/python -m pip install --quiet --no-deps kserve==0.21.0
.venv/bin/python -m pip install --quiet -r requirements-kserve.txt
# sahi (tests/test_slicing.py compares our sliced inference with it) requires opencv-python, which would overwrite
# the cv2 of opencv-python-headless: installed without its dependencies; requirements-dev.txt lists the others.
.venv/bin/python -m pip install --quiet --no-deps sahi==0.12.8
# Roboflow's trackers (tracking archives) requires opencv-python too: likewise (requirements-tracking.txt says why).
.venv/bin/python -m pip install --quiet --no-deps trackers==2.6.1
.venv/bin/python scripts/gen_grpc.py
command -v java >/dev/null || echo "WARNING: java not found; TorchServe's frontend needs Java 17" >&2
