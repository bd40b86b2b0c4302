"""The batch job's kinds of failure, without a server (tests/integration/test_batch_predict.py covers retries and
refusals through run())."""

from __future__ import annotations

from pathlib import Path

import pytest

from yolonas_tools.serve import batch
from yolonas_tools.serve.batch import FatalError, PermanentError, SendError, Stop, TransientError, process


@pytest.fixture
def image(tmp_path: Path) -> Path:
    (tmp_path / "a.jpg").write_bytes(b"\xff\xd8 not really a JPEG")
    return tmp_path


def sender(*failures: SendError):
    """Raises ``failures`` one per call, then answers."""
    calls = []

    def send(data: bytes, file_name: str) -> dict:
        calls.append(file_name)
        if len(calls) <= len(failures):
            raise failures[len(calls) - 1]
        return {"image_size": [2, 1], "detections": []}

    return send, calls


def test_the_three_kinds_are_siblings():
    kinds = (TransientError, PermanentError, FatalError)
    assert all(issubclass(kind, SendError) for kind in kinds)
    assert not any(issubclass(a, b) for a in kinds for b in kinds if a is not b)


def test_a_fatal_failure_stops_the_run_and_leaves_the_image_pending(image):
    send, calls = sender(FatalError("model unknown", 404))
    stop = Stop()
    assert process(image, "a.jpg", send, retries=3, backoff=0.0, stop=stop) is None
    assert stop.reason == "model unknown (404)" and len(calls) == 1


@pytest.mark.parametrize(
    "code, kind", [("UNAVAILABLE", TransientError), ("PERMISSION_DENIED", FatalError), ("INTERNAL", PermanentError)]
)
def test_a_grpc_error_without_details_is_still_classified(monkeypatch, code, kind):
    grpc = pytest.importorskip("grpc")

    class BareError(grpc.RpcError):
        def code(self):
            return getattr(grpc.StatusCode, code)

        def details(self):
            return None

    class FailingClient:
        def __init__(self, endpoints, timeout):
            pass

        def predict(self, model, data, options):
            raise BareError()

    monkeypatch.setattr(batch, "GrpcClient", FailingClient)
    send = batch.grpc_sender(None, "yolo_nas_s", {}, 1.0)
    with pytest.raises(kind):
        send(b"image", "a.jpg")
