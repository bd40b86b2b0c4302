"""Start, stop and inspect TorchServe with this repo's config.properties.

    python scripts/server.py start [MODEL ...]   # scripts/serve.sh start wraps this
    python scripts/server.py stop
    python scripts/server.py status

Each server gets its own working folder (default ``run/``): TMPDIR (TorchServe keeps one PID file per TMPDIR), logs,
the key file TorchServe writes at start, and ``server.json`` with its addresses for the other scripts. Tests start
servers the same way on free ports in temporary folders.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

from common import MODEL_STORE, REPO, RUN_DIR, Endpoints, installed_command

CONFIG = REPO / "config.properties"
PORT_KEYS = {
    "inference_address": "inference",
    "management_address": "management",
    "metrics_address": "metrics",
    "grpc_inference_port": "grpc_inference",
    "grpc_management_port": "grpc_management",
}


class ServerError(RuntimeError):
    pass


def read_properties(path: Path) -> dict[str, str]:
    props = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip()
    return props


def _port(value: str) -> int:
    return int(value.rsplit(":", 1)[1]) if ":" in value else int(value)


def free_ports(count: int = len(PORT_KEYS)) -> dict[str, int]:
    """Distinct free loopback ports for every address in the config (tests run servers side by side)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return dict(zip(PORT_KEYS, (s.getsockname()[1] for s in sockets)))
    finally:
        for sock in sockets:
            sock.close()


def write_config(run_dir: Path, ports: dict[str, int] | None = None, extra: dict[str, str] | None = None) -> Path:
    """The shipped config, with other ports (tests) or extra keys when asked; everything else unchanged."""
    text = CONFIG.read_text()
    for key, port in (ports or {}).items():
        text = re.sub(rf"^({key}=.*?)\d+$", rf"\g<1>{port}", text, flags=re.M)
    text = re.sub(
        r"^metrics_config=(.*)$", lambda m: f"metrics_config={(REPO / m.group(1)).resolve()}", text, flags=re.M
    )
    for key, value in (extra or {}).items():
        text += f"\n{key}={value}\n"
    path = run_dir / "config.properties"
    path.write_text(text)
    return path


def _endpoints(props: dict[str, str]) -> dict[str, str]:
    def grpc(kind: str, port: int) -> str:
        return f"{props.get(f'grpc_{kind}_address', '127.0.0.1')}:{props.get(f'grpc_{kind}_port', port)}"

    return {
        "inference": props["inference_address"],
        "management": props["management_address"],
        "metrics": props["metrics_address"],
        "grpc_inference": grpc("inference", 7070),
        "grpc_management": grpc("management", 7071),
    }


def _check_ports(props: dict[str, str]) -> None:
    for key in PORT_KEYS:
        if key not in props:
            continue
        port = _port(props[key])
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                raise ServerError(f"port {port} ({key}) is in use: another TorchServe may be running") from None


