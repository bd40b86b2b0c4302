"""Clients of a running server: where it listens (``server.json``), REST and gRPC calls with the current key, and the
one place where a call whose key was refused, because the renewer replaced it meanwhile, is retried.

REST: options travel as ``X-*`` headers beside a raw image body (TorchServe does not pass query strings on); a
request a worker died under (500, 503, 507) is retried once. The gRPC client is yolonas_tools/serve/grpc_client.py.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import requests

from yolonas_serving.options import OPTIONS, Flag
from yolonas_tools.data.images import content_type
from yolonas_tools.measure.load import KeepAliveSession, PlainResponse
from yolonas_tools.paths import RUN_DIR
from yolonas_tools.serve.keys import key_refused, read_key


class NoServerError(Exception):
    """No running server is recorded in the run folder."""


@dataclass(frozen=True)
class Endpoints:
    """Where a running server listens, as ``server.py start`` recorded it in ``RUN_DIR/server.json``."""

    inference: str
    management: str
    metrics: str
    grpc_inference: str
    grpc_management: str
    run_dir: Path

    @classmethod
    def load(cls, run_dir: Path = RUN_DIR) -> Endpoints:
        path = Path(run_dir) / "server.json"
        if not path.is_file():
            raise NoServerError(f"no running server recorded in {path}: start one with scripts/serve.sh start")
        data = json.loads(path.read_text())
        return cls(run_dir=Path(run_dir), **data)

    def key(self, kind: str) -> str:
        """The current ``inference`` or ``management`` key from TorchServe's key_file.json."""
        return read_key(self.run_dir / "key_file.json", kind)

    def auth(self, kind: str = "inference") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key(kind)}"}


# --- the key a call carries ------------------------------------------------------------------------------------


#  How long a client waits, after its key was refused, for key_file.json to show the renewed key.
NEW_KEY_WAIT_S = 2.0
T = TypeVar("T")


def with_key(endpoints: Endpoints, kind: str, send: Callable[[str], T]) -> T:
    """``send(key)`` with the current key. If the key was refused because the renewer replaced it while the call
    was on its way, wait briefly for the new one in key_file.json and send once more; a second refusal is returned
    (or raised) as is."""
    key = endpoints.key(kind)
    try:
        outcome = send(key)
        if not key_refused(outcome):
            return outcome
    except Exception as exc:  # gRPC raises its refusal
        if not key_refused(exc):
            raise
    deadline = time.monotonic() + NEW_KEY_WAIT_S
    while endpoints.key(kind) == key and time.monotonic() < deadline:
        time.sleep(0.1)
    return send(endpoints.key(kind))


def authorized_request(
    endpoints: Endpoints,
    method: str,
    url: str,
    kind: str = "inference",
    session: requests.Session | KeepAliveSession | None = None,
    headers: dict[str, str] | None = None,
    **kwargs: Any,
) -> requests.Response | PlainResponse:
    """A REST call with the current ``inference`` or ``management`` key (see ``with_key``)."""
    sender = session or requests

    def send(key: str) -> requests.Response | PlainResponse:
        return sender.request(method, url, headers={**(headers or {}), "Authorization": f"Bearer {key}"}, **kwargs)

    return with_key(endpoints, kind, send)


def grpc_call(endpoints: Endpoints, kind: str, rpc: Callable[..., T], request: object, **kwargs: Any) -> T:
    """A unary gRPC call with the current key as ``authorization`` metadata (see ``with_key``)."""
    return with_key(endpoints, kind, lambda key: rpc(request, metadata=(("authorization", f"Bearer {key}"),), **kwargs))


# --- REST ------------------------------------------------------------------------------------------------------


def option_headers(options: Mapping[str, Any]) -> dict[str, str]:
    """Options travel as their X-* headers with a raw image body (TorchServe does not pass query strings on); unset
    (None) ones stay out."""
    return {OPTIONS[name].header: str(value) for name, value in options.items() if value is not None}


#  TorchServe answers these when a worker died under the request (crash, timeout, scale-down): retry once.
RETRY_STATUSES = (500, 503, 507)


def predict(
    endpoints: Endpoints, model: str, image: Path, headers: dict[str, str], picture: bool = False, timeout: float = 60
) -> requests.Response:
    request_headers = {"Content-Type": content_type(image), **headers}
    if picture:
        request_headers["Accept"] = "image/jpeg"
    url = f"{endpoints.inference}/predictions/{model}"
    data = image.read_bytes()
    for attempt in range(2):
        response = authorized_request(endpoints, "POST", url, data=data, headers=request_headers, timeout=timeout)
        if response.status_code not in RETRY_STATUSES or attempt:
            return response
        time.sleep(1.0)
    return response


def print_table(image: Path, result: dict) -> None:
    detections = result["detections"]
    width, height = result["image_size"]
    print(f"{image} ({width}x{height}): {len(detections)} detections from {result['model']}")
    if detections:
        print(f"  {'class':<16} {'score':>6}  box (x1, y1, x2, y2)")
    for d in detections:
        box = ", ".join(f"{v:7.1f}" for v in d["box"])
        print(f"  {d['class_name']:<16} {d['score']:6.3f}  ({box})")


#  Request options the clients set by other means: --save asks for the picture, streams mark their own end.
NOT_FLAGS = ("format", "sequence_end")


def add_option_arguments(parser: argparse.ArgumentParser) -> None:
    """A flag per request option of the table (``--max-det`` for ``max_det``), unset by default so the archive's
    default holds; values go to the server as text and are checked there."""
    for name, option in OPTIONS.items():
        if name in NOT_FLAGS:
            continue
        flag = "--" + name.replace("_", "-")
        help_text = f"{option.doc} ({option.kind.allowed})"
        if isinstance(option.kind, Flag):
            parser.add_argument(flag, nargs="?", const="true", metavar="true|false", help=help_text)
        else:
            parser.add_argument(flag, metavar=name.upper(), help=help_text)


def request_options(args: argparse.Namespace) -> dict[str, Any]:
    """The request options given on the command line, by name."""
    return {name: getattr(args, name) for name in OPTIONS if name not in NOT_FLAGS and getattr(args, name) is not None}


def add_request_arguments(parser: argparse.ArgumentParser) -> None:
    """Images, model and per-request options: shared by the REST and gRPC clients."""
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--model", default="yolo_nas_s")
    add_option_arguments(parser)
    parser.add_argument("--save", type=Path, help="write the annotated picture (a folder when several images)")
    parser.add_argument("--json", action="store_true", help="print the raw JSON responses")
