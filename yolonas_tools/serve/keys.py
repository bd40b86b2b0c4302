"""TorchServe's keys: reading key_file.json (which TorchServe rewrites in place on every renewal), telling a refused
key, and renewing the keys before they expire, supervised (the renewer ``scripts/key_renewer.py`` describes)."""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import requests

from yolonas_tools.paths import SCRIPTS_DIR, write_json_atomically


class KeyFileError(Exception):
    """key_file.json is missing or cannot be read (the server is not running, or not yet)."""


class _Terminated(Exception):
    """SIGTERM reached the supervisor."""


def read_keys(key_file: Path, patience: float = 1.0) -> dict[str, dict[str, str]]:
    """TorchServe writes ``{"management": {"key": ..., "expiration time": ISO UTC}, "inference": {...},
    "API": {"key": ...}}`` and rewrites it in place on every renewal: a reader can catch it half-written, so a
    file that does not parse is read again for up to ``patience`` seconds."""
    deadline = time.monotonic() + patience
    while True:
        try:
            keys = json.loads(Path(key_file).read_text())
            if all("key" in keys[kind] for kind in ("inference", "management", "API")):
                return keys
            raise KeyError("key")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            if time.monotonic() > deadline:
                raise KeyFileError(f"cannot read the keys from {key_file}: {exc!r}") from None
            time.sleep(0.05)


def read_key(key_file: Path, kind: str) -> str:
    return read_keys(key_file)[kind]["key"]


def key_expiry(entry: dict[str, str]) -> datetime | None:
    """When a key of the key file expires (timezone-aware), None for the API key, which never does."""
    stamp = entry.get("expiration time")
    return None if stamp is None else datetime.fromisoformat(stamp)


def key_refused(outcome: object) -> bool:
    """TorchServe 0.12 refuses a missing, wrong or expired key with REST 400 InvalidKeyException, gRPC
    PERMISSION_DENIED."""
    if hasattr(outcome, "status_code"):  # requests' Response, or the load generator's PlainResponse
        return outcome.status_code == 400 and "InvalidKeyException" in outcome.text
    code = getattr(outcome, "code", None)
    return callable(code) and getattr(code(), "name", None) == "PERMISSION_DENIED"


KINDS = ("inference", "management")
MARGIN_ENV = "YOLONAS_RENEW_MARGIN_MIN"
DEFAULT_MARGIN_MIN = 10.0
RESTART_DELAY_S = 5.0
#  The renewing loop runs as this command, restarted by the supervisor whenever it dies.
RENEWER_COMMAND = SCRIPTS_DIR / "key_renewer.py"
log = logging.getLogger("key_renewer")


def renew_margin_s(expiration_min: float, margin_min: float | None = None) -> float:
    """Seconds before expiry at which a key is renewed: the given margin, else the environment's, else 10 minutes
    or half the key lifetime, whichever is smaller (a 1-minute key is renewed after 30 s)."""
    if margin_min is None and os.environ.get(MARGIN_ENV):
        margin_min = float(os.environ[MARGIN_ENV])
    if margin_min is None:
        margin_min = min(DEFAULT_MARGIN_MIN, expiration_min / 2)
    if not 0 < margin_min < expiration_min:
        raise ValueError(f"the renewal margin ({margin_min} min) must be positive and below the key lifetime "
                         f"(token_expiration_min={expiration_min})")  # fmt: skip
    return margin_min * 60


def check_interval_s(margin_s: float) -> float:
    """Look a few times per margin, so a key is renewed with most of the margin still left."""
    return min(60.0, max(1.0, margin_s / 4))


def management_url(props: dict[str, str]) -> str:
    """The management API as seen from this host (a wildcard bind address is reached on the loopback)."""
    return props.get("management_address", "http://127.0.0.1:8081").replace("0.0.0.0", "127.0.0.1")


def seconds_left(entry: dict[str, str], now: datetime | None = None) -> float | None:
    expiry = key_expiry(entry)
    return None if expiry is None else (expiry - (now or datetime.now(UTC))).total_seconds()


