"""scripts/healthcheck.py against a fake TorchServe (http.server on a free loopback port, in a thread): healthy
when everything is, and each way of not being healthy fails it with exit 1 and one line saying why. The fake
answers as TorchServe 0.12 does: /ping and the management API's model list and descriptions, each behind its key
(a wrong or expired key: 400 InvalidKeyException)."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from yolonas_tools.cli import run_command
from yolonas_tools.serve import clients

MODEL = "yolo_nas_s"
REFUSED = {"code": 400, "type": "InvalidKeyException", "message": "Token Authorization failed. Token either incorrect, "
           "expired, or not provided correctly"}  # fmt: skip


@dataclass
class FakeTorchServe:
    """What the fake answers; tests change it. ``keys``: kind -> (key, expiry) as TorchServe holds them."""

    keys: dict[str, tuple[str, datetime]]
    ping: tuple[int, dict] = (200, {"status": "Healthy"})
    workers: dict[str, list[str]] = field(default_factory=lambda: {MODEL: ["READY"]})


def handler_for(fake: FakeTorchServe) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def answer(self, status: int, body: object) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            kind = "inference" if self.path == "/ping" else "management"
            key, expiry = fake.keys[kind]
            if self.headers.get("Authorization") != f"Bearer {key}" or expiry <= datetime.now(UTC):
                self.answer(400, REFUSED)
            elif self.path == "/ping":
                self.answer(*fake.ping)
            elif self.path == "/models":
                self.answer(200, {"models": [{"modelName": name} for name in fake.workers]})
            elif (name := self.path.removeprefix("/models/")) in fake.workers:
                workers = [{"status": status} for status in fake.workers[name]]
                self.answer(200, [{"modelName": name, "modelVersion": "1.0", "workers": workers}])
            else:
                self.answer(404, {"code": 404, "type": "ModelNotFoundException", "message": "Model not found"})

        def log_message(self, format: str, *args: object) -> None:
            pass  # no access lines in the test output

    return Handler


def write_keys(run_dir: Path, keys: dict[str, tuple[str, datetime]]) -> None:
    """key_file.json as TorchServe writes it."""
    entries = {kind: {"key": key, "expiration time": expiry.isoformat()} for kind, (key, expiry) in keys.items()}
    (run_dir / "key_file.json").write_text(json.dumps({**entries, "API": {"key": "api-key"}}))


def write_renewer_state(run_dir: Path, checked_ago_s: float, error: str | None = None) -> None:
    """renewer.pid (this process: alive) and renewer.json as the renewing loop writes them, checking every 60 s."""
    (run_dir / "renewer.pid").write_text(str(os.getpid()))
    state = {"pid": os.getpid(), "checked_at": time.time() - checked_ago_s, "check_every_s": 60.0, "margin_s": 600.0,
             "error": error}  # fmt: skip
    (run_dir / "renewer.json").write_text(json.dumps(state))


@pytest.fixture
def server(tmp_path: Path):
    """(the fake, its run folder): keys valid for an hour, the renewer checked 5 s ago, one model with a READY
    worker."""
    in_an_hour = datetime.now(UTC) + timedelta(hours=1)
    fake = FakeTorchServe({"inference": ("inference-key", in_an_hour), "management": ("management-key", in_an_hour)})
    http = ThreadingHTTPServer(("127.0.0.1", 0), handler_for(fake))
    thread = threading.Thread(target=http.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{http.server_address[1]}"
    recorded = {"inference": url, "management": url, "metrics": url, "grpc_inference": "127.0.0.1:1",
                "grpc_management": "127.0.0.1:2"}  # fmt: skip
    (tmp_path / "server.json").write_text(json.dumps(recorded))
    write_keys(tmp_path, fake.keys)
    write_renewer_state(tmp_path, checked_ago_s=5)
    yield fake, tmp_path
    http.shutdown()
    http.server_close()
    thread.join()


def healthcheck(run_dir: Path, capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    code = run_command("healthcheck", ["--run-dir", str(run_dir), "--timeout", "5", *args])
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 1, out
    return code, out.strip()


def test_healthy(server, capsys):
    _, run_dir = server
    code, line = healthcheck(run_dir, capsys)
    assert code == 0, line
    assert re.fullmatch(
        f"healthy: {MODEL} 1/1 workers READY; keys valid for (59|60)\\.\\d min more, renewer running", line
    )


def test_a_stuck_key_renewer(server, capsys):
    _, run_dir = server
    write_renewer_state(run_dir, checked_ago_s=600)  # checks every 60 s: stuck after 3 x 60 + 30 s
    code, line = healthcheck(run_dir, capsys)
    assert code == 1
    assert line.startswith("unhealthy: KEY RENEWER IS STUCK: last check 600 s ago; keys will expire; restart it "
                           f"with: python scripts/server.py renewer --run-dir {run_dir}")  # fmt: skip


def test_a_key_renewer_that_fails(server, capsys):
    _, run_dir = server
    write_renewer_state(run_dir, checked_ago_s=5, error="RuntimeError: the token API answered 400")
    code, line = healthcheck(run_dir, capsys)
    assert (code, line) == (1, "unhealthy: KEY RENEWER FAILS: RuntimeError: the token API answered 400 "
                               "(see logs/renewer.log)")  # fmt: skip


def test_a_key_renewer_that_is_gone(server, capsys):
    _, run_dir = server
    (run_dir / "renewer.pid").unlink()
    code, line = healthcheck(run_dir, capsys)
    assert code == 1 and line.startswith("unhealthy: KEY RENEWER IS NOT RUNNING: keys will expire"), line


@pytest.mark.parametrize("kind", ["inference", "management"])
def test_an_expired_key(server, capsys, monkeypatch, kind):
    """TorchServe refuses it (on /ping, or on the model list); the line names the key and the renewer's state."""
    monkeypatch.setattr(clients, "NEW_KEY_WAIT_S", 0.1)  # the client's wait for a renewed key: none is coming
    fake, run_dir = server
    fake.keys[kind] = (f"{kind}-key", datetime.now(UTC) - timedelta(minutes=3))
    write_keys(run_dir, fake.keys)
    write_renewer_state(run_dir, checked_ago_s=600)
    code, line = healthcheck(run_dir, capsys)
    assert code == 1
    assert line.startswith(f"unhealthy: the {kind} key expired 3.0 min ago (TorchServe answers 400 "
                           "InvalidKeyException); KEY RENEWER IS STUCK: last check 600 s ago"), line  # fmt: skip


