#!/usr/bin/env bash
# Operate TorchServe with this repo's config.properties:
#   scripts/serve.sh start [MODEL...]   start (own TMPDIR, logs and key file under run/), wait until healthy, register MODELs
#   scripts/serve.sh stop               stop it (frontend and workers)
#   scripts/serve.sh status             models and their workers
# Exits non-zero when a start fails (port in use, Java missing, unhealthy server).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
exec "$PY" scripts/server.py "$@"