def expired_keys(key_file: Path) -> list[str]:
    """One phrase per key of ``key_file`` whose expiration time has passed, saying how long ago."""
    keys = read_keys(key_file)
    lefts = {kind: seconds_left(keys[kind]) for kind in KINDS}
    return [f"the {kind} key expired {-left / 60:.1f} min ago" for kind, left in lefts.items()
            if left is not None and left <= 0]  # fmt: skip


def renew(management: str, api_key: str, kind: str) -> None:
    response = requests.post(
        f"{management}/token", params={"type": kind}, headers={"Authorization": f"Bearer {api_key}"}, timeout=30
    )
    if response.status_code != 200:
        raise RuntimeError(f"the token API answered {response.status_code}: {response.text.strip()[:200]}")


def check_once(key_file: Path, management: str, margin_s: float) -> dict[str, float | None]:
    """Renew every key with less than ``margin_s`` left; return the seconds each key has left afterwards."""
    keys = read_keys(key_file)
    for kind in KINDS:
        left = seconds_left(keys[kind])
        if left is not None and left < margin_s:
            renew(management, keys["API"]["key"], kind)
            log.info("renewed the %s key (%.0f s were left)", kind, left)
    keys = read_keys(key_file)
    return {kind: seconds_left(keys[kind]) for kind in KINDS}


def process_alive(pid: int) -> bool:
    """Whether a process with this pid exists (one owned by another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _serving(server_pid: int | None) -> bool:
    """Without a server pid the renewer runs until it is stopped."""
    return server_pid is None or process_alive(server_pid)


def renew_forever(key_file: Path, management: str, margin_s: float, server_pid: int | None) -> int:
    """The renewing loop. Errors are logged and retried at the next check: it ends only with the server."""
    interval = check_interval_s(margin_s)
    state_file = key_file.with_name("renewer.json")
    log.info("renewing keys in %s through %s, %.0f s before they expire, checking every %.0f s",
             key_file, management, margin_s, interval)  # fmt: skip
    while _serving(server_pid):
        state = {"pid": os.getpid(), "checked_at": time.time(), "check_every_s": interval, "margin_s": margin_s}
        try:
            state["seconds_left"] = check_once(key_file, management, margin_s)
            state["error"] = None
        except Exception as exc:  # noqa: BLE001 (any failure: log it, keep going)
            state["error"] = f"{type(exc).__name__}: {exc}"
            log.error("could not check or renew the keys: %s; next try in %.0f s", state["error"], interval)
        write_json_atomically(state_file, state, indent=None)
        time.sleep(interval)
    log.info("the server (pid %s) is gone: the key renewer stops", server_pid)
    return 0


def supervise(argv: list[str], server_pid: int | None) -> int:
    """Run the renewing loop as a child and restart it whenever it dies while the server lives: a renewer that
    stopped would let every key expire."""
    child: subprocess.Popen | None = None

    def terminate(signum: int, frame: object) -> None:
        raise _Terminated(signum)

    signal.signal(signal.SIGTERM, terminate)
    try:
        while _serving(server_pid):
            child = subprocess.Popen([sys.executable, str(RENEWER_COMMAND), *argv, "--no-supervisor"])
            code = child.wait()
            if code == 0 or not _serving(server_pid):
                return code
            log.error("THE KEY RENEWER DIED (exit code %s): restarting it in %.0f s", code, RESTART_DELAY_S)
            time.sleep(RESTART_DELAY_S)
    except _Terminated as stopped:
        log.info("key renewer stopped (signal %d)", stopped.args[0])
        if child is not None:
            child.terminate()
    return 0


def setup_logging(log_file: Path | None, rotates: bool = True) -> None:
    """Log to ``log_file`` (else stderr). The renewing loop rotates the file; its supervisor, writing to the same
    file, only follows it (reopening it after a rotation), so that its lines land in the current file."""
    handler: logging.Handler
    if log_file is None:
        handler = logging.StreamHandler()
    elif rotates:  # bounded like TorchServe's own logs
        handler = logging.handlers.RotatingFileHandler(log_file, maxBytes=1_000_000, backupCount=2)
    else:
        handler = logging.handlers.WatchedFileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] key_renewer %(process)d - %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
