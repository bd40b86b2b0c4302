"""Security of the shipped setup, checked on the session TorchServe: token auth on every REST and gRPC API, key
rotation (and the clients' retry across one), archives only from the model store, no unpickling of untrusted objects,
loopback-only sockets."""

from __future__ import annotations

import io
import json
import os
import re
import threading
import zipfile
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote

import grpc
import psutil
import pytest
import requests
import torch
from google.protobuf import empty_pb2

from yolonas_tools.generated import inference_pb2, inference_pb2_grpc, management_pb2, management_pb2_grpc
from yolonas_tools.serve import server
from yolonas_tools.serve.clients import authorized_request
from yolonas_tools.serve.grpc_client import GrpcClient
from yolonas_tools.serve.keys import read_key

MODEL = "yolo_nas_s"
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
#  TorchServe 0.12 answers a missing, wrong or expired token with 400 InvalidKeyException (not 401).
REFUSED = "Token Authorization failed"


def bearer(key: str | None) -> dict[str, str]:
    return {} if key is None else {"Authorization": f"Bearer {key}"}


def rest_calls(endpoints, image: bytes) -> dict[str, tuple[str, str, dict]]:
    """name -> (method, url, requests kwargs) for one call of each kind, without credentials."""
    inference, management = endpoints.inference, endpoints.management
    register = {"url": "yolo_nas_s.mar", "model_name": "intruder", "synchronous": "true"}
    raw_png = {"data": image, "headers": {"Content-Type": "image/png"}}
    return {
        "predict": ("POST", f"{inference}/predictions/{MODEL}", raw_png),
        "ping": ("GET", f"{inference}/ping", {}),
        "list models": ("GET", f"{management}/models", {}),
        "describe": ("GET", f"{management}/models/{MODEL}", {}),
        "register": ("POST", f"{management}/models", {"params": register}),
        "scale": ("PUT", f"{management}/models/{MODEL}", {"params": {"min_worker": 0}}),
        "unregister": ("DELETE", f"{management}/models/{MODEL}", {}),
    }  # fmt: skip


def call(method: str, url: str, kwargs: dict, key: str | None) -> requests.Response:
    headers = {**kwargs.get("headers", {}), **bearer(key)}
    return requests.request(method, url, **{**kwargs, "headers": headers}, timeout=60)


@pytest.fixture(scope="module")
def image(reference_dir: Path) -> bytes:
    return (reference_dir / "images" / "img_a_h480_w640.png").read_bytes()


def registered(endpoints) -> set[str]:
    response = requests.get(f"{endpoints.management}/models", headers=endpoints.auth("management"), timeout=30)
    response.raise_for_status()
    return {m["modelName"] for m in response.json()["models"]}


def test_rest_calls_without_the_right_token_are_refused(endpoints, image):
    keys = {"inference": endpoints.key("inference"), "management": endpoints.key("management")}
    for name, (method, url, kwargs) in rest_calls(endpoints, image).items():
        own = "inference" if name in ("predict", "ping") else "management"
        other = "management" if own == "inference" else "inference"
        for key in (None, "wrong-key", keys[other]):  # no token, a made-up one, the other API's key
            response = call(method, url, kwargs, key)
            assert response.status_code == 400 and REFUSED in response.json()["message"], (name, key, response.text)
    # The calls themselves work with the right key (so the refusals above are about the token), and nothing changed.
    assert call("GET", f"{endpoints.inference}/ping", {}, keys["inference"]).json()["status"] == "Healthy"
    assert call(*rest_calls(endpoints, image)["predict"], keys["inference"]).status_code == 200
    assert registered(endpoints) >= {MODEL} and "intruder" not in registered(endpoints)


