#!/usr/bin/env bash
# Operate TorchServe with this repo's config.properties:
#   scripts/serve.sh start [MODEL...]   start (own TMPDIR, logs and key file under run/), wait until healthy, register
#                                       MODELs; the key renewer starts beside it (--renew-margin-min M)
#   scripts/serve.sh stop               stop it (key renewer, frontend and workers)
#   scripts/serve.sh status             each key's time left, the key renewer, models and their workers
#   scripts/serve.sh renewer            start the key renewer again if it is not running
# Exits non-zero when a start fails (port in use, Java missing, unhealthy server).
# Environment: YOLONAS_RUN_DIR puts the run folder elsewhere than run/. YOLONAS_PORTS="I M X GI GM" makes `start`
# listen on those five loopback ports (REST inference, management, metrics, gRPC inference, gRPC management) instead
# of config.properties' 8080 8081 8082 7070 7071, e.g. beside another server; the other commands and the clients
# read the ports from the run folder. (scripts/server.py has no ports flag: this passes them to its start().)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
if [ -n "${YOLONAS_PORTS:-}" ]; then
  exec "$PY" -c '
import importlib.util, os, sys
ports = os.environ["YOLONAS_PORTS"].split()
if len(ports) != 5 or not all(p.isdigit() for p in ports):
    sys.exit("error: YOLONAS_PORTS needs five port numbers, got " + repr(os.environ["YOLONAS_PORTS"]))
keys = ("inference_address", "management_address", "metrics_address", "grpc_inference_port", "grpc_management_port")
spec = importlib.util.spec_from_file_location("server_cli", "scripts/server.py")
cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cli)
start = cli.start
cli.start = lambda *args, **kwargs: start(*args, ports=dict(zip(keys, map(int, ports))), **kwargs)
sys.argv[0] = "scripts/server.py"
sys.exit(cli.main(sys.argv[1:]))
' "$@"
fi
exec "$PY" scripts/server.py "$@"
