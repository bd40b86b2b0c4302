"""The one load generator and its percentile: nearest rank, a measured value, the same for every table."""

from __future__ import annotations

import threading

import pytest

from yolonas_tools.load import Load, drive, percentile


def test_percentile_is_the_nearest_rank():
    values = [15.0, 20.0, 35.0, 40.0, 50.0]
    assert [percentile(values, q) for q in (5, 30, 40, 50, 100)] == [15.0, 20.0, 20.0, 35.0, 50.0]
    assert percentile(list(range(1, 101)), 95) == 95 and percentile(list(range(1, 101)), 99.5) == 100
    assert percentile([7.0], 50) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_drive_sends_the_total_from_every_client_and_counts_errors_by_kind():
    threads, lock = set(), threading.Lock()
    count = [0]

    def send(session) -> str | None:
        with lock:
            threads.add(threading.get_ident())
            count[0] += 1
            return "HTTP 503" if count[0] % 4 == 0 else None

    load = drive(send, clients=3, total=40)
    assert count[0] == 40 and load.served == 30 and load.errors == {"HTTP 503": 10}
    assert len(threads) <= 3 and load.seconds > 0 and load.per_second > 0
    summary = load.latency_summary()
    assert list(summary) == ["p50", "p95", "p99", "max"] and summary["p50"] <= summary["p99"] <= summary["max"]


def test_drive_adds_windows_to_one_record_and_stops_at_the_deadline():
    load = Load()
    drive(lambda session: None, clients=2, seconds=0.2, interval=0.05, load=load)
    first = load.served
    drive(lambda session: None, clients=2, seconds=0.2, interval=0.05, load=load)
    assert 2 <= first <= 12 and load.served > first and 0.35 < load.seconds < 1.0
