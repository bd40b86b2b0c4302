"""Offline batch jobs: every image of a folder through the running server, resumable through a journal, with
bounded retries of transient failures; what ``scripts/batch_predict.py`` describes.

A failure to send an image is a SendError of one of three kinds: TransientError (retried), PermanentError (the
server refused this image: recorded, the run goes on) and FatalError (nothing can succeed: the run stops).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import requests
from tqdm import tqdm

from yolonas_tools.data.images import content_type, is_image
from yolonas_tools.paths import write_json_atomically
from yolonas_tools.serve.clients import Endpoints, authorized_request, option_headers
from yolonas_tools.serve.grpc_client import GrpcClient, PredictionError
from yolonas_tools.serve.keys import KeyFileError, key_refused

#  gRPC codes TorchServe uses for a busy or restarting backend (507 and 503 map to the first two).
TRANSIENT_GRPC_CODES = frozenset({"RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED"})


class SendError(Exception):
    """An image that did not come back with detections; ``status`` is the HTTP status or gRPC code, if any."""

    def __init__(self, message: str, status: int | str | None = None):
        super().__init__(message)
        self.status = status


class TransientError(SendError):
    """Worth retrying: the server was busy, restarting or unreachable."""


class PermanentError(SendError):
    """The server refused this image; sending it again changes nothing."""


class FatalError(SendError):
    """Nothing can succeed (key refused, model unknown): stop the run, keep the images for the next one."""


@dataclass
class Outcome:
    file_name: str
    image_size: list[int] | None = None  # [width, height]
    detections: list[dict[str, Any]] | None = None  # the handler's detections (box xyxy, score, class_id/name)
    error: str | None = None
    status: int | str | None = None  # HTTP status or gRPC code of the last attempt
    transient: bool = False
    attempts: int = 1

    @property
    def ok(self) -> bool:
        return self.error is None


Sender = Callable[[bytes, str], dict[str, Any]]


def find_images(folder: Path) -> list[str]:
    """Image files under ``folder`` (recursively, by extension) as sorted POSIX paths relative to it."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if is_image(p) and p.is_file())


def _message(response: requests.Response) -> str:
    """The handler's ``{"error": ...}`` or TorchServe's ``{"message": ...}``, else the reason phrase."""
    try:
        body = response.json()
        if isinstance(body, dict):
            return str(body.get("error") or body.get("message") or body)
    except ValueError:
        pass
    return response.text.strip()[:200] or str(response.reason)


def rest_sender(endpoints: Endpoints, model: str, options: dict[str, Any], timeout: float) -> Sender:
    url = f"{endpoints.inference}/predictions/{model}"
    extra = option_headers(options)
    local = threading.local()  # one connection pool per thread

    def send(data: bytes, file_name: str) -> dict[str, Any]:
        if not hasattr(local, "session"):
            local.session = requests.Session()
        headers = {"Content-Type": content_type(file_name), **extra}
        try:
            response = authorized_request(
                endpoints, "POST", url, session=local.session, data=data, headers=headers, timeout=timeout
            )
        except requests.RequestException as exc:  # refused, reset, timed out: the server may be restarting
            raise TransientError(f"{type(exc).__name__}: {exc}") from None
        except KeyFileError as exc:  # key_file.json missing while the server restarts
            raise TransientError(str(exc)) from None
        if response.status_code == 200:
            return response.json()
        message, status = _message(response), response.status_code
        if status >= 500:
            raise TransientError(message, status)
        if status == 404 or key_refused(response):  # unknown model; a key refused even after re-reading it
            raise FatalError(message, status)
        raise PermanentError(message, status)

    return send


