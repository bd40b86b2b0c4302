"""Server control: start, stop and inspect TorchServe with this repo's config.properties (one working folder per
server, the key renewer beside it, as ``scripts/server.py`` describes), and its health (as
``scripts/healthcheck.py`` describes). Failures are ServerError or Unhealthy, with the reason."""

from __future__ import annotations

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

from yolonas_tools.paths import MODEL_STORE, REPO, RUN_DIR, installed_command, read_properties
from yolonas_tools.serve.clients import Endpoints, NoServerError, authorized_request
from yolonas_tools.serve.keys import RENEWER_COMMAND, KeyFileError, process_alive, read_keys, seconds_left

CONFIG = REPO / "config.properties"
LOG_CONFIG = REPO / "log4j2.xml"
#  Settings of config.properties that name a file: TorchServe resolves a relative one against its working directory.
PATH_KEYS = ("metrics_config",)
PORT_KEYS = {
    "inference_address": "inference",
    "management_address": "management",
    "metrics_address": "metrics",
    "grpc_inference_port": "grpc_inference",
    "grpc_management_port": "grpc_management",
}


class ServerError(RuntimeError):
    """TorchServe could not be started, registered with or reached as asked; the message says why."""


class Unhealthy(Exception):
    """The server of a run folder is not healthy; the message says why."""


class _Terminated(Exception):
    """SIGTERM or SIGINT reached a server kept in the foreground."""


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
    """The shipped config with its file paths made absolute (TorchServe runs in ``run_dir``), and other ports
    (tests) or extra keys when asked; everything else unchanged."""
    text = CONFIG.read_text()
    for key, port in (ports or {}).items():
        text = re.sub(rf"^({key}=.*?)\d+$", rf"\g<1>{port}", text, flags=re.M)
    for key in PATH_KEYS:
        text = re.sub(rf"^({key}=)(.*)$", lambda m: f"{m.group(1)}{(CONFIG.parent / m.group(2)).resolve()}", text,
                      flags=re.M)  # fmt: skip
    for key, value in (extra or {}).items():
        text += f"\n{key}={value}\n"
    path = run_dir / "config.properties"
    path.write_text(text)
    check_config_paths(path)
    return path


def check_config_paths(config: Path, cwd: Path | None = None) -> None:
    """Fail before starting when a file the config names does not exist where TorchServe will look for it: a
    relative path is resolved against TorchServe's working directory, not the config's folder, and a missing
    metrics_config kills every worker at start (MetricsCacheIOError) while registration answers a bare 500."""
    props = read_properties(config)
    for key in PATH_KEYS:
        if key in props and not ((cwd or Path.cwd()) / props[key]).is_file():
            raise ServerError(
                f"{config}: {key}={props[key]} does not exist relative to {cwd or Path.cwd()}, where TorchServe will "
                f"look for it. Give {key} an absolute path, or start TorchServe from the folder that holds it."
            )


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


def start_renewer(run_dir: Path, margin_min: float | None = None) -> int:
    """scripts/key_renewer.py for the server of ``run_dir``, in its own session (``stop`` ends it); its pid."""
    run_dir = Path(run_dir).resolve()
    command = [sys.executable, str(RENEWER_COMMAND), "--run-dir", str(run_dir),
               "--log-file", str(run_dir / "logs" / "renewer.log")]  # fmt: skip
    if margin_min is not None:
        command += ["--renew-margin-min", str(margin_min)]
    with open(run_dir / "logs" / "console.log", "ab") as log:  # a crash before logging starts lands here
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    (run_dir / "renewer.pid").write_text(str(process.pid))
    return process.pid


def _kill_group(pid_file: Path, timeout: float) -> bool:
    """SIGTERM the process group led by the pid in ``pid_file``, then SIGKILL what is left; False if none ran."""
    if not pid_file.is_file():
        return False
    pid = int(pid_file.read_text())
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        pid_file.unlink(missing_ok=True)
        return False
    deadline = time.monotonic() + timeout
    while process_alive(pid) and time.monotonic() < deadline:
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