def test_grpc_calls_without_the_right_token_are_refused(endpoints, image):
    inference_key, management_key = endpoints.key("inference"), endpoints.key("management")
    with (
        grpc.insecure_channel(endpoints.grpc_inference) as inference_channel,
        grpc.insecure_channel(endpoints.grpc_management) as management_channel,
    ):
        inference = inference_pb2_grpc.InferenceAPIsServiceStub(inference_channel)
        management = management_pb2_grpc.ManagementAPIsServiceStub(management_channel)
        predict = inference_pb2.PredictionsRequest(model_name=MODEL, input={"data": image})
        register = management_pb2.RegisterModelRequest(url="yolo_nas_s.mar", model_name="intruder", synchronous=True)
        listing = management_pb2.ListModelsRequest(limit=10)
        calls = {
            "Predictions": (inference.Predictions, predict, inference_key),
            "Ping": (inference.Ping, empty_pb2.Empty(), inference_key),
            "ListModels": (management.ListModels, listing, management_key),
            "DescribeModel": (management.DescribeModel, management_pb2.DescribeModelRequest(model_name=MODEL),
                              management_key),
            "RegisterModel": (management.RegisterModel, register, management_key),
        }  # fmt: skip
        for name, (rpc, request, own_key) in calls.items():
            other_key = management_key if own_key == inference_key else inference_key
            for metadata in ((), (("authorization", "Bearer wrong-key"),), (("authorization", f"Bearer {other_key}"),)):
                with pytest.raises(grpc.RpcError) as error:
                    rpc(request, metadata=metadata, timeout=60)
                assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED, (name, metadata, error.value.details())
        reply = management.ListModels(listing, metadata=(("authorization", f"Bearer {management_key}"),), timeout=60)
        models = json.loads(reply.msg)
    assert {m["modelName"] for m in models["models"]} >= {MODEL} and "intruder" not in registered(endpoints)


class _Recorder(BaseHTTPRequestHandler):
    """An HTTP server that would hand out an archive; it records every request it gets."""

    hits: list[str] = []
    archive = b""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.hits.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.archive)))
        self.end_headers()
        self.wfile.write(self.archive)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def archive_host(s_archive: Path):
    _Recorder.hits, _Recorder.archive = [], s_archive.read_bytes()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", _Recorder.hits
    httpd.shutdown()
    httpd.server_close()


def test_archives_come_only_from_the_model_store(endpoints, s_archive: Path, tmp_path: Path, archive_host):
    host, hits = archive_host
    outside = tmp_path / "outside_only.mar"  # a real, loadable archive that is not in the model store
    outside.write_bytes(s_archive.read_bytes())
    refused = {
        f"{host}/outside_only.mar": "does not match any allowed URL",
        "https://example.com/yolo_nas_s.mar": "does not match any allowed URL",
        "file:///etc/passwd": "does not match any allowed URL",
        outside.as_uri(): "does not match any allowed URL",
        str(outside): "Model not found",  # a bare path only names a file in the store
        "../" + outside.name: "Relative path is not allowed",
        f"../{s_archive.parent.name}/{s_archive.name}": "Relative path is not allowed",
        "..%2F" + quote(str(outside), safe=""): "Relative path is not allowed",
    }
    management = endpoints.auth("management")
    for url, message in refused.items():
        params = {"url": url, "model_name": "outside", "initial_workers": 1, "synchronous": "true"}
        response = requests.post(f"{endpoints.management}/models", params=params, headers=management, timeout=120)
        assert response.status_code == 404 and message in response.json()["message"], (url, response.text)
    with grpc.insecure_channel(endpoints.grpc_management) as channel:
        stub = management_pb2_grpc.ManagementAPIsServiceStub(channel)
        request = management_pb2.RegisterModelRequest(url=outside.as_uri(), model_name="outside", synchronous=True)
        with pytest.raises(grpc.RpcError) as error:
            metadata = (("authorization", f"Bearer {endpoints.key('management')}"),)
            stub.RegisterModel(request, metadata=metadata, timeout=120)
        assert "does not match any allowed URL" in error.value.details()
    assert hits == [], "TorchServe must not even fetch from a URL outside allowed_urls"
    assert "outside" not in registered(endpoints)
    assert not (s_archive.parent / outside.name).exists()  # nothing was copied into the store either


