"""Load and soak: one model driven by the load generator (yolonas_tools/measure/load.py) for minutes, with the memory of
its workers and of the frontend sampled meanwhile; what ``scripts/soak.py`` describes."""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import requests

from yolonas_tools.data.images import content_type
from yolonas_tools.measure.load import Load, Send, drive
from yolonas_tools.serve import server
from yolonas_tools.serve.clients import Endpoints, authorized_request
from yolonas_tools.serve.keys import KeyFileError


class SoakError(Exception):
    """The soak could not start (its warm-up round failed)."""


MB = 1024 * 1024


@dataclass
class MemorySample:
    elapsed_s: float
    workers_mb: float  # summed over the model's workers
    frontend_mb: float | None
    worker_pids: list[int]


@dataclass
class SoakReport:
    model: str
    minutes: float
    concurrency: int
    served: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    requests_per_s: float = 0.0
    latency_ms: dict[str, float] = field(default_factory=dict)  # p50, p95, p99, max of the answered requests
    memory: list[MemorySample] = field(default_factory=list)
    workers_restarted: bool = False
    inference_keys_seen: int = 0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values()) + int(self.workers_restarted)

    def growth_mb(self) -> dict[str, float | None]:
        """End minus start, and the trend: median of the last third of the samples minus that of the first third
        (a single sample depends on whether a batch was running when it was taken)."""
        first, last = self.memory[0], self.memory[-1]
        third = max(1, len(self.memory) // 3)
        workers = [s.workers_mb for s in self.memory]
        ends = (first.frontend_mb, last.frontend_mb)
        frontend = None if None in ends else round(ends[1] - ends[0], 1)
        return {
            "workers": round(last.workers_mb - first.workers_mb, 1),
            "workers_trend": round(statistics.median(workers[-third:]) - statistics.median(workers[:third]), 1),
            "frontend": frontend,
        }


def worker_pids(endpoints: Endpoints, model: str) -> list[int]:
    versions = server.describe(endpoints, model, timeout=30)
    return sorted(int(w["pid"]) for version in versions for w in version["workers"] if w.get("pid"))


def frontend_process(run_dir: Path) -> psutil.Process | None:
    """The Java frontend: the child of the ``torchserve`` launcher whose pid server.py records."""
    try:
        launcher = psutil.Process(int((run_dir / "server.pid").read_text()))
        return next((p for p in launcher.children() if p.name() == "java"), launcher)
    except (OSError, ValueError, psutil.Error):
        return None


def rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.Error:  # a worker gone between describe and here: the restart check reports it
            pass
    return round(total / MB, 1)


def sample_memory(endpoints: Endpoints, model: str, frontend: psutil.Process | None, elapsed: float) -> MemorySample:
    try:
        pids = worker_pids(endpoints, model)
    except (requests.RequestException, KeyFileError):  # no answer: no workers, which reads as a restart
        pids = []
    front = None
    if frontend is not None:
        try:
            front = round(frontend.memory_info().rss / MB, 1)
        except psutil.Error:
            pass
    return MemorySample(round(elapsed, 1), rss_mb(pids), front, pids)


def answer_sender(endpoints: Endpoints, model: str, image: Path, timeout: float) -> Send:
    """Posts ``image`` as a raw body with the current key; an answer counts when it is 200 with detections."""
    url = f"{endpoints.inference}/predictions/{model}"
    data = image.read_bytes()
    headers = {"Content-Type": content_type(image)}

    def send(session: requests.Session) -> str | None:
        response = authorized_request(
            endpoints, "POST", url, session=session, data=data, headers=headers, timeout=timeout
        )
        ok = response.status_code == 200 and "detections" in response.json()
        return None if ok else f"HTTP {response.status_code}: {response.text.strip()[:120]}"

    return send


def soak(
    endpoints: Endpoints,
    model: str,
    image: Path,
    minutes: float,
    concurrency: int,
    timeout: float = 120.0,
    sample_every: float = 30.0,
    interval: float = 0.0,
) -> SoakReport:
    report = SoakReport(model, minutes, concurrency)
    frontend = frontend_process(endpoints.run_dir)
    send = answer_sender(endpoints, model, image, timeout)
    # One request per thread first: memory is measured once the worker has seen a full batch.
    warm_up = drive(send, concurrency, total=concurrency)
    if warm_up.errors:
        raise SoakError(f"the warm-up round failed: {dict(warm_up.errors)}")

    keys = {endpoints.key("inference")}
    load = Load()
    start = time.monotonic()
    deadline = start + minutes * 60
    report.memory.append(sample_memory(endpoints, model, frontend, 0.0))
    driver = threading.Thread(target=drive, args=(send, concurrency, deadline - time.monotonic(), None, interval, load))
    driver.start()
    next_sample = start + sample_every
    while (now := time.monotonic()) < deadline:
        time.sleep(max(0.0, min(next_sample, deadline) - now))
        if next_sample <= time.monotonic() < deadline:
            report.memory.append(sample_memory(endpoints, model, frontend, time.monotonic() - start))
            keys.add(endpoints.key("inference"))
            next_sample += sample_every
    driver.join()  # each client finishes its request in flight (bounded by the timeout)
    elapsed = time.monotonic() - start
    report.memory.append(sample_memory(endpoints, model, frontend, elapsed))

    report.served = load.served
    report.errors = dict(load.errors)
    report.requests_per_s = round(report.served / elapsed, 3)
    report.latency_ms = {name: round(ms, 1) for name, ms in load.latency_summary().items()}
    report.inference_keys_seen = len(keys | {endpoints.key("inference")})
    report.workers_restarted = any(s.worker_pids != report.memory[0].worker_pids for s in report.memory)
    return report


def print_report(report: SoakReport, image: Path) -> None:
    first, last = report.memory[0], report.memory[-1]
    growth = report.growth_mb()
    print(f"soak {report.model}: {report.minutes:g} min, concurrency {report.concurrency}, image {image}")
    errors = ", ".join(f"{n} x {kind}" for kind, n in report.errors.items()) or "none"
    print(f"requests: {report.served} served, {sum(report.errors.values())} errors ({errors}), "
          f"{report.requests_per_s:.2f} req/s, {report.inference_keys_seen} inference key(s) seen")  # fmt: skip
    latency = " ".join(f"{k} {v:.0f}" for k, v in report.latency_ms.items())
    print(f"latency ms: {latency or 'no request answered'}")
    peak = max(s.workers_mb for s in report.memory)
    restarted = "YES" if report.workers_restarted else "no"
    print(f"worker RSS MB (pids {last.worker_pids}): start {first.workers_mb:.1f}, end {last.workers_mb:.1f}, "
          f"growth {growth['workers']:+.1f} (trend {growth['workers_trend']:+.1f}), peak {peak:.1f}; "
          f"restarted: {restarted}")  # fmt: skip
    if growth["frontend"] is not None:
        print(f"frontend RSS MB: start {first.frontend_mb:.1f}, end {last.frontend_mb:.1f}, "
              f"growth {growth['frontend']:+.1f}")  # fmt: skip
