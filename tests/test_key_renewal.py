"""Keys without a server: a call refused because its key was renewed meanwhile is sent once more with the new key
(scripts/common.py), key files caught half-written are read again, and the renewal margin's defaults and limits."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import requests

from yolonas_tools.serve.clients import Endpoints, with_key
from yolonas_tools.serve.keys import (
    KeyFileError,
    check_interval_s,
    key_refused,
    read_keys,
    renew_margin_s,
    seconds_left,
)


def write_keys(path: Path, inference: str, expires: str = "2030-01-01T00:00:00.123456789Z") -> None:
    path.write_text(json.dumps({"management": {"key": "m", "expiration time": expires},
                                "inference": {"key": inference, "expiration time": expires},
                                "API": {"key": "api"}}))  # fmt: skip


@pytest.fixture
def endpoints(tmp_path: Path) -> Endpoints:
    write_keys(tmp_path / "key_file.json", "old")
    return Endpoints("http://i", "http://m", "http://x", "g:1", "g:2", tmp_path)


def refusal() -> requests.Response:
    response = requests.Response()
    response.status_code = 400
    response._content = b'{"code": 400, "type": "InvalidKeyException", "message": "Token Authorization failed."}'
    return response


class Denied(Exception):
    """What grpc raises: an error whose code() is PERMISSION_DENIED."""

    def code(self):
        return type("Code", (), {"name": "PERMISSION_DENIED"})()


def test_a_refused_key_is_retried_once_with_the_renewed_key(endpoints: Endpoints):
    sent = []

    def send(key: str) -> object:
        sent.append(key)
        if key == "old":
            write_keys(endpoints.run_dir / "key_file.json", "new")  # renewed while the call was on its way
            return refusal()
        return "answer"

    assert with_key(endpoints, "inference", send) == "answer" and sent == ["old", "new"]


def test_a_refusal_raised_by_grpc_is_retried_too(endpoints: Endpoints):
    sent = []

    def send(key: str) -> str:
        sent.append(key)
        if len(sent) == 1:
            threading.Timer(0.3, write_keys, (endpoints.run_dir / "key_file.json", "new")).start()
            raise Denied()
        return key

    assert with_key(endpoints, "inference", send) == "new" and sent == ["old", "new"]


def test_a_key_refused_twice_is_returned_and_other_errors_are_not_retried(endpoints: Endpoints):
    sent = []
    start = time.monotonic()
    response = with_key(endpoints, "inference", lambda key: sent.append(key) or refusal())
    assert key_refused(response) and sent == ["old", "old"] and time.monotonic() - start < 5

    def broken(key: str) -> None:
        sent.append(key)
        raise ValueError("boom")

    with pytest.raises(ValueError):
        with_key(endpoints, "inference", broken)
    assert len(sent) == 3
    ok = requests.Response()
    ok.status_code = 400
    ok._content = b'{"error": "not an image"}'  # the handler's 400 is no key refusal
    assert not key_refused(ok) and with_key(endpoints, "inference", lambda key: ok) is ok


def test_a_half_written_key_file_is_read_again(tmp_path: Path):
    path = tmp_path / "key_file.json"
    path.write_text('{"management": {"key"')
    threading.Timer(0.2, write_keys, (path, "whole")).start()
    assert read_keys(path)["inference"]["key"] == "whole"
    path.write_text("{")
    with pytest.raises(KeyFileError, match="cannot read the keys"):
        read_keys(path, patience=0.2)


def test_renewal_margin(monkeypatch):
    monkeypatch.delenv("YOLONAS_RENEW_MARGIN_MIN", raising=False)
    assert renew_margin_s(60) == 600 and renew_margin_s(1) == 30 and renew_margin_s(60, 5) == 300
    monkeypatch.setenv("YOLONAS_RENEW_MARGIN_MIN", "15")
    assert renew_margin_s(60) == 900 and renew_margin_s(60, 5) == 300  # the flag beats the environment
    for bad in (0, 60, 90):
        with pytest.raises(ValueError, match="below the key lifetime"):
            renew_margin_s(60, bad)
    assert check_interval_s(30) == 7.5 and check_interval_s(600) == 60 and check_interval_s(2) == 1


def test_seconds_left_reads_torchserve_timestamps():
    from datetime import UTC, datetime

    now = datetime(2030, 1, 1, tzinfo=UTC)
    assert seconds_left({"expiration time": "2030-01-01T00:01:00.500000001Z"}, now) == pytest.approx(60.5)
    assert seconds_left({"key": "api"}, now) is None
