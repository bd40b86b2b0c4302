"""Operating the server with scripts/serve.sh: failed starts say why and exit non-zero; status lists workers."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import soak

from conftest import REPO


def serve(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    command = [shutil.which("bash"), str(REPO / "scripts" / "serve.sh"), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def test_start_refuses_a_busy_port(tmp_path: Path):
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", 8080))
        except OSError:
            pytest.skip("port 8080 is already taken on this machine")
        sock.listen()
        result = serve("start", env={**os.environ, "YOLONAS_RUN_DIR": str(tmp_path)})
    assert result.returncode != 0
    assert "port 8080 (inference_address) is in use" in result.stderr
    assert not (tmp_path / "server.pid").exists()


def test_start_without_java_says_so(tmp_path: Path):
    bin_dir = tmp_path / "bin"  # what serve.sh needs, but no java
    bin_dir.mkdir()
    for tool in ("bash", "dirname"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    (bin_dir / "python3").symlink_to(sys.executable)
    env = {**os.environ, "YOLONAS_RUN_DIR": str(tmp_path / "run"), "PATH": str(bin_dir)}
    result = serve("start", env=env)
    assert result.returncode != 0 and "Java is not installed" in result.stderr


def test_start_with_a_missing_archive_fails_before_starting(tmp_path: Path):
    result = serve("start", "no_such_model", env={**os.environ, "YOLONAS_RUN_DIR": str(tmp_path)})
    assert result.returncode != 0 and "no archive for ['no_such_model']" in result.stderr


def test_status_lists_models_and_workers(endpoints):
    result = serve("status", "--run-dir", str(endpoints.run_dir), env=dict(os.environ))
    assert result.returncode == 0, result.stderr
    assert "yolo_nas_s v1.0: batch 4" in result.stdout and "READY" in result.stdout


def test_stop_without_a_server_is_harmless(tmp_path: Path):
    result = serve("stop", env={**os.environ, "YOLONAS_RUN_DIR": str(tmp_path)})
    assert result.returncode == 0 and "no server was running" in result.stdout


def test_workers_wait_passively(endpoints):
    """server.py starts TorchServe with OMP_WAIT_POLICY=PASSIVE unless the caller chose a policy; workers inherit it."""
    (pid,) = soak.worker_pids(endpoints, "yolo_nas_s")
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'PASSIVE')}".encode() in environ
