"""Load and soak test: drive one model with a bounded request loop; report throughput, latency and memory.

    python scripts/soak.py --model yolo_nas_s --minutes 10 --concurrency 4 [--image IMG] [--json report.json]

``--concurrency`` client threads post the same image back to back (raw body, REST, every request with a timeout)
until the time is up. After one warm-up round, the resident memory (RSS) of the model's workers (their pids from the
management API) and of the frontend is read, then sampled every ``--sample-every`` seconds. Printed: requests
served, errors by kind, requests/s, p50/p95/p99 latency, and memory at start and end with the growth. A worker whose
pid changed was restarted: that counts as an error too. Exit status 1 when anything failed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import requests
from predict import MIME

from common import REPO, RUN_DIR, Endpoints

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

    @property
    def error_count(self) -> int:
        return sum(self.errors.values()) + int(self.workers_restarted)

    def growth_mb(self) -> dict[str, float | None]:
        """End minus start, and the trend: median of the last third of the samples minus that of the first third
        (a single sample depends on whether a batch was running when it was taken)."""
        first, last = self.memory[0], self.memory[-1]
        third = max(1, len(self.memory) // 3)
        workers = [s.workers_mb for s in self.memory]
        frontend = None if first.frontend_mb is None else round(last.frontend_mb - first.frontend_mb, 1)
        return {
            "workers": round(last.workers_mb - first.workers_mb, 1),
            "workers_trend": round(statistics.median(workers[-third:]) - statistics.median(workers[:third]), 1),
            "frontend": frontend,
        }


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    rank = max(1, round(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def worker_pids(endpoints: Endpoints, model: str) -> list[int]:
    response = requests.get(f"{endpoints.management}/models/{model}", headers=endpoints.auth("management"), timeout=30)
    response.raise_for_status()
    return sorted(int(w["pid"]) for description in response.json() for w in description["workers"] if w.get("pid"))


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
    except (requests.RequestException, SystemExit):  # no answer: no workers, which reads as a restart
        pids = []
    front = None
    if frontend is not None:
        try:
            front = round(frontend.memory_info().rss / MB, 1)
        except psutil.Error:
            pass
    return MemorySample(round(elapsed, 1), rss_mb(pids), front, pids)


class Client:
    """One thread's request loop; results go to the shared lists under a lock."""

    def __init__(self, endpoints: Endpoints, model: str, image: Path, timeout: float):
        self.url = f"{endpoints.inference}/predictions/{model}"
        self.endpoints = endpoints
        self.data = image.read_bytes()
        self.content_type = MIME.get(image.suffix.lower(), "application/octet-stream")
        self.timeout = timeout
        self.latencies: list[float] = []
        self.errors: Counter[str] = Counter()
        self.lock = threading.Lock()

    def request(self, session: requests.Session) -> None:
        headers = {**self.endpoints.auth(), "Content-Type": self.content_type}
        start = time.perf_counter()
        try:
            response = session.post(self.url, data=self.data, headers=headers, timeout=self.timeout)
            ok = response.status_code == 200 and "detections" in response.json()
            kind = None if ok else f"HTTP {response.status_code}: {response.text.strip()[:120]}"
        except (requests.RequestException, ValueError) as exc:
            kind = type(exc).__name__
        elapsed_ms = (time.perf_counter() - start) * 1000
        with self.lock:
            if kind is None:
                self.latencies.append(elapsed_ms)
            else:
                self.errors[kind] += 1

    def loop(self, deadline: float) -> None:
        with requests.Session() as session:
            while time.monotonic() < deadline:
                self.request(session)

    def once(self) -> None:
        with requests.Session() as session:
            self.request(session)


def _in_threads(count: int, target: Callable[[], None]) -> None:
    threads = [threading.Thread(target=target) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def soak(
    endpoints: Endpoints,
    model: str,
    image: Path,
    minutes: float,
    concurrency: int,
    timeout: float = 120.0,
    sample_every: float = 30.0,
) -> SoakReport:
    report = SoakReport(model, minutes, concurrency)
    frontend = frontend_process(endpoints.run_dir)
    # One request per thread first: memory is measured once the worker has seen a full batch.
    warm_up = Client(endpoints, model, image, timeout)
    _in_threads(concurrency, warm_up.once)
    if warm_up.errors:
        raise SystemExit(f"the warm-up round failed: {dict(warm_up.errors)}")

    client = Client(endpoints, model, image, timeout)
    start = time.monotonic()
    deadline = start + minutes * 60
    report.memory.append(sample_memory(endpoints, model, frontend, 0.0))
    threads = [threading.Thread(target=client.loop, args=(deadline,)) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    next_sample = start + sample_every
    while (now := time.monotonic()) < deadline:
        time.sleep(max(0.0, min(next_sample, deadline) - now))
        if next_sample <= time.monotonic() < deadline:
            report.memory.append(sample_memory(endpoints, model, frontend, time.monotonic() - start))
            next_sample += sample_every
    for thread in threads:  # each finishes its request in flight (bounded by the timeout)
        thread.join()
    elapsed = time.monotonic() - start
    report.memory.append(sample_memory(endpoints, model, frontend, elapsed))

    latencies = sorted(client.latencies)
    report.served = len(latencies)
    report.errors = dict(client.errors)
    report.requests_per_s = round(report.served / elapsed, 3)
    if latencies:
        report.latency_ms = {f"p{q}": round(percentile(latencies, q), 1) for q in (50, 95, 99)}
        report.latency_ms["max"] = round(latencies[-1], 1)
    report.workers_restarted = any(s.worker_pids != report.memory[0].worker_pids for s in report.memory)
    return report


def print_report(report: SoakReport, image: Path) -> None:
    first, last = report.memory[0], report.memory[-1]
    growth = report.growth_mb()
    print(f"soak {report.model}: {report.minutes:g} min, concurrency {report.concurrency}, image {image}")
    errors = ", ".join(f"{n} x {kind}" for kind, n in report.errors.items()) or "none"
    print(f"requests: {report.served} served, {sum(report.errors.values())} errors ({errors}), "
          f"{report.requests_per_s:.2f} req/s")  # fmt: skip
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="yolo_nas_s")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--image", type=Path, default=REPO / "assets" / "sample.jpg")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    parser.add_argument("--sample-every", type=float, default=30.0, help="seconds between memory samples")
    parser.add_argument("--json", type=Path, help="also write the report here")
    parser.add_argument("--run-dir", type=Path, default=RUN_DIR)
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.concurrency < 1:
        parser.error("--minutes must be positive and --concurrency at least 1")
    endpoints = Endpoints.load(args.run_dir)
    report = soak(endpoints, args.model, args.image, args.minutes, args.concurrency, args.timeout, args.sample_every)
    print_report(report, args.image)
    if args.json:
        args.json.write_text(json.dumps({**asdict(report), "growth_mb": report.growth_mb()}, indent=1))
    return 1 if report.error_count else 0


if __name__ == "__main__":
    sys.exit(main())
