"""Keys that renew themselves, on a server whose keys live one minute (token_expiration_min=1): the REST client, a
batch job and the gRPC client keep working for a key lifetime and more, so past the expiry of every key they started
with; status shows each key's time left; a killed renewer is restarted and said so, a renewer that is gone is
reported; stop leaves no process and no extracted archive behind. Each test gets the module's server running with its
renewer, whatever ran before it. Takes about two minutes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import requests

from helpers import REPO
from yolonas_tools.serve import server
from yolonas_tools.serve.clients import Endpoints
from yolonas_tools.serve.keys import process_alive, read_key

EXPIRATION_MIN = 1
LIFETIME_S = EXPIRATION_MIN * 60
#  Past one lifetime: the clients' last round and batch job begin this much later, so they run on keys renewed after
#  every key of the start had expired.
MARGIN_S = 5
SCRIPTS = REPO / "scripts"
IMAGE = REPO / "assets" / "sample.jpg"


def script(name: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    command = [sys.executable, str(SCRIPTS / name), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=dict(os.environ))


def running(pid_file: Path) -> bool:
    return pid_file.is_file() and process_alive(int(pid_file.read_text()))


@pytest.fixture(scope="module")
def short_keys_run_dir(tmp_path_factory: pytest.TempPathFactory):
    run_dir = tmp_path_factory.mktemp("short_keys")
    yield run_dir
    server.stop(run_dir)


@pytest.fixture
def short_keys(short_keys_run_dir: Path, model_store: Path, s_archive: Path) -> Endpoints:
    """The module's server with its renewer: started on first use, and again where a test stopped it or left its
    renewer gone."""
    run_dir = short_keys_run_dir
    if not running(run_dir / "server.pid"):
        server.start(run_dir, model_store, models=["yolo_nas_s"], ports=server.free_ports(),
                     extra_config={"token_expiration_min": str(EXPIRATION_MIN)})  # fmt: skip
    elif not running(run_dir / "renewer.pid"):
        server.start_renewer(run_dir)
    renewing_loop(run_dir)
    return Endpoints.load(run_dir)


def renewals(run_dir: Path) -> int:
    log = run_dir / "logs" / "renewer.log"
    return log.read_text().count("renewed the inference key") if log.is_file() else 0


def test_clients_keep_working_across_key_expiries(short_keys, tmp_path: Path):
    run_dir = str(short_keys.run_dir)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(6):
        shutil.copy(IMAGE, folder / f"frame_{i}.jpg")
    keys_seen = {short_keys.key("inference")}
    renewed_before = renewals(short_keys.run_dir)
    failures: list[str] = []
    jobs: list[dict] = []
    started: dict[str, list[float]] = {"rounds": [], "jobs": []}  # when each began, in s from the start
    start = time.monotonic()
    expired = LIFETIME_S + MARGIN_S  # by then every key there was at the start has expired

    def until_past_expiry(kind: str) -> Iterator[None]:
        """One iteration after the other, the last one begun after ``expired``, however long each takes."""
        while not started[kind] or started[kind][-1] < expired:
            started[kind].append(time.monotonic() - start)
            yield

    def batch_jobs() -> None:  # one batch job after the other, each a fresh run
        for _ in until_past_expiry("jobs"):
            out = tmp_path / f"job_{len(jobs)}" / "results.json"
            done = script("batch_predict.py", str(folder), "--out", str(out), "--concurrency", "1",
                          "--run-dir", run_dir)  # fmt: skip
            summary = json.loads(out.with_name("results.summary.json").read_text())
            jobs.append(summary)
            if done.returncode or summary["failed"] or summary["stopped"]:
                failures.append(f"batch job: {done.stderr[-500:]} {summary}")

    batch = threading.Thread(target=batch_jobs)
    batch.start()
    for _ in until_past_expiry("rounds"):
        for args in (["predict.py", str(IMAGE), "--run-dir", run_dir],
                     ["grpc_client.py", "--run-dir", run_dir, "predict", str(IMAGE)]):  # fmt: skip
            done = script(*args)
            if done.returncode or "detections from yolo_nas_s" not in done.stdout:
                at = time.monotonic() - start
                failures.append(f"{args[0]} after {at:.0f} s: {done.stdout[-300:]} {done.stderr[-500:]}")
        keys_seen.add(short_keys.key("inference"))
        time.sleep(2)
    batch.join()
    assert failures == []
    assert len(started["rounds"]) >= 2 and len(jobs) >= 2, started
    # Renewed every half lifetime: twice within a lifetime and more, each new key used by the clients.
    assert len(keys_seen) >= 3, keys_seen
    assert sum(job["succeeded"] for job in jobs) >= 2 * len(list(folder.iterdir()))
    log = (short_keys.run_dir / "logs" / "renewer.log").read_text()
    assert renewals(short_keys.run_dir) - renewed_before >= 2 and "ERROR" not in log, log


def test_status_shows_time_left_and_the_renewer(short_keys):
    done = subprocess.run([shutil.which("bash"), str(SCRIPTS / "serve.sh"), "status", "--run-dir",
                           str(short_keys.run_dir)], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    for kind in ("inference", "management"):
        [line] = [x for x in lines if x.startswith(f"{kind} key: ")]
        assert 0 < float(line.split()[2]) <= EXPIRATION_MIN and line.endswith("min left"), line
    assert any(x.startswith("key renewer: running, last check") for x in lines), lines


def renewer_pids(run_dir: Path) -> list[int]:
    leader = int((run_dir / "renewer.pid").read_text())
    return [p.pid for p in psutil.process_iter() if _pgid(p.pid) == leader]


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def renewing_loop(run_dir: Path) -> int:
    """The pid of the renewer's loop, once its supervisor has started it and it has checked the keys."""
    leader = int((run_dir / "renewer.pid").read_text())
    deadline = time.monotonic() + 60
    while True:
        loops = [pid for pid in renewer_pids(run_dir) if pid != leader]
        state = run_dir / "renewer.json"
        if loops and state.is_file() and json.loads(state.read_text())["pid"] in loops:
            [loop] = loops
            return loop
        assert time.monotonic() < deadline, f"no renewing loop checked the keys within 60 s: {loops}"
        time.sleep(0.2)


