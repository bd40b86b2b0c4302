"""Scaling under load on the session TorchServe: yolo_nas_s goes 1 -> 2 -> 1 workers through the REST management
API, then through gRPC, while two clients keep sending requests, each its own image; none may be lost, and each gets
its own image's answer. Also what an extra worker costs in memory
(the numbers are printed: run with -s; M and L only with YOLONAS_ALL_VARIANTS=1, their archives take minutes to build).

TorchServe 0.12 does not drain a worker it scales down: the batch that worker is running fails with 500 "Worker died."
(WorkerThread's finally block). Worse, requests the removed worker had already taken
from the queue while it waited up to maxBatchDelay to fill its batch are dropped without an answer
(BatchAggregator.cleanJobs clears them when the scale-down interrupts the wait): their clients see only their own
timeout. Clients must retry both once; these do (a lost request after REQUEST_TIMEOUT_S), and the test checks that
every request is answered in the end, nothing else ever fails, every scale call (REST and gRPC) succeeds, and the
worker count is right after every call. The one failure a scale call may have is TorchServe's own race, documented in
the README (Scaling): a scale-down whose removed worker still holds jobs throws ConcurrentModificationException in
BatchAggregator.sendError, the call answers 500 (gRPC: an error), and the worker is gone all the same. It is accepted
only when TorchServe logged that exception during the call, and the worker count is checked after it like any other.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import psutil
import pytest
import requests
from answers import as_record

from helpers import build_archive, predict_json
from reference_match import unmatched
from yolonas_tools.serve import server
from yolonas_tools.serve.grpc_client import GrpcClient

MODEL = "yolo_nas_s"
SCALED_DOWN_BATCH = "Worker died."  # what the requests of a scaled-down worker's batch get
REQUEST_TIMEOUT_S = 60  # S answers a batch within a few seconds here: longer means the request was dropped
SCALE_DOWN_RACE = "java.util.ConcurrentModificationException"  # TorchServe 0.12's scale-down race (module docstring)


class Load:
    """Clients posting back to back until stopped, each its own image, and checking each answer against the one that
    image got alone; every final outcome is kept (200 only for the right answer), and every retry."""

    def __init__(self, endpoints, images: list[bytes], expected: list[dict]):
        self.endpoints, self.images, self.expected = endpoints, images, expected
        self.outcomes: list[int | str] = []
        self.retried: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(len(images))]

    def _send(self, client: int) -> int | str:
        try:
            response = requests.post(
                f"{self.endpoints.inference}/predictions/{MODEL}",
                data=self.images[client],
                headers={**self.endpoints.auth(), "Content-Type": "image/png"},
                timeout=REQUEST_TIMEOUT_S,
            )
        except requests.Timeout as exc:
            return f"dropped: {exc!r}"
        except requests.RequestException as exc:
            return repr(exc)
        if response.status_code != 200:
            return f"{response.status_code} {response.text[:200]}"
        body = response.json()
        expected = self.expected[client]
        if body["image_size"] != expected["image_size"] or unmatched(body["detections"], as_record(expected)) != (
            [],
            [],
        ):
            return f"client {client} got another answer than its image's: {body['image_size']}"
        return 200

    def _run(self, client: int) -> None:
        while not self._stop.is_set():
            outcome = self._send(client)
            if outcome != 200 and (SCALED_DOWN_BATCH in outcome or outcome.startswith("dropped")):
                self.retried.append(outcome)
                outcome = self._send(client)
            self.outcomes.append(outcome)

    def wait_for_answers(self, count: int = 1, timeout: float = 300) -> None:
        """Block until ``count`` more requests were answered: proof that traffic flowed at this worker count."""
        target = len(self.outcomes) + count
        deadline = time.monotonic() + timeout
        while len(self.outcomes) < target:
            assert time.monotonic() < deadline, f"no answer within {timeout} s: {self.outcomes[-3:]}"
            time.sleep(0.1)

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=300)


def describe(endpoints, name: str) -> dict:
    response = requests.get(f"{endpoints.management}/models/{name}", headers=endpoints.auth("management"), timeout=30)
    response.raise_for_status()
    return response.json()[0]


def scale_down_races(endpoints) -> int:
    """How often TorchServe has logged its scale-down race so far."""
    log = endpoints.run_dir / "logs" / "ts_log.log"
    return log.read_text(errors="replace").count(SCALE_DOWN_RACE) if log.is_file() else 0


def logged_race_since(endpoints, before: int, timeout: float = 10) -> bool:
    """Whether TorchServe logged its scale-down race after ``before`` races (the log may trail the answer)."""
    deadline = time.monotonic() + timeout
    while scale_down_races(endpoints) <= before:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def rest_scale(endpoints, name: str, workers: int, races: list[str] | None = None) -> None:
    """Scale and assert that it succeeded; with ``races``, TorchServe's logged scale-down race is noted there
    instead of failing."""
    params = {"min_worker": workers, "max_worker": workers, "synchronous": "true"}
    before = scale_down_races(endpoints)
    response = requests.put(
        f"{endpoints.management}/models/{name}", params=params, headers=endpoints.auth("management"), timeout=600
    )
    if races is not None and response.status_code == 500 and logged_race_since(endpoints, before):
        races.append(f"REST scale to {workers}: {response.text[:200]}")
        return
    assert response.status_code == 200 and response.json()["status"] == f"Workers scaled to {workers} for model: {name}"


def grpc_scale(client: GrpcClient, endpoints, name: str, workers: int, races: list[str]) -> None:
    before = scale_down_races(endpoints)
    try:
        message = client.scale(name, workers)
    except grpc.RpcError as exc:
        if not logged_race_since(endpoints, before):
            raise
        races.append(f"gRPC scale to {workers}: {exc.code()} {exc.details()}")
        return
    assert message == f"Workers scaled to {workers} for model: {name}"


def wait_for_workers(endpoints, name: str, count: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        statuses = [w["status"] for w in describe(endpoints, name)["workers"]]
        if statuses == ["READY"] * count:
            return
        assert time.monotonic() < deadline, f"{name}: workers {statuses}, expected {count} READY"
        time.sleep(0.5)


def test_scaling_under_load_loses_no_request(endpoints, reference_dir: Path):
    images = [(reference_dir / "images" / name).read_bytes() for name in ("img_a_h480_w640.png", "img_b_h800_w600.png")]
    expected = [predict_json(endpoints, MODEL, image, "image/png") for image in images]
    assert expected[0]["image_size"] != expected[1]["image_size"], "a mix-up must show"
    races: list[str] = []
    with GrpcClient(endpoints) as client, Load(endpoints, images, expected) as load:
        scalers = {
            "REST": lambda n: rest_scale(endpoints, MODEL, n, races),
            "gRPC": lambda n: grpc_scale(client, endpoints, MODEL, n, races),
        }
        try:
            load.wait_for_answers()
            for scale in scalers.values():
                for workers in (2, 1):
                    scale(workers)
                    wait_for_workers(endpoints, MODEL, workers)
                    load.wait_for_answers()
        finally:
            rest_scale(endpoints, MODEL, 1, races)  # leave the session server as the other tests expect it
    print(f"\n{len(load.outcomes)} requests during scaling, {len(load.retried)} retried after a scale-down: "
          f"{load.retried}; TorchServe's scale-down race: {races}")  # fmt: skip
    failures = [o for o in load.outcomes if o != 200]
    assert failures == [], f"{len(failures)} of {len(load.outcomes)} requests failed: {failures[:3]}"


def worker_memory(endpoints, name: str) -> dict[int, tuple[float, float]]:
    """pid -> (RSS, USS) in MB for each worker process. USS counts only the pages the process alone holds."""
    memory = {}
    for worker in describe(endpoints, name)["workers"]:
        info = psutil.Process(worker["pid"]).memory_full_info()
        memory[worker["pid"]] = (info.rss / 2**20, info.uss / 2**20)
    return memory


VARIANTS = ["s"] + (["m", "l"] if os.environ.get("YOLONAS_ALL_VARIANTS") == "1" else [])


@pytest.mark.parametrize("variant", VARIANTS)
def test_extra_worker_memory(
    variant: str, endpoints, random_checkpoint, s_archive: Path, model_store: Path, reference_dir: Path
):
    """Each worker loads its own copy of the model: a second one costs at least the weights it holds (the fused model
    keeps about two thirds of the checkpoint's parameters), plus the Python/torch runtime."""
    name = f"memory_{variant}"
    checkpoint = random_checkpoint(variant)  # the one s_archive was built from, for S
    archive = s_archive if variant == "s" else build_archive(checkpoint, model_store, f"yolo_nas_{variant}_random")
    image = (reference_dir / "images" / "img_a_h480_w640.png").read_bytes()
    headers = {**endpoints.auth(), "Content-Type": "image/png"}

    def post(_: int) -> int:
        url = f"{endpoints.inference}/predictions/{name}"
        return requests.post(url, data=image, headers=headers, timeout=300).status_code

    def infer(count: int) -> None:  # batch_size 1: concurrent requests spread over the idle workers
        with ThreadPoolExecutor(count) as pool:
            assert list(pool.map(post, range(count))) == [200] * count

    server.register(endpoints, archive.name, name=name, batch_size=1)
    try:
        infer(1)
        one = worker_memory(endpoints, name)
        rest_scale(endpoints, name, 2)
        infer(2)
        two = worker_memory(endpoints, name)
    finally:
        requests.delete(f"{endpoints.management}/models/{name}", headers=endpoints.auth("management"), timeout=120)
    [extra] = set(two) - set(one)
    added_rss = sum(rss for rss, _ in two.values()) - sum(rss for rss, _ in one.values())
    print(f"\nYOLO-NAS {variant.upper()}: one more worker adds {added_rss:.0f} MB RSS (sum over workers); "
          f"the new worker: RSS {two[extra][0]:.0f} MB, USS {two[extra][1]:.0f} MB")  # fmt: skip
    weights_mb = checkpoint.stat().st_size / 2**20
    assert added_rss > weights_mb / 2 and two[extra][1] > weights_mb / 2
