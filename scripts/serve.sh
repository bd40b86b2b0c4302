#!/usr/bin/env bash
# Operate TorchServe with this repo's config.properties:
#   scripts/serve.sh start [MODEL...]   start (own TMPDIR, logs and key file under run/), wait until healthy, register
#                                       MODELs; the key renewer starts beside it (--renew-margin-min M)
#   scripts/serve.sh stop               stop it (key renewer, frontend and workers)
#   scripts/serve.sh status             each key's time left, the key renewer, models and their workers
#   scripts/serve.sh renewer            start the key renewer again if it is not running
# Exits non-zero when a start fails (port in use, Java missing, unhealthy server).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
exec "$PY" scripts/server.py "$@"
