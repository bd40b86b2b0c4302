"""Faults on a TorchServe of this module's own (they kill workers and restart the server): a worker killed under
load is restarted and batch_predict.py loses nothing; a batch that exceeds the response timeout is an error for the
client, not a hang, and every image is still accounted for; a server restart between two runs of the batch client
loses nothing either."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import requests
import yaml

from helpers import REPO, with_model_config
from yolonas_tools.serve import batch, server
from yolonas_tools.serve.clients import Endpoints

MODEL = "yolo_nas_s"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, model_store: Path, s_archive: Path):
    folder = tmp_path_factory.mktemp("faults_run")
    server.start(folder, model_store, models=[MODEL], ports=server.free_ports())
    yield folder
    server.stop(folder)


def make_folder(root: Path, reference_dir: Path, count: int) -> Path:
    """``count`` images (the two reference pictures, alternately) under distinct names."""
    sources = sorted((reference_dir / "images").glob("*.png"))
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        shutil.copy(sources[i % len(sources)], root / f"image_{i:02d}.png")
    return root


def describe(endpoints: Endpoints, model: str = MODEL) -> dict:
    response = requests.get(f"{endpoints.management}/models/{model}", headers=endpoints.auth("management"), timeout=30)
    response.raise_for_status()
    return response.json()[0]


def identity(description: dict) -> list[tuple]:
    """Who the workers are: a restart changes the pid."""
    return [(w["id"], w["pid"], w["startTime"], w["status"]) for w in description["workers"]]


def predict(endpoints: Endpoints, path: Path) -> dict:
    response = requests.post(f"{endpoints.inference}/predictions/{MODEL}", data=path.read_bytes(),
                             headers={**endpoints.auth(), "Content-Type": "image/png"}, timeout=300)  # fmt: skip
    assert response.status_code == 200, response.text
    return response.json()


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


def journaled(out: Path) -> int:
    journal = batch.output_paths(out)["journal"]
    return max(0, len(journal.read_text().splitlines()) - 1) if journal.is_file() else 0


def start_batch(folder: Path, out: Path, endpoints: Endpoints, model: str = MODEL, hold: threading.Event | None = None,
                **options):  # fmt: skip
    """batch.run in a background thread; returns the future of its summary. With ``hold``, every request after the
    first waits until it is set, so that a test can act between the first answer and the rest."""
    rest = batch.rest_sender(endpoints, model, {}, timeout=options.pop("timeout", 300))
    sent = []

    def send(data: bytes, file_name: str) -> dict:
        if hold is not None and sent:
            hold.wait(timeout=300)
        sent.append(file_name)
        return rest(data, file_name)

    header = {"model": model, "folder": str(folder.resolve()), "options": {}}
    pool = ThreadPoolExecutor(1)
    future = pool.submit(batch.run, folder, out, send, header, **options)
    pool.shutdown(wait=False)
    return future


def check_results(out: Path, folder: Path, endpoints: Endpoints) -> None:
    """Every image has results, and they are what the (now healthy) server answers for it."""
    paths = batch.output_paths(out)
    failures = json.loads(paths["failures"].read_text())
    assert failures == []
    images = {i["file_name"]: i["id"] for i in json.loads(paths["images"].read_text())["images"]}
    assert sorted(images) == sorted(p.name for p in folder.iterdir())
    results = json.loads(paths["results"].read_text())
    for name, image_id in images.items():
        expected = predict(endpoints, folder / name)["detections"]
        got = [r for r in results if r["image_id"] == image_id]
        assert [r["category_id"] for r in got] == [d["class_id"] for d in expected]
        assert [r["score"] for r in got] == pytest.approx([d["score"] for d in expected], abs=1e-4)


def test_a_worker_killed_under_load_is_restarted_and_nothing_is_lost(run_dir: Path, reference_dir, tmp_path):
    endpoints = Endpoints.load(run_dir)
    [before] = describe(endpoints)["workers"]
    frontend = psutil.Process(int((run_dir / "server.pid").read_text()))
    workers = [p for p in frontend.children(recursive=True) if "model_service_worker" in " ".join(p.cmdline())]
    assert before["pid"] in [p.pid for p in workers], "the model's worker is a process of this server"

    folder = make_folder(tmp_path / "images", reference_dir, 6)
    out = tmp_path / "killed.json"
    future = start_batch(folder, out, endpoints, concurrency=2, retries=4, backoff=1.0)
    wait_for(lambda: journaled(out) >= 1, 300, "the first answer")
    psutil.Process(before["pid"]).kill()  # requests in flight get 507 "Worker died."; queued ones wait
    summary = future.result(timeout=900)

    assert (summary["succeeded"], summary["failed"]) == (6, 0)
    assert summary["retries_this_run"] >= 1, "the kill hit requests in flight, and they were retried"
    [after] = describe(endpoints)["workers"]
    assert after["status"] == "READY" and after["pid"] != before["pid"] and psutil.pid_exists(after["pid"])
    check_results(out, folder, endpoints)


SLOW_BATCH = 16


def slow_archive(s_archive: Path, target: Path) -> Path:
    """The S archive with a 1 s response timeout, batches of up to 16 collected for 1 s and one torch thread: a
    batch of 16 640x640 images takes about 2.7 s on one core of a fast CPU (fp32 S, 2-core EPYC: about 170 ms each;
    with 8 images on two threads it once finished within the second), so it always exceeds the timeout (REST
    register parameters cannot override an archive's responseTimeout)."""
    with zipfile.ZipFile(s_archive) as archive:
        handler = yaml.safe_load(archive.read("model-config.yaml"))["handler"]
    return with_model_config(s_archive, target, responseTimeout=1, batchSize=SLOW_BATCH, maxBatchDelay=1000,
                             handler={**handler, "torch_threads": 1})  # fmt: skip


def test_a_response_timeout_is_an_error_not_a_hang(run_dir: Path, s_archive: Path, reference_dir, tmp_path):
    endpoints = Endpoints.load(run_dir)
    main_worker = identity(describe(endpoints))
    archive = slow_archive(s_archive, s_archive.parent / "slow_s.mar")
    try:
        server.register(endpoints, archive.name, name="slow_s")
        assert describe(endpoints, "slow_s")["responseTimeout"] == 1
        folder = make_folder(tmp_path / "images", reference_dir, SLOW_BATCH)
        out = tmp_path / "timeout.json"
        start = time.monotonic()
        summary = start_batch(folder, out, endpoints, "slow_s", concurrency=SLOW_BATCH, retries=1, backoff=0.5,
                              timeout=240).result(timeout=900)  # fmt: skip
        elapsed = time.monotonic() - start
    finally:
        requests.delete(f"{endpoints.management}/models/slow_s", headers=endpoints.auth("management"), timeout=120)
        archive.unlink()

    # Every image is accounted for; the ones whose batch timed out are listed with TorchServe's reason.
    assert summary["images"] == summary["succeeded"] + summary["failed"] == SLOW_BATCH
    failures = json.loads(batch.output_paths(out)["failures"].read_text())
    assert summary["failed"] == len(failures) >= 1
    for failure in failures:
        assert failure["status"] in (500, 507) and failure["error"] == "Worker died." and failure["transient"]
        assert failure["attempts"] == 2
    assert elapsed < 600
    # The other model was not disturbed.
    assert identity(describe(endpoints)) == main_worker


def test_a_server_restart_between_two_batch_runs_loses_nothing(run_dir: Path, model_store: Path, reference_dir,
                                                               tmp_path):  # fmt: skip
    folder = make_folder(tmp_path / "images", reference_dir, 4)
    out = tmp_path / "restart.json"
    stopped = threading.Event()
    future = start_batch(folder, out, Endpoints.load(run_dir), hold=stopped, concurrency=1, retries=1, backoff=0.2)
    wait_for(lambda: journaled(out) >= 1, 300, "the first answer")
    server.stop(run_dir)
    stopped.set()  # the other three are sent to a stopped server
    first = future.result(timeout=300)
    assert (first["succeeded"], first["failed"]) == (1, 3)
    failures = json.loads(batch.output_paths(out)["failures"].read_text())
    assert all(f["transient"] for f in failures), failures

    server.start(run_dir, model_store, models=[MODEL], ports=server.free_ports())  # other ports: server.json says
    command = [sys.executable, str(REPO / "scripts" / "batch_predict.py"), str(folder), "--model", MODEL,
               "--out", str(out), "--run-dir", str(run_dir)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    second = json.loads(batch.output_paths(out)["summary"].read_text())
    assert second["sent_this_run"] == first["failed"] and second["skipped_finished_earlier"] == first["succeeded"]
    assert (second["succeeded"], second["failed"]) == (4, 0)
    check_results(out, folder, Endpoints.load(run_dir))