def test_a_killed_renewer_is_restarted_and_logged(short_keys):
    run_dir = short_keys.run_dir
    leader = int((run_dir / "renewer.pid").read_text())
    loop = renewing_loop(run_dir)
    os.kill(loop, 9)
    deadline = time.monotonic() + 30
    while not any(pid not in (leader, loop) for pid in renewer_pids(run_dir)):
        assert time.monotonic() < deadline, "the renewing loop was not restarted"
        time.sleep(0.5)
    assert "THE KEY RENEWER DIED (exit code -9)" in (run_dir / "logs" / "renewer.log").read_text()


def test_a_renewer_that_is_gone_is_reported_and_can_be_restarted(short_keys):
    run_dir = short_keys.run_dir
    # Fresh keys first: they outlive the checks below, which must see the missing renewer and not expired keys.
    api = {"Authorization": f"Bearer {read_key(run_dir / 'key_file.json', 'API')}"}
    for kind in ("inference", "management"):
        renewed = requests.post(f"{short_keys.management}/token", params={"type": kind}, headers=api, timeout=30)
        assert renewed.status_code == 200, renewed.text
    os.killpg(int((run_dir / "renewer.pid").read_text()), 9)
    time.sleep(0.5)
    status = script("server.py", "status", "--run-dir", str(run_dir))
    assert "KEY RENEWER IS NOT RUNNING" in status.stdout, status.stdout
    health = script("healthcheck.py", "--run-dir", str(run_dir))
    assert health.returncode == 1 and health.stdout.startswith("unhealthy: KEY RENEWER IS NOT RUNNING"), health.stdout
    restarted = script("server.py", "renewer", "--run-dir", str(run_dir))
    assert restarted.returncode == 0 and "key renewer started" in restarted.stdout, restarted.stderr
    deadline = time.monotonic() + 30
    while (health := script("healthcheck.py", "--run-dir", str(run_dir))).returncode:
        assert time.monotonic() < deadline, health.stdout
        time.sleep(1)
    assert health.stdout.startswith("healthy: yolo_nas_s 1/1 workers READY"), health.stdout


def test_stop_leaves_no_process_behind(short_keys):
    run_dir = short_keys.run_dir
    assert any((run_dir / "tmp" / "models").iterdir())  # the registered archive, extracted by TorchServe
    launcher = psutil.Process(int((run_dir / "server.pid").read_text()))
    processes = [launcher, *launcher.children(recursive=True)] + [psutil.Process(p) for p in renewer_pids(run_dir)]
    names = {p.name() for p in processes}
    assert "java" in names and len(processes) >= 5, names  # launcher, frontend, worker(s), renewer and its loop
    # The launcher is this process's child: reap it once it exits, as init does for a server that serve.sh started,
    # or it lingers as a zombie that stop waits out (30 s) before it kills it.
    threading.Thread(target=launcher.wait, daemon=True).start()
    done = subprocess.run([shutil.which("bash"), str(SCRIPTS / "serve.sh"), "stop", "--run-dir", str(run_dir)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0 and "stopped" in done.stdout, done.stderr
    _, alive = psutil.wait_procs(processes, timeout=10)
    assert alive == [], alive
    assert not (run_dir / "server.pid").exists() and not (run_dir / "renewer.pid").exists()
    assert not (run_dir / "tmp" / "models").exists()  # TorchServe leaves it when stopped; stop() removes it
    health = script("healthcheck.py", "--run-dir", str(run_dir))
    assert health.returncode == 1 and health.stdout.startswith("unhealthy: no answer from the server"), health.stdout
    assert read_key(run_dir / "key_file.json", "API")  # the files stay for a post-mortem