def grpc_sender(endpoints: Endpoints, model: str, options: dict[str, Any], timeout: float) -> Sender:
    import grpc

    client = GrpcClient(endpoints, timeout)  # channels are thread-safe: one for all threads

    def send(data: bytes, file_name: str) -> dict[str, Any]:
        try:
            return json.loads(client.predict(model, data, options))
        except PredictionError as exc:  # the handler's 4xx, delivered with status OK
            raise PermanentError(str(exc), "handler") from None
        except KeyFileError as exc:  # the key file, as for REST
            raise TransientError(str(exc)) from None
        except grpc.RpcError as exc:
            code, details = exc.code().name, (exc.details() or "").partition("\n")[0]
            if code in TRANSIENT_GRPC_CODES or "worker died" in details.lower():
                raise TransientError(details, code) from None
            if code == "PERMISSION_DENIED" or "not found" in details.lower():
                raise FatalError(details, code) from None
            raise PermanentError(details, code) from None

    return send


class JournalError(Exception):
    """The journal at --out belongs to another job."""


class Journal:
    """Append-only JSON lines: a header naming the run, then one outcome per line; a file's last line wins."""

    def __init__(self, path: Path, header: dict[str, Any]):
        self.path = path
        self.outcomes: dict[str, Outcome] = {}
        self._lock = threading.Lock()
        if path.is_file() and path.stat().st_size:
            self._load(header)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(header) + "\n")

    def _load(self, header: dict[str, Any]) -> None:
        lines = self.path.read_text().splitlines()
        recorded = json.loads(lines[0])
        if recorded != header:
            raise JournalError(
                f"{self.path} belongs to another job ({recorded}); this one is {header}: choose another --out"
            )
        for line in lines[1:]:
            try:
                entry = Outcome(**json.loads(line))
            except (ValueError, TypeError):  # a line cut short by a crash: that image is simply sent again
                continue
            self.outcomes[entry.file_name] = entry
        if not self.path.read_bytes().endswith(b"\n"):
            with self.path.open("a") as stream:
                stream.write("\n")

    def record(self, outcome: Outcome) -> None:
        with self._lock, self.path.open("a") as stream:
            stream.write(json.dumps(asdict(outcome), separators=(",", ":")) + "\n")
            stream.flush()
            os.fsync(stream.fileno())
            self.outcomes[outcome.file_name] = outcome


def backoff_delay(attempt: int, base: float, cap: float = 30.0) -> float:
    """Exponential backoff with jitter, so clients retrying together do not hit the restarted worker together."""
    return min(cap, base * 2**attempt) * random.uniform(0.5, 1.0)


class Stop:
    """Set once when nothing more can succeed (or on Ctrl-C): images not sent by then stay pending."""

    def __init__(self) -> None:
        self.reason: str | None = None


def process(folder: Path, file_name: str, send: Sender, retries: int, backoff: float, stop: Stop) -> Outcome | None:
    """One image, with bounded retries of transient failures; None when the run stopped before sending it."""
    try:
        data = (folder / file_name).read_bytes()
    except OSError as exc:
        return Outcome(file_name, error=f"cannot read the file: {exc}")
    error = TransientError("not sent")
    for attempt in range(1, retries + 2):
        if attempt > 1:
            time.sleep(backoff_delay(attempt - 2, backoff))
        if stop.reason:
            return None
        try:
            result = send(data, file_name)
            return Outcome(file_name, result["image_size"], result["detections"], attempts=attempt)
        except FatalError as exc:
            stop.reason = f"{exc} ({exc.status})"
            return None
        except PermanentError as exc:
            return Outcome(file_name, error=str(exc), status=exc.status, attempts=attempt)
        except TransientError as exc:
            error = exc
        except (KeyError, TypeError, ValueError) as exc:  # a 200 that is not the handler's JSON
            return Outcome(file_name, error=f"unexpected answer: {exc!r}", status=200, attempts=attempt)
    return Outcome(file_name, error=str(error), status=error.status, transient=True, attempts=retries + 1)


def output_paths(out: Path) -> dict[str, Path]:
    stem = out.name[: -len(out.suffix)] if out.suffix else out.name
    names = {
        "images": "images.json",
        "failures": "failures.json",
        "summary": "summary.json",
        "journal": "journal.jsonl",
    }
    return {"results": out, **{kind: out.with_name(f"{stem}.{name}") for kind, name in names.items()}}