def test_a_key_the_server_does_not_know_is_its_refusal(server, capsys, monkeypatch):
    """Not expired, only not the server's: nothing to explain beyond TorchServe's answer."""
    monkeypatch.setattr(clients, "NEW_KEY_WAIT_S", 0.1)
    fake, run_dir = server
    fake.keys["inference"] = ("a-key-from-another-start", fake.keys["inference"][1])
    assert healthcheck(run_dir, capsys) == (1, f"unhealthy: /ping answered 400: {json.dumps(REFUSED)}")


def test_no_model_registered(server, capsys):
    fake, run_dir = server
    fake.workers = {}
    assert healthcheck(run_dir, capsys) == (1, "unhealthy: no model is registered")


def test_a_model_without_a_ready_worker(server, capsys):
    fake, run_dir = server
    fake.workers = {MODEL: ["UNLOADING"], "other": ["READY"]}
    assert healthcheck(run_dir, capsys) == (1, f"unhealthy: {MODEL} has 0 of 1 workers READY")
    code, line = healthcheck(run_dir, capsys, "--model", "missing")
    assert code == 1 and line.startswith("unhealthy: http://127.0.0.1:") and "/models/missing answered 404" in line


@pytest.mark.parametrize("status, body", [(200, {"status": "Unhealthy"}), (500, {"status": "Partial Healthy"})])
def test_a_ping_that_is_not_healthy(server, capsys, status, body):
    fake, run_dir = server
    fake.ping = (status, body)
    assert healthcheck(run_dir, capsys) == (1, f"unhealthy: /ping answered {status}: {json.dumps(body)}")


def test_an_unreadable_key_file(server, capsys):
    _, run_dir = server
    (run_dir / "key_file.json").write_text('{"inference": {"key": ')  # cut short, and never completed
    code, line = healthcheck(run_dir, capsys)
    assert code == 1
    assert line.startswith(f"unhealthy: cannot read the keys from {run_dir / 'key_file.json'}: JSONDecodeError"), line


def test_no_server_recorded(tmp_path, capsys):
    code, line = healthcheck(tmp_path, capsys)
    assert (code, line) == (1, f"unhealthy: no running server recorded in {tmp_path / 'server.json'}: start one "
                               "with scripts/serve.sh start")  # fmt: skip