class _Payload:
    """Unpickling this runs os.system: what a hostile weights file would do."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_a_malicious_pickle_in_an_archive_is_never_unpickled(endpoints, s_archive: Path, tmp_path: Path):
    """An archive whose weights.pth runs a shell command when unpickled fails to load, and the command never runs:
    the loader reads with torch's weights_only unpickler, then an allow-list one; neither calls os.system."""
    marker = tmp_path / "pwned"
    payload = io.BytesIO()
    torch.save({"net": _Payload(f"touch {marker}")}, payload)
    name = "malicious_pickle"
    archive = s_archive.parent / f"{name}.mar"
    with zipfile.ZipFile(s_archive) as source, zipfile.ZipFile(archive, "w") as target:
        for item in source.infolist():
            data = payload.getvalue() if item.filename == "weights.pth" else source.read(item.filename)
            target.writestr(item, data)
    try:
        params = {"url": archive.name, "model_name": name, "initial_workers": 1, "synchronous": "true"}
        response = requests.post(
            f"{endpoints.management}/models", params=params, headers=endpoints.auth("management"), timeout=300
        )
        assert response.status_code == 500 and "Failed to start workers" in response.json()["message"], response.text
        assert not marker.exists(), "the pickle's command ran"
        log = (endpoints.run_dir / "logs" / "model_log.log").read_text(errors="replace")
        assert "refused to load global posix.system: it is not on the allow-list" in log
        assert name not in registered(endpoints)
    finally:
        requests.delete(f"{endpoints.management}/models/{name}", headers=endpoints.auth("management"), timeout=60)
        archive.unlink()
    assert not marker.exists()


def test_shipped_config_binds_loopback_and_keeps_token_auth():
    props = server.read_properties(server.CONFIG)
    for key in ("inference_address", "management_address", "metrics_address"):
        scheme, _, rest = props[key].partition("://")
        assert scheme in ("http", "https") and rest.rsplit(":", 1)[0] == "127.0.0.1", (key, props[key])
    for key in ("grpc_inference_address", "grpc_management_address"):
        assert props[key] == "127.0.0.1", (key, props[key])
    assert props["disable_token_authorization"] == "false"
    assert props.get("enable_envvars_config", "false") == "false"  # environment variables cannot turn auth off
    assert int(props["max_request_size"]) <= 20 * 1024 * 1024
    allowed = [re.compile(p, re.IGNORECASE) for p in props["allowed_urls"].split(",")]
    for url in ("http://127.0.0.1:1/x.mar", "https://host/x.mar", "file:///tmp/x.mar", "s3://bucket/x.mar"):
        assert not any(p.fullmatch(url) for p in allowed), url


def listening_sockets(pid: int) -> list[tuple[str, int]]:
    root = psutil.Process(pid)
    sockets = []
    for process in [root, *root.children(recursive=True)]:
        try:
            connections = process.net_connections(kind="inet")
        except psutil.NoSuchProcess:  # a worker that just exited
            continue
        for connection in connections:
            if connection.status == psutil.CONN_LISTEN or connection.type == 2:  # TCP listeners and UDP sockets
                sockets.append((connection.laddr.ip, connection.laddr.port))
    return sockets


def test_running_server_listens_on_loopback_only(endpoints):
    sockets = listening_sockets(int((endpoints.run_dir / "server.pid").read_text()))
    assert sockets and all(ip in LOOPBACK for ip, _ in sockets), sockets
    configured = {endpoints.inference, endpoints.management, endpoints.metrics, endpoints.grpc_inference,
                  endpoints.grpc_management}  # fmt: skip
    assert {int(address.rsplit(":", 1)[1]) for address in configured} <= {port for _, port in sockets}


def test_keys_rotate_through_the_token_api(endpoints, image):
    """POST <management>/token?type=inference|management with the API key issues a new key and rewrites
    key_file.json; the old key is refused from then on (REST and gRPC), the new one works."""
    key_file = endpoints.run_dir / "key_file.json"
    api_key = read_key(key_file, "API")
    url = f"{endpoints.management}/token"
    # Only the API key may rotate keys.
    for key in (None, endpoints.key("management"), endpoints.key("inference")):
        response = requests.post(url, params={"type": "inference"}, headers=bearer(key), timeout=30)
        assert response.status_code == 400, response.text
    assert requests.post(url, params={"type": "bogus"}, headers=bearer(api_key), timeout=30).status_code == 400

    old = {kind: endpoints.key(kind) for kind in ("inference", "management")}
    for kind in ("inference", "management"):
        response = requests.post(url, params={"type": kind}, headers=bearer(api_key), timeout=30)
        assert response.status_code == 200, response.text
    new = {kind: endpoints.key(kind) for kind in ("inference", "management")}
    assert new["inference"] != old["inference"] and new["management"] != old["management"]
    assert read_key(key_file, "API") == api_key

    ping = f"{endpoints.inference}/ping"
    assert requests.get(ping, headers=bearer(old["inference"]), timeout=30).status_code == 400
    assert requests.get(ping, headers=bearer(new["inference"]), timeout=30).json()["status"] == "Healthy"
    models = f"{endpoints.management}/models"
    assert requests.get(models, headers=bearer(old["management"]), timeout=30).status_code == 400
    assert requests.get(models, headers=bearer(new["management"]), timeout=30).status_code == 200
    with grpc.insecure_channel(endpoints.grpc_inference) as channel:
        stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
        request = inference_pb2.PredictionsRequest(model_name=MODEL, input={"data": image})
        with pytest.raises(grpc.RpcError) as error:
            stub.Predictions(request, metadata=(("authorization", f"Bearer {old['inference']}"),), timeout=120)
        assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
        reply = stub.Predictions(request, metadata=(("authorization", f"Bearer {new['inference']}"),), timeout=120)
        assert json.loads(reply.prediction)["detections"]