def start(
    run_dir: Path = RUN_DIR,
    model_store: Path = MODEL_STORE,
    models: list[str] | None = None,
    ports: dict[str, int] | None = None,
    extra_config: dict[str, str] | None = None,
    timeout: float = 180.0,
    renew_margin_min: float | None = None,
) -> Endpoints:
    """Start TorchServe and its key renewer in the background, wait until it answers /ping, register ``models``
    (``["all"]``: every archive in the store); raise if it fails."""
    if shutil.which("java") is None:
        raise ServerError("Java is not installed: TorchServe's frontend needs Java 11 or newer (17 recommended)")
    torchserve = installed_command("torchserve")
    if torchserve is None:
        raise ServerError("torchserve is not installed in this environment: pip install -r requirements.txt")
    run_dir = Path(run_dir).resolve()
    pid_file = run_dir / "server.pid"
    if pid_file.is_file() and process_alive(int(pid_file.read_text())):
        raise ServerError(f"a server from {run_dir} is already running (pid {pid_file.read_text().strip()})")
    _remove_extracted_archives(run_dir)  # left by a server that did not stop through stop()
    for sub in ("tmp", "logs"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    for stale in ("key_file.json", "renewer.json"):
        (run_dir / stale).unlink(missing_ok=True)
    config = write_config(run_dir, ports, extra_config)
    props = read_properties(config)
    _check_ports(props)
    env = dict(os.environ, TMPDIR=str(run_dir / "tmp"), TEMP=str(run_dir / "tmp"))
    env.update(LOG_LOCATION=str(run_dir / "logs"), METRICS_LOCATION=str(run_dir / "logs"))
    # Workers share the cores with the frontend and each other: OpenMP threads that spin while waiting for work
    # steal them (served S measured 0-35% more images/s with passive waiting, every backend; see README).
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    command = [torchserve, "--start", "--foreground", "--ncs", "--model-store", str(Path(model_store).resolve())]
    command += ["--ts-config", str(config), "--log-config", str(LOG_CONFIG)]
    with open(run_dir / "logs" / "console.log", "ab") as log:
        process = subprocess.Popen(
            command, cwd=run_dir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    pid_file.write_text(str(process.pid))
    try:  # from here on, whatever interrupts the start (a timeout, an error, Ctrl-C) stops what was started
        (run_dir / "server.json").write_text(json.dumps(_endpoints(props), indent=2))
        endpoints = Endpoints.load(run_dir)
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                pid_file.unlink(missing_ok=True)
                raise ServerError(
                    f"TorchServe exited with code {process.returncode} during start:\n{_log_tail(run_dir)}"
                )
            if (run_dir / "key_file.json").is_file():
                try:
                    if requests.get(f"{endpoints.inference}/ping", headers=endpoints.auth(), timeout=2).ok:
                        break
                except (requests.RequestException, KeyFileError):
                    pass
            if time.monotonic() > deadline:
                raise ServerError(f"TorchServe did not become healthy within {timeout:.0f} s:\n{_log_tail(run_dir)}")
            time.sleep(0.5)
        start_renewer(run_dir, renew_margin_min)
        if models == ["all"]:
            models = sorted(p.name for p in Path(model_store).glob("*.mar"))
        for model in models or []:
            register(endpoints, model)
    except BaseException:
        stop(run_dir)
        raise
    return endpoints


def register(endpoints: Endpoints, archive: str, name: str | None = None, **params: object) -> dict:
    """Register ``archive`` (a .mar name in the model store) synchronously; extra params go to the API as is."""
    archive = archive if archive.endswith(".mar") else f"{archive}.mar"
    query = {"url": archive, "synchronous": "true", "initial_workers": 1, **params}
    if name:
        query["model_name"] = name
    url = f"{endpoints.management}/models"
    response = authorized_request(endpoints, "POST", url, "management", params=query, timeout=600)
    if not response.ok:
        raise ServerError(f"registering {archive} failed ({response.status_code}): {response.text.strip()}")
    return response.json()


def stop(run_dir: Path = RUN_DIR, timeout: float = 30.0) -> bool:
    """Stop the server started from ``run_dir``: key renewer, frontend and workers; False if none was running."""
    run_dir = Path(run_dir).resolve()
    _kill_group(run_dir / "renewer.pid", 5.0)
    stopped = _kill_group(run_dir / "server.pid", timeout)
    _remove_extracted_archives(run_dir)
    return stopped


def _remove_extracted_archives(run_dir: Path) -> None:
    """TorchServe extracts each registered archive into TMPDIR/models/<uuid> and removes it on unregister, but not
    when it is stopped: without this every restart would leave a copy of every model behind."""
    shutil.rmtree(run_dir / "tmp" / "models", ignore_errors=True)


def wait_in_foreground(run_dir: Path) -> int:
    """Stay attached to the server of ``run_dir`` (a container's main process): stop it all on SIGTERM/SIGINT, and
    exit with an error, after stopping the rest, when TorchServe or the key renewer is gone."""
    run_dir = Path(run_dir).resolve()

    def terminate(signum: int, frame: object) -> None:
        raise _Terminated(signum)

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, terminate)
    try:
        while True:
            for name in ("server", "renewer"):
                pid = int((run_dir / f"{name}.pid").read_text())
                if not process_alive(pid) or _reaped(pid):
                    print(f"error: the {name} process ({pid}) is gone: stopping", file=sys.stderr, flush=True)
                    stop(run_dir)
                    return 1
            time.sleep(2.0)
    except _Terminated:
        stop(run_dir)
        return 0


def _reaped(pid: int) -> bool:
    """Our own child that exited is a zombie until waited for: reap it and say so."""
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == pid
    except ChildProcessError:
        return False


def key_status(run_dir: Path) -> list[str]:
    """One line per key with the time it has left, and one on the renewer: running (with its last check) or,
    loudly, not."""
    run_dir = Path(run_dir).resolve()
    keys = read_keys(run_dir / "key_file.json")
    lines = []
    for kind in ("inference", "management"):
        left = seconds_left(keys[kind])
        state = "EXPIRED" if left is not None and left <= 0 else f"{left / 60:.1f} min left"
        lines.append(f"{kind} key: {state}")
    lines.append(renewer_status(run_dir)[1])
    return lines


def renewer_status(run_dir: Path) -> tuple[bool, str]:
    """(healthy, one line): the renewer process is alive and has checked the keys recently."""
    pid_file, state_file = run_dir / "renewer.pid", run_dir / "renewer.json"
    fix = f"keys will expire; restart it with: python scripts/server.py renewer --run-dir {run_dir}"
    if not pid_file.is_file() or not process_alive(int(pid_file.read_text())):
        return False, f"KEY RENEWER IS NOT RUNNING: {fix}"
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError):
        return True, "key renewer: starting"
    age = time.time() - state["checked_at"]
    if age > 3 * state["check_every_s"] + 30:
        return False, f"KEY RENEWER IS STUCK: last check {age:.0f} s ago; {fix}"
    if state.get("error"):
        return False, f"KEY RENEWER FAILS: {state['error']} (see logs/renewer.log)"
    margin = state["margin_s"] / 60
    return True, f"key renewer: running, last check {age:.0f} s ago, renews keys {margin:.1f} min before expiry"