def _log_tail(run_dir: Path, lines: int = 30) -> str:
    log = run_dir / "logs" / "console.log"
    if not log.is_file():
        return ""
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def start(
    run_dir: Path = RUN_DIR,
    model_store: Path = MODEL_STORE,
    models: list[str] | None = None,
    ports: dict[str, int] | None = None,
    extra_config: dict[str, str] | None = None,
    timeout: float = 180.0,
) -> Endpoints:
    """Start TorchServe in the background, wait until it answers /ping, register ``models``; raise if it fails."""
    if shutil.which("java") is None:
        raise ServerError("Java is not installed: TorchServe's frontend needs Java 11 or newer (17 recommended)")
    torchserve = installed_command("torchserve")
    if torchserve is None:
        raise ServerError("torchserve is not installed in this environment: pip install -r requirements.txt")
    run_dir = Path(run_dir).resolve()
    pid_file = run_dir / "server.pid"
    if pid_file.is_file() and _pid_alive(int(pid_file.read_text())):
        raise ServerError(f"a server from {run_dir} is already running (pid {pid_file.read_text().strip()})")
    for sub in ("tmp", "logs"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    (run_dir / "key_file.json").unlink(missing_ok=True)
    config = write_config(run_dir, ports, extra_config)
    props = read_properties(config)
    _check_ports(props)
    env = dict(os.environ, TMPDIR=str(run_dir / "tmp"), TEMP=str(run_dir / "tmp"))
    env.update(LOG_LOCATION=str(run_dir / "logs"), METRICS_LOCATION=str(run_dir / "logs"))
    # Workers share the cores with the frontend and each other: OpenMP threads that spin while waiting for work
    # steal them (served S measured 0-35% more images/s with passive waiting, every backend; see README).
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    command = [torchserve, "--start", "--foreground", "--ncs", "--model-store", str(Path(model_store).resolve())]
    command += ["--ts-config", str(config)]
    with open(run_dir / "logs" / "console.log", "ab") as log:
        process = subprocess.Popen(
            command, cwd=run_dir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    pid_file.write_text(str(process.pid))
    (run_dir / "server.json").write_text(json.dumps(_endpoints(props), indent=2))
    endpoints = Endpoints.load(run_dir)
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            pid_file.unlink(missing_ok=True)
            raise ServerError(f"TorchServe exited with code {process.returncode} during start:\n{_log_tail(run_dir)}")
        if (run_dir / "key_file.json").is_file():
            try:
                if requests.get(f"{endpoints.inference}/ping", headers=endpoints.auth(), timeout=2).ok:
                    break
            except (requests.RequestException, SystemExit):
                pass
        if time.monotonic() > deadline:
            stop(run_dir)
            raise ServerError(f"TorchServe did not become healthy within {timeout:.0f} s:\n{_log_tail(run_dir)}")
        time.sleep(0.5)
    for model in models or []:
        register(endpoints, model)
    return endpoints


def register(endpoints: Endpoints, archive: str, name: str | None = None, **params: object) -> dict:
    """Register ``archive`` (a .mar name in the model store) synchronously; extra params go to the API as is."""
    archive = archive if archive.endswith(".mar") else f"{archive}.mar"
    query = {"url": archive, "synchronous": "true", "initial_workers": 1, **params}
    if name:
        query["model_name"] = name
    response = requests.post(
        f"{endpoints.management}/models", params=query, headers=endpoints.auth("management"), timeout=600
    )
    if not response.ok:
        raise ServerError(f"registering {archive} failed ({response.status_code}): {response.text.strip()}")
    return response.json()


def stop(run_dir: Path = RUN_DIR, timeout: float = 30.0) -> bool:
    """Stop the server started from ``run_dir`` (frontend and workers); False if none was running."""
    run_dir = Path(run_dir).resolve()
    pid_file = run_dir / "server.pid"
    if not pid_file.is_file():
        return False
    pid = int(pid_file.read_text())
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        pid_file.unlink(missing_ok=True)
        return False
    deadline = time.monotonic() + timeout
    while _pid_alive(pid) and time.monotonic() < deadline:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)  # whatever ignored SIGTERM, workers included
    except ProcessLookupError:
        pass
    pid_file.unlink(missing_ok=True)
    return True


def status(endpoints: Endpoints) -> list[dict]:
    headers = endpoints.auth("management")
    listing = requests.get(f"{endpoints.management}/models", headers=headers, timeout=10)
    listing.raise_for_status()
    described = []
    for model in listing.json().get("models", []):
        response = requests.get(f"{endpoints.management}/models/{model['modelName']}", headers=headers, timeout=10)
        described.extend(response.json())
    return described


def _print_usage(endpoints: Endpoints, models: list[str]) -> None:
    name = Path(models[0]).stem if models else "yolo_nas_s"
    print(
        f"TorchServe is up: inference {endpoints.inference}, management {endpoints.management}, "
        f"metrics {endpoints.metrics}/metrics, gRPC {endpoints.grpc_inference} / {endpoints.grpc_management}"
    )
    key_file = endpoints.run_dir / "key_file.json"
    print(f"Keys are in {key_file}. For example:")
    print(f"  python scripts/predict.py IMAGE --model {name}")
    print(f"  KEY=$(python -c \"import json; print(json.load(open('{key_file}'))['inference']['key'])\")")
    print(
        f'  curl -H "Authorization: Bearer $KEY" -H "Content-Type: image/jpeg" --data-binary @IMAGE '
        f"{endpoints.inference}/predictions/{name}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["start", "stop", "status"])
    parser.add_argument("models", nargs="*", help="archives in the model store to register at start (name or name.mar)")
    parser.add_argument("--run-dir", type=Path, default=RUN_DIR)
    parser.add_argument("--model-store", type=Path, default=MODEL_STORE)
    args = parser.parse_intermixed_args()  # "start --run-dir DIR MODEL" as well as "--run-dir DIR start MODEL"
    try:
        if args.command == "start":
            missing = [
                m for m in args.models if not (args.model_store / (m if m.endswith(".mar") else f"{m}.mar")).is_file()
            ]
            if missing:
                raise ServerError(f"no archive for {missing} in {args.model_store}: build it with scripts/archive.py")
            _print_usage(start(args.run_dir, args.model_store, args.models), args.models)
        elif args.command == "stop":
            print("stopped" if stop(args.run_dir) else "no server was running")
        else:
            for model in status(Endpoints.load(args.run_dir)):
                workers = ", ".join(f"{w['id']} {w['status']}" for w in model.get("workers", []))
                print(
                    f"{model['modelName']} v{model['modelVersion']}: batch {model['batchSize']}, "
                    f"delay {model['maxBatchDelay']} ms, workers [{workers}]"
                )
    except (ServerError, requests.RequestException) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