def write_outputs(
    paths: dict[str, Path], files: list[str], outcomes: dict[str, Outcome], not_sent: str
) -> tuple[int, int, int]:
    """COCO results, images and categories, failures (images never sent included); returns (succeeded, failed,
    detections). Image ids follow the sorted file names, so they stay the same across reruns."""
    names = sorted(set(files) | set(outcomes))
    ids = {name: i for i, name in enumerate(names, start=1)}
    results, images, failures, categories = [], [], [], {}
    for name in names:
        outcome = outcomes.get(name) or Outcome(name, error=f"not sent: {not_sent}", transient=True, attempts=0)
        if not outcome.ok:
            failures.append({"file_name": name, "error": outcome.error, "status": outcome.status,
                             "transient": outcome.transient, "attempts": outcome.attempts})  # fmt: skip
            continue
        width, height = outcome.image_size
        images.append({"id": ids[name], "file_name": name, "width": width, "height": height})
        for d in outcome.detections:
            x1, y1, x2, y2 = d["box"]
            categories[d["class_id"]] = d["class_name"]
            results.append({"image_id": ids[name], "file_name": name, "category_id": d["class_id"],
                            "bbox": [x1, y1, round(x2 - x1, 2), round(y2 - y1, 2)], "score": d["score"]})  # fmt: skip
    write_json_atomically(paths["results"], results, indent=None)  # can be large: compact
    write_json_atomically(
        paths["images"], {"images": images, "categories": [{"id": k, "name": v} for k, v in sorted(categories.items())]}
    )
    write_json_atomically(paths["failures"], failures)
    return len(images), len(failures), len(results)


def run(
    folder: Path,
    out: Path,
    send: Sender,
    header: dict[str, Any],
    concurrency: int = 4,
    retries: int = 5,
    backoff: float = 1.0,
    retry_failed: bool = False,
) -> dict[str, Any]:
    """Send every image not finished by an earlier run; write the outputs; return the summary."""
    start = time.perf_counter()
    files = find_images(folder)
    paths = output_paths(out)
    journal = Journal(paths["journal"], header)
    finished = {name for name, o in journal.outcomes.items() if o.ok or not (o.transient or retry_failed)}
    pending = [name for name in files if name not in finished]
    stop = Stop()
    failed_now = retried = 0

    def task(name: str) -> Outcome | None:
        outcome = process(folder, name, send, retries, backoff, stop)
        if outcome is not None:
            journal.record(outcome)  # here, not in the loop below: a crash then loses no finished image
        return outcome

    pool = ThreadPoolExecutor(max(1, concurrency))
    queue, in_flight = iter(pending), set()
    try:
        with tqdm(total=len(files), initial=len(files) - len(pending), unit="img", disable=None) as bar:
            while True:
                # A few images per thread in the pool at a time, not a future for each of a million images.
                for name in itertools.islice(queue, 2 * max(1, concurrency) - len(in_flight)):
                    in_flight.add(pool.submit(task, name))
                if not in_flight:
                    break
                done, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in done:
                    outcome = future.result()
                    if outcome is not None:
                        failed_now += not outcome.ok
                        retried += outcome.attempts - 1
                    bar.update()
                bar.set_postfix(failed=failed_now, refresh=False)
    except KeyboardInterrupt:
        stop.reason = "interrupted"
        raise
    finally:  # whatever finished is in the journal and goes into the outputs
        pool.shutdown(wait=True, cancel_futures=True)
        succeeded, failed, detections = write_outputs(paths, files, journal.outcomes, stop.reason or "interrupted")
    elapsed = time.perf_counter() - start
    summary = {
        **header,
        "images": succeeded + failed,
        "succeeded": succeeded,
        "failed": failed,
        "detections": detections,
        "skipped_finished_earlier": len(files) - len(pending),
        "sent_this_run": len(pending),
        "failed_this_run": failed_now,
        "retries_this_run": retried,
        "stopped": stop.reason,
        "elapsed_s": round(elapsed, 2),
        "images_per_s": round(len(pending) / elapsed, 3) if elapsed > 0 else None,
        "files": {kind: str(path) for kind, path in paths.items()},
    }
    write_json_atomically(paths["summary"], summary)
    return summary