def registered_models(endpoints: Endpoints, timeout: float = 10.0) -> list[str]:
    """The names of the registered models (the management API's list; keys renewed mid-call are retried)."""
    listing = authorized_request(endpoints, "GET", f"{endpoints.management}/models", "management", timeout=timeout)
    listing.raise_for_status()
    return [model["modelName"] for model in listing.json().get("models", [])]


def describe(endpoints: Endpoints, model: str, timeout: float = 10.0) -> list[dict]:
    """The management API's description of ``model``: one entry per version, each with its workers."""
    url = f"{endpoints.management}/models/{model}"
    response = authorized_request(endpoints, "GET", url, "management", timeout=timeout)
    response.raise_for_status()
    return response.json()


def status(endpoints: Endpoints) -> list[dict]:
    """Every registered model as the management API describes it."""
    return [version for model in registered_models(endpoints) for version in describe(endpoints, model)]


# --- health ----------------------------------------------------------------------------------------------------


def ready_workers(endpoints: Endpoints, models: list[str], timeout: float) -> dict[str, tuple[int, int]]:
    """model -> (READY workers, workers) for ``models``, or for every registered model when empty."""
    try:
        models = models or registered_models(endpoints, timeout)
        if not models:
            raise Unhealthy("no model is registered")
        counts = {}
        for model in models:
            workers = [w for version in describe(endpoints, model, timeout) for w in version.get("workers", [])]
            counts[model] = (sum(w.get("status") == "READY" for w in workers), len(workers))
    except requests.HTTPError as exc:
        answer = exc.response
        raise Unhealthy(f"{answer.url} answered {answer.status_code}: {answer.text.strip()[:200]}") from None
    return counts


def check_health(run_dir: Path, models: list[str], timeout: float) -> str:
    """The reason the server of ``run_dir`` is healthy; raises Unhealthy with the reason it is not."""
    try:
        endpoints = Endpoints.load(run_dir)
        keys = read_keys(run_dir / "key_file.json")
    except (NoServerError, KeyFileError) as exc:
        raise Unhealthy(str(exc)) from None
    try:
        ping = authorized_request(endpoints, "GET", f"{endpoints.inference}/ping", timeout=timeout)
        if ping.status_code != 200 or ping.json().get("status") != "Healthy":
            raise Unhealthy(f"/ping answered {ping.status_code}: {ping.text.strip()[:200]}")
        counts = ready_workers(endpoints, models, timeout)
    except requests.RequestException as exc:
        raise Unhealthy(f"no answer from the server: {type(exc).__name__}: {exc}") from None
    except ValueError as exc:
        raise Unhealthy(f"unexpected answer: {exc}") from None
    idle = [f"{m} has {ready} of {total} workers READY" for m, (ready, total) in counts.items() if not ready]
    if idle:
        raise Unhealthy("; ".join(idle))
    renewing, renewer_line = renewer_status(Path(run_dir).resolve())
    if not renewing:
        raise Unhealthy(renewer_line)
    workers = ", ".join(f"{m} {ready}/{total} workers READY" for m, (ready, total) in counts.items())
    left = min(seconds_left(keys[kind]) or 0.0 for kind in ("inference", "management")) / 60
    return f"{workers}; keys valid for {left:.1f} min more, renewer running"
