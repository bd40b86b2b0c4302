"""Two versions of one model side by side, as in the README's canary rollout: archive.py --version (and --set),
routes to /predictions/<model>/<version>, and the default switched with set-default, over REST and gRPC."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests

from helpers import build_archive
from yolonas_tools.generated import management_pb2
from yolonas_tools.serve import server
from yolonas_tools.serve.grpc_client import GrpcClient

MODEL = "canary"


@pytest.fixture(scope="module")
def two_versions(ts_server, s_archive: Path, model_store: Path, tmp_path_factory, random_checkpoint):
    """canary 1.0 (the session's archive: archive.py's default version and settings) and canary 2.0 (--version 2.0,
    max_det 1 and one more setting through --set, from the same checkpoint), registered under one name on the session
    server: 1.0 first, so it is the default."""
    staging = tmp_path_factory.mktemp("staging_versions")
    build_archive(random_checkpoint("s"), staging, MODEL, "--version", "2.0", "--set", "max_det=1",
                  "--set", "responseTimeout=90")  # fmt: skip
    canary = (staging / f"{MODEL}.mar").rename(model_store / f"{MODEL}_2.0.mar")
    try:
        for archive in (s_archive, canary):
            server.register(ts_server, archive.name, name=MODEL)
        with GrpcClient(ts_server) as client:
            yield ts_server, client
    finally:
        for version in ("2.0", "1.0"):  # the default version goes last
            requests.delete(f"{ts_server.management}/models/{MODEL}/{version}",
                            headers=ts_server.auth("management"), timeout=60)  # fmt: skip


@pytest.fixture(scope="module")
def image(reference_dir: Path) -> bytes:
    return (reference_dir / "images" / "img_a_h480_w640.png").read_bytes()


def detections(endpoints, image: bytes, path: str) -> int:
    response = requests.post(
        f"{endpoints.inference}/predictions/{path}",
        data=image,
        headers={**endpoints.auth(), "Content-Type": "image/png"},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    return len(response.json()["detections"])


def set_default_rest(endpoints, version: str) -> None:
    response = requests.put(
        f"{endpoints.management}/models/{MODEL}/{version}/set-default", headers=endpoints.auth("management"), timeout=60
    )
    assert response.status_code == 200, response.text


def test_versions_route_and_the_default_switches(two_versions, image):
    endpoints, client = two_versions
    described = {d["modelVersion"]: d for d in client.describe(MODEL, "all")}
    assert described["2.0"]["responseTimeout"] == 90 and described["1.0"]["responseTimeout"] != 90
    # max_det=1 tells the versions apart: 2.0 answers one detection, 1.0 many.
    assert detections(endpoints, image, f"{MODEL}/1.0") > 1
    assert detections(endpoints, image, f"{MODEL}/2.0") == 1
    assert detections(endpoints, image, MODEL) > 1  # the first registered version is the default

    set_default_rest(endpoints, "2.0")  # REST: the canary becomes the default
    assert detections(endpoints, image, MODEL) == 1
    assert detections(endpoints, image, f"{MODEL}/1.0") > 1  # the old version still answers by its path

    # gRPC: roll back with SetDefault; Predictions picks a version with model_version.
    reply = client.management.SetDefault(
        management_pb2.SetDefaultRequest(model_name=MODEL, model_version="1.0"),
        metadata=(("authorization", f"Bearer {endpoints.key('management')}"),),
        timeout=60,
    )
    assert "1.0" in reply.msg
    assert len(json.loads(client.predict(MODEL, image))["detections"]) > 1
    assert len(json.loads(client.predict(MODEL, image, version="2.0"))["detections"]) == 1
    assert detections(endpoints, image, MODEL) > 1  # REST sees the same default
