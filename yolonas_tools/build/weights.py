"""Official pretrained YOLO-NAS weights (COCO, 80 classes): downloaded, checked, kept.

Tries the chosen source first, then the other. A file is streamed to ``NAME.part`` and renamed only once it loads as
YOLO-NAS of the requested variant with 80 classes (Ultralytics' pickled model objects through the restricted loader,
no code run). Neither project publishes checksums, so that load is the only check; the sha256 printed is for your
records. A file already in place that passes the check is kept. The weights are under Deci's own licence
(non-commercial use): read it before using them.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from urllib.parse import urlsplit

import requests
from tqdm import tqdm

from yolonas import CheckpointError, read_checkpoint

#  super-gradients moved its weights in 2024 (the old Deci URLs answer 404); Ultralytics re-hosts the same models
#  as pickled model objects.
SOURCES: dict[str, str] = {
    "super-gradients": "https://sg-hub-nv.s3.amazonaws.com/models/yolo_nas_{variant}_coco.pth",
    "ultralytics": "https://github.com/ultralytics/assets/releases/download/v8.3.0/yolo_nas_{variant}.pt",
}
COCO_CLASSES = 80
#  Offline, DNS fails at once and a refused connection too; a black-holed route would hang without a connect timeout.
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 60.0
CHUNK_BYTES = 1 << 20


class DownloadError(Exception):
    """Nothing usable came from a URL: no connection, a timeout or an HTTP error."""


class WeightsUnavailable(Exception):
    """No source gave the weights. ``invalid``: a file arrived but was not the requested model."""

    def __init__(self, message: str, invalid: bool) -> None:
        super().__init__(message)
        self.invalid = invalid


def download(url: str, target: Path) -> None:
    """Stream ``url`` into ``target`` (created or replaced); any failure raises DownloadError and removes it."""
    try:
        with requests.get(url, stream=True, timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S)) as response:
            response.raise_for_status()
            total = int(response.headers.get("Content-Length", 0)) or None
            with open(target, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, disable=None) as bar:
                for chunk in response.iter_content(CHUNK_BYTES):
                    f.write(chunk)
                    bar.update(len(chunk))
    except requests.RequestException as exc:
        target.unlink(missing_ok=True)
        raise DownloadError(describe_request_error(exc)) from None
    except BaseException:
        target.unlink(missing_ok=True)
        raise


def describe_request_error(exc: requests.RequestException) -> str:
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        return f"HTTP {exc.response.status_code} {exc.response.reason}"
    #  urllib3 wraps the root cause (name resolution, refused connection) in a MaxRetryError with a long message.
    cause = getattr(exc.args[0], "reason", None) if exc.args else None
    return f"{type(exc).__name__}: {cause or exc}"


def validate(path: Path, variant: str) -> str:
    """Raise CheckpointError unless ``path`` holds YOLO-NAS ``variant`` with the 80 COCO classes; return its layout."""
    return read_checkpoint(path, variant, COCO_CLASSES).source


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def report(path: Path, layout: str, note: str) -> None:
    print(f"{path}: {note} ({layout})")
    print(f"sha256 {sha256(path)}  (no published checksum to compare with)")


def fetch(source: str, variant: str, out: Path) -> Path:
    """Download from one source into ``out`` atomically; raise DownloadError or CheckpointError."""
    url = SOURCES[source].format(variant=variant)
    target = out / Path(urlsplit(url).path).name
    part = target.with_name(target.name + ".part")
    print(f"downloading {url}", file=sys.stderr)
    download(url, part)
    try:
        layout = validate(part, variant)
    except CheckpointError:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, target)
    report(target, layout, f"YOLO-NAS {variant.upper()} from {source}")
    return target


def existing(variant: str, out: Path, sources: list[str]) -> Path | None:
    """A previously downloaded file that still passes the check, if any."""
    for source in sources:
        path = out / Path(urlsplit(SOURCES[source].format(variant=variant)).path).name
        if path.is_file():
            try:
                report(path, validate(path, variant), "already present")
                return path
            except CheckpointError as exc:
                print(f"{path}: ignoring the file already there: {exc}", file=sys.stderr)
    return None


def obtain(variant: str, out: Path, first_source: str = "super-gradients") -> Path:
    """The checked weights of ``variant`` in ``out``: a file already there, else downloaded from ``first_source``,
    then the other. Raises WeightsUnavailable."""
    sources = [first_source] + [s for s in SOURCES if s != first_source]
    found = existing(variant, out, sources)
    if found:
        return found
    out.mkdir(parents=True, exist_ok=True)
    invalid = False
    for source in sources:
        try:
            return fetch(source, variant, out)
        except DownloadError as exc:
            print(f"{source}: download failed: {exc}", file=sys.stderr)
        except CheckpointError as exc:
            print(f"{source}: the file is not the expected model, discarded: {exc}", file=sys.stderr)
            invalid = True
    raise WeightsUnavailable(f"could not get YOLO-NAS {variant.upper()} weights from {' or '.join(sources)}", invalid)