class RotatingSession(requests.Session):
    """A client session whose calls are recorded (key sent, status); before the calls numbered in ``rotate_before``
    it rotates the key through the token API, after the client has read the key and before the call leaves: the
    call carries a key TorchServe no longer accepts, as when the renewer replaces it while a call is on its way."""

    def __init__(self, rotate: Callable[[], None], rotate_before: set[int]):
        super().__init__()
        self.rotate, self.rotate_before = rotate, rotate_before
        self.sent: list[tuple[str, int]] = []

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> requests.Response:
        if len(self.sent) in self.rotate_before:
            self.rotate()
        response = super().request(method, url, *args, **kwargs)
        self.sent.append((kwargs["headers"]["Authorization"], response.status_code))
        return response


def rotating_rpc(rpc: Callable[..., Any], rotate: Callable[[], None], sent: list[str]) -> Callable[..., Any]:
    """``rpc`` that rotates the key before its first call leaves and records the key of every call (see
    RotatingSession)."""

    def call(request: object, metadata: tuple, **kwargs: Any) -> Any:
        if not sent:
            rotate()
        sent.append(dict(metadata)["authorization"])
        return rpc(request, metadata=metadata, **kwargs)

    return call


def test_clients_retry_once_with_a_key_rotated_in_the_middle_of_their_session(endpoints, image):
    """The clients of yolonas_tools.serve read the key for every call and, when TorchServe refuses it because it
    was replaced meanwhile, read the new one and send once more (clients.with_key): a REST session and a gRPC
    client go on across a rotation through POST /token, each refused call retried with the new key."""
    api_key = read_key(endpoints.run_dir / "key_file.json", "API")

    def rotate(kind: str) -> Callable[[], None]:
        def post() -> None:
            response = requests.post(f"{endpoints.management}/token", params={"type": kind}, headers=bearer(api_key),
                                     timeout=30)  # fmt: skip
            assert response.status_code == 200, response.text

        return post

    url = f"{endpoints.inference}/predictions/{MODEL}"
    with RotatingSession(rotate("inference"), rotate_before={1}) as session:
        for _ in range(3):
            response = authorized_request(endpoints, "POST", url, session=session, data=image,
                                          headers={"Content-Type": "image/png"}, timeout=120)  # fmt: skip
            assert response.status_code == 200 and response.json()["detections"], response.text
    keys = [key for key, _ in session.sent]
    assert [status for _, status in session.sent] == [200, 400, 200, 200]  # the second call retried once
    assert keys[0] == keys[1] != keys[2] == keys[3] == f"Bearer {endpoints.key('inference')}"

    with GrpcClient(endpoints) as client:
        sent: dict[str, list[str]] = {"inference": [], "management": []}
        client.inference.Predictions = rotating_rpc(client.inference.Predictions, rotate("inference"),
                                                    sent["inference"])  # fmt: skip
        client.management.DescribeModel = rotating_rpc(client.management.DescribeModel, rotate("management"),
                                                       sent["management"])  # fmt: skip
        assert json.loads(client.predict(MODEL, image))["detections"]
        assert client.describe(MODEL)[0]["modelName"] == MODEL
    for kind, keys in sent.items():
        assert len(keys) == 2 and keys[0] != keys[1] == f"Bearer {endpoints.key(kind)}", (kind, keys)
