"""One load generator and one percentile definition, behind every latency table this repository prints (soak.py,
batch_sweep.py and bench.py's served rows), and one way to time calls in process (``in_turns``: bench.py,
model_info.py, draft_decode.py).

``drive`` runs ``clients`` threads, each with its own HTTP session, sending one request after another (``interval``
seconds apart) until ``seconds`` have passed or ``total`` requests have been sent; every request is timed from
send to the end of its answer. A session is a ``requests.Session`` unless the caller asks for another kind, such as
``KeepAliveSession``. ``percentile`` is the nearest rank: the smallest latency with at least q% of the
latencies at or below it, always a measured value.
"""

from __future__ import annotations

import http.client
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import requests

#  What a client sends once: the request on its session; it returns None when the answer is right, else what went
#  wrong (counted by kind).
Send = Callable[[Any], str | None]


@dataclass(frozen=True)
class PlainResponse:
    """What a ``KeepAliveSession`` call answers: the fields of ``requests.Response`` its callers read."""

    status_code: int
    text: str

    @property
    def ok(self) -> bool:
        return self.status_code < 400


class KeepAliveSession:
    """One keep-alive HTTP/1.1 connection per host, with the ``request(method, url, headers, data, timeout)`` call of
    ``requests.Session``. A load generator runs on the cores of the server it measures: requests spent 1.4 ms of CPU
    per call there (a 130 kB JPEG POST), this 0.4 ms, which left the server's 1-client p50 1.1 ms lower (2-core
    EPYC, one interleaved run). A connection keeps the timeout of its first call."""

    def __init__(self) -> None:
        self.connections: dict[tuple[str, int], http.client.HTTPConnection] = {}

    def __enter__(self) -> KeepAliveSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for connection in self.connections.values():
            connection.close()
        self.connections.clear()

    def request(
        self,
        method: str,
        url: str,
        headers: dict[str, str] | None = None,
        data: bytes | None = None,
        timeout: float | None = None,
    ) -> PlainResponse:
        parts = urlsplit(url)
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError(f"KeepAliveSession speaks plain http only, not {url}")
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        host = (parts.hostname, parts.port or 80)
        reused = host in self.connections
        connection = self.connections.get(host) or http.client.HTTPConnection(*host, timeout=timeout)
        self.connections[host] = connection
        try:
            return self._send(connection, method, path, headers or {}, data)
        except ConnectionError:  # http.client's RemoteDisconnected is one
            if not reused:
                raise
            # Most likely the server had closed the idle connection: as urllib3 does, send once more on a new one.
            return self._send(connection, method, path, headers or {}, data)

    @staticmethod
    def _send(
        connection: http.client.HTTPConnection, method: str, path: str, headers: dict[str, str], data: bytes | None
    ) -> PlainResponse:
        try:
            connection.request(method, path, body=data, headers=headers)
            response = connection.getresponse()
            return PlainResponse(response.status, response.read().decode("utf-8", "replace"))
        except BaseException:
            connection.close()  # http.client stays mid-request after a failure and would refuse the next call
            raise


def in_turns(
    calls: dict[str, Callable[[], Any]], repeats: int, budget_s: float = math.inf, warm_up: int = 1
) -> dict[str, list[tuple[float, Any]]]:
    """(milliseconds, result) of every call, calling them in turn round after round, so that the load of other
    processes falls on all of them alike: ``warm_up`` rounds untimed, then ``repeats`` rounds, or fewer (at least 3)
    once ``budget_s`` is spent."""
    for _ in range(warm_up):
        for call in calls.values():
            call()
    results: dict[str, list[tuple[float, Any]]] = {name: [] for name in calls}
    deadline = time.perf_counter() + budget_s
    for done in range(repeats):
        if done >= 3 and time.perf_counter() > deadline:
            break
        for name, call in calls.items():
            start = time.perf_counter()
            value = call()
            results[name].append(((time.perf_counter() - start) * 1000, value))
    return results


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0 < q <= 100) of ``values`` by nearest rank."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


@dataclass
class Load:
    """What a run of the load generator measured."""

    latencies_ms: list[float] = field(default_factory=list)  # of the requests answered right
    errors: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def served(self) -> int:
        return len(self.latencies_ms)

    @property
    def per_second(self) -> float:
        return self.served / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        return percentile(self.latencies_ms, q)

    def latency_summary(self, quantiles: Sequence[float] = (50, 95, 99)) -> dict[str, float]:
        """``{"p50": ms, ..., "max": ms}``; empty when nothing was answered."""
        if not self.latencies_ms:
            return {}
        return {**{f"p{q:g}": self.percentile(q) for q in quantiles}, "max": max(self.latencies_ms)}


def drive(
    send: Send,
    clients: int,
    seconds: float | None = None,
    total: int | None = None,
    interval: float = 0.0,
    load: Load | None = None,
    session: Callable[[], Any] = requests.Session,
) -> Load:
    """``clients`` threads sending back to back until ``seconds`` pass or ``total`` requests are sent (whichever is
    given; both: the first reached), each on its own ``session()``. Results are added to ``load`` when given (several
    windows, one record)."""
    if seconds is None and total is None:
        raise ValueError("drive needs seconds or total")
    load = load or Load()
    lock = threading.Lock()
    deadline = math.inf if seconds is None else time.monotonic() + seconds
    remaining = [math.inf if total is None else total]

    def take() -> bool:
        with lock:
            if remaining[0] <= 0 or time.monotonic() >= deadline:
                return False
            remaining[0] -= 1
            return True

    def client() -> None:
        with session() as client_session:
            while take():
                start = time.perf_counter()
                try:
                    error = send(client_session)
                except (OSError, http.client.HTTPException, ValueError) as exc:  # requests' errors are OSErrors
                    error = type(exc).__name__
                elapsed_ms = (time.perf_counter() - start) * 1000
                with lock:
                    if error is None:
                        load.latencies_ms.append(elapsed_ms)
                    else:
                        load.errors[error] += 1
                time.sleep(max(0.0, min(interval, deadline - time.monotonic())))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:  # each finishes its request in flight (bounded by its timeout)
        thread.join()
    load.seconds += time.perf_counter() - start
    return load
