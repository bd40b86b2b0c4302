"""The one load generator and its percentile: nearest rank, a measured value, the same for every table."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from yolonas_tools.measure.load import KeepAliveSession, Load, PlainResponse, drive, percentile
from yolonas_tools.serve.keys import key_refused


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


class EchoHandler(BaseHTTPRequestHandler):
    """Answers a POST with its path, body length and Authorization header; closes the connection silently after
    each answer when the server's ``drop_after_answer`` is set (as a server closing an idle keep-alive connection)."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.peers.add(self.client_address[1])
        status = 400 if self.headers.get("Authorization") == "Bearer old" else 200
        text = "InvalidKeyException" if status == 400 else f"{self.path} {len(body)} {self.headers['Authorization']}"
        payload = text.encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)
        self.close_connection = self.server.drop_after_answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def echo_server() -> Iterator[ThreadingHTTPServer]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), EchoHandler)
    httpd.peers, httpd.drop_after_answer = set(), False
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def test_keep_alive_session_posts_on_one_connection(echo_server):
    url = f"http://127.0.0.1:{echo_server.server_address[1]}/predictions/m?x=1"
    with KeepAliveSession() as session:
        answers = [session.request("POST", url, headers={"Authorization": "Bearer k"}, data=b"12345") for _ in range(5)]
    assert all(a.ok and a.status_code == 200 for a in answers)
    assert answers[0].text == "/predictions/m?x=1 5 Bearer k"
    assert len(echo_server.peers) == 1  # every request on the same connection


def test_keep_alive_session_resends_when_the_server_closed_the_connection(echo_server):
    echo_server.drop_after_answer = True
    url = f"http://127.0.0.1:{echo_server.server_address[1]}/p"
    with KeepAliveSession() as session:
        answers = [session.request("POST", url, headers={"Authorization": "Bearer k"}, data=b"ab") for _ in range(3)]
    assert [a.text for a in answers] == ["/p 2 Bearer k"] * 3 and len(echo_server.peers) == 3


def test_keep_alive_answers_are_read_like_requests_ones(echo_server):
    url = f"http://127.0.0.1:{echo_server.server_address[1]}/p"
    with KeepAliveSession() as session:
        refused = session.request("POST", url, headers={"Authorization": "Bearer old"}, data=b"")
    assert not refused.ok and key_refused(refused)
    assert not key_refused(PlainResponse(400, "bad image"))
    with pytest.raises(ValueError, match="plain http"):
        KeepAliveSession().request("POST", "https://127.0.0.1/p")


def test_drive_counts_a_refused_connection_as_an_error_every_time():
    """Each failed call leaves the session ready for the next (http.client would otherwise refuse to send)."""
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    load = drive(
        lambda session: session.request("POST", f"http://127.0.0.1:{port}/p", data=b"") and None,
        clients=1,
        total=4,
        session=KeepAliveSession,
    )
    assert load.served == 0 and load.errors == {"ConnectionRefusedError": 4}
